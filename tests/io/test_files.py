import copy
import json
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core.tiling import predict
from napari_unet.io import ModelFileError, load_model, registry, save_model
from napari_unet.io.files import TORCHSCRIPT_META


def test_round_trip_keeps_weights_metadata_and_predictions(tmp_path):
    model = tiny_model(
        "valid", pixel_size=[0.65, 0.65], provenance={"data": "synthetic"}, object_diameter=27.5
    )
    model.info.normalization = {"mode": "zscore"}
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.info.classes == ["background", "interior", "boundary"]
    assert loaded.info.normalization == {"mode": "zscore"}
    assert loaded.info.pixel_size == [0.65, 0.65]
    assert loaded.info.object_diameter == 27.5
    assert "27.5 px diameter" in loaded.info.card()
    assert loaded.info.provenance == {"data": "synthetic"}
    assert loaded.info.geometry == model.info.geometry
    assert loaded.info.source == str(path)
    image = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    np.testing.assert_array_equal(predict(image, loaded), predict(image, model))


def test_a_trained_model_saved_under_another_name_is_called_by_it(tmp_path):
    """``save_model(train(load_model("nuclei"), ...), "mine.safetensors")`` kept the name
    "nuclei": results and panels took the fine-tuned file for the bundled model."""
    from napari_unet.core import synthetic
    from napari_unet.core.training import TrainConfig, train

    base = save_model(tiny_model("same", name="cells"), tmp_path / "cells.safetensors")
    image, labels = synthetic.nuclei((48, 48), n=4, seed=0)
    cfg = TrainConfig(steps=1, patch_size=32, batch_size=1, device="cpu")
    trained = train(load_model(base), [image], [labels], "instances", cfg)
    assert trained.info.name == "cells"
    assert load_model(save_model(trained, tmp_path / "mine.safetensors")).info.name == "mine"
    from napari_unet.io.bioimageio import export_package  # (and as a package)

    assert load_model(export_package(trained, tmp_path / "pkg.zip")).info.name == "pkg U-Net"
    named = trained.with_info(name="cells v2")  # a name of its own is kept
    assert load_model(save_model(named, tmp_path / "m2.safetensors")).info.name == "cells v2"
    # an untrained model keeps its name wherever it is saved
    assert load_model(save_model(load_model(base), tmp_path / "c.safetensors")).info.name == (
        "cells"
    )


def test_half_precision_file_loads_as_float32(tmp_path):
    model = tiny_model("same")
    path = save_model(model, tmp_path / "h.safetensors", half=True)
    loaded = load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())
    image = np.random.default_rng(1).random((30, 30), dtype=np.float32)
    np.testing.assert_allclose(predict(image, loaded), predict(image, model), atol=2e-2)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    model = tiny_model("same")
    path = save_model(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model("valid"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bundled_models_are_never_overwritten():
    target = registry.WEIGHTS_DIR / "nuclei.safetensors"
    with pytest.raises(ModelFileError, match="refusing to overwrite the bundled model"):
        save_model(tiny_model("same"), target)


def test_saved_files_are_readable_by_others_as_the_umask_allows(tmp_path, monkeypatch):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)

    def process_wide(mask):  # setting it, even to read it, races with other threads
        raise AssertionError("a save changed the process's umask")

    monkeypatch.setattr(os, "umask", process_wide)
    path = save_model(tiny_model("same"), tmp_path / "m.safetensors")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_truncated_and_corrupt_files(tmp_path):
    path = save_model(tiny_model("same"), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "noise.bin").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelFileError, match="not a model file") as err:
        load_model(tmp_path / "noise.bin")
    assert "bioimage.io package" in str(err.value)  # every kind it reads is named
    with pytest.raises(ModelFileError, match="no model file or bundled model named"):
        load_model(tmp_path / "missing.safetensors")


def test_weights_not_matching_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_model(tiny_model("same", depth=2), tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    info = json.loads(meta["napari_unet"])
    info["architecture"]["depth"] = 3
    save_file(
        tensors, str(tmp_path / "bad.safetensors"), {**meta, "napari_unet": json.dumps(info)}
    )
    with pytest.raises(ModelFileError, match="do not match the architecture"):
        load_model(tmp_path / "bad.safetensors")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_hostile_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="refused for safety"):
        load_model(tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ModelFileError, match="refused for safety"):
            load_model(tmp_path / "evil.pkl")
    assert [str(w.message) for w in shown] == []  # the refusal alone, not torch's advice first
    assert not (tmp_path / "PWNED").exists()


