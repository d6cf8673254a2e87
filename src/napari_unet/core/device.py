"""Device selection and memory budgets for inference and training."""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices usable here, best first (always ends with ``"cpu"``)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; others are checked."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {DEVICES}")
    if base == "auto":
        return torch.device(available_devices()[0])
    if base != "cpu" and base not in available_devices():
        raise ValueError(
            f"device {name!r} is not available here; available: {available_devices()}"
        )
    return torch.device(name)


def amp_applies(amp: bool, device: torch.device) -> bool:
    """Whether mixed precision (``amp``) is used on ``device``: on CUDA only."""
    return bool(amp and device.type == "cuda")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (faster than float32):
    CUDA GPUs with bf16 support, CPUs with AVX512-BF16 or AMX (oneDNN)."""
    try:
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if device.type == "cpu":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


def free_memory(device: torch.device) -> int:
    """Bytes we may use on ``device``: free GPU memory, or available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = available_ram()
    if available is not None:
        return available
    return int(os.environ.get("NAPARI_UNET_MEMORY", 4 << 30))


def available_ram() -> int | None:
    """Bytes of RAM available (Linux's MemAvailable), or None where it is not known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an out-of-memory error from torch."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    # CUDA / MPS say "out of memory"; the CPU allocator "DefaultCPUAllocator: can't
    # allocate memory: you tried to allocate ..."
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
