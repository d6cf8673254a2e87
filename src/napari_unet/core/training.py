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

import contextlib
import copy
import datetime
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from napari_unet.core.adaptation import adapt_norm, add_pseudo_labels
from napari_unet.core.cancel import Cancelled
from napari_unet.core.device import fast_bf16, resolve_device
from napari_unet.core.loss import evaluate_patches
from napari_unet.core.samples import (
    PatchSampler,
    batch_stream,
    normalized_plane,
    prepare,
    resolved,
)
from napari_unet.core.train_config import (
    OVERRUN,
    STEPPING,
    STOPPED_EARLY,
    Phase,
    TrainConfig,
    TrainStep,
)
from napari_unet.core.train_step import Stepper, diverged, learning_rate, planned_steps
from napari_unet.core.weighting import MASK_WEIGHTS, mask_weighting, on_masks
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import UNet, for_training, to_layout


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
    names: Sequence[str] = (),
    val_names: Sequence[str] = (),
    objects: Sequence[np.ndarray | None] = (),
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
    time, for the reports and for ``config.max_seconds``. ``names`` name the images,
    then the unlabelled ones, in messages (e.g. their files; else "image 0", ...);
    ``val_names`` the validation images. ``objects``: see
    :func:`~napari_unet.core.samples.prepare` (painted classes drawn from objects).
    """
    cfg = config or TrainConfig()
    check_trainable(model)
    if cfg.checkpoint:
        _check_checkpoint(Path(cfg.checkpoint), model)
    if cfg.bf16 not in (True, False, "auto"):
        raise ValueError(f"bf16 must be True, False or 'auto', not {cfg.bf16!r}")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg = resolved(cfg, model, kind, objects)  # (here too: the provenance says it)
    samples = prepare(model, images, labels, kind, cfg, names[: len(images)], objects)
    sampler = PatchSampler(samples, model, cfg, rng)
    val = _validation_batch(model, val_images, val_labels, kind, cfg, val_names)
    dev = resolve_device(cfg.device)
    cfg = _resolve_bf16(cfg, dev)  # resolved, so that the provenance says what was used
    net = for_training(copy.deepcopy(model.net), dev)
    run = _Run(net, model, cfg, dev, data_name, kind, on_masks(kind, objects))
    yield from run.adapt(samples, unlabelled, rng, should_stop, phases, names[len(images) :])
    run.net.train()
    # one fixed patch the network must still answer with finite numbers (finite weights
    # can overflow: lr 1e6 gave a model whose every prediction was NaN, saved as done)
    run.probe = PatchSampler(
        samples, model, replace(cfg, focus=0.0), np.random.default_rng(cfg.seed + 3)
    ).batch(1, aug=False)[0]
    if phases and cfg.max_seconds is not None:
        yield Phase("timing the steps")
    # the budget counts from here: the setup above (seconds) is not training
    start = time.perf_counter()
    planned = planned_steps(run.net, samples, model, cfg, dev)
    # (a stop_after beyond the steps the budget holds: the run ends with them; it was
    # refused here, after all the setup, naming a step count the user never gave)
    stop_after = cfg.stop_after if cfg.stop_after is None or cfg.stop_after <= planned else None
    run.cfg = replace(cfg, steps=planned, stop_after=stop_after)
    if should_stop is not None and should_stop():  # (setup takes seconds: asked meanwhile)
        raise Cancelled(STOPPED_EARLY)
    if phases:  # (a stop asked during the first step keeps it: a caller can say so)
        yield Phase(STEPPING)
    yield from run.steps(sampler, val, should_stop, start)
    return run.finish()


@dataclass
class _Run:
    """One training run's network and state, as its steps and reports see them."""

    net: torch.nn.Module
    model: LoadedModel  # the base (never modified)
    cfg: TrainConfig
    dev: torch.device
    data_name: str
    kind: str
    masks: bool = False  # trained on instance masks (kind, or painted classes drawn from them)
    probe: torch.Tensor | None = None  # a fixed input whose output must stay finite
    step: int = 0
    metrics: dict = field(default_factory=dict)

    def adapt(self, samples, unlabelled, rng, should_stop, phases: bool, names=()):
        """Batch-norm re-estimation and the base model's answer for unpainted pixels,
        as ``cfg`` asks (each announced by a :class:`Phase` with ``phases``)."""
        cfg, model = self.cfg, self.model
        if cfg.adapt_norm:
            if phases:
                yield Phase("re-estimating the normalisation")
            try:
                extra = []
                for i, im in enumerate(unlabelled):
                    if should_stop is not None and should_stop():
                        raise Cancelled
                    what = names[i] if i < len(names) else f"unlabelled image {i}"
                    extra.append(normalized_plane(model, im, what))
                planes = [s.unpadded() for s in samples] + extra
                adapt_norm(self.net, planes, model, rng, self.dev, should_stop=should_stop)
            except Cancelled:
                raise Cancelled(STOPPED_EARLY) from None
        if cfg.pseudo_weight > 0 and self.kind == "sparse":
            if phases:
                yield Phase("predicting the unpainted pixels")
            base = LoadedModel(self.net.eval(), model.info)
            try:
                add_pseudo_labels(samples, base, cfg, self.dev, should_stop)
            except Cancelled:
                raise Cancelled(STOPPED_EARLY) from None

    def steps(self, sampler, val, should_stop, start: float) -> Generator[TrainStep, None, None]:
        """The optimisation steps, a :class:`TrainStep` after each."""
        cfg, net = self.cfg, self.net
        stepper = Stepper(net, cfg, self.dev)
        with contextlib.closing(batch_stream(sampler, cfg)) as stream:  # (ends workers)
            yield from self._steps(stepper, stream, val, should_stop, start)

    def _steps(self, stepper, stream, val, should_stop, start: float):
        """:meth:`steps` on the batches of ``stream``."""
        cfg, net = self.cfg, self.net
        away = 0.0  # seconds spent suspended at ``yield``
        for step, batch in enumerate(stream, 1):
            self.step = step
            lr = learning_rate(cfg, step)
            loss = stepper.step(batch, lr, step)
            elapsed = time.perf_counter() - start - away
            last = _last_step(cfg, step, elapsed, should_stop)
            self.metrics = {}
            if val is not None and ((cfg.val_every and step % cfg.val_every == 0) or last):
                self.metrics = evaluate_patches(net, val, cfg.dice, self.dev)
                net.train()
            if cfg.checkpoint and step % cfg.checkpoint_every == 0:
                if not _healthy(net, self.probe, self.dev):  # never a diverged network
                    diverged(step, cfg)
                _save_checkpoint(self.result(net), cfg.checkpoint, step)
                net.train()
            suspended = time.perf_counter()
            loss = float(loss.detach())
            yield TrainStep(
                step, cfg.steps, loss, lr, elapsed, self.metrics, cfg.max_seconds, self.snapshot
            )
            away += time.perf_counter() - suspended
            if last:
                break

    def snapshot(self) -> LoadedModel:
        """An eval-mode copy of the network as it is now (for live previews).

        Call it while the generator is suspended at the step of interest.
        """
        return self.result(copy.deepcopy(self.net).eval())

    def result(self, net) -> LoadedModel:
        """``net`` as a model trained by this run so far, with its provenance."""
        return _result(
            net,
            self.model,
            self.cfg,
            self.step,
            self.data_name,
            self.kind,
            self.metrics,
            self.masks,
        )

    def finish(self) -> LoadedModel:
        """The trained model, on the CPU (refused if it diverged)."""
        net = self.net.eval().cpu()
        if not _healthy(net, self.probe, torch.device("cpu")):
            diverged(self.step, self.cfg)
        for p in net.parameters():  # a frozen encoder is frozen for this run only
            p.requires_grad_(True)
        return self.result(net)


