"""Export of a project U-Net as a bioimage.io package (format 0.5.5 zip)."""

from __future__ import annotations

import copy
import datetime
import importlib
import inspect
import io
import json
import re
import stat
import time
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_unet.core import normalize as norm
from napari_unet.io.bioimageio._cover import _cover
from napari_unet.io.bioimageio._files import _sha256
from napari_unet.io.bioimageio._licence import checked_licence
from napari_unet.io.bioimageio._load import _device, _direct
from napari_unet.io.bioimageio._processing import (
    EXPORT_EPS,
    _Pointwise,
    _split_post,
    _split_pre,
)
from napari_unet.io.bioimageio._rdf import ENGINE_IN, ENGINE_OUT, _tensor_v05
from napari_unet.io.bioimageio._readme import (
    UNET_CITATION,
    declared_halo,
    package_readme,
    smallest_input,
)
from napari_unet.io.bioimageio._weights import _exec_source
from napari_unet.io.files import TORCHSCRIPT_META, saved_name
from napari_unet.io.safe_files import ModelFileError, atomic_write
from napari_unet.model.info import LoadedModel, ModelInfo
from napari_unet.model.shapes import Geometry

# 0.5.5: the first with a softmax post-processing step (0.5.4 tools refused it)
FORMAT_VERSION = "0.5.5"
_ARCH_MODULES = ("napari_unet.model.shapes", "napari_unet.model.blocks", "napari_unet.model.unet")


def _strip_internal_imports(src: str) -> str:
    lines, skip = [], False
    for line in src.splitlines():
        if skip:
            skip = ")" not in line
            continue
        if line.startswith("from __future__"):
            continue
        if line.startswith(("from napari_unet", "import napari_unet")):
            skip = line.rstrip().endswith("(")
            continue
        lines.append(line)
    return "\n".join(lines)


def architecture_source() -> str:
    """One self-contained Python file defining :class:`UNet` (same state-dict keys)."""
    parts = [
        '"""napari-unet U-Net architecture (model/shapes.py, blocks.py, unet.py in one file).',
        "",
        "Build with ``UNet(**kwargs)`` (kwargs: the UNetConfig fields) and load the state dict.",
        '"""',
        "",
        "from __future__ import annotations",
    ]
    for name in _ARCH_MODULES:
        src = inspect.getsource(importlib.import_module(name))
        parts += ["", f"# ---- {name} ----", _strip_internal_imports(src)]
    return "\n".join(parts) + "\n"


def _weights_files(net, info: ModelInfo, arch_name: str) -> dict:
    """State dict, architecture source (checked to rebuild ``net``) and TorchScript."""
    source = architecture_source()
    rebuilt = _exec_source(source, arch_name).UNet(**net.config.to_dict())
    try:
        rebuilt.load_state_dict(net.state_dict(), strict=True)
    except RuntimeError:
        raise ModelFileError(
            "the exported architecture source does not rebuild the U-Net"
        ) from None
    state = io.BytesIO()
    torch.save(net.state_dict(), state)
    g = net.geometry
    n = g.snap(max(g.min_input, 2 * g.halo + g.multiple), "up")
    meta = json.dumps({**info.to_dict(), "source": "", "format": "napari-unet"}, default=str)
    script = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, info.in_channels, n, n), check_trace=False)
        torch.jit.save(traced, script, _extra_files={TORCHSCRIPT_META: meta})
    return {
        "weights_state_dict.pt": state.getvalue(),
        arch_name: source.encode(),
        "weights_torchscript.pt": script.getvalue(),
    }


def _export_preprocessing(spec: dict) -> list:
    ops = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    axes = ["channel", "y", "x"] if spec.get("joint") else ["y", "x"]
    # the engine divides by the spread itself (guarding only a zero one); the spec needs
    # eps > 0, and its default 1e-6 would change dim images (spread ~1e-5) by 10 %
    eps = float(spec.get("eps", EXPORT_EPS))
    # what the format takes (its validator refused such packages once written)
    if spec["mode"] == "percentile" and not float(spec["high"]) > 1:
        raise ValueError(
            f"the model normalises to its {spec['high']:g} % percentile; a bioimage.io "
            "package's scale_range needs a top percentile above 1"
        )
    if spec["mode"] in ("percentile", "zscore") and not 0 < eps <= 0.1:
        raise ValueError(
            f"the model's normalisation eps is {eps:g}; a bioimage.io package takes 0 to 0.1"
        )
    if spec["mode"] == "percentile":
        kwargs = {
            "axes": axes,
            "min_percentile": float(spec["low"]),
            "max_percentile": float(spec["high"]),
            "eps": eps,
        }
        ops.append({"id": "scale_range", "kwargs": kwargs})
    elif spec["mode"] == "zscore":
        ops.append({"id": "zero_mean_unit_variance", "kwargs": {"axes": axes, "eps": eps}})
    elif spec["mode"] == "fixed":
        gain = 1.0 / float(spec["scale"])
        offset = -float(spec["offset"]) * gain
        if (gain, offset) != (1.0, 0.0):
            ops.append({"id": "scale_linear", "kwargs": {"gain": gain, "offset": offset}})
    return ops


