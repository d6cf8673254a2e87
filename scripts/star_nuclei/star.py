"""Star-convex (StarDist-like) nuclei: an experiment, not part of the plugin.

The bundled ``nuclei`` model's misses are mostly touching nuclei whose interior
cores the network joins. Here each nucleus pixel instead predicts the nucleus's
extent along 32 rays (Schmidt et al. 2018, *Cell Detection with Star-convex
Polygons*) plus an object probability (the distance transform normalised per
nucleus); polygons from the most probable pixels, kept by greedy non-maximum
suppression, are the nuclei. Network: the project's U-Net (depth 4, width 16,
same padding, batch norm) with a 64-channel 1x1 + ReLU layer before a 33-channel
head. Targets are computed per augmented patch (flips, rotations, zoom, elastic,
intensity, noise as the bundled recipe) on a 32-px margin.
Figures: docs/models/nuclei.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from _dense_experiment import normalized, predict_raw
from scipy import ndimage as ndi
from skimage.draw import polygon
from torch import nn

from napari_unet.core.augment import AugmentConfig, augment
from napari_unet.model import UNet, UNetConfig


def angles(rays: int) -> np.ndarray:
    return np.arange(rays) * (2 * np.pi / rays)


def star_distances(lab: np.ndarray, rays: int = 32) -> np.ndarray:
    """(rays, H, W) distance from each object pixel to its object's edge along each ray.

    Rays stop at the first pixel of another label (or the image edge); the distance
    is corrected for the overshoot as in StarDist.
    """
    H, W = lab.shape
    padded = np.pad(lab.astype(np.int64), 1, constant_values=-2)
    flat = padded.ravel()
    W2 = W + 2
    ys, xs = np.nonzero(lab > 0)
    base = (ys + 1) * W2 + (xs + 1)
    L = flat[base]
    out = np.zeros((rays, H, W), np.float32)
    for k, th in enumerate(angles(rays)):
        dy, dx = math.sin(th), math.cos(th)
        corr = 1 - 0.5 / max(abs(dx), abs(dy))
        b, lbl = base, L
        idx = np.arange(len(ys))
        d = np.zeros(len(ys), np.float32)
        t = 0
        while idx.size:
            t += 1
            off = int(np.rint(t * dy)) * W2 + int(np.rint(t * dx))
            same = flat[b + off] == lbl
            if not same.all():
                d[idx[~same]] = t - corr
                idx, b, lbl = idx[same], b[same], lbl[same]
        out[k, ys, xs] = d
    return out


def star_distances_torch(lab: torch.Tensor, rays: int = 32, crop: int = 0) -> torch.Tensor:
    """``star_distances`` for a batch ``(B, H, W)`` of integer labels on any device,
    for the pixels ``crop`` or more from the edge (rays still see the whole patch).

    At ray step ``t`` each object pixel looks at the label ``rint(t * (dy, dx))``
    away along each ray (as the NumPy version), all pixels and rays in one gather.
    """
    B, H, W = lab.shape
    dev = lab.device
    m = H + W  # no ray inside the patch is longer
    padded = F.pad(lab.int(), (m, m, m, m), value=-2)
    Hp, Wp = H + 2 * m, W + 2 * m
    flat = padded.reshape(-1)
    inner = lab[:, crop : H - crop, crop : W - crop]
    h, w = inner.shape[1:]
    pix = torch.nonzero(inner.reshape(-1) > 0).squeeze(1)  # object pixels of the crop
    b, rem = pix // (h * w), pix % (h * w)
    base = b * (Hp * Wp) + (rem // w + crop + m) * Wp + (rem % w + crop + m)
    own = flat[base]
    th = angles(rays)
    sin, cos = np.sin(th), np.cos(th)
    corr = torch.tensor(1 - 0.5 / np.maximum(np.abs(sin), np.abs(cos)), device=dev)
    corr = corr.float()[:, None]
    t_ = np.arange(1, m + 1)[:, None]  # every step's offset per ray, sent once: (m, rays)
    offs = np.rint(t_ * sin).astype(np.int64) * Wp + np.rint(t_ * cos).astype(np.int64)
    offs = torch.from_numpy(offs).to(dev)
    d = torch.zeros((rays, pix.numel()), dtype=torch.float32, device=dev)
    alive = torch.ones((rays, pix.numel()), dtype=torch.bool, device=dev)
    for t in range(1, m + 1):
        seen = flat[base[None, :] + offs[t - 1][:, None]]
        stop = alive & (seen != own[None, :])
        d = torch.where(stop, t - corr, d)
        alive &= ~stop
        if t % 8 == 0 and not bool(alive.any()):
            break
    out = torch.zeros((rays, B * h * w), dtype=torch.float32, device=dev)
    out[:, pix] = d
    return out.reshape(rays, B, h, w).transpose(0, 1)


def object_prob(lab: np.ndarray) -> np.ndarray:
    """Each object's distance transform divided by its maximum (StarDist's target)."""
    out = np.zeros(lab.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        m = lab[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        out[sl][m] = (d / d.max())[m]
    return out


def instances(prob, dist, prob_thresh=0.5, nms_thresh=0.4, grid=1, overlap="iou", min_size=8):
    """Greedy NMS over star polygons (highest probability first), rendered first-come."""
    rays = dist.shape[0]
    th = angles(rays)
    sin, cos = np.sin(th), np.cos(th)
    H, W = prob.shape
    mask = prob > prob_thresh
    if grid > 1:
        g = np.zeros_like(mask)
        g[::grid, ::grid] = True
        mask &= g
    ys, xs = np.nonzero(mask)
    order = np.argsort(-prob[ys, xs], kind="stable")
    canvas = np.zeros((H, W), np.int32)
    areas = np.zeros(len(order) + 1, np.int64)  # pixels of kept polygon k (label k)
    kept = 0
    for i in order:
        y, x = ys[i], xs[i]
        d = dist[:, y, x]
        rr, cc = polygon(y + d * sin, x + d * cos, (H, W))
        n = rr.size
        if n < min_size:
            continue
        owners = canvas[rr, cc]
        taken = owners > 0
        if taken.any():
            ids, cnt = np.unique(owners[taken], return_counts=True)
            a = areas[ids]
            denom = (n + a - cnt) if overlap == "iou" else np.minimum(n, a)
            if (cnt / denom).max() > nms_thresh:
                continue
        free = ~taken
        if free.sum() < min_size:
            continue
        kept += 1
        areas[kept] = n
        canvas[rr[free], cc[free]] = kept
    return canvas


class StarNet(nn.Module):
    def __init__(self, rays=32, width=16, feat=64, scale=1.0):
        super().__init__()
        self.scale = scale  # distances are predicted in units of ``scale`` px
        self.unet = UNet(
            UNetConfig(1, feat, depth=4, base_width=width, padding="same", norm="batch")
        )
        self.out = nn.Conv2d(feat, 1 + rays, 1)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        y = self.out(F.relu(self.unet(x)))
        if self.scale != 1.0:
            y = torch.cat([y[:, :1], y[:, 1:] * self.scale], 1)
        return y


class Sampler:
    """Augmented 256-px patches with their targets (rays on a 32-px margin).

    ``rays_later``: ``draw`` returns the margin's label patch instead of the rays,
    for ``rays_on_device`` to compute them where the network trains (a GPU).
    """

    def __init__(self, items, rng, patch=256, margin=32, rays=32, aug=None, rays_later=False):
        self.rng, self.patch, self.margin, self.rays = rng, patch, margin, rays
        self.rays_later = rays_later
        self.aug = aug or AugmentConfig(
            intensity=0.25, shift=0.05, noise=0.05, elastic=0.3, zoom=0.3
        )
        p = patch // 2 + margin + 64
        self.pad = p
        self.items = [
            (
                np.pad(normalized(im), p, mode="reflect"),
                np.pad(lab.astype(np.int64), p, constant_values=-1),
            )
            for _, im, lab in items
        ]

    def draw(self):
        img, lab = self.items[self.rng.integers(len(self.items))]
        s = self.patch + 2 * self.margin
        H, W = img.shape[0] - 2 * self.pad, img.shape[1] - 2 * self.pad
        cy = self.rng.integers(H) + self.pad
        cx = self.rng.integers(W) + self.pad
        y0, x0 = cy - s // 2, cx - s // 2
        im = img[None, y0 : y0 + s, x0 : x0 + s]
        lb = lab[y0 : y0 + s, x0 : x0 + s]
        im, lb, _ = augment(im, lb, np.zeros((1, s, s), np.float32), self.rng, self.aug)
        valid = lb >= 0
        pos = np.where(valid, lb, 0)
        # objects touching ignored pixels keep their rays stopping there (like an image edge)
        m = self.margin
        c = (slice(m, m + self.patch),) * 2
        if self.rays_later:
            d = np.where(valid, lb, -1).astype(np.int32)
        else:
            d = star_distances(np.where(valid, lb, -1), self.rays)[:, c[0], c[1]]
        pr = object_prob(pos)
        return im[:, c[0], c[1]], pr[c], d, valid[c]

    def batch(self, n):
        parts = [self.draw() for _ in range(n)]
        return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(p))) for p in zip(*parts))

    def rays_on_device(self, batch, device):
        """``train_loop``'s ``prepare`` for ``rays_later``: the label patches' rays."""
        x, prob, lab, valid = batch
        return x, prob, star_distances_torch(lab, self.rays, crop=self.margin), valid


def star_loss(out, prob, dist, valid, dist_w=0.2, reg=1e-4):
    v = valid.float()
    bce = F.binary_cross_entropy_with_logits(out[:, 0], prob, reduction="none")
    lp = (bce * v).sum() / v.sum().clamp(min=1)
    m = prob * v
    mae = (out[:, 1:] - dist).abs().mean(1)
    ld = (mae * m).mean() / (m.mean() + 1e-6)
    lr_ = (((1 - prob) * v)[:, None] * out[:, 1:] ** 2).mean()
    return lp + dist_w * ld + reg * lr_, float(lp.detach()), float(ld.detach())


def predict(net, img, pad=64):
    """(object probability, ray distances) on a whole image, mirror-padded."""
    out = predict_raw(net, img, pad)
    return 1 / (1 + np.exp(-out[0])), np.maximum(out[1:], 0)