def test_plain_state_dict_needs_an_architecture(tmp_path):
    torch.save(tiny_model("same").net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelFileError, match="without the network's architecture"):
        load_model(tmp_path / "sd.pt")


def test_weights_only_checkpoint_with_metadata_loads(tmp_path):
    model = tiny_model("valid")
    blob = {"state_dict": model.net.state_dict(), "napari_unet": json.dumps(model.info.to_dict())}
    torch.save(blob, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    image = np.random.default_rng(2).random((25, 25), dtype=np.float32)
    np.testing.assert_array_equal(predict(image, loaded), predict(image, model))


def test_torchscript_with_and_without_metadata(tmp_path):
    model = tiny_model("valid", depth=2)
    g = model.info.geometry
    traced = torch.jit.trace(model.net, torch.rand(1, 1, g.min_input, g.min_input))
    extra = {TORCHSCRIPT_META: json.dumps(model.info.to_dict())}
    torch.jit.save(traced, str(tmp_path / "meta.pt"), _extra_files=extra)
    torch.jit.save(traced, str(tmp_path / "bare.pt"))
    image = np.random.default_rng(3).random((70, 45), dtype=np.float32)
    ref = predict(image, model)
    with_meta = load_model(tmp_path / "meta.pt")
    assert with_meta.info.format == "torchscript"
    np.testing.assert_allclose(predict(image, with_meta), ref, atol=1e-6)
    bare = load_model(tmp_path / "bare.pt")  # geometry measured on load
    assert bare.info.geometry.shrink == g.shrink
    assert bare.info.geometry.multiple == g.multiple
    assert bare.info.num_classes == 3 and bare.info.in_channels == 1
    np.testing.assert_allclose(predict(image, bare), ref, atol=1e-6)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_a_torchscript_whose_metadata_understates_the_halo_is_refused(tmp_path, padding):
    """Too small a halo makes tiles show seams (0 for the nuclei network: 0.72 off)."""
    model = tiny_model(padding, depth=2)
    g = model.info.geometry
    traced = torch.jit.trace(model.net, torch.rand(1, 1, g.min_input + 16, g.min_input + 16))
    info = model.info.to_dict()
    torch.jit.save(
        traced, str(tmp_path / "ok.pt"), _extra_files={TORCHSCRIPT_META: json.dumps(info)}
    )
    assert load_model(tmp_path / "ok.pt").info.geometry.halo == g.halo
    info["geometry"]["halo"] = g.halo - 4
    torch.jit.save(
        traced, str(tmp_path / "lie.pt"), _extra_files={TORCHSCRIPT_META: json.dumps(info)}
    )
    with pytest.raises(
        ModelFileError, match=f"lie.pt: its metadata declares a halo of {g.halo - 4} px"
    ):
        load_model(tmp_path / "lie.pt")


@pytest.mark.parametrize("meta", ['{"name": 1}', "not json", "[1, 2]", '{"geometry": 5}'])
def test_bad_metadata_in_any_model_format_is_a_model_file_error(tmp_path, meta):
    from safetensors.torch import save_file

    model = tiny_model("valid", depth=2)
    g = model.info.geometry
    traced = torch.jit.trace(model.net, torch.rand(1, 1, g.min_input, g.min_input))
    torch.jit.save(traced, str(tmp_path / "m.pt"), _extra_files={TORCHSCRIPT_META: meta})
    torch.save({"state_dict": model.net.state_dict(), "napari_unet": meta}, tmp_path / "c.pth")
    state = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), {"napari_unet": meta})
    for name in ("m.pt", "c.pth", "m.safetensors"):
        with pytest.raises(ModelFileError, match=f"{name}: invalid napari-unet metadata"):
            load_model(tmp_path / name)


def test_bare_same_padding_torchscript_gets_a_measured_halo(tmp_path):
    model = tiny_model("same", depth=2)
    traced = torch.jit.trace(model.net, torch.rand(1, 1, 64, 64))
    torch.jit.save(traced, str(tmp_path / "same.pt"))
    bare = load_model(tmp_path / "same.pt")
    assert bare.info.geometry.halo == model.info.geometry.halo
    image = np.random.default_rng(4).random((90, 61), dtype=np.float32)
    np.testing.assert_allclose(predict(image, bare, tile=64), predict(image, model), atol=1e-5)