def _export_postprocessing(activation: str) -> list:
    ops = []
    if activation == "softmax":
        ops.append({"id": "softmax", "kwargs": {"axis": "channel"}})
    elif activation == "sigmoid":
        ops.append({"id": "sigmoid"})
    return ops + [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]


def _export_axes(info: ModelInfo, g: Geometry) -> tuple[list, list]:
    lo = smallest_input(g)
    names = ["raw"] if info.in_channels == 1 else [f"channel{i}" for i in range(info.in_channels)]
    inputs = [{"type": "batch"}, {"type": "channel", "channel_names": names}]
    outputs = [{"type": "batch"}, {"type": "channel", "channel_names": list(info.classes)}]
    for k in "yx":
        inputs.append({"type": "space", "id": k, "size": {"min": lo, "step": g.multiple}})
        size = {"tensor_id": "raw", "axis_id": k, "offset": -g.shrink}
        outputs.append({"type": "space", "id": k, "size": size})
        if not g.valid and g.halo > 0:
            outputs[-1]["halo"] = declared_halo(g)
    return inputs, outputs


def _test_input(info: ModelInfo, g: Geometry) -> np.ndarray:
    from scipy import ndimage

    n = g.snap(max(128, g.min_input, 2 * g.halo + 2 * g.multiple), "up")
    noise = np.random.default_rng(0).random((info.in_channels, n, n))
    img = ndimage.gaussian_filter(noise, sigma=(0, 3, 3))
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-12) * 200 + 10
    return img[None].astype(np.float32)


def _test_tensors(net, info: ModelInfo, tensors: tuple[dict, dict]) -> tuple:
    """Test input and the output of the same direct path :func:`run_test_tensors` uses."""
    inp = _tensor_v05(tensors[0], "raw", "preprocessing")
    out = _tensor_v05(tensors[1], "prediction", "postprocessing")
    normalization, pre = _split_pre(inp, info.in_channels)
    activation, post = _split_post(out)
    spec_info = replace(info, normalization=normalization, activation=activation)
    x = _test_input(info, net.geometry)
    # the pointwise steps too (a 'fixed' normalisation is exported as scale_linear: the
    # test output was computed without it, and the package failed its own test)
    pre, post = _Pointwise(pre), _Pointwise(post)
    y = _direct(lambda t: post(net(pre(t))), _device(net), spec_info, x, ENGINE_IN, ENGINE_OUT)
    return x, y.astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _tif(a: np.ndarray) -> bytes:
    """A sample tensor (one image, channels first) as a TIFF, which imageio reads."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric="minisblack")
    return buf.getvalue()


def _rdf_name(name: str) -> str:
    """A name bioimage.io accepts: 5-128 characters of letters, digits and ``_+- ()``."""
    clean = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", str(name)).strip() or "napari-unet"
    if len(clean) < 5:
        clean = f"{clean} U-Net"
    return clean[:128]


def _authors(authors, info: ModelInfo) -> list:
    if authors is None:
        listed = str(info.provenance.get("authors", ""))
        authors = [s.strip() for s in listed.split(",") if s.strip()] or ["napari-unet"]
    return [a if isinstance(a, dict) else {"name": str(a)} for a in authors]


def _file(name: str, files: dict) -> dict:
    return {"source": name, "sha256": _sha256(files[name])}


def _plain(obj):
    """Plain Python types only (numpy scalars and tuples from metadata)."""
    return json.loads(
        json.dumps(obj, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


def _rdf_weights(net, files: dict, names: dict) -> dict:
    version = str(torch.__version__).split("+")[0]
    arch = {
        **_file(names["architecture"], files),
        "callable": "UNet",
        "kwargs": net.config.to_dict(),
    }
    state = {**_file(names["state_dict"], files), "architecture": arch}
    script = {**_file(names["torchscript"], files), "parent": "pytorch_state_dict"}
    return {
        "pytorch_state_dict": {**state, "pytorch_version": version},
        "torchscript": {**script, "pytorch_version": version},
    }


def _rdf(net, info: ModelInfo, tensors: tuple, files: dict, names: dict, meta: dict) -> dict:
    inputs, outputs = tensors
    inputs["test_tensor"] = _file("test_input.npy", files)
    outputs["test_tensor"] = _file("test_output.npy", files)
    # (the zoo's validator asks for them "for FAIR compliance": images a viewer opens)
    inputs["sample_tensor"] = _file("sample_input.tif", files)
    outputs["sample_tensor"] = _file("sample_output.tif", files)
    keep = ("classes", "instances", "metrics", "normalization", "pixel_size", "object_diameter")
    now = datetime.datetime.now(datetime.timezone.utc)
    rdf = {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": _rdf_name(info.name),
        "description": info.description
        or f"U-Net segmenting {', '.join(info.classes)} (napari-unet)",
        "authors": meta["authors"],
        "cite": _citations(info),
        "license": meta["license"],
        "documentation": "README.md",
        "covers": [meta["cover"]],
        "tags": ["unet2d", "pytorch", "segmentation", "napari-unet"],
        "timestamp": now.isoformat(timespec="seconds"),
        "inputs": [inputs],
        "outputs": [outputs],
        "weights": _rdf_weights(net, files, names),
        "config": {"napari_unet": {**{k: getattr(info, k) for k in keep}, **_trained(info)}},
    }
    return _plain(rdf)


# provenance the RDF holds in fields of its own, or that names the weights file's
# surroundings (its model card "beside the weights file")
_CREDIT_AND_FILE = ("authors", "license", "cite", "model_card")


def _trained(info: ModelInfo) -> dict:
    """How the model was made (base model, data, steps, seed, settings), for
    ``napari-unet info`` of the package; credit (authors, licence, citations) is in the
    RDF's own fields."""
    made = {k: v for k, v in info.provenance.items() if k not in _CREDIT_AND_FILE}
    return {"provenance": made} if made else {}


