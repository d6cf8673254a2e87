"""bioimage.io packages: export, import, the spec's test tensors, tiling and safety."""

import hashlib
import io
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from conftest import REAL_PACKAGE, needs_real_package, tiny_model
from napari_unet.cli import main
from napari_unet.core import normalize as norm
from napari_unet.core.tile_plan import tiling_geometry
from napari_unet.core.tiling import predict
from napari_unet.io import ModelFileError, load_model, save_model
from napari_unet.io.bioimageio import (
    PackageNet,
    export_package,
    is_package,
    load_package,
    run_test_tensors,
)

REAL, needs_real = REAL_PACKAGE, needs_real_package


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread avoids oversubscribing a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Packages exported from the tiny valid- and same-padding U-Nets (made once)."""
    out = tmp_path_factory.mktemp("bioimageio")
    return {p: export_package(tiny_model(p), out / f"tiny_{p}.zip") for p in ("valid", "same")}


def _rehash(node, content):
    if isinstance(node, dict):
        if node.get("source") in content and "sha256" in node:
            node["sha256"] = hashlib.sha256(content[node["source"]]).hexdigest()
        for value in node.values():
            _rehash(value, content)
    elif isinstance(node, list):
        for value in node:
            _rehash(value, content)


def repack(src, dst, edit=None, files=None, drop=(), rehash=True):
    """Copy a package zip, editing its RDF and files (hashes updated unless told not to)."""
    with zipfile.ZipFile(src) as zf:
        content = {n: zf.read(n) for n in zf.namelist() if n not in drop}
    content.update(files or {})
    rdf = yaml.safe_load(content["bioimageio.yaml"])
    if edit is not None:
        edit(rdf)
    if rehash:
        _rehash(rdf, content)
    content["bioimageio.yaml"] = yaml.safe_dump(rdf, sort_keys=False).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return dst


def image(h=97, w=83, seed=0):
    return np.random.default_rng(seed).random((h, w), dtype=np.float32) * 100


# ---------------------------------------------------------------- export and round trip


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_round_trip_predicts_like_the_original(exported, padding):
    model = tiny_model(padding)
    loaded = load_package(exported[padding])
    info, g = loaded.info, model.info.geometry
    assert isinstance(loaded.net, PackageNet)
    assert (info.format, info.classes, info.in_channels) == ("bioimageio", model.info.classes, 1)
    assert info.activation == "softmax" and info.fixed_input is None
    # the model's own (the package's scale_range with the eps the spec needs agrees)
    assert info.normalization == {"mode": "percentile", "low": 1.0, "high": 99.8}
    # the halo as declared: the context napari-unet's tiles read (24 px for 22 here)
    assert (info.geometry.multiple, info.geometry.shrink, info.geometry.halo) == (
        g.multiple,
        g.shrink,
        tiling_geometry(g).halo,
    )
    assert info.provenance["weights"] == "torchscript (weights_torchscript.pt)"
    ours = predict(image(), model, device="cpu")
    np.testing.assert_allclose(predict(image(), loaded, device="cpu"), ours, rtol=0, atol=1e-5)
    assert run_test_tensors(loaded) < 1e-4


def test_state_dict_weights_run_package_code_only_when_trusted(exported):
    with pytest.raises(ModelFileError, match="trust_code=True"):
        load_package(exported["same"], weights_format="pytorch_state_dict")
    loaded = load_package(exported["same"], weights_format="pytorch_state_dict", trust_code=True)
    assert loaded.info.provenance["weights"].startswith("pytorch_state_dict")
    assert run_test_tensors(loaded) < 1e-4
    ours = predict(image(), tiny_model("same"), device="cpu")
    np.testing.assert_allclose(predict(image(), loaded, device="cpu"), ours, rtol=0, atol=1e-5)
    # its feature maps are the network's stages (the wrapper offered 'core', 'pre', 'post')
    from napari_unet.core.features import capture, inspectable, stage_names

    trusted = load_package(exported["same"], trust_code=True)  # (TorchScript was taken)
    assert trusted.info.provenance["weights"].startswith("pytorch_state_dict")
    assert inspectable(trusted.net) and not inspectable(load_package(exported["same"]).net)

    assert stage_names(loaded.net) == stage_names(tiny_model("same").net)
    theirs, mine = capture(image(), loaded), capture(image(), tiny_model("same"))
    for stage, fm in mine.items():
        assert theirs[stage].origin == fm.origin and theirs[stage].scale == fm.scale
        np.testing.assert_allclose(theirs[stage].data, fm.data, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_a_package_s_halo_pads_its_input_to_a_size_it_takes(tmp_path, depth):
    """bioimage.io tools pad the input by the halo on each side: nuclei's 94 px on a 16-px
    grid gave 388 x 388 predictions of 400 x 400 inputs in bioimageio.core, and tiles
    that differed by 0.34 (found by validating the export)."""
    model = tiny_model("same", depth=depth)
    g = model.info.geometry
    path = export_package(model, tmp_path / f"d{depth}.zip")
    with zipfile.ZipFile(path) as zf:
        rdf = yaml.safe_load(zf.read("bioimageio.yaml"))
    y_in, y_out = rdf["inputs"][0]["axes"][2], rdf["outputs"][0]["axes"][2]
    halo, step, least = y_out["halo"], y_in["size"]["step"], y_in["size"]["min"]
    assert step == g.multiple and halo >= g.halo and (2 * halo) % step == 0
    # the context napari-unet's tiles read, on the pooling grid (depth 2: 24 px, where
    # half a step, 22 px, put a runner's image 2 px off the grid; found by review)
    assert halo % step == 0 and halo == tiling_geometry(g).halo
    assert least > 2 * halo and least % step == g.min_input % step
    assert load_package(path).info.geometry.halo == halo  # the larger is used


@pytest.mark.parametrize(
    ("normalization", "message"),
    [
        ({"mode": "percentile", "low": 0.1, "high": 1.0}, "top percentile above 1"),
        ({"mode": "zscore", "eps": 0.5}, "takes 0 to 0.1"),
    ],
)
def test_normalisations_a_package_cannot_hold_are_refused_at_export(
    tmp_path, normalization, message
):
    """They were written, and the zoo's validator refused them (found by validating)."""
    model = tiny_model("same")
    model.info.normalization = normalization
    with pytest.raises(ValueError, match=message):
        export_package(model, tmp_path / "n.zip")
    assert not (tmp_path / "n.zip").exists()


