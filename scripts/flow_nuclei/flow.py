"""Flow-field (Cellpose-like) nuclei: an experiment, not part of the plugin.

The bundled ``nuclei`` model's misses are mostly touching nuclei whose interior
cores the network joins. Here the network instead predicts, at each pixel, the
direction towards its nucleus's centre (Stringer et al. 2021, *Cellpose*): the
normalised gradient of a heat potential diffused from each nucleus's centre
within the nucleus, plus a foreground probability. Pixels then follow the
predicted flow for 200 steps; those that end at the same sink are one nucleus,
so two touching nuclei separate wherever their flows diverge, even if no seam
is visible. Network: the project's U-Net (depth 4, width 16, same padding,
batch norm, 1.94 M parameters) with three outputs (flow y, flow x, foreground
logit). The potential is computed once per training image and warped with the
image by the augmentation (a scalar field, so flows taken after warping stay
exact under zoom, rotation and elastic deformation).
Figures: docs/models/nuclei.md.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _dense_experiment import normalized, predict_raw
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from napari_unet.core.augment import AugmentConfig, augment
from napari_unet.core.targets import contact_weights
from napari_unet.model import UNet, UNetConfig

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def heat_potential(lab: np.ndarray) -> np.ndarray:
    """log(1 + T): heat diffused from each object's centre, within the object.

    As Cellpose's ``masks_to_flows``: the centre is the object pixel nearest the
    object's median coordinates; each iteration adds 1 at the centres and
    replaces every pixel by the mean of its 3x3 neighbours of the same object
    (others count 0), for twice the largest object's extent.
    """
    lab = np.asarray(lab)
    H, W = lab.shape
    ys, xs = np.nonzero(lab > 0)
    out = np.zeros((H, W), np.float32)
    if ys.size == 0:
        return out
    n = ys.size
    L = lab[ys, xs]
    idmap = np.full((H + 2, W + 2), n, np.int64)
    idmap[ys + 1, xs + 1] = np.arange(n)
    padlab = np.pad(lab, 1)
    nb = np.empty((9, n), np.int64)
    for k, (dy, dx) in enumerate(_OFFSETS):
        same = padlab[ys + 1 + dy, xs + 1 + dx] == L
        nb[k] = np.where(same, idmap[ys + 1 + dy, xs + 1 + dx], n)
    centres, extent = [], 0
    order = np.argsort(L, kind="stable")
    bounds = np.searchsorted(L[order], np.unique(L))
    for idx in np.split(order, bounds[1:]):
        py, px = ys[idx], xs[idx]
        my, mx = np.median(py), np.median(px)
        centres.append(idx[np.argmin((py - my) ** 2 + (px - mx) ** 2)])
        extent = max(extent, int(np.ptp(py) + np.ptp(px)))
    centres = np.asarray(centres)
    T = np.zeros(n + 1, np.float64)
    for _ in range(2 * extent + 2):
        T[centres] += 1
        T[:n] = T[nb].mean(0)
        T[n] = 0
    out[ys, xs] = np.log1p(T[:n])
    return out


def flows_from_potential(pot: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """(2, H, W) unit gradient of ``pot`` on object pixels (0 elsewhere)."""
    fg = lab > 0
    p = np.where(fg, pot, 0).astype(np.float32)
    gy, gx = np.gradient(p)
    mag = np.sqrt(gy**2 + gx**2) + 1e-20
    return np.stack([gy / mag, gx / mag]) * fg


def mask_flows(lab: np.ndarray) -> np.ndarray:
    return flows_from_potential(heat_potential(lab), lab)


class FlowNet(torch.nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.unet = UNet(UNetConfig(1, 3, depth=4, base_width=width, padding="same", norm="batch"))
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.unet(x.contiguous(memory_format=torch.channels_last))


class Sampler:
    """Augmented 256-px patches; half centred on pixels where two nuclei touch."""

    def __init__(self, items, rng, patch=256, margin=16, aug=None, contact_share=0.5):
        self.rng, self.patch, self.margin = rng, patch, margin
        self.contact_share = contact_share
        self.aug = aug or AugmentConfig(
            intensity=0.25, shift=0.05, noise=0.05, elastic=0.3, zoom=0.3
        )
        p = patch // 2 + margin + 64
        self.pad = p
        self.items = []
        for _, im, lab in items:
            lab = lab.astype(np.int64)
            cy, cx = np.nonzero(contact_weights(lab, 1.0))
            self.items.append(
                (
                    np.pad(normalized(im), p, mode="reflect"),
                    np.pad(lab, p, constant_values=-1),
                    np.pad(heat_potential(lab), p),
                    (cy + p, cx + p),
                )
            )

    def draw(self):
        img, lab, pot, (ccy, ccx) = self.items[self.rng.integers(len(self.items))]
        s = self.patch + 2 * self.margin
        if ccy.size and self.rng.random() < self.contact_share:
            i = self.rng.integers(ccy.size)
            cy, cx = ccy[i] + self.rng.integers(-48, 49), ccx[i] + self.rng.integers(-48, 49)
        else:
            H, W = img.shape[0] - 2 * self.pad, img.shape[1] - 2 * self.pad
            cy, cx = self.rng.integers(H) + self.pad, self.rng.integers(W) + self.pad
        y0, x0 = cy - s // 2, cx - s // 2
        im = img[None, y0 : y0 + s, x0 : x0 + s]
        lb = lab[y0 : y0 + s, x0 : x0 + s]
        pt = pot[y0 : y0 + s, x0 : x0 + s]
        im, lb, pt = augment(im, lb, pt, self.rng, self.aug)
        valid = lb >= 0
        fl = flows_from_potential(pt, lb)
        m = self.margin
        c = (slice(m, m + self.patch),) * 2
        return im[:, c[0], c[1]], fl[:, c[0], c[1]], (lb[c] > 0).astype(np.float32), valid[c]

    def batch(self, n):
        parts = [self.draw() for _ in range(n)]
        return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(p))) for p in zip(*parts))


def flow_term(out_flow, flow, valid):
    """Cellpose's flow loss: MSE of the flows (x5) / 2, over the valid pixels."""
    v = valid.float()
    mse = ((out_flow - 5 * flow) ** 2).sum(1) / 2
    return (mse * v).sum() / v.sum().clamp(min=1) / 2