def _tensor_descriptions(info: ModelInfo, g: Geometry) -> tuple[dict, dict]:
    in_axes, out_axes = _export_axes(info, g)
    inputs = {
        "id": "raw",
        "description": "image, float32",
        "axes": in_axes,
        "preprocessing": _export_preprocessing(info.normalization),
    }
    post = _export_postprocessing(info.activation)
    outputs = {
        "id": "prediction",
        "description": f"{info.activation} of the class logits",
        "axes": out_axes,
        "postprocessing": post,
    }
    if info.activation in ("softmax", "sigmoid"):
        outputs["data"] = {"type": "float32", "range": [0.0, 1.0]}
    return inputs, outputs


def export_package(
    model: LoadedModel, out_zip, *, cover=None, license: str | None = None, authors=None
) -> Path:
    """Write a project U-Net as a bioimage.io package (format 0.5.5 zip), atomically.

    Parameters
    ----------
    model : LoadedModel
        A napari-unet U-Net (``model.net`` is a :class:`~napari_unet.model.UNet`).
    out_zip : str or Path
        The ``.zip`` to write.
    cover : str, Path or ndarray, optional
        Cover image (PNG/JPEG/GIF file or an array); default: test input beside
        the prediction.
    license : str, optional
        SPDX licence of the weights. Default: the model's own
        (``model.info.provenance["license"]``, kept through fine-tuning), else
        CC-BY-4.0. A model whose licence has no SPDX identifier (``em-membrane``:
        the ISBI 2012 data terms) needs one given here that respects it.
    authors : list of str or dict, optional
        Default: ``model.info.provenance["authors"]``, else ``"napari-unet"``.

    Returns
    -------
    Path
        ``out_zip``.
    """
    from napari_unet.model.unet import UNet

    if not isinstance(model.net, UNet):
        raise ModelFileError("only napari-unet U-Nets can be exported as bioimage.io packages")
    if model.net.config.norm == "group":
        raise ModelFileError(
            "a U-Net with group normalisation sees the whole input at once (no halo), so "
            "no package of it can be tiled or have its geometry checked; save it as a "
            ".safetensors file"
        )
    out_zip = Path(out_zip)
    model = model.with_info(name=saved_name(model, out_zip))
    license = checked_licence(license, model)
    if out_zip.suffix != ".zip":
        raise ModelFileError(f"a bioimage.io package is a .zip, got {out_zip.name!r}")
    net = copy.deepcopy(model.net).float().cpu().eval()
    info = replace(model.info, normalization=norm.validate(model.info.normalization))
    names = {
        "torchscript": "weights_torchscript.pt",
        "state_dict": "weights_state_dict.pt",
        "architecture": "unet_architecture.py",
    }
    files = _weights_files(net, info, names["architecture"])
    tensors = _tensor_descriptions(info, net.geometry)
    x, y = _test_tensors(net, info, tensors)
    files["test_input.npy"], files["test_output.npy"] = _npy(x), _npy(y)
    files["sample_input.tif"], files["sample_output.tif"] = _tif(x[0]), _tif(y[0])
    cover_name, files_cover = _cover(cover, x, y)
    files[cover_name] = files_cover
    files["README.md"] = package_readme(info, net.geometry, names).encode()
    meta = {"authors": _authors(authors, info), "license": license, "cover": cover_name}
    rdf = _rdf(net, info, tensors, files, names, meta)
    files = {"bioimageio.yaml": _yaml(rdf), **files}
    return atomic_write(out_zip, lambda tmp: _write_zip(tmp, files))


def _citations(info: ModelInfo) -> list[dict]:
    """The U-Net paper, then what the weights ask to be cited (their data), each once."""
    cites = [UNET_CITATION]
    extra = info.provenance.get("cite") or []
    for entry in extra if isinstance(extra, list) else [extra]:
        if not isinstance(entry, dict) or not entry.get("text"):
            continue
        cite = {k: str(entry[k]) for k in ("text", "doi", "url") if entry.get(k)}
        if ("doi" in cite or "url" in cite) and cite not in cites:  # the spec needs one
            cites.append(cite)
    return cites


def _yaml(rdf: dict) -> bytes:
    import yaml

    return yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()


def _write_zip(path, files: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            # a regular file readable by all, as the zip itself (writestr's default,
            # 0600 without a file type, unpacked to files only their owner could read)
            info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
