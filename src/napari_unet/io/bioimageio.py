"""BioImage Model Zoo (bioimage.io) packages: import, export and the spec's own test.

A package is a folder or ``.zip`` holding an RDF (``bioimageio.yaml`` or
``rdf.yaml``, format 0.5 and, where cheap, 0.4), weights and test tensors.

Import (:func:`load_package`) maps a package onto the overlap-tile engine:

* statistical pre-processing (``zero_mean_unit_variance``, ``scale_range``)
  becomes the engine's per-plane normalisation spec, so tiles share one
  plane's statistics and tiling stays seamless;
* pointwise steps (``scale_linear``, ``fixed_zero_mean_unit_variance``,
  ``clip``, ``binarize``, ...) run around the weights in :class:`PackageNet`;
  a final ``sigmoid`` / ``softmax`` becomes ``info.activation``;
* the geometry comes from the input axes (``min + n*step`` or a fixed size)
  and the halo is the larger of the declared one and the one measured on the
  network (gradients for PyTorch weights, perturbations for ONNX).

Weights: ``torchscript`` (``torch.jit.load``), ``pytorch_state_dict`` (the
package's architecture code runs only with ``trust_code=True``; weights via
``torch.load(weights_only=True)``) and ``onnx`` (optional ``onnxruntime``).
Nothing is ever downloaded and every declared sha256 is checked.

Export (:func:`export_package`) writes a project U-Net as a format 0.5.4 zip
with TorchScript and state-dict weights, test tensors, cover and README.
:func:`run_test_tensors` runs a package on its ``test_input`` exactly as the
spec does (one pass, no tiling) and compares with ``test_output``.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib
import inspect
import io
import json
import math
import posixpath
import re
import struct
import sys
import types
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_unet.core import normalize as norm
from napari_unet.io.files import TORCHSCRIPT_META, ModelFileError, atomic_write
from napari_unet.model.info import LoadedModel, ModelInfo
from napari_unet.model.shapes import Geometry

__all__ = [
    "OnnxNet",
    "PackageNet",
    "architecture_source",
    "export_package",
    "is_package",
    "load_package",
    "run_test_tensors",
]

RDF_NAMES = ("bioimageio.yaml", "rdf.yaml")
FORMAT_VERSION = "0.5.4"
WEIGHTS_ORDER = ("torchscript", "pytorch_state_dict", "onnx")
UNET_CITATION = {
    "text": "Ronneberger, O., Fischer, P., Brox, T. U-Net: Convolutional Networks for "
    "Biomedical Image Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
STATISTICAL = ("zero_mean_unit_variance", "scale_range", "scale_mean_variance")
ENGINE_IN = ("b", "c", "y", "x")
ENGINE_OUT = ("b", "c", "y", "x")
_TOL = 1e-7  # relative output change that counts as "depends on" when probing a network


# --------------------------------------------------------------------------- reading


class _Files:
    """Files of a package folder or zip, addressed by their path inside the package."""

    def __init__(self, path: Path, prefix: str = "", members: frozenset = frozenset()):
        self.path, self.prefix, self.members = path, prefix, members
        self.is_zip = bool(members)

    def has(self, name: str) -> bool:
        name = _safe_name(name)
        if self.is_zip:
            return self.prefix + name in self.members
        return self._local(name).is_file()

    def read(self, name: str) -> bytes:
        name = _safe_name(name)
        if self.is_zip:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(self.prefix + name)
        return self._local(name).read_bytes()

    def _local(self, name: str) -> Path:
        root = self.path.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ModelFileError(f"{name}: points outside the package folder; refused")
        return path


def _safe_name(name: str) -> str:
    """A package-relative POSIX path; absolute paths and ``..`` are refused."""
    name = str(name).replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
        raise ModelFileError(f"{name!r}: absolute or '..' path inside a package; refused")
    return posixpath.normpath(name)


def _is_remote(source: str) -> bool:
    return "://" in str(source) or str(source).startswith("doi:")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(source) -> tuple[_Files, str]:
    """The package's files and the name of its RDF among them."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelFileError(f"{source}: no such bioimage.io package")
    if path.is_dir():
        return _Files(path), _rdf_in(path.name, [p.name for p in path.iterdir()])
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if path.suffix in (".yaml", ".yml"):
        return _Files(path.parent), path.name
    raise ModelFileError(f"{path.name}: not a bioimage.io package (folder, RDF .yaml or .zip)")


def _rdf_in(label: str, names: list[str]) -> str:
    found = [n for n in names if n in RDF_NAMES or n.endswith(".bioimageio.yaml")]
    if not found:
        raise ModelFileError(f"{label}: no bioimageio.yaml or rdf.yaml in the package")
    return sorted(found, key=lambda n: (n not in RDF_NAMES, n))[0]


def _open_zip(path: Path) -> tuple[_Files, str]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    for name in names:
        try:
            _safe_name(name)
        except ModelFileError:
            raise ModelFileError(
                f"{path.name}: unsafe member {name!r} (absolute path or '..'); refused"
            ) from None
    rdfs = [
        n for n in names if posixpath.basename(n) in RDF_NAMES or n.endswith(".bioimageio.yaml")
    ]
    if not rdfs:
        raise ModelFileError(f"{path.name}: a zip without bioimageio.yaml or rdf.yaml")
    top = min(rdfs, key=lambda n: (n.count("/"), posixpath.basename(n) not in RDF_NAMES))
    prefix = top.rsplit("/", 1)[0] + "/" if "/" in top else ""
    members = frozenset(n for n in names if not n.endswith("/"))
    return _Files(path, prefix, members), top[len(prefix) :]


def is_package(source) -> bool:
    """Whether ``source`` looks like a bioimage.io package (never raises).

    Parameters
    ----------
    source : str or Path
        A folder, an RDF ``.yaml`` file or a ``.zip``.
    """
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            return any((path / n).is_file() for n in RDF_NAMES) or any(
                path.glob("*.bioimageio.yaml")
            )
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            return True
        if path.is_file() and zipfile.is_zipfile(path):
            _open_zip(path)
            return True
    except (OSError, ModelFileError, zipfile.BadZipFile):
        return False
    return False


