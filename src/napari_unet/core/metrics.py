"""Segmentation metrics: object F1 at an IoU threshold, matched IoU, pixel IoU,
the pixel misclassification rate, the ISBI 2012 pixel error (1 - maximal pixel
F-score) and the ISBI 2012 foreground-restricted Rand error."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _relabel(lab: np.ndarray) -> np.ndarray:
    """Ids 1..n in the order of the given ids, 0 staying background (any integer ids:
    uint64 above 2**63 wrapped to negatives through int64, which skimage refuses)."""
    lab = np.asarray(lab)
    whole = lab.dtype.kind in "biu" or (
        lab.dtype.kind == "f" and np.array_equal(lab, np.round(lab))
    )
    if not whole:
        raise ValueError(f"label images hold whole-number ids, got dtype {lab.dtype}")
    from napari_unet.core.targets import renumbered

    return renumbered(lab)


def _same_shape(true, pred) -> None:
    """Scores compare pixel for pixel: different shapes were broadcast, or transposed
    images scored as a poor match, without a word."""
    if np.shape(true) != np.shape(pred):
        raise ValueError(
            f"the truth has shape {np.shape(true)} and the prediction {np.shape(pred)}: "
            "score images of the same shape"
        )


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true (rows) and predicted (columns) object, background excluded."""
    _same_shape(true, pred)
    t, p = _relabel(true), _relabel(pred)
    nt, np_ = int(t.max()), int(p.max())
    overlap = np.bincount(t.ravel() * (np_ + 1) + p.ravel(), minlength=(nt + 1) * (np_ + 1))
    overlap = overlap.reshape(nt + 1, np_ + 1)
    area_t = overlap.sum(1, keepdims=True)
    area_p = overlap.sum(0, keepdims=True)
    union = area_t + area_p - overlap
    iou = overlap / np.maximum(union, 1)
    return iou[1:, 1:]


def object_scores(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict:
    """One-to-one matching of instances; F1 at ``threshold``.

    The matching has the most pairs with IoU >= ``threshold``, and among those the
    highest total IoU (Hungarian assignment, as StarDist's ``matching``): maximising
    the total IoU alone could trade one pair at the threshold for two below it.
    Returns ``tp``, ``fp``, ``fn``, ``f1``, ``precision``, ``recall`` and
    ``mean_matched_iou`` (mean IoU of the matched pairs). With no object on either
    side there is nothing to find: F1 is 0 (StarDist's convention), unlike
    :func:`pixel_iou`, which calls two empty masks a perfect match (1).
    """
    iou = iou_matrix(true, pred)
    nt, np_ = iou.shape
    if nt and np_:
        # a pair at the threshold outweighs any sum of IoUs (< 1 in all); a pair under it
        # counts nothing (its IoU pulled the assignment from a better pair above it)
        gain = np.where(iou >= threshold, 1 + iou / (2 * max(nt, np_)), 0.0)
        rows, cols = linear_sum_assignment(-gain)
        matched = iou[rows, cols]
        matched = matched[matched >= threshold]
    else:
        matched = np.zeros(0)
    tp = len(matched)
    fp, fn = np_ - tp, nt - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "mean_matched_iou": float(matched.mean()) if tp else 0.0,
        "sum_matched_iou": float(matched.sum()),
    }


