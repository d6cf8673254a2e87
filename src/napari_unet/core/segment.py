"""One call from an image to what a user asked for: probabilities, class labels
or instances. Shared by the command line and the napari widgets."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from napari_unet.core import postprocess
from napari_unet.core.tiling import Progress, predict_iter

MODES = ("probabilities", "labels", "instances")


@dataclass(frozen=True)
class SegmentOptions:
    """What to compute and how (defaults: automatic tiles, instances)."""

    mode: str = "instances"
    axes: str | None = None
    tile: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    amp: bool = True
    threshold: float = 0.5
    min_size: int = 0
    min_confidence: float | None = None  # None: the model's instance recipe
    region: tuple[int, int, int, int] | None = None
    tta: bool = False  # average over mirrored tiles (4x the time)


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """Luminance (ITU-R 601) of an ``(..., Y, X, 3 or 4)`` RGB(A) image, float32."""
    rgb = np.asarray(image)[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def segment_iter(image, model, options: SegmentOptions) -> Generator[Progress, None, np.ndarray]:
    """Yield progress, return the result for ``options.mode``.

    ``probabilities``: float32 ``(K, *leading, Y, X)``; ``labels``: uint8 class
    indices; ``instances``: int32 object labels ``(*leading, Y, X)``.
    """
    if options.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {options.mode!r}")
    engine = "labels" if options.mode == "labels" else "probabilities"
    result = yield from predict_iter(
        image,
        model,
        axes=options.axes,
        tile=options.tile,
        batch_size=options.batch_size,
        device=options.device,
        amp=options.amp,
        output=engine,
        region=options.region,
        tta=options.tta,
    )
    if options.mode == "instances":
        yield Progress(1, 1, "finding objects")
        info = model.info
        result = postprocess.instances(
            result,
            info.instances,
            info.classes,
            options.threshold,
            options.min_size,
            options.min_confidence,
        )
    return result
