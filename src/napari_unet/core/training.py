"""Training and fine-tuning a U-Net from image / label arrays.

:func:`train_iter` is a generator: it yields a :class:`TrainStep` after every
optimisation step (so callers plot the loss, show progress and cancel by
closing it) and returns the trained :class:`~napari_unet.model.info.LoadedModel`.
The model passed in is never modified: training works on a copy.

Labels come as dense class masks, dense instance masks (turned into background
/ interior / boundary with the paper's border weights) or sparse strokes
(``0`` = not annotated, ignored by the loss); see :mod:`napari_unet.core.targets`.
"""

from __future__ import annotations

import copy
import datetime
import math
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_unet.core import normalize as norm
from napari_unet.core import targets as tg
from napari_unet.core.adaptation import adapt_norm, add_pseudo_labels
from napari_unet.core.augment import AugmentConfig, augment
from napari_unet.core.axes import resolve_axes
from napari_unet.core.cancel import Cancelled
from napari_unet.core.device import fast_bf16, resolve_device
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import UNet, for_training, to_layout

# a time-budgeted run stops at this multiple of its budget whatever its planned steps
OVERRUN = 1.25
STOPPED_EARLY = "stopped before the first training step: nothing was learned"


@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults suit fine-tuning a bundled model)."""

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 8
    patch_size: int = 256
    weight_decay: float = 1e-4
    warmup: int = 20
    schedule: str = "cosine"  # or "constant"
    class_weighting: str = "balanced"  # "balanced" (1 / frequency), "sqrt" or "none"
    border_w0: float = 10.0  # paper's separation weight (instance labels); 0 = off
    border_sigma: float = 5.0
    # instance labels -> classes (targets.instances_to_classes); None: the base model's
    # own convention (targets.convention: its training provenance, else 2 px / no cores)
    boundary_width: int | None = None
    core_fraction: float | None = None  # interior = object cores deeper than this share
    # instances with cores: soft interior / boundary targets, a ramp over this share of
    # the depth around core_fraction (targets.core_share); 0 = hard classes; None: the
    # base model's (its training provenance, else 0)
    core_ramp: float | None = None
    contact_w0: float = 0.0  # instances: extra weight where two objects touch (no gap)
    dice: float = 0.0  # weight of a soft Dice term added to cross-entropy
    # bootstrapped cross-entropy: average only this share of each batch's annotated
    # pixels, the ones with the highest weighted loss (1 = all pixels)
    hard_fraction: float = 1.0
    # forward pass autocast to bfloat16: True, False, or "auto" (where the device runs it
    # natively, see device.fast_bf16); weights stay float32
    bf16: bool | str = False
    focus: float = 0.5  # share of patches centred on boundaries / minority classes
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_every: int = 100  # validation every this many steps (0: at the end only)
    val_patches: int = 16
    seed: int = 0
    device: str = "auto"
    freeze_encoder: bool = False
    # fine-tuning on few annotations (see TrainConfig.finetune):
    adapt_norm: bool = False  # re-estimate batch-norm statistics on the images first
    anchor: float = 0.0  # L2-SP pull of the weights toward the base model's
    pseudo_weight: float = 0.0  # sparse labels: base prediction where confident, this share
    pseudo_threshold: float = 0.9  # ... counted confident above this probability
    # wall-time budget: the steps that fit in it are timed on a copy of the network
    # first, then run as a run of that many steps (``steps`` caps them), so the
    # result is the one ``steps=N`` without a budget gives (N: its provenance steps)
    max_seconds: float | None = None
    # end after this many steps of the schedule: a stopped run (Stop & keep, or a
    # budget overrun), repeated from its provenance (steps planned, steps made)
    stop_after: int | None = None
    checkpoint: str | None = None  # .safetensors path written every checkpoint_every steps
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # as to_dict() and a model's provenance have it
            known = {f.name for f in fields(AugmentConfig)}
            unknown = sorted(set(self.augment) - known)
            if unknown:
                raise ValueError(
                    f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}"
                )
            self.augment = AugmentConfig(**self.augment)
        elif not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"augment must be an AugmentConfig or a dict, got {self.augment!r}")
        least = {"steps": 1, "batch_size": 1, "patch_size": 1, "val_patches": 1, "val_every": 0}
        least.update(checkpoint_every=1, seed=0, stop_after=1)  # stop_after: None = off
        for name, low in least.items():
            value = getattr(self, name)
            if name == "stop_after" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the learning rate must be a finite number above 0, got {self.lr!r}")
        if self.checkpoint is not None and not str(self.checkpoint).endswith(".safetensors"):
            raise ValueError(f"checkpoint files end in .safetensors, got {self.checkpoint!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        # weights and shares: finite, not negative (a NaN Dice weight was silently no Dice)
        shares = {"pseudo_threshold": 1.0, "pseudo_weight": None, "dice": None}
        for name in ("weight_decay", "anchor", "border_w0", "contact_w0", *shares):
            value = getattr(self, name)
            top = shares.get(name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (top is not None and value > top)
            ):
                what = f"between 0 and {top}" if top is not None else "a finite number >= 0"
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if self.max_seconds is not None and not 0 < self.max_seconds < float("inf"):
            raise ValueError(
                f"max_seconds must be above 0 and finite (or None: no time limit), got "
                f"{self.max_seconds!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def finetune(cls, **overrides) -> TrainConfig:
        """Defaults for the annotate-and-retrain loop (few strokes, seconds to minutes).

        Chosen by ``benchmarks/finetune.py``: batch-norm statistics re-estimated on
        the user's images, strokes class-balanced, the base model's confident
        prediction kept where nothing is painted, weights anchored to the base,
        bfloat16 autocast where the device runs it natively.
        """
        base = dict(
            steps=400,
            lr=1e-3,
            batch_size=4,
            patch_size=128,
            warmup=10,
            border_w0=0.0,
            focus=0.0,
            val_every=50,
            adapt_norm=True,
            anchor=1e-2,
            pseudo_weight=0.5,
            max_seconds=60.0,
            augment=AugmentConfig(intensity=0.2, noise=0.03),
            # bfloat16 where the hardware runs it natively: 1.4x the steps in the
            # same budget on this project's CPU, F1 as good or better (benchmark)
            bf16="auto",
        )
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class Phase:
    """A setup stage of a run, reported before it starts (with ``phases=True``): stages
    of seconds between reports left a GUI's Cancel unseen for 20 s."""

    message: str


