"""The training loss (weighted cross-entropy, optional soft Dice) and validation numbers.

Targets are class indices with ``-1`` for pixels nobody annotated; the loss
ignores them, so painted strokes (sparse labels) train only where painted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from napari_unet.model.unet import to_layout


def loss_fn(logits, target, weights, dice: float = 0.0, hard: float = 1.0) -> torch.Tensor:
    """Pixel-weighted cross-entropy over annotated pixels (+ optional soft Dice).

    ``weights`` is ``(B, H, W)``, or ``(B, 2, H, W)`` with each pixel's interior
    share (soft cores, :func:`targets.core_share`; ``< 0``: the hard target) second:
    there the loss is ``-(q log p_interior + (1 - q) log p_boundary)``.
    ``hard < 1``: the cross-entropy is the mean over that share of the annotated
    pixels with the highest weighted loss (bootstrapped cross-entropy), so pixels
    the network already gets right stop diluting the few it does not.
    """
    if not 0 < hard <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard}")
    valid = target >= 0
    share = None
    if weights.ndim == 4:
        weights, share = weights[:, 0], weights[:, 1]
    ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    if share is not None:
        logp = torch.log_softmax(logits, 1)
        q = share.clamp(min=0)
        soft = -(q * logp[:, 1] + (1 - q) * logp[:, 2])
        ce = torch.where(share >= 0, soft, ce)
    w = weights * valid
    if hard < 1:
        per_pixel = (ce * w)[valid]
        k = max(1, math.ceil(hard * per_pixel.numel()))
        loss = per_pixel.topk(k, sorted=False).values.mean() if per_pixel.numel() else ce.sum() * 0
    else:
        loss = (ce * w).sum() / valid.sum().clamp(min=1)
    if dice > 0:
        probs = torch.softmax(logits, 1)
        onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2)
        m = valid[:, None].float()
        inter = (probs * onehot * m).sum((0, 2, 3))
        denom = ((probs + onehot) * m).sum((0, 2, 3))
        loss = loss + dice * (1 - ((2 * inter + 1) / (denom + 1)).mean())
    return loss


def evaluate_patches(net, batch, dice: float, dev) -> dict:
    """Loss and pixel accuracy on fixed validation patches."""
    x, t, w = (a.to(dev) for a in batch)
    net.eval()
    with torch.inference_mode():
        logits = net(to_layout(x, net))
        loss = float(loss_fn(logits, t, w, dice))
        valid = t >= 0
        acc = float((logits.argmax(1)[valid] == t[valid]).float().mean()) if valid.any() else 0.0
    return {"val_loss": round(loss, 5), "val_pixel_accuracy": round(acc, 5)}