def _last_step(cfg: TrainConfig, step: int, elapsed: float, should_stop) -> bool:
    """The run ends after this step: planned, stopped, or on a machine that slowed down a
    lot since the steps were timed (the provenance's steps still say how far it went)."""
    late = cfg.max_seconds is not None and elapsed >= OVERRUN * cfg.max_seconds
    if step == cfg.steps or late or step == cfg.stop_after:
        return True
    return should_stop is not None and should_stop()


def _validation_batch(model, val_images, val_labels, kind: str, cfg: TrainConfig, names=()):
    """The fixed validation patches of ``val_images`` (None without any)."""
    if len(val_images) != len(val_labels):
        raise ValueError(f"{len(val_images)} validation images but {len(val_labels)} label images")
    if not len(val_images):
        return None
    try:
        vs = prepare(model, val_images, val_labels, kind, cfg, names)
    except ValueError as err:
        raise ValueError(f"validation data: {err}") from None
    vsampler = PatchSampler(
        vs, model, replace(cfg, focus=0.0), np.random.default_rng(cfg.seed + 1)
    )
    return vsampler.batch(cfg.val_patches, aug=False)


def _resolve_bf16(cfg: TrainConfig, dev) -> TrainConfig:
    """``cfg`` with ``bf16`` True or False for ``dev`` ("auto": where it is native)."""
    native = fast_bf16(dev)
    if cfg.bf16 is True and not native:
        warnings.warn(
            f"bfloat16 autocast was asked for, but {dev} has no native bfloat16 "
            "(AVX512-BF16 or AMX on a CPU): it is emulated and several times slower than "
            "float32 here; leave it off (TrainConfig's bf16='auto' takes it only where native)",
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


def check_trainable(model: LoadedModel) -> None:
    """Refuse a network this module cannot train (before any work is done for it)."""
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


# provenance that stays true of a model trained further (credit); the rest (the base's
# data, validation, card, calibration...) described the base, not the result
_KEPT_PROVENANCE = ("authors", "license", "cite")


def base_name(info) -> str:
    """How a model trained from the model ``info`` describes it: its ``base_model``."""
    if not info.source and not info.provenance:  # a new network: no base to name
        return "none (random weights)"
    source = f" ({Path(info.source).name})" if info.source else ""
    return f"{info.name or 'unnamed'}{source}"


def _result(net, model, cfg, steps, data_name, kind, metrics, masks=False) -> LoadedModel:
    base = model.info
    parent = base_name(base)
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
        # how it weighs instance masks: this run's if it trained on them, else its
        # base's (a fine-tune on strokes, weighed otherwise, passes it on)
        "mask_weighting": (
            {k: getattr(cfg, k) for k in MASK_WEIGHTS} if masks else mask_weighting(model)
        ),
    }
    info = replace(model.info, provenance=provenance, metrics=dict(metrics), source="")
    return LoadedModel(net.eval(), info)