def test_exported_package_contents(exported):
    with zipfile.ZipFile(exported["same"]) as zf:
        names = set(zf.namelist())
        # unpacked, every file is a regular file others can read (they were 0600)
        assert {i.external_attr >> 16 for i in zf.infolist()} == {0o100644}
        rdf = yaml.safe_load(zf.read("bioimageio.yaml"))
        cover = zf.read("cover.png")
        arch = zf.read("unet_architecture.py").decode()
        readme = zf.read("README.md").decode()
    assert {"README.md", "test_input.npy", "test_output.npy", "weights_torchscript.pt"} <= names
    # images a viewer opens, which the zoo's validator asks for ("for FAIR compliance")
    assert rdf["inputs"][0]["sample_tensor"]["source"] == "sample_input.tif"
    assert rdf["outputs"][0]["sample_tensor"]["source"] == "sample_output.tif"
    with zipfile.ZipFile(exported["same"]) as zf:
        test_in = np.load(io.BytesIO(zf.read("test_input.npy")))
        sample = tifffile.imread(io.BytesIO(zf.read("sample_input.tif")))
    np.testing.assert_array_equal(sample, test_in[0])  # (channels, y, x)
    assert "input sizes: 52 + k*4 px" in readme  # as the description declares (not 16)
    assert rdf["format_version"] == "0.5.5" and cover.startswith(b"\x89PNG")
    assert rdf["cite"][0]["doi"] == "10.1007/978-3-319-24574-4_28"
    assert rdf["license"] == "CC-BY-4.0" and len(rdf["name"]) >= 5
    y = rdf["inputs"][0]["axes"][2]
    assert y["size"] == {"min": 52, "step": 4}
    assert rdf["outputs"][0]["axes"][2]["halo"] == 24  # the context on the 4-px grid
    assert [p["id"] for p in rdf["outputs"][0]["postprocessing"]] == ["softmax", "ensure_dtype"]
    assert "from napari_unet" not in arch and "import napari_unet" not in arch


def test_export_takes_the_licence_and_citations_the_weights_record(tmp_path):
    """The weights' own licence (kept through fine-tuning) and data citations go into
    the package; terms without an SPDX identifier need one chosen by the user."""
    model = tiny_model("same")
    data_paper = {"text": "Someone et al. The data. 2021.", "doi": "10.1000/data"}
    model.info.provenance.update(license="BSD-3-Clause", cite=[data_paper])
    with zipfile.ZipFile(export_package(model, tmp_path / "own.zip")) as zf:
        rdf = yaml.safe_load(zf.read("bioimageio.yaml"))
    assert rdf["license"] == "BSD-3-Clause"
    assert [c["doi"] for c in rdf["cite"]] == ["10.1007/978-3-319-24574-4_28", "10.1000/data"]
    model.info.provenance["license"] = "non-commercial research only"
    with pytest.raises(ModelFileError, match="no SPDX identifier: save it as a .safetensors"):
        export_package(model, tmp_path / "nc.zip")
    assert not (tmp_path / "nc.zip").exists()
    export_package(model, tmp_path / "nc.zip", license="CC-BY-NC-4.0")
    with zipfile.ZipFile(tmp_path / "nc.zip") as zf:
        assert yaml.safe_load(zf.read("bioimageio.yaml"))["license"] == "CC-BY-NC-4.0"