def _read_rdf(files: _Files, name: str) -> dict:
    import yaml

    try:
        rdf = yaml.safe_load(files.read(name))
    except yaml.YAMLError as err:
        raise ModelFileError(f"{name}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise ModelFileError(f"{name}: not a bioimage.io model description (type: model)")
    return rdf


# --------------------------------------------------------------------------- parsing


@dataclass
class _Axis:
    """One tensor axis; ``kind`` is ``b``, ``c``, ``y``, ``x`` or ``other``."""

    kind: str
    id: str
    size: object = None  # int, ("param", min, step), ("ref", tensor, axis, offset) or None
    halo: int = 0
    names: list | None = None
    scale: float = 1.0
    unit: str | None = None


@dataclass
class _Tensor:
    id: str
    axes: list
    ops: list
    test: tuple | None = None  # (path, sha256 or None)

    def axis(self, kind: str) -> _Axis | None:
        return next((a for a in self.axes if a.kind == kind), None)

    @property
    def names(self) -> tuple:
        return tuple(a.kind if a.kind != "other" else f"other:{a.id}" for a in self.axes)


@dataclass
class _Spec:
    """The parts of an RDF the loader uses, the same for format 0.4 and 0.5."""

    rdf: dict
    version: str
    inputs: list
    outputs: list
    weights: dict
    files: list = field(default_factory=list)  # declared (path, sha256)


def _parse(rdf: dict, label: str) -> _Spec:
    version = str(rdf.get("format_version", ""))
    try:
        if version.startswith("0.5"):
            spec = _parse_v05(rdf)
        elif version.startswith("0.4"):
            spec = _parse_v04(rdf)
        else:
            raise ModelFileError(
                f"{label}: format_version {version!r} is not supported (0.4, 0.5)"
            )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        if isinstance(err, ModelFileError):
            raise
        raise ModelFileError(f"{label}: invalid bioimage.io description ({err!r})") from None
    spec.files = _declared_files(rdf) + spec.files
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise ModelFileError(
            f"{label}: {len(spec.inputs)} inputs and {len(spec.outputs)} outputs; "
            "only one input and one output tensor are supported"
        )
    return spec


def _declared_files(node) -> list:
    """Every ``{source, sha256}`` pair in the RDF (0.5 style)."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("source"), str) and isinstance(node.get("sha256"), str):
            found.append((node["source"], node["sha256"]))
        for value in node.values():
            found += _declared_files(value)
    elif isinstance(node, list):
        for value in node:
            found += _declared_files(value)
    return found


_DEFAULT_IDS = {"batch": "batch", "channel": "channel", "index": "index", "time": "time"}


def _axes_v05(raw: list) -> list:
    axes = []
    for a in raw:
        kind_of = a.get("type")
        aid = str(a.get("id", _DEFAULT_IDS.get(kind_of, "x")))
        if kind_of in ("batch", "channel"):
            kind = kind_of[0]
        else:
            kind = aid if kind_of == "space" and aid in ("x", "y") else "other"
        names = a.get("channel_names") if kind == "c" else None
        names = names if isinstance(names, list) else None
        size = _size_v05(a.get("size"), len(names) if names else None)
        axes.append(
            _Axis(
                kind, aid, size, int(a.get("halo", 0)), names, a.get("scale", 1.0), a.get("unit")
            )
        )
    return axes


def _size_v05(size, n_names):
    if size is None:
        return n_names
    if isinstance(size, int):
        return size
    if "tensor_id" in size:
        return ("ref", str(size["tensor_id"]), str(size["axis_id"]), int(size.get("offset", 0)))
    if "step" in size:
        return ("param", int(size["min"]), int(size["step"]))
    return None  # data-dependent


def _ops(raw, axes: list, v04: bool) -> list:
    """Processing steps as ``(op, kwargs)`` with axis ids replaced by axis kinds."""
    kinds = {a.id: a.kind for a in axes}
    ops = []
    for step in raw or []:
        op = step["name"] if v04 else step["id"]
        kw = dict(step.get("kwargs") or {})
        if v04 and op == "zero_mean_unit_variance" and kw.get("mode") == "fixed":
            op = "fixed_zero_mean_unit_variance"
        if kw.get("axes") is not None:
            kw["axes"] = {
                kinds.get(str(i), "b" if str(i) == "batch" else "other") for i in kw["axes"]
            }
        if "axis" in kw:
            kw["axis"] = kinds.get(str(kw["axis"]), "other")
        ops.append((op, kw))
    return ops


def _tensor_v05(t: dict, default_id: str, ops_key: str) -> _Tensor:
    axes = _axes_v05(t["axes"])
    test = t.get("test_tensor")
    return _Tensor(
        str(t.get("id", default_id)),
        axes,
        _ops(t.get(ops_key), axes, v04=False),
        (test["source"], test.get("sha256")) if test else None,
    )


def _parse_v05(rdf: dict) -> _Spec:
    weights = {}
    for fmt, entry in (rdf.get("weights") or {}).items():
        if entry:
            weights[fmt] = dict(entry)
    return _Spec(
        rdf,
        str(rdf["format_version"]),
        [_tensor_v05(t, "input", "preprocessing") for t in rdf["inputs"]],
        [_tensor_v05(t, "output", "postprocessing") for t in rdf["outputs"]],
        weights,
    )


def _axes_v04(t: dict) -> list:
    letters, shape = t["axes"], t["shape"]
    halo = t.get("halo") or [0] * len(letters)
    axes = []
    for i, ch in enumerate(letters):
        kind = ch if ch in ENGINE_IN else "other"
        if isinstance(shape, list):
            size = int(shape[i])
        elif "min" in shape:
            step = int(shape["step"][i])
            size = ("param", int(shape["min"][i]), step) if step else int(shape["min"][i])
        else:
            size = _ref_v04(shape, i, ch)
        axes.append(_Axis(kind, ch, size, int(halo[i])))
    return axes


def _ref_v04(shape: dict, i: int, ch: str):
    """0.4 implicit shape: ``ref * scale + 2 * offset``."""
    scale, offset = shape["scale"][i], shape["offset"][i]
    if scale in (0, None):
        return int(round(2 * offset))
    if scale != 1:
        raise ModelFileError(f"output axis {ch!r} is rescaled (scale {scale}); not supported")
    return ("ref", str(shape["reference_tensor"]), ch, int(round(2 * offset)))


def _arch_v04(entry: dict) -> dict:
    arch = str(entry.get("architecture", ""))
    kwargs = entry.get("kwargs") or {}
    if ".py:" in arch:
        source, name = arch.rsplit(":", 1)
        return {
            "source": source,
            "sha256": entry.get("architecture_sha256"),
            "callable": name,
            "kwargs": kwargs,
        }
    module, _, name = arch.rpartition(".")
    return {"import_from": module, "callable": name, "kwargs": kwargs}


def _parse_v04(rdf: dict) -> _Spec:
    tensors = {}
    for key, ops_key, tests in (
        ("inputs", "preprocessing", "test_inputs"),
        ("outputs", "postprocessing", "test_outputs"),
    ):
        tensors[key] = []
        for i, t in enumerate(rdf[key]):
            axes = _axes_v04(t)
            test = rdf.get(tests) or []
            ops = _ops(t.get(ops_key), axes, v04=True)
            tensors[key].append(
                _Tensor(str(t["name"]), axes, ops, (test[i], None) if test else None)
            )
    weights, files = {}, []
    for fmt, entry in (rdf.get("weights") or {}).items():
        entry = dict(entry)
        if fmt == "pytorch_state_dict":
            entry["architecture"] = _arch_v04(entry)
            arch = entry["architecture"]
            if arch.get("source") and arch.get("sha256"):
                files.append((arch["source"], arch["sha256"]))
        weights[fmt] = entry
    return _Spec(
        rdf, str(rdf["format_version"]), tensors["inputs"], tensors["outputs"], weights, files
    )


# ------------------------------------------------------------------- integrity and weights


def _check_hashes(files: _Files, spec: _Spec) -> None:
    """Every declared local file that is present must match its sha256."""
    for name, sha in spec.files:
        if _is_remote(name) or not files.has(name):
            continue
        if _sha256(files.read(name)) != str(sha).lower():
            raise ModelFileError(
                f"{name}: sha256 does not match the package description (changed or corrupt)"
            )


def _read_checked(files: _Files, name: str, sha: str | None, what: str) -> bytes:
    if _is_remote(name):
        raise ModelFileError(
            f"{what} {posixpath.basename(name)} is not in the package (it points to {name}); "
            "napari-unet downloads nothing"
        )
    if not files.has(name):
        raise ModelFileError(f"{what} {name} is declared but missing from the package")
    data = files.read(name)
    if sha and _sha256(data) != str(sha).lower():
        raise ModelFileError(f"{name}: sha256 does not match the package description")
    return data


def _weights_problem(fmt: str, entry: dict, files: _Files, trust_code: bool) -> str | None:
    """Why these weights cannot be used (None when they can)."""
    source = str(entry.get("source", ""))
    if _is_remote(source):
        return (
            f"{fmt} weights {posixpath.basename(source)} are not in the package "
            f"(they are at {source}) and napari-unet downloads nothing"
        )
    if not files.has(source):
        return f"{fmt} weights file {source} is missing from the package"
    if fmt == "pytorch_state_dict":
        arch = entry.get("architecture") or {}
        src = arch.get("source")
        if src and (_is_remote(src) or not files.has(src)):
            return f"the architecture file {src} of the pytorch_state_dict weights is missing"
        if not trust_code:
            return (
                f"pytorch_state_dict weights run Python code from the package "
                f"({src or arch.get('import_from')}); confirm that you trust its authors with "
                "trust_code=True (command line: --trust-code)"
            )
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnx weights need onnxruntime: pip install onnxruntime (or napari-unet[onnx])"
    return None


def _choose_weights(spec: _Spec, files: _Files, fmt: str | None, trust_code: bool):
    if fmt is not None and fmt not in spec.weights:
        raise ModelFileError(
            f"no {fmt} weights in the package (it has: {', '.join(spec.weights)})"
        )
    problems = []
    for name in [fmt] if fmt else WEIGHTS_ORDER:
        if name not in spec.weights:
            continue
        problem = _weights_problem(name, spec.weights[name], files, trust_code)
        if problem is None:
            return name, spec.weights[name]
        problems.append(problem)
    if not problems:
        raise ModelFileError(
            f"no usable weights: the package has {', '.join(spec.weights) or 'none'}; "
            f"napari-unet reads {', '.join(WEIGHTS_ORDER)}"
        )
    raise ModelFileError("; ".join(problems))


def _load_weights(fmt: str, entry: dict, files: _Files) -> nn.Module:
    data = _read_checked(files, entry["source"], entry.get("sha256"), f"{fmt} weights")
    if fmt == "torchscript":
        try:
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any parse error means a bad file
            raise ModelFileError(
                f"{entry['source']}: cannot load as TorchScript ({_first_line(err)})"
            ) from None
        return net.float().eval()
    if fmt == "pytorch_state_dict":
        return _state_dict_net(data, entry, files)
    return OnnxNet(data, entry["source"])


def _architecture(arch: dict, files: _Files):
    """The architecture callable; runs package code (the caller checked trust)."""
    if arch.get("import_from"):
        module = importlib.import_module(arch["import_from"])
    else:
        code = _read_checked(files, arch["source"], arch.get("sha256"), "architecture file")
        module = _exec_source(code, arch["source"])
    factory = getattr(module, str(arch.get("callable")), None)
    if not callable(factory):
        raise ModelFileError(f"architecture {arch.get('callable')!r} not found in its source")
    return factory


def _state_dict_net(data: bytes, entry: dict, files: _Files) -> nn.Module:
    arch = entry.get("architecture") or {}
    net = _architecture(arch, files)(**(arch.get("kwargs") or {}))
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - UnpicklingError and friends
        raise ModelFileError(
            f"{entry['source']}: not a plain state dict (needs code to unpickle); refused"
        ) from None
    try:
        net.load_state_dict(state, strict=bool(entry.get("strict", True)))
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ModelFileError(
            f"{entry['source']}: weights do not match the architecture ({_first_line(err)})"
        ) from None
    return net.float().eval()


class OnnxNet(nn.Module):
    """ONNX weights run by onnxruntime behind an ``nn.Module``: torch tensors in and out."""

    def __init__(self, data: bytes, name: str = "weights.onnx") -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any onnxruntime failure
            raise ModelFileError(f"{name}: cannot load as ONNX ({_first_line(err)})") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(
            first.type, np.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the session on ``x`` (any device); the result is float32 on ``x``'s device."""
        arr = x.detach().cpu().numpy().astype(self.dtype, copy=False)
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


# ------------------------------------------------------------------- processing steps


def _param(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-channel list, broadcastable to ``(N, C, H, W)``."""
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return v.reshape(1, -1, 1, 1) if v.ndim == 1 else v


_INT_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint16": torch.int32,
    "uint32": torch.int64,
    "bool": torch.bool,
}


def _ensure_dtype(x, kw):
    dtype = _INT_DTYPES.get(str(kw.get("dtype")))
    return x if dtype is None else x.to(dtype).to(torch.float32)


POINTWISE = {
    "ensure_dtype": _ensure_dtype,
    "scale_linear": lambda x, kw: (
        x * _param(kw.get("gain", 1.0), x) + _param(kw.get("offset", 0.0), x)
    ),
    "fixed_zero_mean_unit_variance": lambda x, kw: (
        (x - _param(kw["mean"], x)) / (_param(kw["std"], x) + kw.get("eps", 1e-6))
    ),
    "clip": lambda x, kw: torch.clamp(x, kw.get("min"), kw.get("max")),
    "binarize": lambda x, kw: (x > _param(kw["threshold"], x)).to(x.dtype),
    "sigmoid": lambda x, kw: torch.sigmoid(x),
    "softmax": lambda x, kw: torch.softmax(x, dim=1),
}


class _Pointwise(nn.Module):
    """Pixel-wise processing steps on ``(N, C, H, W)`` tensors (seamless under tiling)."""

    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = list(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op, kw in self.ops:
            x = POINTWISE[op](x, kw)
        return x


def _pointwise(ops: list, where: str) -> list:
    """Check that ``ops`` are pointwise steps the engine can run around the weights."""
    out = []
    for op, kw in ops:
        if op not in POINTWISE:
            hint = " (it needs whole-image statistics)" if op in STATISTICAL else ""
            raise ModelFileError(f"{where} step {op!r} is not supported here{hint}")
        if kw.get("axis", "c") != "c" or "min_percentile" in kw or "max_percentile" in kw:
            raise ModelFileError(f"{where} step {op!r} with {kw} is not supported")
        if op == "ensure_dtype" and str(kw.get("dtype")) not in _INT_DTYPES:
            continue  # float casts: the engine computes in float32 anyway
        out.append((op, kw))
    return out


def _norm_spec(op: str, kw: dict, channels: int, tensor_id: str) -> dict:
    """A statistical pre-processing step as the engine's per-plane normalisation spec."""
    if op == "scale_mean_variance" or kw.get("reference_tensor") not in (None, tensor_id):
        raise ModelFileError(f"pre-processing {op!r} relative to another tensor is not supported")
    axes = kw.get("axes")
    if axes is not None and not {"y", "x"} <= set(axes):
        raise ModelFileError(f"pre-processing {op!r} over axes {sorted(axes)} is not supported")
    eps = float(kw.get("eps", 1e-6))
    if op == "zero_mean_unit_variance":
        spec = {"mode": "zscore", "eps": eps}
    else:
        low, high = float(kw.get("min_percentile", 0.0)), float(kw.get("max_percentile", 100.0))
        spec = {"mode": "percentile", "low": low, "high": high, "eps": eps}
    if channels > 1 and (axes is None or "c" in axes):
        spec["joint"] = True
    return spec


def _split_pre(t: _Tensor, channels: int) -> tuple[dict, list]:
    stat = [i for i, (op, _) in enumerate(t.ops) if op in STATISTICAL]
    if not stat:
        return {"mode": "none"}, _pointwise(t.ops, "pre-processing")
    if len(stat) > 1:
        raise ModelFileError("pre-processing with two statistical steps is not supported")
    i = stat[0]
    if any(op != "ensure_dtype" for op, _ in t.ops[:i]):
        raise ModelFileError(
            f"pre-processing before {t.ops[i][0]!r} other than ensure_dtype is not supported"
        )
    spec = _norm_spec(*t.ops[i], channels, t.id)
    return spec, _pointwise(t.ops[i + 1 :], "pre-processing")


def _split_post(t: _Tensor) -> tuple[str, list]:
    ops = list(t.ops)
    while ops and ops[-1][0] == "ensure_dtype" and str(ops[-1][1].get("dtype")) not in _INT_DTYPES:
        ops.pop()
    activation = "none"
    if ops and ops[-1][0] in ("sigmoid", "softmax") and ops[-1][1].get("axis", "c") == "c":
        activation = ops.pop()[0]
    return activation, _pointwise(ops, "post-processing")


# ------------------------------------------------------------------- the network


def _arrange(t: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """Reorder named axes ``src`` to ``dst``; axes only on one side must have size 1."""
    for i in reversed(range(len(src))):
        if src[i] not in dst:
            if t.shape[i] != 1:
                raise ValueError(f"axis {src[i]} has size {t.shape[i]}; the package needs 1")
            t = t.squeeze(i)
    kept = [n for n in src if n in dst]
    for name in dst:
        if name not in kept:
            t = t.unsqueeze(-1)
            kept.append(name)
    return t.permute([kept.index(n) for n in dst])


class PackageNet(nn.Module):
    """A package's weights in the engine's layout: ``(N, C, H, W)`` in, ``(N, K, H', W')`` out.

    Pointwise pre-processing runs before the weights and pointwise
    post-processing after them; statistical pre-processing and the final
    activation are left to the engine (``info.normalization``, ``info.activation``).
    ``crop`` trims a declared output halo from valid-padding networks.
    """

    def __init__(self, core, spec: _Spec, files: _Files, pre: list, post: list, single: bool):
        super().__init__()
        self.core = core
        self.pre, self.post = _Pointwise(pre), _Pointwise(post)
        self.package, self.files, self.single = spec, files, single
        self.in_names, self.out_names = spec.inputs[0].names, spec.outputs[0].names
        self.crop = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or the package's output) for ``x`` of shape ``(N, C, H, W)``."""
        y = self.uncropped(x)
        c = self.crop
        return y[..., c : y.shape[-2] - c, c : y.shape[-1] - c] if c else y

    def uncropped(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-processing, weights and post-processing, as the spec runs them."""
        return self.post(self.bare(self.pre(x)))

    def bare(self, x: torch.Tensor) -> torch.Tensor:
        """The weights alone, with the layout converted both ways."""
        if self.single and x.shape[0] > 1:
            return torch.cat([self.bare(x[i : i + 1]) for i in range(x.shape[0])])
        y = self.core(_arrange(x, ENGINE_IN, self.in_names))
        return _arrange(y, self.out_names, ENGINE_OUT)


class _Bare(nn.Module):
    def __init__(self, net: PackageNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.bare(x)


def _runner(net: PackageNet):
    bare = _Bare(net).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return bare(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

    return run


# ------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Declared:
    """What the RDF says about sizes: fixed or ``min + n*step`` inputs, shrink, halo."""

    fixed: tuple | None
    min: int
    step: int
    shrink: int
    halo: int
    channels: int
    classes: int

    def accepted(self, n: int) -> int:
        """Smallest declared input size ``>= n`` (variable-size inputs)."""
        return self.min + max(0, math.ceil((n - self.min) / self.step)) * self.step


def _axis_of(t: _Tensor, kind: str) -> _Axis:
    a = t.axis(kind)
    if a is None:
        raise ModelFileError(f"tensor {t.id!r} has no {kind} axis; only 2D images are supported")
    return a


def _size_one(size) -> bool:
    if isinstance(size, tuple):
        return size[0] == "ref" or (size[0] == "param" and size[1] == 1)
    return size == 1


def _check_other_axes(t: _Tensor) -> None:
    for a in t.axes:
        if a.kind == "other" and not _size_one(a.size):
            raise ModelFileError(
                f"tensor {t.id!r} axis {a.id!r} of size {a.size}: only 2D images are supported"
            )


def _combine(y: tuple, x: tuple) -> tuple[int, int]:
    """``(min, step)`` accepted along both spatial axes."""
    if y == x:
        return y
    m, lo = math.lcm(y[1], x[1]), max(y[0], x[0])
    for s in range(lo, lo + m):
        if (s - y[0]) % y[1] == 0 and (s - x[0]) % x[1] == 0:
            return s, m
    raise ModelFileError("input axes y and x accept no common size")


def _shrink(inp: _Tensor, out: _Tensor, fixed) -> int:
    values = []
    for i, k in enumerate("yx"):
        size, scale = _axis_of(out, k).size, _axis_of(out, k).scale
        if isinstance(size, tuple) and size[0] == "ref":
            ref = next((a for a in inp.axes if a.id == size[2]), None)
            if size[1] != inp.id or ref is None or ref.kind != k or ref.scale != scale:
                raise ModelFileError(f"output axis {k} is not the input's axis {k} (or rescaled)")
            values.append(-size[3])
        elif isinstance(size, int) and fixed is not None:
            values.append(fixed[i] - size)
        else:
            raise ModelFileError(f"output axis {k}: its size is not derived from the input")
    if values[0] != values[1] or values[0] < 0 or values[0] % 2:
        raise ModelFileError(f"output smaller than the input by {values}: not supported")
    return values[0]


def _channels(t: _Tensor, ref: _Tensor | None) -> int:
    a = t.axis("c")
    if a is None:
        return 1
    if isinstance(a.size, int):
        return a.size
    if isinstance(a.size, tuple) and a.size[0] == "ref" and ref is not None:
        return _channels(ref, None) + a.size[3]
    raise ModelFileError(f"tensor {t.id!r}: its number of channels is not fixed")


def _declared(inp: _Tensor, out: _Tensor) -> _Declared:
    _check_other_axes(inp)
    _check_other_axes(out)
    sizes = [_axis_of(inp, k).size for k in "yx"]
    if all(isinstance(s, int) for s in sizes):
        fixed, lo, step = tuple(sizes), min(sizes), 0
    elif all(isinstance(s, tuple) and s[0] == "param" for s in sizes):
        fixed = None
        lo, step = _combine(sizes[0][1:], sizes[1][1:])
    else:
        raise ModelFileError(f"input {inp.id!r}: spatial sizes {sizes} are not supported")
    halo = max(_axis_of(out, k).halo for k in "yx")
    return _Declared(
        fixed, lo, step, _shrink(inp, out, fixed), halo, _channels(inp, None), _channels(out, inp)
    )


def _shift_equal(a: np.ndarray, b: np.ndarray, m: int, margin: int) -> bool:
    if a.shape != b.shape:
        return False
    a = a[..., margin + m : a.shape[-2] - margin, margin + m : a.shape[-1] - margin]
    b = b[..., margin : b.shape[-2] - margin - m, margin : b.shape[-1] - margin - m]
    return a.size > 0 and bool(np.abs(a - b).max() <= 1e-6 * (1 + np.abs(a).max()))


def _find_multiple(run, c: int, hw: tuple, margin: int, candidates: tuple) -> int | None:
    """First shift in ``candidates`` under which the network is translation-equivariant."""
    rng = np.random.default_rng(1)
    pad = max(candidates)
    big = rng.standard_normal((1, c, hw[0] + pad, hw[1] + pad)).astype(np.float32)
    try:
        ref = run(big[..., : hw[0], : hw[1]])
    except Exception:  # noqa: BLE001 - size refused
        return None
    for m in candidates:
        try:
            moved = run(big[..., m : m + hw[0], m : m + hw[1]])
        except Exception:  # noqa: BLE001, S112 - size refused: next candidate
            continue
        if _shift_equal(ref, moved, m, margin):
            return m
    return None


def _reach(run, x, base, corner, block, tol, rng) -> int:
    """How far outside a perturbed ``block`` the output changes (a halo estimate)."""
    cy, cx = corner
    y = x.copy()
    y[..., cy : cy + block, cx : cx + block] += rng.standard_normal(
        (1, x.shape[1], block, block)
    ).astype(np.float32)
    changed = np.abs(run(y) - base).max(axis=(0, 1)) > tol
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    if rows.size == 0:
        return 0
    far = (
        cy - rows.min(),
        rows.max() - cy - block + 1,
        cx - cols.min(),
        cols.max() - cx - block + 1,
    )
    return int(max(0, *far))


def _perturb_halo(run, c: int, hw: tuple, block: int, start: int) -> int | None:
    """Smallest ``h`` such that replacing every input pixel further than ``h`` from a
    ``block x block`` square leaves the square's output unchanged (None: frame too small).
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, *hw)).astype(np.float32)
    base = run(x)
    cy, cx = ((n // 2) // block * block for n in hw)
    room = min(cy, cx, hw[0] - cy - block, hw[1] - cx - block)
    sel = (Ellipsis, slice(cy, cy + block), slice(cx, cx + block))
    tol = _TOL * (1 + float(np.abs(base[sel]).max()))
    # the reach of the block's edge pixels misses a few pixels of other pooling phases
    h = max(start, _reach(run, x, base, (cy, cx), block, tol, rng) + 4)
    while h <= room:
        y = rng.standard_normal(x.shape).astype(np.float32)
        keep = (Ellipsis, slice(cy - h, cy + block + h), slice(cx - h, cx + block + h))
        y[keep] = x[keep]
        if np.abs(run(y)[sel] - base[sel]).max() <= tol:
            return h
        h += 4
    return None


def _grad_halo(net: PackageNet, c: int, size: int, block: int) -> int | None:
    """:func:`measure_halo` on the bare weights; None when the frame was too small."""
    from napari_unet.model.receptive import measure_halo

    h = measure_halo(_Bare(net).eval(), c, size, block, 0, dtype=torch.float32)
    net.eval()
    lo = (size // 2) // block * block
    return h if h < min(lo, size - lo - block) else None


def _adaptive_halo(net, run, torch_weights: bool, c: int, sizes, start: int, block: int) -> int:
    """Measure the halo on growing frames until the receptive field fits."""
    n = sizes(2 * start + 3 * block)
    for _ in range(4):
        if torch_weights:
            h = _grad_halo(net, c, n, block)
        else:
            h = _perturb_halo(run, c, (n, n), block, start)
        if h is not None:
            return h
        n = sizes(2 * n)
    raise ModelFileError(f"cannot measure the network's halo: it exceeds a {n} px frame")


def _valid_geometry(net: PackageNet, run, d: _Declared):
    net.crop = d.halo  # a declared halo is still to be cropped from the output
    shrink = d.shrink + 2 * d.halo
    if d.fixed:
        m = _find_multiple(run, d.channels, d.fixed, 0, (8, 16, 32, 64, 128))
        hw = d.fixed
    else:
        hw = (d.accepted(d.min + 8 * d.step),) * 2
        m = _find_multiple(run, d.channels, hw, 0, tuple(d.step * 2**k for k in range(3)))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or d.step or 8
    return Geometry(m, d.min % m, d.min, shrink, shrink // 2), d.fixed, notes


def _used_halo(measured: int | None, m: int, d: _Declared) -> int:
    """The declared halo, or a larger measured one rounded up to the tile grid.

    Rounding puts every tile's first pixel on the image's pooling grid, so the
    result does not depend on how the halo was measured (gradients or perturbations).
    """
    if measured is None or measured <= d.halo:
        return d.halo
    return math.ceil(measured / m) * m


def _measured_note(measured: int | None, halo: int, d: _Declared) -> dict:
    if measured is None:
        return {"halo": f"declared {d.halo} px (too large to measure inside the fixed input)"}
    return {"halo": f"declared {d.halo} px, measured {measured} px, used {halo} px"}


def _variable_geometry(net: PackageNet, run, torch_weights: bool, d: _Declared):
    block = math.lcm(d.step, 32)
    measured = _adaptive_halo(net, run, torch_weights, d.channels, d.accepted, d.halo, block)
    margin = 2 * max(measured, d.halo)
    hw = (d.accepted(2 * margin + 8 * d.step + 32),) * 2
    m = _find_multiple(run, d.channels, hw, margin, (d.step, 2 * d.step, 4 * d.step))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or d.step
    halo = _used_halo(measured, m, d)
    return (
        Geometry(m, d.min % m, d.min, 0, halo),
        None,
        {**_measured_note(measured, halo, d), **notes},
    )


def _relaxed_geometry(net: PackageNet, run, d: _Declared):
    """Geometry of PyTorch weights declared with one fixed size that accept others too."""

    def sizes(n: int) -> int:
        return 32 * math.ceil(n / 32)

    try:
        measured = _adaptive_halo(net, run, True, d.channels, sizes, d.halo, 32)
        margin = 2 * max(measured, d.halo)
        frame = sizes(2 * margin + 96)
        m = _find_multiple(run, d.channels, (frame, frame), margin, (1, 2, 4, 8, 16, 32))
        if m is None:
            return None
        halo = _used_halo(measured, m, d)
        n = m * math.ceil((2 * halo + m) / m)
        run(np.zeros((1, d.channels, n, n), np.float32))
    except Exception:  # noqa: BLE001 - any failure: keep the declared fixed size
        return None
    notes = _measured_note(measured, halo, d)
    notes["input size"] = f"declared {d.fixed[0]} x {d.fixed[1]}; the weights accept {n} + k*{m}"
    return Geometry(m, 0, n, 0, halo), None, notes


def _fixed_geometry(run, d: _Declared):
    measured = _perturb_halo(run, d.channels, d.fixed, 64, d.halo)
    margin = 2 * max(measured or 0, d.halo)
    m = _find_multiple(run, d.channels, d.fixed, margin, (8, 16, 32, 64, 128))
    notes = {} if m else {"tiling": "not translation-equivariant: tiles may show seams"}
    m = m or 8
    halo = _used_halo(measured, m, d)
    return (
        Geometry(m, d.min % m, d.min, 0, halo),
        d.fixed,
        {**_measured_note(measured, halo, d), **notes},
    )


def _geometry(net: PackageNet, torch_weights: bool, d: _Declared):
    """Geometry, fixed input size and notes for the model card."""
    run = _runner(net)
    if d.shrink > 0:
        return _valid_geometry(net, run, d)
    if d.fixed is None:
        return _variable_geometry(net, run, torch_weights, d)
    relaxed = _relaxed_geometry(net, run, d) if torch_weights else None
    return relaxed or _fixed_geometry(run, d)


# ------------------------------------------------------------------- loading


def _person(a) -> str:
    name = a.get("name", "") if isinstance(a, dict) else str(a)
    return str(name).split(";")[0].strip()


def _citation(c) -> str:
    if not isinstance(c, dict):
        return str(c)
    ref = f"doi:{c['doi']}" if c.get("doi") else c.get("url", "")
    return " ".join(str(c.get("text", "")).split()) + (f" ({ref})" if ref else "")


def _provenance(spec: _Spec, fmt: str, entry: dict, notes: dict) -> dict:
    rdf = spec.rdf
    p = {}
    if rdf.get("authors"):
        p["authors"] = ", ".join(_person(a) for a in rdf["authors"])
    if rdf.get("license"):
        p["license"] = str(rdf["license"])
    if rdf.get("cite"):
        p["cite"] = "; ".join(_citation(c) for c in rdf["cite"])
    p["weights"] = f"{fmt} ({entry['source']})"
    p["bioimageio"] = f"format {spec.version}" + (f", id {rdf['id']}" if rdf.get("id") else "")
    p.update(notes)
    return p


def _classes(out: _Tensor, k: int) -> list[str]:
    a = out.axis("c")
    if a is not None and a.names and len(a.names) == k:
        return [str(n) for n in a.names]
    return [out.id] if k == 1 else [f"class{i}" for i in range(k)]


def _pixel_size(inp: _Tensor) -> list[float] | None:
    axes = [inp.axis(k) for k in "yx"]
    if all(a is not None and a.unit for a in axes):
        return [float(a.scale) for a in axes]
    return None


def _single_sample(inp: _Tensor, out: _Tensor) -> bool:
    b_in, b_out = inp.axis("b"), out.axis("b")
    return b_in is None or b_out is None or b_in.size == 1


def load_package(source, trust_code: bool = False, weights_format: str | None = None):
    """Load a bioimage.io model package for the overlap-tile engine.

    Parameters
    ----------
    source : str or Path
        A package folder, its RDF (``bioimageio.yaml`` / ``rdf.yaml``) or a ``.zip``.
    trust_code : bool
        Allow running the package's architecture code (``pytorch_state_dict`` weights).
    weights_format : str, optional
        ``"torchscript"``, ``"pytorch_state_dict"`` or ``"onnx"``; default: the
        first usable one in that order.

    Returns
    -------
    LoadedModel
        ``net`` is a :class:`PackageNet`; ``info.format`` is ``"bioimageio"``.

    Raises
    ------
    ModelFileError
        Unreadable, unsafe, unsupported or tampered packages (one-line reason).
    """
    files, rdf_name = _open(source)
    spec = _parse(_read_rdf(files, rdf_name), rdf_name)
    _check_hashes(files, spec)
    fmt, entry = _choose_weights(spec, files, weights_format, trust_code)
    inp, out = spec.inputs[0], spec.outputs[0]
    declared = _declared(inp, out)
    normalization, pre = _split_pre(inp, declared.channels)
    activation, post = _split_post(out)
    core = _load_weights(fmt, entry, files)
    net = PackageNet(core, spec, files, pre, post, _single_sample(inp, out)).eval()
    geometry, fixed, notes = _geometry(net, fmt != "onnx", declared)
    rdf = spec.rdf
    config = (rdf.get("config") or {}).get("napari_unet") or {}
    info = ModelInfo(
        name=str(rdf.get("name") or Path(source).stem),
        classes=_classes(out, declared.classes),
        in_channels=declared.channels,
        geometry=geometry,
        normalization=normalization,
        activation=activation,
        instances=config.get("instances"),
        pixel_size=_pixel_size(inp) or config.get("pixel_size"),
        description=" ".join(str(rdf.get("description", "")).split()),
        provenance=_provenance(spec, fmt, entry, notes),
        source=str(source),
        format="bioimageio",
        fixed_input=fixed,
    )
    return LoadedModel(net, info)


# ------------------------------------------------------------------- the spec's test


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    return y


def _device(module: nn.Module) -> torch.device:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def _direct(forward, device, info: ModelInfo, x: np.ndarray, in_names, out_names) -> np.ndarray:
    """The spec's way: whole-tensor statistics, one forward pass, no tiling."""
    t = _arrange(torch.from_numpy(np.asarray(x, dtype=np.float64)), in_names, ENGINE_IN).numpy()
    spec = norm.validate(info.normalization)
    planes = [norm.apply(s, *norm.plane_stats(s.reshape(s.shape[0], -1), spec)) for s in t]
    with torch.inference_mode():
        y = forward(torch.from_numpy(np.stack(planes)).to(device)).float().cpu()
        y = _activate(y, info.activation)
    return _arrange(y, ENGINE_OUT, out_names).numpy()


def _load_array(files: _Files, test, what: str) -> np.ndarray:
    if test is None:
        raise ModelFileError(f"the package declares no {what}")
    data = _read_checked(files, test[0], test[1], what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ModelFileError(f"{test[0]}: not a plain .npy array ({err})") from None


def run_test_tensors(
    model_or_package, *, weights_format=None, trust_code=False, atol: float = 1e-4
) -> float:
    """Run a package on its ``test_input`` as the spec does and compare with ``test_output``.

    Pre-processing with statistics of the whole tensor, one forward pass on
    the whole tensor, post-processing; no tiling.

    Parameters
    ----------
    model_or_package : LoadedModel or str or Path
        A model from :func:`load_package`, or a package to load.
    atol : float
        Largest accepted absolute difference.

    Returns
    -------
    float
        The largest absolute difference from ``test_output``.

    Raises
    ------
    ModelFileError
        If the difference exceeds ``atol`` or the shapes differ.
    """
    model = model_or_package
    if not isinstance(model, LoadedModel):
        model = load_package(model, trust_code=trust_code, weights_format=weights_format)
    net = model.net
    if not isinstance(net, PackageNet):
        raise ModelFileError("run_test_tensors needs a model loaded from a bioimage.io package")
    inp, out = net.package.inputs[0], net.package.outputs[0]
    x = _load_array(net.files, inp.test, "test input")
    expected = _load_array(net.files, out.test, "test output")
    got = _direct(net.uncropped, _device(net), model.info, x, net.in_names, net.out_names)
    if got.shape != expected.shape:
        raise ModelFileError(
            f"{out.test[0]}: shape {expected.shape}, the network gives {got.shape}"
        )
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not diff <= atol:
        raise ModelFileError(
            f"{out.test[0]}: the output differs by {diff:.3g} (tolerance {atol:g})"
        )
    return diff


# ------------------------------------------------------------------- export

_ARCH_MODULES = ("napari_unet.model.shapes", "napari_unet.model.blocks", "napari_unet.model.unet")
_PALETTE = np.array(
    [[0, 0, 0], [255, 200, 0], [0, 160, 255], [255, 60, 60], [60, 220, 90], [200, 80, 255]],
    np.uint8,
)


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


def _exec_source(code: bytes | str, filename: str) -> types.ModuleType:
    """Run Python source as a fresh module (callers decide whether it is trusted)."""
    digest = _sha256(code if isinstance(code, bytes) else code.encode())
    name = f"_napari_unet_bioimageio_{digest[:16]}"
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    try:
        exec(compile(code, filename, "exec"), module.__dict__)
    except Exception as err:  # noqa: BLE001 - report any failure of the code
        sys.modules.pop(name, None)
        raise ModelFileError(
            f"{filename}: the architecture code failed ({_first_line(err)})"
        ) from None
    return module


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
    eps = float(spec.get("eps", 1e-6))
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
    lo = g.min_input if g.valid else g.snap(2 * g.halo + 1, "up")
    names = ["raw"] if info.in_channels == 1 else [f"channel{i}" for i in range(info.in_channels)]
    inputs = [{"type": "batch"}, {"type": "channel", "channel_names": names}]
    outputs = [{"type": "batch"}, {"type": "channel", "channel_names": list(info.classes)}]
    for k in "yx":
        inputs.append({"type": "space", "id": k, "size": {"min": lo, "step": g.multiple}})
        size = {"tensor_id": "raw", "axis_id": k, "offset": -g.shrink}
        outputs.append({"type": "space", "id": k, "size": size})
        if not g.valid and g.halo > 0:
            outputs[-1]["halo"] = g.halo
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
    normalization, _ = _split_pre(inp, info.in_channels)
    activation, _ = _split_post(out)
    spec_info = replace(info, normalization=normalization, activation=activation)
    x = _test_input(info, net.geometry)
    y = _direct(net, _device(net), spec_info, x, ENGINE_IN, ENGINE_OUT)
    return x, y.astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in rgb)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _as_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        lo, hi = np.percentile(a, (1, 99.8))
        a = (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ModelFileError(f"a cover image must be (H, W) or (H, W, 3), got {a.shape}")
    return a[..., :3]


def _cover_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Input (grey) beside the prediction (class colours), side by side (2:1)."""
    left = _as_rgb(x[0, 0])
    probs = y[0]
    if probs.shape[0] == 1:
        small = (np.clip(probs[0], 0, 1)[..., None] * _PALETTE[1]).astype(np.uint8)
    else:
        small = _PALETTE[probs.argmax(axis=0) % len(_PALETTE)]
    right = np.zeros_like(left)
    o = (left.shape[0] - small.shape[0]) // 2
    right[o : o + small.shape[0], o : o + small.shape[1]] = small
    return np.concatenate([left, right], axis=1)


def _cover(cover, x: np.ndarray, y: np.ndarray) -> tuple[str, bytes]:
    if cover is None:
        return "cover.png", _png(_cover_image(x, y))
    if isinstance(cover, np.ndarray):
        return "cover.png", _png(_as_rgb(cover))
    path = Path(cover)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif"):
        raise ModelFileError(f"{path.name}: a cover must be a PNG, JPEG or GIF image")
    return f"cover{path.suffix.lower()}", path.read_bytes()


def _readme(info: ModelInfo, g: Geometry, names: dict) -> str:
    a = info.architecture or {}
    spec = ", ".join(f"{k} {v}" for k, v in info.normalization.items())
    lines = [
        f"# {info.name}",
        "",
        info.description or "A U-Net segmentation model exported from napari-unet.",
        "",
        "## Model",
        "",
        f"- classes: {', '.join(info.classes)} ({info.activation})",
        f"- input: {info.in_channels} channel(s); normalisation per image and channel: {spec}",
        f"- architecture: U-Net (Ronneberger et al. 2015), depth {a.get('depth')}, base width "
        f"{a.get('base_width')}, {a.get('padding')} padding, {a.get('norm')} norm",
        f"- input sizes: {g.min_input} + k*{g.multiple} px; context (halo) {g.halo} px per side"
        + (f"; the output is {g.shrink} px smaller" if g.valid else ""),
        "",
        "## Weights",
        "",
        f"- `{names['torchscript']}`: TorchScript (traced; accepts every input size above)",
        f"- `{names['state_dict']}`: PyTorch state dict for `UNet(**kwargs)` in "
        f"`{names['architecture']}`",
        "",
        "## Use",
        "",
        "In napari with napari-unet, or on the command line:",
        "`napari-unet predict IMAGE --model THIS.zip`. Large images are segmented with",
        "overlap-tile inference; tiled and one-pass results agree.",
        "",
        "## Validation",
        "",
        "`test_output.npy` is the output for `test_input.npy` (pre-processing with statistics",
        "of the whole tensor, one forward pass, post-processing), as the bioimage.io spec",
        "runs it; napari-unet checks it with `napari_unet.io.bioimageio.run_test_tensors`.",
    ]
    extra = [f"- {k}: {v}" for k, v in info.provenance.items() if k != "train_config"]
    extra += [f"- {k}: {v}" for k, v in info.metrics.items()]
    if extra:
        lines += ["", "## Training and evaluation", "", *extra]
    lines += ["", "## Citation", "", f"{UNET_CITATION['text']} doi:{UNET_CITATION['doi']}"]
    return "\n".join(lines) + "\n"


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
    keep = ("classes", "instances", "metrics", "normalization", "pixel_size")
    now = datetime.datetime.now(datetime.timezone.utc)
    rdf = {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": _rdf_name(info.name),
        "description": info.description
        or f"U-Net segmenting {', '.join(info.classes)} (napari-unet)",
        "authors": meta["authors"],
        "cite": [UNET_CITATION],
        "license": meta["license"],
        "documentation": "README.md",
        "covers": [meta["cover"]],
        "tags": ["unet2d", "pytorch", "segmentation", "napari-unet"],
        "timestamp": now.isoformat(timespec="seconds"),
        "inputs": [inputs],
        "outputs": [outputs],
        "weights": _rdf_weights(net, files, names),
        "config": {"napari_unet": {k: getattr(info, k) for k in keep}},
    }
    return _plain(rdf)


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
    model: LoadedModel, out_zip, *, cover=None, license: str = "CC-BY-4.0", authors=None
) -> Path:
    """Write a project U-Net as a bioimage.io package (format 0.5.4 zip), atomically.

    Parameters
    ----------
    model : LoadedModel
        A napari-unet U-Net (``model.net`` is a :class:`~napari_unet.model.UNet`).
    out_zip : str or Path
        The ``.zip`` to write.
    cover : str, Path or ndarray, optional
        Cover image (PNG/JPEG/GIF file or an array); default: test input beside
        the prediction.
    license : str
        SPDX licence of the weights.
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
    out_zip = Path(out_zip)
    if out_zip.suffix != ".zip":
        raise ModelFileError(f"a bioimage.io package is a .zip, got {out_zip.name!r}")
    net = copy.deepcopy(model.net).float().eval()
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
    cover_name, files_cover = _cover(cover, x, y)
    files[cover_name] = files_cover
    files["README.md"] = _readme(info, net.geometry, names).encode()
    meta = {"authors": _authors(authors, info), "license": license, "cover": cover_name}
    rdf = _rdf(net, info, tensors, files, names, meta)
    files = {"bioimageio.yaml": _yaml(rdf), **files}
    return atomic_write(out_zip, lambda tmp: _write_zip(tmp, files))


def _yaml(rdf: dict) -> bytes:
    import yaml

    return yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()


def _write_zip(path, files: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
