"""napari-unet: U-Net segmentation for napari.

The core (``napari_unet.model``, ``napari_unet.core``, ``napari_unet.io``) never
imports Qt or napari; widgets live in ``napari_unet._widgets``.
"""

__version__ = "0.1.0"