def test_how_a_model_was_made_survives_export(tmp_path):
    """A package's card said nothing of the base model, data, steps or settings of the
    model it was exported from (all of it was in the .safetensors card)."""
    model = tiny_model("same")
    made = {"base_model": "nuclei (nuclei.safetensors)", "lineage": "nuclei (nuclei.safetensors)",
            "training_data": "img0.tif, img1.tif", "steps": 91, "seed": 0,
            "train_config": {"lr": 0.001, "batch_size": 4}}  # fmt: skip
    model.info.provenance.update(made, model_card="nuclei.md beside the weights file")
    package = load_package(export_package(model, tmp_path / "ft.zip"))
    assert {k: package.info.provenance.get(k) for k in made} == made
    assert "model_card" not in package.info.provenance  # (no such file beside a package)
    assert package.info.provenance["weights"].startswith("torchscript")  # the package's own
    card = package.info.card()
    assert "base_model:    nuclei (nuclei.safetensors)" in card and "steps:         91" in card


def test_export_refuses_licences_bioimageio_refuses(tmp_path):
    """'notalicense' and 'mit' were written, into packages bioimage.io calls invalid."""
    pytest.importorskip("bioimageio.spec")  # (its SPDX list; without it, the form only)
    model = tiny_model("same")
    with pytest.raises(ModelFileError, match="'notalicense' is not an SPDX"):
        export_package(model, tmp_path / "a.zip", license="notalicense")
    with pytest.raises(ModelFileError, match="did you mean MIT"):
        export_package(model, tmp_path / "b.zip", license="mit")
    with pytest.raises(ModelFileError, match="the licence given is empty"):
        export_package(model, tmp_path / "c.zip", license=" ")
    assert not list(tmp_path.iterdir())


def test_export_refuses_other_networks_and_names(tmp_path, exported):
    with pytest.raises(ModelFileError, match="only napari-unet U-Nets"):
        export_package(load_package(exported["same"]), tmp_path / "again.zip")
    with pytest.raises(ModelFileError, match=r"\.zip"):
        export_package(tiny_model("same"), tmp_path / "model.safetensors")
    rgb = np.zeros((8, 16, 3), np.uint8)
    out = export_package(tiny_model("same"), tmp_path / "cover.zip", cover=rgb, license="MIT")
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    with zipfile.ZipFile(out) as zf:
        assert yaml.safe_load(zf.read("bioimageio.yaml"))["license"] == "MIT"
    with pytest.raises(ModelFileError, match="not an SPDX licence identifier"):
        export_package(tiny_model("same"), tmp_path / "l.zip", license="not a licence")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png\n")
    for name in ("empty.png", "text.png"):  # one line, no advice on imageio's plugins
        with pytest.raises(ModelFileError, match="not a readable cover image") as err:
            export_package(tiny_model("same"), tmp_path / "c.zip", cover=tmp_path / name)
        assert "\n" not in str(err.value) and "pip install" not in str(err.value)
    from PIL import Image

    Image.fromarray(np.full((6, 9, 3), 200, np.uint8)).save(tmp_path / "mine.png")
    out = export_package(tiny_model("same"), tmp_path / "p.zip", cover=tmp_path / "mine.png")
    with zipfile.ZipFile(out) as zf:  # a readable cover goes in as it is
        assert zf.read("cover.png") == (tmp_path / "mine.png").read_bytes()
    assert not (tmp_path / "l.zip").exists() and not (tmp_path / "c.zip").exists()


def test_fixed_normalisation_and_metrics_survive_export_and_group_norm_is_refused(tmp_path):
    """A 'fixed' normalisation is exported as scale_linear: the test output must include
    it (the package failed its own test by 1), and the metrics come back on import."""
    from napari_unet.model.info import wrap_unet
    from napari_unet.model.unet import UNet, UNetConfig

    model = tiny_model("same", normalization={"mode": "fixed", "offset": 10.0, "scale": 50.0})
    model.info.metrics = {"f1@0.5": 0.9}
    out = export_package(model, tmp_path / "fixed.zip")
    back = load_package(out)
    assert run_test_tensors(back) <= 1e-4
    assert back.info.metrics == {"f1@0.5": 0.9}
    x = image()
    np.testing.assert_allclose(
        predict(x, back, device="cpu"), predict(x, model, device="cpu"), atol=1e-4
    )
    gn = wrap_unet(
        UNet(
            UNetConfig(
                in_channels=1, num_classes=2, depth=2, base_width=8, padding="same", norm="group"
            )
        )
    )
    with pytest.raises(ModelFileError, match="group normalisation .* save it as a .safetensors"):
        export_package(gn, tmp_path / "gn.zip")
    assert not (tmp_path / "gn.zip").exists()


def test_exported_packages_validate_with_bioimageio_spec(exported, no_network):
    spec = pytest.importorskip("bioimageio.spec")
    for path in exported.values():
        summary = spec.load_description(path, perform_io_checks=True).validation_summary
        assert summary.status in ("valid-format", "passed"), summary.format()


# ---------------------------------------------------------------- tiling


def test_exported_package_tiles_seamlessly(exported):
    loaded = load_package(exported["same"])
    big = image(700, 650, seed=3)
    tiled = predict(big, loaded, tile=96, device="cpu")
    whole = predict(big, loaded, tile=4096, device="cpu")
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- other layouts and formats


class _ChannelLast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2))


def _write_package(folder: Path, rdf: dict, files: dict) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _script_bytes(net, example):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(net.eval(), example), buf)
    return buf.getvalue()


