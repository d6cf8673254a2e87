"""napari widgets (Qt). Thin: all computation is in napari_unet.core."""