def flow_loss(out, flow, fg, valid):
    """Cellpose's loss: the flow term plus BCE of the foreground."""
    v = valid.float()
    den = v.sum().clamp(min=1)
    lf = flow_term(out[:, :2], flow, valid)
    bce = F.binary_cross_entropy_with_logits(out[:, 2], fg, reduction="none")
    lp = (bce * v).sum() / den
    return lf + lp, float(lf.detach()), float(lp.detach())


def predict(net, img, pad=64):
    """(flows (2, H, W) in unit length, foreground logit (H, W)) on a whole image."""
    out = predict_raw(net, img, pad)
    return out[:2] / 5, out[2]


def follow(flow: np.ndarray, mask: np.ndarray, niter: int = 200) -> np.ndarray:
    """(N, 2) end points of the mask's pixels after ``niter`` Euler steps along ``flow``."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    p = torch.from_numpy(np.stack([ys, xs], 1).astype(np.float32))
    f = torch.from_numpy(np.ascontiguousarray(flow[::-1] * mask))[None].float()  # (x, y)
    scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)])
    hi = torch.tensor([H - 1, W - 1], dtype=torch.float32)
    for _ in range(niter):
        g = p[:, [1, 0]] * scale - 1
        d = F.grid_sample(f, g[None, None], align_corners=True)[0, :, 0].T  # (N, [dx, dy])
        p = torch.minimum(torch.clamp(p + d[:, [1, 0]], min=0), hi)
    return p.numpy()


def instances(
    flow, logit, prob_logit=0.0, flow_threshold=0.4, min_size=15, niter=200, seed_count=10
):
    """Cellpose's ``get_masks``: cluster the flows' end points, check flow consistency."""
    lab = sink_labels(flow, logit, prob_logit, niter, seed_count)
    return finish(lab, flow, flow_threshold, min_size)


def sink_labels(flow, logit, prob_logit=0.0, niter=200, seed_count=10):
    """Foreground pixels labelled by the sink their flow ends in (0: none)."""
    mask = logit > prob_logit
    H, W = mask.shape
    lab = np.zeros((H, W), np.int32)
    if mask.sum() == 0:
        return lab
    ends = np.rint(follow(flow, mask, niter)).astype(np.int64)
    hist = np.bincount(ends[:, 0] * W + ends[:, 1], minlength=H * W).reshape(H, W)
    hmax = ndi.maximum_filter(hist, 5)
    peaks = (hist >= hmax) & (hist > seed_count)
    seeds, _ = ndi.label(peaks)
    # grow each sink up to 5 px over end-point density (Cellpose: 5 dilations, h > 2)
    sinks = expand_labels(seeds, 5) * (hist > 2)
    ys, xs = np.nonzero(mask)
    lab[ys, xs] = sinks[ends[:, 0], ends[:, 1]]
    return lab


def finish(lab, flow, flow_threshold=0.4, min_size=15):
    """Drop too big / small objects and those whose flows disagree with their shape."""
    H, W = lab.shape
    lab = lab.copy()
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    lab[np.isin(lab, ids[(counts < min_size) | (counts > 0.4 * H * W)])] = 0
    if flow_threshold is not None and lab.max():
        lab = _drop_bad_flows(lab, flow, flow_threshold)
    return _fill_and_relabel(lab, min_size)


def _drop_bad_flows(lab, flow, threshold):
    mf = mask_flows(lab)
    err = ((mf - flow) ** 2).sum(0)
    idx = np.arange(1, lab.max() + 1)
    e = ndi.mean(err, lab, idx)
    bad = idx[np.asarray(e) > threshold]
    lab = lab.copy()
    lab[np.isin(lab, bad)] = 0
    return lab


def _fill_and_relabel(lab, min_size):
    out = np.zeros_like(lab)
    k = 0
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is None:
            continue
        m = ndi.binary_fill_holes(lab[sl] == i)
        if m.sum() < min_size:
            continue
        k += 1
        out[sl][m & (out[sl] == 0)] = k
    return out
