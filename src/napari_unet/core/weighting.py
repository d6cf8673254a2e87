"""The loss's weights: how classes are weighted, and the extra weight on the gaps and
contacts between objects, as a run asks or as the base model was trained."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from napari_unet.core import targets as tg
from napari_unet.core.train_config import TrainConfig
from napari_unet.model.info import LoadedModel

WEIGHTINGS = {"balanced": 1.0, "sqrt": 0.5, "none": 0.0}  # class weight = frequency^-power
MASK_WEIGHTS = ("class_weighting", "border_w0", "contact_w0")  # what with_weighting fills


def on_masks(kind: str, objects=()) -> bool:
    """Whether labels of ``kind`` (with painted classes' ``objects``) are instance masks."""
    return kind == "instances" or any(o is not None for o in objects)


def mask_weighting(model: LoadedModel) -> dict:
    """How ``model`` was trained on instance masks (class weighting, separation and
    contact weights): its record of it (kept through fine-tunes on strokes, which weigh
    otherwise), else its training settings if it was trained on masks, else the
    defaults of a training run."""
    provenance = model.info.provenance
    recorded = provenance.get("mask_weighting")
    if not isinstance(recorded, dict):
        settings = provenance.get("train_config")
        on_masks = isinstance(settings, dict) and provenance.get("label_kind") == "instances"
        recorded = settings if on_masks else {}
    fresh, own = TrainConfig(), {}
    for k in MASK_WEIGHTS:  # (a record of another kind: the defaults)
        value = recorded.get(k, getattr(fresh, k))
        if k == "class_weighting":
            fits = isinstance(value, str) and value in WEIGHTINGS
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool)
            fits = fits and 0 <= value < 1e6
        own[k] = value if fits else getattr(fresh, k)
    return own


def with_weighting(cfg: TrainConfig, model: LoadedModel, masks: bool) -> TrainConfig:
    """``cfg`` with an unset (None) class weighting, separation weight and contact
    weight filled in: where the labels are instance masks (``masks``), the base model's
    own (:func:`mask_weighting`; a network trained with soft class weights and weights
    on touching objects, fine-tuned on masks without them, merged more of them); for
    painted strokes (no objects), balanced classes and no separation weights."""
    unset = [k for k in MASK_WEIGHTS if getattr(cfg, k) is None]
    if not unset:
        return cfg
    if masks:
        own = mask_weighting(model)
        return replace(cfg, **{k: own[k] for k in unset})
    return replace(cfg, **{k: "balanced" if k == "class_weighting" else 0.0 for k in unset})


def separation(objects: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """The paper's separation weights and the contact weights of an instance mask."""
    border = np.zeros(objects.shape, np.float32)
    if cfg.border_w0 > 0:
        border += tg.border_weights(objects, cfg.border_w0, cfg.border_sigma)
    if cfg.contact_w0 > 0:
        border += tg.contact_weights(objects, cfg.contact_w0)
    return border