def test_v05_channel_last_package_with_pointwise_steps(tmp_path):
    net = _ChannelLast()
    x = np.random.default_rng(0).random((1, 24, 32, 2), dtype=np.float32) * 10
    mean, std = np.array([1.0, 2.0]), np.array([2.0, 3.0])
    with torch.no_grad():
        logits = net(torch.from_numpy(((x - mean) / (std + 1e-6)).astype(np.float32))).numpy()
    expected = (np.clip(logits, -1, 1) > 0.2).astype(np.float32)
    size = {"min": 16, "step": 8}
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "channel last",
        "description": "t",
        "authors": [{"name": "A"}],
        "cite": [{"text": "c", "doi": "10.1/x"}],
        "license": "MIT",
        "inputs": [
            {
                "id": "in",
                "axes": [
                    {"type": "batch"},
                    {"type": "space", "id": "y", "size": size},
                    {"type": "space", "id": "x", "size": size},
                    {"type": "channel", "channel_names": ["r", "g"]},
                ],
                "test_tensor": {"source": "x.npy"},
                "preprocessing": [
                    {
                        "id": "fixed_zero_mean_unit_variance",
                        "kwargs": {"axis": "channel", "mean": mean.tolist(), "std": std.tolist()},
                    }
                ],
            }
        ],
        "outputs": [
            {
                "id": "out",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["a", "b"]},
                    {"type": "space", "id": "y", "size": {"tensor_id": "in", "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": "in", "axis_id": "x"}},
                ],
                "test_tensor": {"source": "y.npy"},
                "postprocessing": [
                    {"id": "clip", "kwargs": {"min": -1, "max": 1}},
                    {"id": "binarize", "kwargs": {"threshold": 0.2}},
                ],
            }
        ],
        "weights": {"torchscript": {"source": "w.pt", "pytorch_version": "2.0"}},
    }
    files = {"x.npy": _npy_bytes(x), "y.npy": _npy_bytes(expected)}
    files["w.pt"] = _script_bytes(net, torch.zeros(1, 16, 16, 2))
    loaded = load_package(_write_package(tmp_path / "pkg", rdf, files))
    info = loaded.info
    assert (info.classes, info.in_channels, info.activation) == (["a", "b"], 2, "none")
    assert info.normalization == {"mode": "none"} and info.geometry.halo >= 1
    assert run_test_tensors(loaded) <= 1e-4
    tiled = predict(x[0], loaded, axes="YXC", tile=16, device="cpu")
    np.testing.assert_array_equal(tiled, predict(x[0], loaded, axes="YXC", device="cpu"))
    inner = (slice(None), slice(1, -1), slice(1, -1))  # the engine mirrors, the spec zero-pads
    np.testing.assert_array_equal(tiled[inner], expected[0][inner])


def test_v04_package_with_statistical_and_pointwise_steps(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = np.random.default_rng(1).random((1, 1, 40, 48), dtype=np.float32) * 50
    lo, hi = np.percentile(x, [1, 99])
    pre = np.clip((x - lo) / (hi - lo + 1e-6), 0, 1).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(pre)).numpy()
    expected = 1 / (1 + np.exp(-(2 * logits + 0.5)))
    rdf = {
        "format_version": "0.4.10",
        "type": "model",
        "name": "old format",
        "license": "MIT",
        "authors": [{"name": "B"}],
        "cite": [{"text": "c", "url": "https://example.com"}],
        "test_inputs": ["x.npy"],
        "test_outputs": ["y.npy"],
        "inputs": [
            {
                "name": "raw",
                "axes": "bcyx",
                "data_type": "float32",
                "shape": {"min": [1, 1, 16, 16], "step": [0, 0, 8, 8]},
                "preprocessing": [
                    {
                        "name": "scale_range",
                        "kwargs": {
                            "mode": "per_sample",
                            "axes": "xy",
                            "min_percentile": 1,
                            "max_percentile": 99,
                        },
                    },
                    {"name": "clip", "kwargs": {"min": 0, "max": 1}},
                ],
            }
        ],
        "outputs": [
            {
                "name": "prob",
                "axes": "bcyx",
                "data_type": "float32",
                "halo": [0, 0, 4, 4],
                "shape": {
                    "reference_tensor": "raw",
                    "scale": [1, 1, 1, 1],
                    "offset": [0, 0, 0, 0],
                },
                "postprocessing": [
                    {"name": "scale_linear", "kwargs": {"gain": 2, "offset": 0.5, "axes": "xy"}},
                    {"name": "sigmoid"},
                ],
            }
        ],
        "weights": {"torchscript": {"source": "w.pt", "sha256": None}},
    }
    files = {"x.npy": _npy_bytes(x), "y.npy": _npy_bytes(expected)}
    files["w.pt"] = _script_bytes(net, torch.zeros(1, 1, 16, 16))
    rdf["weights"]["torchscript"]["sha256"] = hashlib.sha256(files["w.pt"]).hexdigest()
    loaded = load_package(_write_package(tmp_path / "pkg", rdf, files) / "rdf.yaml")
    info = loaded.info
    assert info.normalization == {"mode": "percentile", "low": 1.0, "high": 99.0, "eps": 1e-6}
    assert (info.activation, info.classes, info.geometry.halo) == ("sigmoid", ["prob"], 4)
    assert info.geometry.multiple == 8 and info.provenance["bioimageio"] == "format 0.4.10"
    assert run_test_tensors(loaded) < 1e-5
    tiled = predict(x[0, 0], loaded, tile=24, device="cpu")
    np.testing.assert_allclose(tiled, predict(x[0, 0], loaded, tile=512, device="cpu"), atol=1e-6)


