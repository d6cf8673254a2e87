"""Core algorithms (no Qt, no napari): tiling, normalisation, post-processing, training."""