def train(model, images, labels, kind="instances", config=None, callback=None, **kwargs):
    """Run :func:`train_iter` to the end; ``callback(step)`` after each step."""
    from napari_unet.core.tiling import run_to_end

    return run_to_end(train_iter(model, images, labels, kind, config, **kwargs), callback)


def _short_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k not in ("device", "val_patches")}


def _check_checkpoint(path: Path, model: LoadedModel) -> None:
    """Refuse, before training, a checkpoint file that would overwrite the base model (a
    run wrote its half-trained network over it), a bundled model, or one that cannot be
    written (found at the first checkpoint, it ended the run)."""
    from napari_unet.io.outputs import check_writable

    try:
        check_writable(path, protect=[model.info.source] if model.info.source else [])
    except ValueError as err:
        raise ValueError(f"checkpoint: {err}") from None


def _save_checkpoint(model: LoadedModel, path: str, step: int) -> None:
    """A checkpoint that cannot be written (disk full, the folder gone) is said, and the
    run goes on: its network is still in memory, to be returned at the end."""
    from napari_unet.io.files import ModelFileError, save_model

    try:
        save_model(model, path)
    except (OSError, ModelFileError) as err:
        warnings.warn(
            f"the checkpoint at step {step} could not be written to {path} ({err}); "
            "training goes on",
            RuntimeWarning,
            stacklevel=2,
        )