def pooled_f1_interval(
    counts, strata=None, level: float = 0.95, n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the pooled object F1 over images.

    ``counts``: per image ``(tp, fp, fn)``; ``strata``: per image a group (e.g. its
    magnification) within which images are resampled, so that every resample keeps
    the split's design. Returns the (1 - level) / 2 and (1 + level) / 2 quantiles of
    the pooled F1 of ``n`` resamples (seeded, so the interval is reproducible). With a
    few images it shows how far the pooled F1 depends on which images were held back.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    if not len(c):
        raise ValueError("no images to resample")
    groups = np.zeros(len(c), int) if strata is None else np.unique(strata, return_inverse=True)[1]
    if len(groups) != len(c):
        raise ValueError(f"{len(c)} images but {len(groups)} strata")
    rng = np.random.default_rng(seed)
    total = np.zeros((n, 3), np.int64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        picks = rng.integers(0, len(members), size=(n, len(members)))
        total += c[members[picks]].sum(1)
    tp, fp, fn = total.T
    f1 = 2 * tp / np.maximum(1, 2 * tp + fp + fn)
    return float(np.quantile(f1, (1 - level) / 2)), float(np.quantile(f1, (1 + level) / 2))


def pixel_iou(true_fg: np.ndarray, pred_fg: np.ndarray) -> float:
    """IoU of two foreground masks."""
    _same_shape(true_fg, pred_fg)
    t, p = np.asarray(true_fg, bool), np.asarray(pred_fg, bool)
    union = np.count_nonzero(t | p)
    return np.count_nonzero(t & p) / union if union else 1.0


def pixel_error(true: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of pixels whose binary class differs (misclassification rate).

    This is the Hamming-distance pixel error of Jain et al. 2010; the ISBI 2012
    leaderboard's "pixel error" is :func:`isbi_pixel_error` instead.
    """
    _same_shape(true, pred)
    return float(np.mean(np.asarray(true, bool) != np.asarray(pred, bool)))


ISBI_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))


def isbi_pixel_error(truths, probs, thresholds=ISBI_THRESHOLDS) -> tuple[float, float]:
    """The ISBI 2012 challenge's pixel error: 1 - maximal F-score of pixel similarity.

    As the challenge's evaluation (Fiji ``trainableSegmentation.metrics.PixelError``,
    ``getPixelErrorMaximalFScore(0.0, 1.0, 0.1)``) computes it for a stack: the
    positive class is the label's foreground (``truth > 0``: cell interior), the
    proposal is binarised as ``prob > t``, true / false positives and false
    negatives are pooled over all slices, and the best F-score over the
    thresholds counts. ``truths`` and ``probs`` are sequences of same-shaped
    slices (or single arrays). Returns ``(1 - best F-score, its threshold)``.
    """
    if isinstance(truths, np.ndarray):
        truths, probs = [truths], [probs]
    if len(truths) != len(probs) or not len(truths):
        raise ValueError("need the same, non-zero number of label and probability slices")
    positives = [np.asarray(truth) > 0 for truth in truths]
    probs = [np.asarray(prob) for prob in probs]
    best = (-1.0, float(thresholds[0]))
    for t in thresholds:
        tp = fp = fn = 0
        for pos, prob in zip(positives, probs):
            pred = prob > t
            tp += np.count_nonzero(pos & pred)
            fp += np.count_nonzero(~pos & pred)
            fn += np.count_nonzero(pos & ~pred)
        f = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f > best[0]:
            best = (f, float(t))
    return 1.0 - best[0], best[1]


def rand_error(true_seg: np.ndarray, pred_seg: np.ndarray) -> float:
    """Foreground-restricted Rand error ``1 - V_rand`` (ISBI 2012, Arganda-Carreras 2015).

    ``true_seg`` and ``pred_seg`` are label images; only pixels with a non-zero
    ground-truth label (cell interiors, not membranes) count. Callers grow
    predicted segments over predicted membranes first (see
    :func:`segments_from_membranes`); a counted pixel they left at 0 is a segment of
    its own, as the challenge counts it (it was one segment with every other 0).
    ``V_rand`` is the F-score of the Rand split and merge scores.
    """
    _same_shape(true_seg, pred_seg)
    t = _relabel(true_seg).ravel().astype(np.int64)
    p = _relabel(pred_seg).ravel().astype(np.int64)
    keep = t > 0
    t, p = t[keep], p[keep]
    lone = p == 0
    p[lone] = p.max(initial=0) + 1 + np.arange(int(lone.sum()))
    n = t.size
    if n == 0:
        return 0.0
    _, t = np.unique(t, return_inverse=True)
    _, p = np.unique(p, return_inverse=True)
    pij = np.bincount(t * (p.max() + 1) + p).astype(np.float64) / n
    ai = np.bincount(t).astype(np.float64) / n
    bj = np.bincount(p).astype(np.float64) / n
    sum_p2 = np.sum(pij**2)
    v_split = sum_p2 / np.sum(bj**2)
    v_merge = sum_p2 / np.sum(ai**2)
    return float(1 - 2 * v_split * v_merge / (v_split + v_merge))


def segments_from_membranes(cell_prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Cells = connected components of ``cell_prob > threshold``, grown over membranes."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    seeds, _ = ndi.label(cell_prob > threshold)
    return watershed(-cell_prob, markers=seeds)
