"""The U-Net itself and its size arithmetic (torch only, no Qt, no napari)."""

from napari_unet.model.shapes import Geometry
from napari_unet.model.unet import UNet, UNetConfig

__all__ = ["Geometry", "UNet", "UNetConfig"]
