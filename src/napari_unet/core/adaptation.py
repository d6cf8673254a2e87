"""Adapting a trained network to new images without new weights from scratch.

Helpers that :func:`napari_unet.core.training.train_iter` uses for fine-tuning
(batch-norm re-estimation, pseudo-labels from the model's confident
predictions) and a prior correction of a two-class model's decision threshold.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from napari_unet.core.cancel import Cancelled
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import to_layout

if TYPE_CHECKING:
    from napari_unet.core.samples import Sample
    from napari_unet.core.train_config import TrainConfig


def adapt_norm(
    net, planes: Sequence[np.ndarray], model: LoadedModel, rng, dev, crops=16, should_stop=None
):
    """Re-estimate batch-norm running statistics on ``planes`` (normalised ``(C, Y, X)``).

    The statistics become the plain average over up to ``crops`` crops of at most
    512 x 512 px, about one per 512 x 512 px of each plane (no gradients, weights
    untouched): the cheapest domain adaptation, and it keeps train and inference
    statistics of the user's images alike.
    ``should_stop()`` is asked before each crop: True raises
    :class:`~napari_unet.core.cancel.Cancelled` (the statistics are then half made, so
    the network must be dropped).
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or not planes:
        return
    g = model.info.geometry
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    # a crop per 512 x 512 px of each plane (one crop of a single large plane gave the
    # statistics of a 16th of it), taken from the planes in turn, in random order,
    # ``crops`` in all (every plane of a stack before a second crop of any)
    per_plane = [math.ceil(p.shape[1] * p.shape[2] / 512**2) for p in planes]
    turn = rng.permutation(len(planes))
    order = [i for r in range(max(per_plane)) for i in turn if per_plane[i] > r][:crops]
    try:
        with torch.no_grad():
            for i in order:
                if should_stop is not None and should_stop():
                    raise Cancelled("stopped while re-estimating the normalisation")
                _forward_crop(net, planes[i], g, rng, dev)
    finally:  # (stopped half way too)
        for m, mom in zip(bns, saved):
            m.momentum = mom


def _forward_crop(net, plane: np.ndarray, g, rng, dev) -> None:
    """One random crop of ``plane`` through ``net`` (its batch norms take the statistics)."""
    h, w = (_crop_size(n, g) for n in plane.shape[1:])
    y0 = int(rng.integers(0, max(1, plane.shape[1] - h + 1)))
    x0 = int(rng.integers(0, max(1, plane.shape[2] - w + 1)))
    crop = plane[:, y0 : y0 + h, x0 : x0 + w]
    if crop.shape[1:] != (h, w):  # smaller than one tile: mirror it up
        crop = np.pad(
            crop,
            ((0, 0), (0, h - crop.shape[1]), (0, w - crop.shape[2])),
            mode="symmetric",
        )
    net(to_layout(torch.from_numpy(np.ascontiguousarray(crop))[None].to(dev), net))


def _crop_size(n: int, g) -> int:
    """Crop side for the statistics: at most 512 px, and at least two pooling strides
    (a 1 x 1 bottleneck gives batch norm one value per channel, which it refuses)."""
    least = max(g.min_input, 2 * g.multiple)
    size = g.snap(min(512, max(n, least)), "down")
    return size if size >= least else g.snap(least, "up")


def add_pseudo_labels(
    samples: list[Sample], model: LoadedModel, cfg: TrainConfig, dev, should_stop=None
) -> None:
    """Fill unpainted pixels with the model's prediction where it is confident
    (``should_stop``: see :func:`~napari_unet.core.tiling.predict_iter`).

    Their total weight per image is ``cfg.pseudo_weight`` times the painted
    pixels' total, so a few strokes are not drowned by a million pseudo-labels
    and still win where they disagree (painted pixels are never overwritten).
    """
    from napari_unet.core.tiling import predict

    plain = LoadedModel(model.net, replace(model.info, normalization={"mode": "none"}))
    for s in samples:
        probs = predict(
            s.unpadded(), plain, axes="CYX", device=dev, amp=False, should_stop=should_stop
        )
        conf, guess = probs.max(0), probs.argmax(0)
        p = s.pad
        target = s.target[p:-p, p:-p]
        weights = s.weights[p:-p, p:-p]
        painted = target >= 0
        pseudo = ~painted & (conf >= cfg.pseudo_threshold)
        n = int(pseudo.sum())
        if n == 0:
            continue
        per_pixel = cfg.pseudo_weight * float(weights[painted].sum()) / n
        target[pseudo] = guess[pseudo]
        weights[pseudo] = per_pixel


def calibrate_threshold(model: LoadedModel, cls: int, threshold: float) -> LoadedModel:
    """A copy of a two-class ``model`` whose arg-max equals ``p(cls) > threshold`` of the original.

    Class-balanced training shifts the decision toward the rare class; this moves
    it back by adding ``log((1 - t) / t)`` to the class's logit bias (a prior
    correction: probabilities, labels and instances all follow, no extra
    metadata needed). The threshold is chosen on training data by the caller.
    """
    if model.info.num_classes != 2:
        raise ValueError("threshold calibration needs a two-class model")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    head = getattr(model.net, "head", None)
    if head is None or getattr(head, "bias", None) is None:
        raise ValueError("the network has no output layer bias to calibrate")
    net = copy.deepcopy(model.net)
    with torch.no_grad():
        net.head.bias[cls] += math.log((1 - threshold) / threshold)
    provenance = {
        **model.info.provenance,
        "calibrated_threshold": {"class": model.info.classes[cls], "threshold": threshold},
    }
    return LoadedModel(net.eval(), replace(model.info, provenance=provenance))