@dataclass(frozen=True)
class TrainStep:
    """One optimisation step's report."""

    step: int
    steps: int
    loss: float
    lr: float
    elapsed: float
    metrics: dict = field(default_factory=dict)
    budget: float | None = None  # the run's time budget in seconds, if any
    snapshot: Callable[[], LoadedModel] | None = field(default=None, repr=False, compare=False)

    @property
    def eta(self) -> float:
        """Seconds left at the current pace (or of the time budget, if sooner)."""
        left = self.elapsed / self.step * (self.steps - self.step) if self.step else math.nan
        if self.budget is not None:
            left = min(left, max(0.0, self.budget - self.elapsed))
        return left


@dataclass
class _Sample:
    image: np.ndarray  # (C, H + 2p, W + 2p) normalised, mirrored by p
    target: np.ndarray  # (H + 2p, W + 2p) int64, -1 outside / not annotated
    weights: np.ndarray  # (H + 2p, W + 2p) float32 per-pixel weights
    focus: np.ndarray  # (n, 2) pixel coordinates worth sampling more often
    annotated: np.ndarray  # (n, 2) annotated pixel coordinates (sparse labels)
    shape: tuple[int, int]
    pad: int

    def unpadded(self) -> np.ndarray:
        p = self.pad
        return self.image[:, p:-p, p:-p]