def test_joint_and_eps_normalisation_specs():
    sample = np.array([[0.0, 2.0, 4.0], [10.0, 12.0, 14.0]])
    scale, offset = norm.plane_stats(sample, {"mode": "zscore", "eps": 0.5, "joint": True})
    joint = np.concatenate(sample)
    np.testing.assert_allclose(scale, 1 / (joint.std() + 0.5))
    np.testing.assert_allclose(offset, -joint.mean() / (joint.std() + 0.5))
    scale, _ = norm.plane_stats(sample, {"mode": "percentile", "low": 0, "high": 100})
    np.testing.assert_allclose(scale, [0.25, 0.25])  # unchanged without the new keys


# ---------------------------------------------------------------- integrity and safety


def test_sha256_mismatch_names_the_file(tmp_path, exported):
    bad = repack(
        exported["same"], tmp_path / "bad.zip", files={"test_input.npy": b"x"}, rehash=False
    )
    with pytest.raises(ModelFileError, match=r"test_input\.npy: sha256"):
        load_package(bad)
    folder = tmp_path / "folder"
    with zipfile.ZipFile(exported["same"]) as zf:
        zf.extractall(folder)
    assert load_package(folder).info.format == "bioimageio"
    (folder / "weights_torchscript.pt").write_bytes(b"tampered")
    with pytest.raises(ModelFileError, match=r"weights_torchscript\.pt: sha256"):
        load_package(folder / "bioimageio.yaml")


def test_a_package_whose_torchscript_writes_files_is_refused(tmp_path, exported):
    """Its weights ran their code without --trust-code (found by review)."""

    class Writes(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def forward(self, x):
            t = torch.from_file(self.path, shared=True, size=4)
            return x + t[0] * 0.0

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Writes(str(tmp_path / "victim"))), buf)
    bad = repack(
        exported["same"], tmp_path / "bad.zip", files={"weights_torchscript.pt": buf.getvalue()}
    )
    with pytest.raises(ModelFileError, match=r"weights_torchscript\.pt: refused: .*from_file"):
        load_package(bad)
    assert not (tmp_path / "victim").exists()


def test_corrupt_and_oversized_zip_members_are_model_file_errors(tmp_path, exported, monkeypatch):
    import napari_unet.io.bioimageio._files as files_mod

    # one byte of the stored (deflated) weights flipped: a CRC error, not a traceback
    data = bytearray(Path(exported["same"]).read_bytes())
    with zipfile.ZipFile(exported["same"]) as zf:
        info = zf.getinfo("weights_torchscript.pt")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"crc\.zip: weights_torchscript\.pt is corrupt"):
        load_package(tmp_path / "crc.zip")
    # a member that unpacks to more than may be read is refused before it is read; its
    # sha256 is taken in chunks
    monkeypatch.setattr(files_mod, "MAX_READ", 1000)
    with pytest.raises(ModelFileError, match=r"more than a package file may hold"):
        load_package(exported["same"])


def test_unsafe_paths_are_refused(tmp_path, exported):
    for member in ("../evil.txt", "/etc/evil.txt"):
        path = tmp_path / "evil.zip"
        with zipfile.ZipFile(exported["same"]) as src, zipfile.ZipFile(path, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, src.read(name))
            dst.writestr(member, b"x")
        with pytest.raises(ModelFileError, match="unsafe member"):
            load_package(path)
        # still a package (it has a description): load_model says why it is refused,
        # not "not a model file this plugin reads"
        assert is_package(path)
        with pytest.raises(ModelFileError, match="unsafe member"):
            load_model(path)

    def outside(rdf):
        rdf["weights"]["torchscript"]["source"] = "../w.pt"

    folder = tmp_path / "pkg"
    with zipfile.ZipFile(repack(exported["same"], tmp_path / "o.zip", outside)) as zf:
        zf.extractall(folder)
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"'\.\.'"):
        load_package(folder)


def test_architecture_code_never_runs_without_trust(tmp_path, exported):
    marker = tmp_path / "ran"
    with zipfile.ZipFile(exported["same"]) as zf:
        code = zf.read("unet_architecture.py") + f"\nopen({str(marker)!r}, 'w').close()\n".encode()

    def state_dict_only(rdf):
        del rdf["weights"]["torchscript"]

    path = repack(
        exported["same"],
        tmp_path / "sd.zip",
        state_dict_only,
        files={"unet_architecture.py": code},
        drop=("weights_torchscript.pt",),
    )
    with pytest.raises(ModelFileError, match="trust"):
        load_package(path)
    assert not marker.exists()
    assert run_test_tensors(path, trust_code=True) < 1e-4
    assert marker.exists()


