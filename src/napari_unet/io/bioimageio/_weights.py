"""Integrity and weights: sha256 checks; choosing and loading TorchScript, state dict, ONNX."""

from __future__ import annotations

import importlib
import io
import posixpath
import sys
import tempfile
import types

import numpy as np
import torch
from torch import nn

from napari_unet.io.bioimageio._files import (
    _Files,
    _first_line,
    _is_remote,
    _read_checked,
    _sha256,
)
from napari_unet.io.bioimageio._rdf import _Spec
from napari_unet.io.safe_files import ModelFileError, check_zip_archive
from napari_unet.io.scripted import load_script

WEIGHTS_ORDER = ("torchscript", "pytorch_state_dict", "onnx")


def _check_hashes(files: _Files, spec: _Spec) -> None:
    """Every declared local file that is present must match its sha256."""
    for name, sha in spec.files:
        if _is_remote(name) or not files.has(name):
            continue
        if files.sha256(name) != str(sha).lower():
            raise ModelFileError(
                f"{name}: sha256 does not match the package description (changed or corrupt)"
            )


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
    """``(format, entry, why others were passed over)`` of the weights to load."""
    if fmt is not None and fmt not in spec.weights:
        raise ModelFileError(
            f"no {fmt} weights in the package (it has: {', '.join(spec.weights)})"
        )
    # trusted: the network itself first, whose stages the feature-map panel shows (the
    # advice to tick 'Trust package code' for them loaded the TorchScript all the same)
    order = ("pytorch_state_dict", "torchscript", "onnx") if trust_code else WEIGHTS_ORDER
    problems = []
    for name in [fmt] if fmt else order:
        if name not in spec.weights:
            continue
        problem = _weights_problem(name, spec.weights[name], files, trust_code)
        if problem is None:
            return name, spec.weights[name], problems
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
        return load_script(data, entry["source"]).float().eval()
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


def _state_dict_net(data: bytes, entry: dict, files: _Files) -> nn.Module:
    arch = entry.get("architecture") or {}
    net = _architecture(arch, files)(**(arch.get("kwargs") or {}))
    check_zip_archive(io.BytesIO(data), entry["source"])  # a zip bomb inside
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


# onnxruntime's folder for the external data of a model given as bytes
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


class OnnxNet(nn.Module):
    """ONNX weights run by onnxruntime behind an ``nn.Module``: torch tensors in and out."""

    opaque = True  # no stages to look into (core.features.inspectable)

    def __init__(self, data: bytes, name: str = "weights.onnx") -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            # external data files are looked for in an empty folder: they were read from
            # the folder napari was started in, unchecked by the package's hashes
            with tempfile.TemporaryDirectory() as empty:
                opts.add_session_config_entry(EXTERNAL_FOLDER, empty)
                self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any onnxruntime failure
            if "external data" in str(err).lower():
                raise ModelFileError(
                    f"{name}: its weights are in external data files, which napari-unet "
                    "does not read; save the ONNX model with its weights inside"
                ) from None
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
