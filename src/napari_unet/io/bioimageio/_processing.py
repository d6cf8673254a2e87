"""Processing steps around the weights and the network in the engine's layout (PackageNet)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from napari_unet.io.bioimageio._files import _Files
from napari_unet.io.bioimageio._rdf import ENGINE_IN, ENGINE_OUT, _Spec, _Tensor
from napari_unet.io.safe_files import ModelFileError

# the eps of an exported package's normalisation (the spec needs one above 0)
EXPORT_EPS = 1e-12

STATISTICAL = ("zero_mean_unit_variance", "scale_range", "scale_mean_variance")


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


# the settings a pointwise step cannot do without
_REQUIRED = {"fixed_zero_mean_unit_variance": ("mean", "std"), "binarize": ("threshold",)}


def _pointwise(ops: list, where: str) -> list:
    """Check that ``ops`` are pointwise steps the engine can run around the weights."""
    out = []
    for op, kw in ops:
        if op not in POINTWISE:
            hint = " (it needs whole-image statistics)" if op in STATISTICAL else ""
            raise ModelFileError(f"{where} step {op!r} is not supported here{hint}")
        if kw.get("axis", "c") != "c" or "min_percentile" in kw or "max_percentile" in kw:
            raise ModelFileError(f"{where} step {op!r} with {kw} is not supported")
        missing = [k for k in _REQUIRED.get(op, ()) if kw.get(k) is None]
        if missing:  # (a KeyError when the network first ran)
            raise ModelFileError(f"{where} step {op!r} has no {' or '.join(missing)}")
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