def test_remote_weights_are_never_downloaded(tmp_path, exported, no_network):
    def remote(rdf):
        rdf["weights"]["torchscript"]["source"] = "https://example.com/remote_weights.pt"

    path = repack(exported["same"], tmp_path / "remote.zip", remote)
    with pytest.raises(ModelFileError, match=r"remote_weights\.pt .*downloads nothing"):
        load_package(path, weights_format="torchscript")
    with pytest.raises(ModelFileError, match=r"remote_weights\.pt .*trust_code=True"):
        load_package(path)  # both usable formats are explained
    loaded = load_package(path, trust_code=True)  # falls back to the local state dict
    assert loaded.info.provenance["weights"].startswith("pytorch_state_dict")


def test_missing_onnxruntime_is_a_clear_error(tmp_path, exported, monkeypatch):
    def onnx_only(rdf):
        rdf["weights"] = {"onnx": {"source": "w.onnx", "sha256": "", "opset_version": 17}}

    path = repack(exported["same"], tmp_path / "onnx.zip", onnx_only, files={"w.onnx": b"x"})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelFileError, match="pip install onnxruntime"):
        load_package(path)


# ---------------------------------------------------------------- load_model and CLI


def test_load_model_and_cli_handle_packages(tmp_path, capsys):
    src = save_model(tiny_model("valid"), tmp_path / "tiny.safetensors")
    out = tmp_path / "pkg.zip"
    assert main(["export", str(src), "--bioimageio", str(out), "--author", "Ada"]) == 0
    assert main(["info", str(out)]) == 0
    card = capsys.readouterr().out
    assert "format:        bioimageio" in card and "authors:       Ada" in card
    assert "10.1007/978-3-319-24574-4_28" in card
    assert load_model(out).info.format == "bioimageio"
    assert main(["export", str(out), "--bioimageio", str(tmp_path / "x.zip")]) == 1


def test_round_trip_keeps_dim_images(exported):
    """The export's eps must not change images whose intensities span ~1e-5 (the
    engine divides by the spread itself; the spec's default eps 1e-6 changed them)."""
    model, loaded = tiny_model("same"), load_package(exported["same"])
    dim = image() * 1e-7
    np.testing.assert_allclose(
        predict(dim, loaded, device="cpu"), predict(dim, model, device="cpu"), atol=1e-5
    )


def test_round_trip_keeps_sparse_images(exported):
    """A dark field with a few bright nuclei: its percentiles coincide, and the export's
    eps (the spec needs one) turned off the model's rule for them (21 nuclei found by
    the package, 2 by the model file)."""
    model, loaded = tiny_model("same"), load_package(exported["same"])
    sparse = np.zeros((64, 64), np.uint16)
    sparse[30:32, 20:22] = 800  # 0.1 % of the pixels: under the 99.8th percentile
    np.testing.assert_allclose(
        predict(sparse, loaded, device="cpu"), predict(sparse, model, device="cpu"), atol=1e-5
    )
    # the network sees the nuclei at 1, as the model file shows them (not at 8e14)
    scale, offset = norm.plane_stats(sparse.reshape(1, -1), loaded.info.normalization)
    assert scale == pytest.approx([1 / 800]) and offset == pytest.approx([0])


@pytest.mark.parametrize("used", [False, True])
def test_nested_yaml_aliases_are_refused_before_they_are_expanded(tmp_path, exported, used):
    """A few hundred bytes of nested aliases describe 10**12 entries: walking every path
    took hours, and turning the authors into text (a used bomb) gigabytes. The expanded
    size is counted, each node once, and the description refused."""
    with zipfile.ZipFile(exported["same"]) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    rdf = yaml.safe_load(content["bioimageio.yaml"])
    if used:
        del rdf["authors"]  # given below as the bomb
    rdf = yaml.safe_dump(rdf, sort_keys=False)
    text = rdf + "\nx_bomb:\n" + "\n".join("  " + line for line in levels)
    if used:
        text += "\nauthors: *a11\n"
    content["bioimageio.yaml"] = text.encode()
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    with pytest.raises(
        ModelFileError, match="holds more than 100,000 entries \\(its YAML aliases"
    ):
        load_package(tmp_path / "bomb.zip")


def test_an_oversized_description_is_refused_unread(tmp_path, exported):
    from napari_unet.io.bioimageio import _files

    with zipfile.ZipFile(exported["same"]) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    content["bioimageio.yaml"] += b"\n# " + b"x" * (_files.MAX_RDF + 1)
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    with pytest.raises(ModelFileError, match="bioimageio.yaml: .* unpacked, more than"):
        load_package(tmp_path / "big.zip")