class _Dilated(torch.nn.Module):
    """One convolution whose taps lie ``d`` px apart."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, dilation=d, padding=d)

    def forward(self, x):
        return self.conv(x)


class _AtMost512(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 512 or x.shape[-2] > 512:
            raise ValueError("at most 512 x 512 px")
        return self.conv(x)


def test_a_halo_beyond_the_probe_s_frame_is_measured_on_a_larger_one(tmp_path):
    """A network reaching 300 px measured 0 on the 512 px frame, and its tiles differed
    from one pass by 0.14 without a word (found by review)."""
    torch.manual_seed(0)
    torch.jit.script(_Dilated(300)).save(str(tmp_path / "d.pt"))
    model = load_model(tmp_path / "d.pt")
    assert model.info.geometry.halo == 300
    image = np.random.default_rng(0).random((700, 700), dtype=np.float32)
    tile = model.info.geometry.snap(2 * 300 + 64, "up")
    np.testing.assert_array_equal(predict(image, model, tile=tile), predict(image, model))
    # one that takes no input over 512 px is measured on the frames it takes (a larger
    # frame for the check refused it; found by review)
    torch.jit.script(_AtMost512()).save(str(tmp_path / "small.pt"))
    assert load_model(tmp_path / "small.pt").info.geometry.halo == 1
    # one reaching further than the largest frame measures is refused, not mis-measured
    torch.jit.script(_Dilated(700)).save(str(tmp_path / "far.pt"))
    with pytest.raises(ModelFileError, match=r"far\.pt: .*reaches beyond a 1024 px frame"):
        load_model(tmp_path / "far.pt")


@pytest.mark.parametrize("padding, depth", [("valid", 3), ("valid", 4), ("same", 4)])
def test_bare_torchscript_of_a_deep_u_net_gets_its_grid_and_halo(tmp_path, padding, depth):
    """A 256 px probe is off a valid network's grid (it answers, 2 px off centre), and a
    same-padding network's 94 px halo reaches past a 64 px comparison margin: traces of
    both bundled models were refused or mis-measured."""
    model = tiny_model(padding, depth=depth)
    g = model.info.geometry
    traced = torch.jit.trace(model.net, torch.rand(1, 1, g.min_input, g.min_input))
    torch.jit.save(traced, str(tmp_path / "bare.pt"))
    bare = load_model(tmp_path / "bare.pt")
    assert bare.info.geometry == g
    image = np.random.default_rng(5).random((150, 131), dtype=np.float32)
    tile = g.snap(2 * g.halo + 3 * g.multiple, "up")
    np.testing.assert_allclose(predict(image, bare, tile=tile), predict(image, model), atol=1e-5)


def test_weights_holding_nan_are_refused(tmp_path):
    import copy

    model = tiny_model("same", depth=2)
    model = type(model)(copy.deepcopy(model.net), model.info)  # the fixture's net is shared
    with torch.no_grad():
        next(model.net.parameters())[0] = float("nan")
    save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(ModelFileError, match="nan.safetensors: the weights hold NaN"):
        load_model(tmp_path / "nan.safetensors")
    torch.jit.save(torch.jit.trace(model.net, torch.rand(1, 1, 32, 32)), str(tmp_path / "n.pt"))
    with pytest.raises(ModelFileError, match="n.pt: the weights hold NaN"):
        load_model(tmp_path / "n.pt")


def test_zip_that_is_not_a_model(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelFileError, match="x.zip: a zip file .* holds no bioimage.io model"):
        load_model(tmp_path / "x.zip")
    data = (tmp_path / "x.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])  # truncated: no directory
    with pytest.raises(ModelFileError, match="cut.zip: a zip file that is corrupt or truncated"):
        load_model(tmp_path / "cut.zip")


def test_weights_that_answer_nan_or_are_not_floats_are_refused(tmp_path):
    model = tiny_model("same", depth=2)
    broken = copy.deepcopy(model.net)
    broken.enc0[1].running_var.fill_(-1.0)  # finite, but every answer is NaN
    path = save_model(type(model)(broken, model.info), tmp_path / "negvar.safetensors")
    with pytest.raises(ModelFileError, match="negvar.safetensors: the network answers NaN"):
        load_model(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = save_model(model, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    state = load_file(str(good))
    state["head.weight"] = state["head.weight"].to(torch.int8)
    save_file(state, str(tmp_path / "int8.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="weight head.weight is torch.int8, not floating"):
        load_model(tmp_path / "int8.safetensors")


def _with_metadata(tmp_path, name, edit, model=None):
    """A copy of a tiny model's file whose napari-unet metadata ``edit`` changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_model(model or tiny_model("same", depth=2), tmp_path / "src.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    info = json.loads(meta["napari_unet"])
    edit(info)
    out = tmp_path / name
    save_file(tensors, str(out), {**meta, "napari_unet": json.dumps(info)})
    return out


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("classes", 5, "'classes' must be a non-empty list"),
        ("classes", [1, 2, 3], "'classes' must be a non-empty list"),
        ("normalization", ["percentile"], "'normalization' must be a normalisation spec"),
        # numbers that are not: a TypeError deep in predict and export before
        ("normalization", {"mode": "percentile", "low": "x", "high": None}, "normalisation spec"),
        ("normalization", {"mode": "fixed", "scale": float("nan")}, "normalisation spec"),
        ("normalization", {"mode": "zscore", "eps": -1}, "normalisation spec"),
        ("provenance", ["x"], "'provenance' must be an object"),
        ("in_channels", 100000, "'in_channels' must be an integer from 1 to 1024"),
        ("fixed_input", [30000, 30000], "'fixed_input' must be two integers from 1 to 16384"),
        ("object_diameter", "big", "'object_diameter' must be a positive number"),
        ("activation", "relu", "'activation' must be softmax"),
        ("in_channels", True, "'in_channels' must be an integer"),
    ],
)
def test_metadata_of_the_wrong_type_names_the_field(tmp_path, key, value, match):
    path = _with_metadata(tmp_path, "bad.safetensors", lambda info: info.update({key: value}))
    with pytest.raises(
        ModelFileError, match=f"bad.safetensors: invalid napari-unet metadata.*{match}"
    ):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda i: i["architecture"].update(depth="2"), "depth must be an integer"),
        (lambda i: i["geometry"].update(multiple=0), "geometry multiple must be >= 1"),
        (lambda i: i["geometry"].update(halo=-4), "geometry halo must be >= 0"),
        (lambda i: i.update(classes=["a", "b", "c", "d"]), "disagrees with itself"),
        (lambda i: i.update(in_channels=3), "disagrees with itself"),
    ],
)
def test_metadata_that_contradicts_itself_or_the_weights_is_refused(tmp_path, edit, match):
    with pytest.raises(ModelFileError, match=match):
        load_model(_with_metadata(tmp_path, "bad.safetensors", edit))


