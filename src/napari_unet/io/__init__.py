"""Model files in and out, and bundled models by name (no Qt, no napari)."""

from napari_unet.io.files import ModelFileError, load_model, save_model

__all__ = ["ModelFileError", "load_model", "save_model"]
