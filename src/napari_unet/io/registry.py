"""Bundled models, by name.

A bundled model is a ``<name>.safetensors`` file in ``napari_unet/weights``
with a model card ``<name>.md`` beside it. Only models trained by the
project's own training code are shipped (see ``scripts/`` and ``docs/``).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "nuclei"


def bundled_models() -> dict[str, Path]:
    """Names and files of the bundled models, sorted by name."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}


def bundled_path(name: str) -> Path | None:
    """The file of the bundled model ``name``, or None."""
    return bundled_models().get(name)


def default_model() -> str | None:
    """Name of the model used when none is given (None if nothing is bundled)."""
    models = bundled_models()
    if DEFAULT_MODEL in models:
        return DEFAULT_MODEL
    return next(iter(models), None)


def is_bundled(path: str | Path) -> bool:
    """Whether ``path`` is one of the shipped weight files (never to be overwritten)."""
    try:
        return Path(path).resolve().parent == WEIGHTS_DIR
    except OSError:
        return False