def test_a_small_file_describing_a_huge_network_is_refused_before_building_it(
    tmp_path, monkeypatch
):
    """Depth 8 at width 1024 would need terabytes: the shapes are compared on the meta
    device first, and no real network is built (depth 9 is refused by its number)."""
    from napari_unet.io import files

    built = []
    real_unet = files.UNet

    def spy(config):
        built.append(torch.get_default_device().type)
        return real_unet(config)

    path = _with_metadata(
        tmp_path, "huge.safetensors", lambda i: i["architecture"].update(depth=8, base_width=1024)
    )
    monkeypatch.setattr(files, "UNet", spy)
    with pytest.raises(ModelFileError, match="do not match the architecture.*missing"):
        load_model(path)
    assert built == ["meta"]


def test_pickled_checkpoint_whose_weights_are_not_a_dict(tmp_path):
    model = tiny_model("same", depth=2)
    meta = json.dumps(model.info.to_dict())
    for name, state in (("list.pt", [1, 2]), ("tensor.pt", torch.zeros(3))):
        torch.save({"state_dict": state, "napari_unet": meta}, tmp_path / name)
        with pytest.raises(ModelFileError, match="not a dict of named tensors"):
            load_model(tmp_path / name)


class _Tuple(torch.nn.Module):
    def forward(self, x):
        return x, x


class _NoChannel(torch.nn.Module):
    def forward(self, x):
        return x[:, 0]


