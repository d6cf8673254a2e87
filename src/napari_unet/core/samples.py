"""Training data as the network sees it: images normalised and mirrored, labels turned
into class targets with per-pixel weights (:func:`prepare`), and random patches drawn
from them with the halo a valid-padding network needs (:class:`PatchSampler`)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

import numpy as np
import torch

from napari_unet.core import normalize as norm
from napari_unet.core import targets as tg
from napari_unet.core.augment import augment
from napari_unet.core.axes import resolve_axes
from napari_unet.core.train_config import TrainConfig
from napari_unet.core.weighting import WEIGHTINGS, on_masks, separation, with_weighting
from napari_unet.model.info import LoadedModel


@dataclass
class Sample:
    image: np.ndarray  # (C, H + 2p, W + 2p) normalised, mirrored by p
    target: np.ndarray  # (H + 2p, W + 2p) int64, -1 outside / not annotated
    weights: np.ndarray  # (H + 2p, W + 2p) float32 per-pixel weights
    focus: np.ndarray  # (n, 2) pixel coordinates worth sampling more often
    annotated: np.ndarray  # (n, 2) annotated pixel coordinates (sparse labels)
    shape: tuple[int, int]
    pad: int
    objects: int = 0  # annotated objects (instance labels)

    def unpadded(self) -> np.ndarray:
        p = self.pad
        return self.image[:, p:-p, p:-p]


def with_convention(cfg: TrainConfig, model: LoadedModel) -> TrainConfig:
    """``cfg`` with an unset boundary width / core fraction / core ramp taken from the
    base model (soft cores only where the model's own cores are kept)."""
    width, core = tg.convention(model.info)
    core = core if cfg.core_fraction is None else float(cfg.core_fraction)
    ramp = cfg.core_ramp
    if ramp is None:
        ramp = tg.recorded_core_ramp(model.info) if core > 0 else 0.0
    return replace(
        cfg,
        boundary_width=width if cfg.boundary_width is None else int(cfg.boundary_width),
        core_fraction=core,
        core_ramp=float(ramp),
    )


def resolved(cfg: TrainConfig, model: LoadedModel, kind: str, objects=()) -> TrainConfig:
    """``cfg`` with what it leaves unset taken from the base model: its target
    convention (:func:`with_convention`) and, for instance masks, its loss weighting
    (:func:`~napari_unet.core.weighting.with_weighting`)."""
    return with_weighting(with_convention(cfg, model), model, on_masks(kind, objects))


def normalized_plane(model: LoadedModel, image: np.ndarray, what: str = "image") -> np.ndarray:
    """A ``(Y, X)`` or ``(C, Y, X)`` plane checked and normalised as the model expects:
    ``(C, Y, X)`` float32."""
    img = np.asarray(image)
    norm.check_dtype(img.dtype)
    c = model.info.in_channels
    try:  # as segmenting reads it: channels first or last (YXC), an empty image refused
        ax = resolve_axes(img.shape, None, c)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if ax.leading and int(np.prod(ax.leading_shape)) == 1:  # (1, Y, X): one plane
        img = img.reshape([n for n, a in zip(img.shape, ax.axes) if a in "CYX"])
        ax = resolve_axes(img.shape, "".join(a for a in ax.axes if a in "CYX"), c)
    if ax.leading:
        raise ValueError(
            f"{what} has shape {np.shape(image)}; the model needs (Y, X), ({c}, Y, X) or "
            f"(Y, X, {c}): train on 2D planes"
        )
    img = np.moveaxis(img, ax.axes.index("C"), 0) if "C" in ax.axes else img[None]
    spec = norm.validate(model.info.normalization)
    try:
        scale, offset = norm.plane_stats(img.reshape(img.shape[0], -1), spec)
    except ValueError as err:  # NaN: which image of several
        raise ValueError(f"{what}: {err}") from None
    return norm.apply(img, scale, offset)


def prepare(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    kind: str,
    cfg: TrainConfig,
    names: Sequence[str] = (),
    objects: Sequence[np.ndarray | None] = (),
) -> list[Sample]:
    """Normalise images, convert labels, compute weights and sampling points.

    ``names`` (e.g. file names) name the images in messages (else "image 0", ...).
    ``objects``: for ``"sparse"`` labels drawn from instance masks (fine-tuning on
    masks that cover part of an image), each image's objects (or None), which give the
    separation and contact weights that instance labels have."""
    for what, given in (("images", images), ("labels", labels)):
        if isinstance(given, np.ndarray) or not isinstance(given, Sequence):
            raise TypeError(f"{what} are a list of arrays, one per image, got {type(given)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images")
    if not images:
        raise ValueError("no training images given")
    info = model.info
    cfg = resolved(cfg, model, kind, objects)
    side = max(max(np.shape(lab)[-2:], default=0) for lab in labels)
    if cfg.patch_size > 4 * max(side, 64):  # images are padded by a patch on every side
        raise ValueError(
            f"patch size {cfg.patch_size} px is far larger than the images (at most {side} px "
            f"a side): choose at most {4 * max(side, 64)}"
        )
    soft = kind == "instances" and cfg.core_ramp > 0 and info.num_classes == 3
    if soft and not cfg.core_fraction:
        raise ValueError("core_ramp needs core_fraction > 0 (soft cores)")
    if cfg.draw_images == "objects" and kind != "instances":
        raise ValueError(
            f"draw_images='objects' counts the objects of instance labels, not {kind!r} ones: "
            "draw images by their pixels"
        )
    if not 0 < cfg.hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {cfg.hard_fraction}")
    if cfg.class_weighting not in WEIGHTINGS:
        raise ValueError(
            f"class_weighting must be one of {list(WEIGHTINGS)}, not {cfg.class_weighting!r}"
        )
    objects = list(objects) + [None] * (len(images) - len(objects))
    planes = [
        _plane(model, img, lab, names[i] if i < len(names) else f"image {i}", kind, cfg, soft)
        for i, (img, lab) in enumerate(zip(images, labels))
    ]
    for i, (plane, ids) in enumerate(zip(planes, objects)):
        if ids is None:
            continue
        ids = np.asarray(ids)  # painted classes drawn from objects: their weights
        if ids.shape != plane.target.shape:
            raise ValueError(
                f"the objects of image {i} have shape {ids.shape}, its labels {plane.target.shape}"
            )
        plane.border += separation(tg.renumbered(ids), cfg)
    targets = [p.target for p in planes]
    _check_classes(targets, info.classes, kind)
    cw = tg.class_weights(targets, info.num_classes, WEIGHTINGS[cfg.class_weighting])
    pad = cfg.patch_size + info.geometry.halo + info.geometry.multiple
    return [_sample(p, cw, kind, info.num_classes, pad) for p in planes]


@dataclass
class _Plane:
    """One training image before padding: its targets and the extra weights on them."""

    image: np.ndarray  # (C, H, W) normalised
    target: np.ndarray  # (H, W) class, -1 = not annotated
    border: np.ndarray  # (H, W) separation and contact weights (instance labels)
    share: np.ndarray | None  # (H, W) interior share (soft cores), else None
    objects: int = 0  # instances in the labels


def _plane(model, img, lab, what: str, kind: str, cfg: TrainConfig, soft: bool) -> _Plane:
    image = normalized_plane(model, img, what)
    shape = np.shape(lab)
    lab = np.asarray(lab)
    if lab.ndim == 3 and 1 in (lab.shape[0], lab.shape[-1]) and lab.size == image[0].size:
        lab = lab.reshape(image.shape[1:])  # (1, Y, X) or (Y, X, 1), as images may be
    if lab.shape != image.shape[1:]:
        raise ValueError(
            f"the labels of {what} have shape {shape} but its plane is "
            f"{image.shape[1:]} (from {np.shape(img)})"
        )
    if lab.dtype.kind == "f" and np.isfinite(lab).all() and (lab == np.round(lab)).all():
        lab = lab.astype(np.int64)  # whole numbers in floats (Fiji's 32-bit label images)
    if kind == "instances":
        lab = tg.sequential_instances(lab, f"the labels of {what}")
    num_classes = model.info.num_classes
    try:  # (which file, of several)
        target = tg.to_target(lab, kind, num_classes, cfg.boundary_width, cfg.core_fraction)
    except ValueError as err:
        raise ValueError(f"the labels of {what}: {err}") from None
    border = separation(lab, cfg) if kind == "instances" else np.zeros(lab.shape, np.float32)
    share = None
    if soft:
        share = tg.core_share(lab, cfg.boundary_width, cfg.core_fraction, cfg.core_ramp)
    objects = int(lab.max(initial=0)) if kind == "instances" else 0  # (sequential)
    return _Plane(image, target, border, share, objects)


def _check_classes(targets, classes, kind: str) -> None:
    """Refuse labels with nothing annotated, or with one class only: trained on one
    class, the network learns to answer it everywhere (a 0/1 mask read as strokes
    turned every cell pixel into membrane; with the fine-tune recipe's pseudo-labels
    too: a nuclei mask read as strokes of 'background' took the nuclei model's share of
    nucleus pixels from 0.99 to 0), as the fine-tune panel does."""
    if not any((t >= 0).any() for t in targets):
        raise ValueError("the labels are empty: annotate some pixels first")
    seen = np.unique(np.concatenate([np.unique(t[t >= 0]) for t in targets]))
    if len(seen) >= 2:
        return
    only = classes[int(seen[0])] if int(seen[0]) < len(classes) else seen[0]
    hint = (
        " A dense mask? Strokes count 0 as 'not annotated' and k as class k - 1: "
        "use --label-kind classes (0 = the first class) or instances."
        if kind == "sparse"
        else ""
    )
    raise ValueError(
        f"the labels hold only one class ({only!r}): annotate at least two, or the "
        f"network learns one answer.{hint}"
    )


def _sample(plane: _Plane, cw: np.ndarray, kind: str, num_classes: int, pad: int) -> Sample:
    """``plane`` mirrored by ``pad``, with class-weighted pixel weights and the pixels
    worth sampling more often (boundaries, touching objects, the rarest class)."""
    target, border = plane.target, plane.border
    weights = np.where(target >= 0, cw[np.clip(target, 0, None)] + border, 0).astype(np.float32)
    if plane.share is not None:  # interior share travels with the weights: (2, H, W)
        weights = np.stack([weights, plane.share])
    if kind == "instances":
        focus_mask = (target == 2) | (border > 0.5)
    else:  # the rarest class that is annotated (an unpainted class would focus on nothing)
        counts = np.bincount(target[target >= 0], minlength=num_classes).astype(float)
        rare = int(np.argmin(np.where(counts > 0, counts, np.inf)))
        focus_mask = (border > 0.5) | (target == rare) if kind != "classes" else target == rare
    return Sample(
        image=np.pad(plane.image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect"),
        target=np.pad(target, pad, constant_values=tg.IGNORE),
        weights=np.pad(weights, ((0, 0),) * (weights.ndim - 2) + ((pad, pad),) * 2),
        focus=np.argwhere(focus_mask & (target >= 0)),
        annotated=np.argwhere(target >= 0),
        shape=target.shape,
        pad=pad,
        objects=plane.objects,
    )


class PatchSampler:
    """Draws training patches: input with halo, target and weights of the output size."""

    def __init__(self, samples: list[Sample], model: LoadedModel, cfg: TrainConfig, rng):
        self.samples, self.cfg, self.rng = samples, cfg, rng
        g = model.info.geometry
        if g.valid:
            self.tile = g.snap(cfg.patch_size + 2 * g.halo, "up")
            self.out = g.output_size(self.tile)
        else:
            self.tile = g.snap(cfg.patch_size, "up")
            self.out = self.tile
        self.halo = (self.tile - self.out) // 2
        norm_layers = (torch.nn.modules.batchnorm._BatchNorm,)
        if (
            cfg.batch_size == 1
            and self.tile < 2 * g.multiple
            and any(isinstance(m, norm_layers) for m in model.net.modules())
        ):
            raise ValueError(
                f"patches of {self.tile} px in batches of 1 leave batch norm one value per "
                f"channel at the network's deepest level: use patches of at least "
                f"{g.snap(2 * g.multiple, 'up')} px or a batch of 2 or more"
            )
        if cfg.draw_images == "objects":  # (an image of background only: as one object)
            counts = np.array([max(s.objects, 1) for s in samples], float)
        else:
            counts = np.array([len(s.annotated) for s in samples], float)
        self.p_image = counts / counts.sum()

    def draw(self, aug: bool = True):
        i = self.rng.choice(len(self.samples), p=self.p_image)
        s = self.samples[i]
        pool = s.focus if len(s.focus) and self.rng.random() < self.cfg.focus else s.annotated
        cy, cx = pool[self.rng.integers(len(pool))]
        oy = cy - self.out // 2 + self.rng.integers(-self.out // 4, self.out // 4 + 1)
        ox = cx - self.out // 2 + self.rng.integers(-self.out // 4, self.out // 4 + 1)
        oy = int(np.clip(oy, -self.out // 2, s.shape[0] - self.out // 2)) + s.pad
        ox = int(np.clip(ox, -self.out // 2, s.shape[1] - self.out // 2)) + s.pad
        image = s.image[:, oy - self.halo : oy - self.halo + self.tile,
                        ox - self.halo : ox - self.halo + self.tile]  # fmt: skip
        target = s.target[oy : oy + self.out, ox : ox + self.out]
        weights = s.weights[..., oy : oy + self.out, ox : ox + self.out]
        if aug:
            return augment(image, target, weights, self.rng, self.cfg.augment)
        return image, target, weights

    def batch(self, n: int, aug: bool = True):
        parts = [self.draw(aug) for _ in range(n)]
        return tuple(torch.from_numpy(np.stack(p)) for p in zip(*parts))


def batch_stream(sampler: PatchSampler, cfg: TrainConfig) -> Iterator[tuple]:
    """The training batches of steps 1, 2, ... ``cfg.steps``: drawn by ``sampler`` in
    the loop, or with ``cfg.workers`` by that many processes, a few batches ahead.

    With workers, batch n comes from the random stream (seed, n), whichever process
    draws it, so that the number of workers does not change the run. Closing the
    stream (or the generator that iterates it) ends the processes; a worker that dies
    (killed, out of memory) ends the run with a message instead of a wait forever.
    """
    if not cfg.workers:
        for _ in range(cfg.steps):
            yield sampler.batch(cfg.batch_size)
        return
    # fork shares the prepared images with the workers; elsewhere they are pickled
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = ProcessPoolExecutor(
        cfg.workers, context, initializer=_adopt, initargs=(sampler, os.getpid())
    )
    pending: deque = deque()
    try:
        for step in range(1, cfg.steps + 1):
            try:
                while len(pending) < 2 * cfg.workers and step + len(pending) <= cfg.steps:
                    job = (cfg.seed, step + len(pending), cfg.batch_size)
                    pending.append(pool.submit(_draw_batch, job))
                arrays = pending.popleft().result()
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a process drawing training patches ended unexpectedly (killed, out "
                    f"of memory, or it could not start) at step {step}: train again with fewer "
                    "workers or none"
                ) from None
            yield tuple(torch.from_numpy(a) for a in arrays)
    finally:  # (the batches in hand are drawn to their end: a fraction of a second)
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_SAMPLER: PatchSampler | None = None


def _adopt(sampler: PatchSampler, parent: int) -> None:
    """A worker process's start: the sampler it draws with.

    Ctrl-C and SIGTERM are the run's to handle (it ends the workers): a forked worker
    ran the command line's handlers too, printed their messages, and wrote into their
    wake-up pipe, so one SIGTERM to the process group counted as a second and the run
    ended unsaved. A worker whose run is gone (killed) ends itself: orphans held their
    memory and the run's output pipe."""
    global _WORKER_SAMPLER
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    _WORKER_SAMPLER = sampler


def _end_with(parent: int) -> None:
    """End this worker process once ``parent`` (the training run's) is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _draw_batch(job: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """One batch, in a worker: (seed, step, size) -> stacked inputs, targets, weights."""
    seed, step, n = job
    _WORKER_SAMPLER.rng = np.random.default_rng([seed, step])
    parts = [_WORKER_SAMPLER.draw() for _ in range(n)]
    return tuple(np.stack(p) for p in zip(*parts))