@pytest.mark.parametrize(
    "processing",
    [
        {"id": "scale_linear", "kwargs": {"gain": "two"}},
        {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": "tiny"}},
    ],
)
def test_processing_values_of_the_wrong_kind_are_one_line(tmp_path, exported, processing):
    """A gain "two" ended the CLI in a traceback and the panel in a bare "Error: new():
    invalid data type 'str'"; an eps "tiny" named neither the file nor the value."""
    bad = repack(
        exported["same"],
        tmp_path / "bad.zip",
        lambda r: r["inputs"][0].update(preprocessing=[processing]),
    )
    with pytest.raises(ModelFileError, match="bad.zip: "):
        load_model(bad)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["outputs"][0]["axes"][2].update(halo=100000), "a halo of 100000"),
        (
            lambda r: r["inputs"][0]["axes"][2]["size"].update(min=10**9),
            "a smallest input size of",
        ),
        # a step of 2048 took 14 GB to measure; coprime steps near 1e6 searched for hours
        (lambda r: r["inputs"][0]["axes"][2]["size"].update(step=2048), "an input size step"),
        (
            lambda r: (
                r["inputs"][0]["axes"][2]["size"].update(min=1, step=999983),
                r["inputs"][0]["axes"][3]["size"].update(min=2, step=1000003),
            ),
            "an input size step of 999983",
        ),
    ],
)
def test_declared_sizes_are_bounded_before_they_size_an_array(tmp_path, exported, edit, match):
    bad = repack(exported["same"], tmp_path / "bad.zip", edit)
    with pytest.raises(ModelFileError, match=f"the package declares {match}"):
        load_package(bad)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["inputs"][0]["axes"][2]["size"].update(step=0), "step 0: both must be"),
        (lambda r: r["inputs"][0]["axes"][2]["size"].update(step=-8), "step -8: both must be"),
        (lambda r: r.update(config=["x"]), "'config'.*must be a mapping"),
        (lambda r: r.update(config={"napari_unet": ["x"]}), "'config'.*must be a mapping"),
        (
            lambda r: r.update(config={"napari_unet": {"object_diameter": "big"}}),
            "'object_diameter' must be a positive number",
        ),
        (
            lambda r: r.update(config={"napari_unet": {"provenance": ["steps", 5]}}),
            "'config.napari_unet.provenance' must be a mapping",
        ),
    ],
)
def test_malformed_description_fields_are_model_file_errors(tmp_path, exported, edit, match):
    bad = repack(exported["same"], tmp_path / "bad.zip", edit)
    with pytest.raises(ModelFileError, match=f"bioimageio.yaml: .*{match}"):
        load_package(bad)


def test_declared_sizes_the_network_does_not_take_are_refused_at_load(tmp_path, exported):
    """A package declaring min 34, step 2 for a network that takes multiples of 4 loaded,
    then failed on the first tile of every image."""

    def edit(rdf):
        for axis in rdf["inputs"][0]["axes"][2:]:
            axis["size"].update(min=34, step=2)

    bad = repack(exported["same"], tmp_path / "bad.zip", edit)
    with pytest.raises(
        ModelFileError,
        match=r"bad.zip: the network returned an array of "
        r"shape \(1, 3, 32, 32\) for input \(1, 1, 34, 34\).*declares",
    ):
        load_model(bad)
    assert load_model(exported["same"]).info.geometry.multiple == 4  # as declared: loads

    def fewer_classes(rdf):  # (the sizes are right: they are not blamed)
        rdf["outputs"][0]["axes"][1]["channel_names"] = ["a", "b"]

    with pytest.raises(ModelFileError, match=r"says \(1, 2, 52, 52\): a broken model file$"):
        load_model(repack(exported["same"], tmp_path / "two.zip", fewer_classes))


def test_a_package_declaring_inputs_its_network_refuses_says_so(tmp_path, exported):
    """A torch error alone (\"Given groups=1, weight of size ...\") read as napari-unet's
    fault (found by review)."""

    def three_channels(rdf):
        rdf["inputs"][0]["axes"][1]["channel_names"] = ["r", "g", "b"]

    with pytest.raises(
        ModelFileError, match=r"three\.zip: the network fails on inputs .*\(3 channel"
    ):
        load_model(repack(exported["same"], tmp_path / "three.zip", three_channels))


def test_a_package_s_training_data_is_on_the_card(tmp_path, exported):
    """The zoo's unet2d_nuclei_broad names its data set; the card said nothing of it."""

    def named(rdf):
        rdf["training_data"] = {"id": "ilastik/covid_if_training_data/1"}

    loaded = load_model(repack(exported["same"], tmp_path / "data.zip", named))
    assert loaded.info.provenance["training_data"] == (
        "bioimage.io dataset ilastik/covid_if_training_data/1"
    )
    # a data set described inline (format 0.4): its name and source, not a dict

    def inline(rdf):
        rdf["training_data"] = {"name": "my nuclei", "source": "https://example.org/d.zip"}

    loaded = load_model(repack(exported["same"], tmp_path / "inline.zip", inline))
    assert loaded.info.provenance["training_data"] == "my nuclei - https://example.org/d.zip"
    # a package napari-unet exported keeps its own record of the data
    own = load_model(exported["same"]).info.provenance.get("training_data")
    assert own == tiny_model("same").info.provenance.get("training_data")