class _Upsample(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2.0)


class _Thresholded(torch.nn.Module):
    """A 5x5 mean (halo 2) thresholded inside the network: no gradient reaches the input."""

    def forward(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
        return torch.cat([(mean > 0).float(), (mean <= 0).float()], dim=1)


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (_Tuple(), "returns tuple, not one"),
        (_NoChannel(), r"returns a tensor of shape \(1, 256, 256\) for an input of shape"),
        (_Upsample(), "gives a 512 x 512 output"),
    ],
)
def test_torchscript_whose_output_is_not_a_class_map_is_refused(tmp_path, net, match):
    torch.jit.save(torch.jit.script(net), str(tmp_path / "odd.pt"))
    with pytest.raises(ModelFileError, match=match):
        load_model(tmp_path / "odd.pt")


class _Only128(torch.nn.Module):
    """Two 5 x 5 convolutions (halo 4) that take 128 x 128 inputs only, as scripted or
    traced networks often do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 5, padding=2)
        self.b = torch.nn.Conv2d(4, 2, 5, padding=2)

    def forward(self, x):
        if x.shape[-2] != 128 or x.shape[-1] != 128:
            raise ValueError("need 128 x 128")
        return self.b(torch.relu(self.a(x)))


class _Refuses(torch.nn.Module):
    def forward(self, x):
        raise ValueError("this network needs its own pre-processing")


def test_a_torchscript_that_takes_one_size_is_tiled_at_that_size(tmp_path):
    """It was refused with a 17-line TorchScript traceback (or 'cannot load it')."""
    torch.manual_seed(0)
    net = _Only128().eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "fixed.pt"))
    loaded = load_model(tmp_path / "fixed.pt")
    assert loaded.info.fixed_input == (128, 128) and loaded.info.in_channels == 1
    assert loaded.info.geometry.halo >= 4
    # the same convolutions at any size, in one tile: the tiles at 128 are seamless
    any_size = torch.nn.Sequential(net.a, torch.nn.ReLU(), net.b)
    torch.jit.save(torch.jit.trace(any_size, torch.rand(1, 1, 64, 64)), str(tmp_path / "any.pt"))
    image = np.random.default_rng(6).standard_normal((300, 260)).astype(np.float32)
    ref = predict(image, load_model(tmp_path / "any.pt"), tile=512, device="cpu")
    np.testing.assert_allclose(predict(image, loaded, device="cpu"), ref, atol=1e-5)


def test_a_torchscript_that_refuses_every_input_says_what_its_code_raised(tmp_path):
    torch.jit.save(torch.jit.script(_Refuses()), str(tmp_path / "r.pt"))
    with pytest.raises(ModelFileError) as err:
        load_model(tmp_path / "r.pt")
    message = str(err.value)
    assert "ValueError: this network needs its own pre-processing" in message
    assert "\n" not in message and "TorchScript interpreter" not in message


def test_a_torchscript_declaring_a_huge_halo_is_refused(tmp_path):
    model = tiny_model("same", depth=2)
    traced = torch.jit.trace(model.net, torch.rand(1, 1, 64, 64))
    info = model.info.to_dict()
    info["geometry"]["halo"] = 600
    torch.jit.save(
        traced, str(tmp_path / "h.pt"), _extra_files={TORCHSCRIPT_META: json.dumps(info)}
    )
    with pytest.raises(
        ModelFileError, match="declares a halo of 600 px; napari-unet takes 0 to 512"
    ):
        load_model(tmp_path / "h.pt")


def test_thresholded_torchscript_gets_its_halo_by_perturbation(tmp_path):
    torch.jit.save(torch.jit.script(_Thresholded()), str(tmp_path / "t.pt"))
    loaded = load_model(tmp_path / "t.pt")
    assert loaded.info.num_classes == 2
    assert loaded.info.geometry.halo >= 2
    image = np.random.default_rng(5).standard_normal((150, 130)).astype(np.float32)
    whole = predict(image, loaded, tile=512)
    np.testing.assert_array_equal(predict(image, loaded, tile=64), whole)


def test_torchscript_metadata_must_match_the_network(tmp_path):
    model = tiny_model("valid", depth=2)
    g = model.info.geometry
    traced = torch.jit.trace(model.net, torch.rand(1, 1, g.min_input, g.min_input))
    info = model.info.to_dict()
    info["classes"] = ["a", "b"]
    extra = {TORCHSCRIPT_META: json.dumps(info)}
    torch.jit.save(traced, str(tmp_path / "m.pt"), _extra_files=extra)
    with pytest.raises(ModelFileError, match=r"returns \(3, .*metadata says \(2, "):
        load_model(tmp_path / "m.pt")


def test_an_unwritable_folder_is_named_not_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".m.safetensors.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(
        OSError, match="cannot write .*m.safetensors: permission denied in the folder"
    ) as err:
        save_model(tiny_model("same"), tmp_path / "m.safetensors")
    assert ".tmp" not in str(err.value)
    monkeypatch.undo()
    # a "folder" that is a file: said so (it was "file exists in the folder ...")
    (tmp_path / "mine.safetensors").write_bytes(b"")
    with pytest.raises(OSError, match=r"mine.safetensors is a file, not a folder$"):
        save_model(tiny_model("same"), tmp_path / "mine.safetensors" / "x.safetensors")


def test_a_broken_instance_recipe_is_refused_at_load(tmp_path):
    """It loaded, and every instances run failed after the network had run."""
    model = tiny_model("same")
    for recipe, match in [
        ({"method": "watershed", "seed": 7}, "instance recipe seed 7 is not a class index"),
        ({"method": "magic"}, "instance method 'magic' is unknown"),
        ({"method": "watershed", "seed_threshold": 3.0}, "seed_threshold must be between"),
    ]:
        model.info.instances = recipe
        save_model(model, tmp_path / "r.safetensors")
        with pytest.raises(ModelFileError, match=match) as err:
            load_model(tmp_path / "r.safetensors")
        assert str(err.value).startswith("r.safetensors: instance")


class _Padded(torch.nn.Module):
    """A 1 x 1 convolution carrying a buffer of zeros (1 GiB in the file that was found)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.register_buffer("padding", torch.zeros(500_000))

    def forward(self, x):
        return self.conv(x)