def prepare(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    kind: str,
    cfg: TrainConfig,
) -> list[_Sample]:
    """Normalise images, convert labels, compute weights and sampling points."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images")
    if not images:
        raise ValueError("no training images given")
    info = model.info
    cfg = with_convention(cfg, model)
    side = max(max(np.shape(lab)[-2:], default=0) for lab in labels)
    if cfg.patch_size > 4 * max(side, 64):  # images are padded by a patch on every side
        raise ValueError(
            f"patch size {cfg.patch_size} px is far larger than the images (at most {side} px "
            f"a side): choose at most {4 * max(side, 64)}"
        )
    pad = cfg.patch_size + info.geometry.halo + info.geometry.multiple
    soft = kind == "instances" and cfg.core_ramp > 0 and info.num_classes == 3
    if soft and not cfg.core_fraction:
        raise ValueError("core_ramp needs core_fraction > 0 (soft cores)")
    if not 0 < cfg.hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {cfg.hard_fraction}")
    prepared, all_targets = [], []
    for i, (img, lab) in enumerate(zip(images, labels)):
        image = normalized_plane(model, img, f"image {i}")
        lab = np.asarray(lab)
        if lab.ndim == 3 and 1 in (lab.shape[0], lab.shape[-1]) and lab.size == image[0].size:
            lab = lab.reshape(image.shape[1:])  # (1, Y, X) or (Y, X, 1), as images may be
        if lab.shape != image.shape[1:]:
            raise ValueError(
                f"labels {i} have shape {np.shape(labels[i])} but image {i}'s plane is "
                f"{image.shape[1:]} (from {np.shape(img)})"
            )
        if kind == "instances":
            lab = tg.sequential_instances(lab, f"labels {i}")
        target = tg.to_target(lab, kind, info.num_classes, cfg.boundary_width, cfg.core_fraction)
        all_targets.append(target)
        border = np.zeros(lab.shape, np.float32)
        if kind == "instances":
            if cfg.border_w0 > 0:
                border += tg.border_weights(lab, cfg.border_w0, cfg.border_sigma)
            if cfg.contact_w0 > 0:
                border += tg.contact_weights(lab, cfg.contact_w0)
        share = None
        if soft:
            share = tg.core_share(lab, cfg.boundary_width, cfg.core_fraction, cfg.core_ramp)
        prepared.append((image, target, border, share))
    if not any((t >= 0).any() for t in all_targets):
        raise ValueError("the labels are empty: annotate some pixels first")
    seen = np.unique(np.concatenate([np.unique(t[t >= 0]) for t in all_targets]))
    pseudo = kind == "sparse" and cfg.pseudo_weight > 0  # (the model's answer adds the rest)
    if len(seen) < 2 and not pseudo:
        # trained on one class, the network learns to answer it everywhere (a 0/1 mask
        # read as strokes turned every cell pixel into membrane)
        only = info.classes[int(seen[0])] if int(seen[0]) < len(info.classes) else seen[0]
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
    powers = {"balanced": 1.0, "sqrt": 0.5, "none": 0.0}
    if cfg.class_weighting not in powers:
        raise ValueError(
            f"class_weighting must be one of {list(powers)}, not {cfg.class_weighting!r}"
        )
    cw = tg.class_weights(all_targets, info.num_classes, powers[cfg.class_weighting])
    samples = []
    for image, target, border, share in prepared:
        weights = np.where(target >= 0, cw[np.clip(target, 0, None)] + border, 0).astype(
            np.float32
        )
        if share is not None:  # interior share travels with the weights: (2, H, W)
            weights = np.stack([weights, share])
        annotated = np.argwhere(target >= 0)
        # the rarest class that is annotated (an unpainted class would focus on nothing)
        counts = np.bincount(target[target >= 0], minlength=info.num_classes).astype(float)
        rare = int(np.argmin(np.where(counts > 0, counts, np.inf)))
        focus_mask = (border > 0.5) | (target == rare) if kind != "classes" else target == rare
        if kind == "instances":
            focus_mask = (target == 2) | (border > 0.5)
        samples.append(
            _Sample(
                image=np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect"),
                target=np.pad(target, pad, constant_values=tg.IGNORE),
                weights=np.pad(weights, ((0, 0),) * (weights.ndim - 2) + ((pad, pad),) * 2),
                focus=np.argwhere(focus_mask & (target >= 0)),
                annotated=annotated,
                shape=target.shape,
                pad=pad,
            )
        )
    return samples


class _Sampler:
    """Draws training patches: input with halo, target and weights of the output size."""

    def __init__(self, samples: list[_Sample], model: LoadedModel, cfg: TrainConfig, rng):
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


def train_iter(
    model: LoadedModel,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    kind: str = "instances",
    config: TrainConfig | None = None,
    val_images: Sequence[np.ndarray] = (),
    val_labels: Sequence[np.ndarray] = (),
    data_name: str = "arrays",
    unlabelled: Sequence[np.ndarray] = (),
    should_stop: Callable[[], bool] | None = None,
    phases: bool = False,
) -> Generator[TrainStep | Phase, None, LoadedModel]:
    """Train a copy of ``model``; yields a :class:`TrainStep` per step, returns the copy.

    ``phases=True`` also yields a :class:`Phase` before each setup stage (normalisation
    re-estimation, predictions for the unpainted pixels, timing the steps), so that a
    caller can report them and stop there.

    ``unlabelled`` images (same layout as ``images``) only take part in the
    batch-norm re-estimation (``config.adapt_norm``): e.g. the other planes of
    the stack the user wants segmented. ``should_stop()`` returning True ends
    training early *with* a result (closing the generator discards it). Time
    spent outside the generator (paused, previews) does not count as training
    time, for the reports and for ``config.max_seconds``.
    """
    cfg = config or TrainConfig()
    _check_trainable(model)
    if cfg.bf16 not in (True, False, "auto"):
        raise ValueError(f"bf16 must be True, False or 'auto', not {cfg.bf16!r}")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg = with_convention(cfg, model)
    samples = prepare(model, images, labels, kind, cfg)
    sampler = _Sampler(samples, model, cfg, rng)
    val = _validation_batch(model, val_images, val_labels, kind, cfg)
    dev = resolve_device(cfg.device)
    cfg = _resolve_bf16(cfg, dev)  # resolved, so that the provenance says what was used
    net = for_training(copy.deepcopy(model.net), dev)
    if cfg.adapt_norm and phases:
        yield Phase("re-estimating the normalisation")
    if cfg.adapt_norm:
        extra = [
            normalized_plane(model, im, f"unlabelled image {i}") for i, im in enumerate(unlabelled)
        ]
        adapt_norm(net, [s.unpadded() for s in samples] + extra, model, rng, dev)
    if cfg.pseudo_weight > 0 and kind == "sparse":
        if phases:
            yield Phase("predicting the unpainted pixels")
        try:
            add_pseudo_labels(samples, LoadedModel(net.eval(), model.info), cfg, dev, should_stop)
        except Cancelled:
            raise Cancelled(STOPPED_EARLY) from None
    net.train()
    # one fixed patch the network must still answer with finite numbers (finite weights
    # can overflow: lr 1e6 gave a model whose every prediction was NaN, saved as done)
    probe = _Sampler(
        samples, model, replace(cfg, focus=0.0), np.random.default_rng(cfg.seed + 3)
    ).batch(1, aug=False)[0]
    if phases and cfg.max_seconds is not None:
        yield Phase("timing the steps")
    # the budget counts from here: the setup above (seconds) is not training
    start = time.perf_counter()
    cfg = replace(cfg, steps=_planned_steps(net, samples, model, cfg, dev))
    if should_stop is not None and should_stop():  # (setup takes seconds: asked meanwhile)
        raise Cancelled(STOPPED_EARLY)
    stepper = _Stepper(net, cfg, dev)
    metrics: dict = {}
    step = 0
    away = 0.0  # seconds spent suspended at ``yield``

    def snapshot() -> LoadedModel:
        """An eval-mode copy of the network as it is now (for live previews).

        Call it while the generator is suspended at the step of interest.
        """
        return _result(copy.deepcopy(net).eval(), model, cfg, step, data_name, kind, metrics)

    for step in range(1, cfg.steps + 1):
        lr = _lr(cfg, step)
        loss = stepper.step(sampler.batch(cfg.batch_size), lr, step)
        elapsed = time.perf_counter() - start - away
        # a machine that slowed down a lot since the steps were timed: stop (the
        # provenance's steps still say how far it went)
        late = cfg.max_seconds is not None and elapsed >= OVERRUN * cfg.max_seconds
        last = step == cfg.steps or late or step == cfg.stop_after
        last = last or (should_stop is not None and should_stop())
        metrics = {}
        if val is not None and ((cfg.val_every and step % cfg.val_every == 0) or last):
            metrics = evaluate_patches(net, val, cfg.dice, dev)
            net.train()
        if cfg.checkpoint and step % cfg.checkpoint_every == 0:
            if not _healthy(net, probe, dev):  # a checkpoint is never a diverged network
                _diverged(step, cfg)
            _checkpoint(net, model, cfg, step, data_name, kind, metrics)
        suspended = time.perf_counter()
        yield TrainStep(
            step, cfg.steps, float(loss.detach()), lr, elapsed, metrics, cfg.max_seconds, snapshot
        )
        away += time.perf_counter() - suspended
        if last:
            break
    net.eval().cpu()
    if not _healthy(net, probe, torch.device("cpu")):
        _diverged(step, cfg)
    for p in net.parameters():  # a frozen encoder is frozen for this run only
        p.requires_grad_(True)
    return _result(net, model, cfg, step, data_name, kind, metrics)


def _validation_batch(model, val_images, val_labels, kind: str, cfg: TrainConfig):
    """The fixed validation patches of ``val_images`` (None without any)."""
    if len(val_images) != len(val_labels):
        raise ValueError(f"{len(val_images)} validation images but {len(val_labels)} label images")
    if not len(val_images):
        return None
    try:
        vs = prepare(model, val_images, val_labels, kind, cfg)
    except ValueError as err:
        raise ValueError(f"validation data: {err}") from None
    vsampler = _Sampler(vs, model, replace(cfg, focus=0.0), np.random.default_rng(cfg.seed + 1))
    return vsampler.batch(cfg.val_patches, aug=False)


def _resolve_bf16(cfg: TrainConfig, dev) -> TrainConfig:
    """``cfg`` with ``bf16`` True or False for ``dev`` ("auto": where it is native)."""
    native = fast_bf16(dev)
    if cfg.bf16 is True and not native:
        warnings.warn(
            f"bfloat16 autocast was asked for, but {dev} has no native bfloat16 "
            "(AVX512-BF16 or AMX on a CPU): it is emulated and several times slower than "
            "float32 here; leave it off (or use bf16='auto')",
            RuntimeWarning,
            stacklevel=3,
        )
    return replace(cfg, bf16=native if cfg.bf16 == "auto" else bool(cfg.bf16))


def _healthy(net, probe: torch.Tensor, dev) -> bool:
    """Finite weights, and finite outputs for ``probe`` in eval mode (as it predicts)."""
    if not all(bool(torch.isfinite(p).all()) for p in net.state_dict().values()):
        return False
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = net(to_layout(probe.to(dev), net))
    finally:
        net.train(was)
    return bool(torch.isfinite(out).all())


def _diverged(step: int, cfg: TrainConfig):
    raise ValueError(
        f"training diverged by step {step} (the loss or the weights are no longer finite "
        f"numbers): nothing was saved; lower the learning rate (it was {cfg.lr:g})"
    )


def _check_trainable(model: LoadedModel) -> None:
    if not isinstance(model.net, UNet):
        raise ValueError(
            f"only napari-unet U-Nets can be trained; {model.info.name!r} is a "
            f"{model.info.format} network. Train a napari-unet model (a bundled one, or a new "
            "network) instead"
        )
    if model.info.num_classes < 2:
        raise ValueError(
            f"{model.info.name!r} has one output class: training needs at least two "
            "(e.g. background and foreground)"
        )


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
    scale, offset = norm.plane_stats(img.reshape(img.shape[0], -1), spec)
    return norm.apply(img, scale, offset)


def _checkpoint(net, model, cfg, step, data_name, kind, metrics) -> None:
    from napari_unet.io.files import save_model

    save_model(_result(net, model, cfg, step, data_name, kind, metrics), cfg.checkpoint)
    net.train()


# provenance that stays true of a model trained further (credit); the rest (the base's
# data, validation, card, calibration...) described the base, not the result
_KEPT_PROVENANCE = ("authors", "license", "cite")


def _result(net, model, cfg, steps, data_name, kind, metrics) -> LoadedModel:
    base = model.info
    source = f" ({Path(base.source).name})" if base.source else ""
    parent = f"{base.name or 'unnamed'}{source}"
    if not base.source and not base.provenance:  # a new network: no base to name
        parent = "none (random weights)"
    earlier = base.provenance.get("lineage")
    provenance = {
        **{k: v for k, v in base.provenance.items() if k in _KEPT_PROVENANCE},
        "base_model": parent,
        "lineage": f"{earlier} -> {parent}" if earlier else parent,
        "training_data": data_name,
        "label_kind": kind,
        "steps": steps,
        "seed": cfg.seed,
        "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_config": _short_config(cfg),
    }
    info = replace(model.info, provenance=provenance, metrics=dict(metrics), source="")
    return LoadedModel(net.eval(), info)


def train(model, images, labels, kind="instances", config=None, callback=None, **kwargs):
    """Run :func:`train_iter` to the end; ``callback(step)`` after each step."""
    from napari_unet.core.tiling import run_to_end

    return run_to_end(train_iter(model, images, labels, kind, config, **kwargs), callback)


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


def _trainable(net, cfg: TrainConfig):
    for p in net.parameters():  # whatever an earlier run or the caller left
        p.requires_grad_(True)
    if not cfg.freeze_encoder:
        return list(net.parameters())
    for p in _frozen(net).parameters():
        p.requires_grad_(False)
    return [p for p in net.parameters() if p.requires_grad]


def _frozen(net) -> torch.nn.ModuleList:
    """The encoder stages (frozen by ``freeze_encoder``)."""
    names = getattr(net, "stage_names", [])
    return torch.nn.ModuleList(getattr(net, n) for n in names if n.startswith("enc"))


def _planned_steps(net, samples, model: LoadedModel, cfg: TrainConfig, dev) -> int:
    """How many steps fit in ``cfg.max_seconds`` (at most ``cfg.steps``), from four
    training steps of a copy of ``net`` on batches of its own: the run's network,
    random streams and schedule are left as they were."""
    if cfg.max_seconds is None:
        return cfg.steps
    torch_state = torch.get_rng_state()
    trial = _Stepper(copy.deepcopy(net).train(), cfg, dev)
    sampler = _Sampler(samples, model, cfg, np.random.default_rng(cfg.seed + 2))
    times = []
    for _ in range(4):  # whole steps, optimiser and anchor included
        t0 = time.perf_counter()
        trial.step(sampler.batch(cfg.batch_size), cfg.lr, 0)
        times.append(time.perf_counter() - t0)
    torch.set_rng_state(torch_state)
    # the first step pays for allocations; a run that turns out slower stops at
    # OVERRUN x the budget (and is repeated by stop_after), one that turns out faster
    # leaves time unused: the median of the others
    per_step = float(np.median(times[1:]))
    return max(1, min(cfg.steps, int((cfg.max_seconds - sum(times)) / per_step)))


class _Stepper:
    """One optimisation step of ``net``: forward, loss (with the L2-SP anchor), update."""

    def __init__(self, net, cfg: TrainConfig, dev) -> None:
        self.net, self.cfg, self.dev = net, cfg, dev
        self.params = _trainable(net, cfg)
        self.anchor = [p.detach().clone() for p in self.params] if cfg.anchor > 0 else None
        decay = 0.0 if self.anchor else cfg.weight_decay
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=decay)

    def step(self, batch, lr: float, step: int) -> torch.Tensor:
        cfg, net = self.cfg, self.net
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, t, w = (a.to(self.dev) for a in batch)
        if cfg.freeze_encoder:  # its batch-norm statistics stay as they are too
            _frozen(net).eval()
        with torch.autocast(self.dev.type, torch.bfloat16, enabled=cfg.bf16):
            logits = net(to_layout(x, net))
        loss = loss_fn(logits.float(), t, w, cfg.dice, cfg.hard_fraction)
        total = loss
        if self.anchor is not None:
            pull = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.anchor))
            total = loss + cfg.anchor * pull
        if not torch.isfinite(total):
            _diverged(step, cfg)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return loss


def _lr(cfg: TrainConfig, step: int) -> float:
    # at most a fifth of the run warms up (5 steps with a warm-up of 20 never reached lr)
    warmup = min(cfg.warmup, cfg.steps // 5)
    if step <= warmup:
        return cfg.lr * step / max(1, warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    t = min((step - warmup) / max(1, cfg.steps - warmup), 1.0)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def _short_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in ("device", "val_patches")}