def test_a_single_citation_or_author_need_not_be_a_list(tmp_path, exported):
    def single(rdf):
        rdf["cite"] = {"text": "One paper", "doi": "10.1/x"}
        rdf["authors"] = {"name": "Ada"}

    info = load_package(repack(exported["same"], tmp_path / "one.zip", single)).info
    assert info.provenance["cite"] == [{"text": "One paper", "doi": "10.1/x"}]
    assert "cite:          One paper (10.1/x)" in info.card()
    assert info.provenance["authors"] == "Ada"


def test_zip_and_folder_read_the_same_description(tmp_path, exported):
    """With both bioimageio.yaml and rdf.yaml, both forms read bioimageio.yaml, whatever
    the order of the zip's members."""
    with zipfile.ZipFile(exported["same"]) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    other = yaml.safe_load(content["bioimageio.yaml"])
    other["name"] = "the rdf.yaml copy"
    first = {"rdf.yaml": yaml.safe_dump(other).encode(), **content}
    with zipfile.ZipFile(tmp_path / "both.zip", "w") as zf:
        for name, data in first.items():
            zf.writestr(name, data)
    folder = tmp_path / "both"
    with zipfile.ZipFile(tmp_path / "both.zip") as zf:
        zf.extractall(folder)
    names = {load_package(p).info.name for p in (tmp_path / "both.zip", folder)}
    assert names == {yaml.safe_load(content["bioimageio.yaml"])["name"]}


# ---------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def real_torchscript():
    return load_package(REAL)


@pytest.fixture(scope="module")
def real_onnx():
    pytest.importorskip("onnxruntime")
    return load_package(REAL, weights_format="onnx")


@needs_real
def test_real_package_torchscript_passes_its_test_tensors(real_torchscript):
    info = real_torchscript.info
    assert info.provenance["weights"] == "torchscript (weights.pt)"
    assert (info.classes, info.activation) == (["probability"], "sigmoid")
    assert info.normalization == {"mode": "zscore", "eps": 1e-6}
    assert info.geometry.halo > 32 and info.geometry.multiple == 8  # declared 32 is too small
    card = info.card()
    for text in ("bioimageio", "Constantin Pape", "MIT", "10.1007/978-3-319-24574-4_28"):
        assert text in card
    assert run_test_tensors(real_torchscript) < 1e-4


@needs_real
def test_real_package_onnx_passes_its_test_tensors(real_onnx):
    assert real_onnx.info.fixed_input == (512, 512)
    assert real_onnx.info.geometry.halo > 32
    assert run_test_tensors(real_onnx) < 1e-4


@needs_real
def test_real_package_tiles_seamlessly(real_torchscript, real_onnx):
    big = np.random.default_rng(5).random((700, 650), dtype=np.float32) * 255
    whole = predict(big, real_torchscript, tile=4096, device="cpu")
    tiled = predict(big, real_torchscript, tile=448, device="cpu")
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-4)
    fixed_tiles = predict(big, real_onnx, device="cpu")  # 512 x 512 tiles
    np.testing.assert_allclose(fixed_tiles, whole, rtol=0, atol=1e-4)


@needs_real
def test_real_remote_state_dict_is_not_downloaded(no_network):
    with pytest.raises(ModelFileError, match=r"unet2d_nuclei_broad_weights\.torch .*downloads"):
        load_package(REAL, weights_format="pytorch_state_dict", trust_code=True)
    # trusted, it loads its TorchScript and says why (trust had seemed to do nothing)
    trusted = load_package(REAL, trust_code=True).info.provenance
    assert trusted["weights"].startswith("torchscript")
    assert "napari-unet downloads nothing: torchscript weights used" in trusted["trust_note"]
    assert "trust_note" not in load_package(REAL).info.provenance


def test_a_zipped_member_that_unpacks_far_beyond_its_size_is_refused_unread(
    tmp_path, exported, monkeypatch
):
    """A 5 MB zip whose weights (no sha256: it is optional) unpacked to 1.9 GiB of zeros
    took 6 GB of memory and 44 s before it was refused."""
    import napari_unet.io.safe_files as files_mod

    monkeypatch.setattr(files_mod, "BOMB_SIZE", 100_000)  # (64 MiB: a test stays small)

    def no_hash(rdf):
        rdf["weights"]["torchscript"].pop("sha256", None)

    plain = repack(exported["same"], tmp_path / "plain.zip", edit=no_hash, rehash=False)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, bytes(1_000_000) if name == "weights_torchscript.pt" else data)
    with pytest.raises(ModelFileError, match=r"weights_torchscript\.pt unpacks to .* zip bomb"):
        load_package(bomb)
    assert load_package(plain).info.num_classes == 3  # weights compress little: read


def test_a_pointwise_step_without_its_settings_is_refused_at_load(tmp_path, exported):
    """It loaded, and every run then failed with a bare KeyError ('threshold')."""

    def add_binarize(rdf):
        rdf["outputs"][0]["postprocessing"].insert(0, {"id": "binarize", "kwargs": {}})

    path = repack(exported["same"], tmp_path / "nothreshold.zip", edit=add_binarize)
    with pytest.raises(ModelFileError, match="step 'binarize' has no threshold"):
        load_package(path)