def test_a_torchscript_file_holding_a_zip_bomb_is_refused_unread(tmp_path, monkeypatch):
    import zipfile

    import napari_unet.io.safe_files as files_mod

    monkeypatch.setattr(files_mod, "BOMB_SIZE", 100_000)  # (64 MiB: a test stays small)
    torch.jit.save(torch.jit.script(_Padded()), str(tmp_path / "stored.pt"))
    with (
        zipfile.ZipFile(tmp_path / "stored.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert (tmp_path / "bomb.pt").stat().st_size < 100_000
    with pytest.raises(ModelFileError, match=r"bomb.pt: .* unpacks to 2 MiB .* zip bomb"):
        load_model(tmp_path / "bomb.pt")
    assert load_model(tmp_path / "stored.pt").info.num_classes == 2  # stored: read


class _ManyPads(torch.nn.Module):
    """Buffers each under the per-member limit, far over it together."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        for i in range(4):
            self.register_buffer(f"pad{i}", torch.zeros(15_000))

    def forward(self, x):
        return self.conv(x)


def _deflated(src, dst):
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def test_zip_bombs_spread_over_members_or_in_a_checkpoint_are_refused(tmp_path, monkeypatch):
    """24 members of 60 MiB each (1.4 GiB from 1.4 MB) passed the per-member check, and a
    torch.save checkpoint was unpacked whole before anything was checked."""
    import napari_unet.io.safe_files as files_mod

    monkeypatch.setattr(files_mod, "BOMB_SIZE", 100_000)  # (64 MiB: a test stays small)
    torch.jit.save(torch.jit.script(_ManyPads()), str(tmp_path / "many.pt"))
    bomb = _deflated(tmp_path / "many.pt", tmp_path / "many_bomb.pt")
    with pytest.raises(ModelFileError, match=r"many_bomb.pt: the archive unpacks to .* zip bomb"):
        load_model(bomb)
    torch.save({"state_dict": {"w": torch.zeros(200_000)}}, tmp_path / "c.pth")
    bomb = _deflated(tmp_path / "c.pth", tmp_path / "c_bomb.pth")
    with pytest.raises(ModelFileError, match=r"c_bomb.pth: .* zip bomb"):
        load_model(bomb)
