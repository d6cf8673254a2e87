"""What a training run is asked to do (:class:`TrainConfig`) and what it reports
(:class:`Phase` before each setup stage, :class:`TrainStep` after each step)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from napari_unet.core.augment import AugmentConfig
from napari_unet.model.info import LoadedModel

# a time-budgeted run stops at this multiple of its budget whatever its planned steps
OVERRUN = 1.25
STOPPED_EARLY = "stopped before the first training step: nothing was learned"
# the phase reported as the steps begin: a stop asked from then on ends the run after the
# step under way and keeps its result; before, the run ends with nothing
STEPPING = "training"


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
    # the loss's weights. class_weighting: "balanced" (1 / frequency), "sqrt" or "none".
    # None (these three): the base model's own where the labels are instance masks (its
    # training record, else the defaults here), and balanced / off for painted strokes
    # (samples.with_weighting): fine-tuning the nuclei model on exact masks with
    # balanced weights and no separation weights lowered its F1 (0.83 -> 0.60)
    class_weighting: str | None = "balanced"
    border_w0: float | None = 10.0  # paper's separation weight (instance labels); 0 = off
    border_sigma: float = 5.0
    # instance labels -> classes (targets.instances_to_classes); None: the base model's
    # own convention (targets.convention: its training provenance, else 2 px / no cores)
    boundary_width: int | None = None
    core_fraction: float | None = None  # interior = object cores deeper than this share
    # instances with cores: soft interior / boundary targets, a ramp over this share of
    # the depth around core_fraction (targets.core_share); 0 = hard classes; None: the
    # base model's (its training provenance, else 0)
    core_ramp: float | None = None
    contact_w0: float | None = 0.0  # instances: extra weight where two objects touch (no gap)
    dice: float = 0.0  # weight of a soft Dice term added to cross-entropy
    # bootstrapped cross-entropy: average only this share of each batch's annotated
    # pixels, the ones with the highest weighted loss (1 = all pixels)
    hard_fraction: float = 1.0
    # forward pass autocast to bfloat16: True, False, or "auto" (where the device runs it
    # natively, see device.fast_bf16); weights stay float32
    bf16: bool | str = False
    focus: float = 0.5  # share of patches centred on boundaries / minority classes
    # which image a patch comes from: "pixels", in proportion to its annotated pixels, or
    # "objects" (instance labels), to its annotated objects, so that images dense with
    # small objects (a 20x section) are drawn as often as their objects count
    draw_images: str = "pixels"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val_every: int = 100  # validation every this many steps (0: at the end only)
    val_patches: int = 16
    seed: int = 0
    device: str = "auto"
    # processes drawing the patches beside the training loop (0: in the loop itself). A
    # GPU step outpaces one CPU core's augmentation several times over. With workers,
    # batch n is drawn from its own seed (seed, n): the run is the same for any number
    # of workers, and differs from the run without them
    workers: int = 0
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
        self.augment = _augment_config(self.augment)
        _check_types(self)
        _check_counts(self)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the learning rate must be a finite number above 0, got {self.lr!r}")
        if self.checkpoint is not None and not str(self.checkpoint).endswith(".safetensors"):
            raise ValueError(f"checkpoint files end in .safetensors, got {self.checkpoint!r}")
        if self.draw_images not in ("pixels", "objects"):
            raise ValueError(
                f"draw_images must be 'pixels' or 'objects', got {self.draw_images!r}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        _check_weights(self)
        if self.stop_after is not None and self.stop_after > self.steps:
            raise ValueError(
                f"stop_after ({self.stop_after}) is beyond the {self.steps} steps of the run: "
                "it ends a run early, after that many of its steps"
            )
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
            class_weighting=None,  # strokes: balanced; instance masks: the base's own
            border_w0=None,
            contact_w0=None,
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


def _augment_config(augment) -> AugmentConfig:
    """``augment`` as an :class:`AugmentConfig` (a dict as ``to_dict()`` and a model's
    provenance have it)."""
    if isinstance(augment, AugmentConfig):
        return augment
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be an AugmentConfig or a dict, got {augment!r}")
    known = {f.name for f in fields(AugmentConfig)}
    unknown = sorted(set(augment) - known)
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
    return AugmentConfig(**augment)


_KINDS = {"int": (int,), "float": (numbers.Real,), "bool": (bool,), "str": (str,)}


def _check_types(cfg: TrainConfig) -> None:
    """Each setting of the kind its field declares ("no" for a switch was taken as on,
    and "0.001" for the learning rate failed deep inside training)."""
    for f in fields(cfg):
        kinds = [k.strip() for k in str(f.type).split("|")]
        allowed = tuple(t for k in kinds for t in _KINDS.get(k, ()))
        value = getattr(cfg, f.name)
        if not allowed or (value is None and "None" in kinds):
            continue  # (the augmentation checks itself)
        if not isinstance(value, allowed) or (isinstance(value, bool) and "bool" not in kinds):
            raise ValueError(f"{f.name} must be {' or '.join(kinds)}, got {value!r}")


# the largest batch and patch: a batch of 1e9 patches (a typo, or a hostile model file's
# settings) filled the memory with no message, and no Ctrl-C stopped it
MOST = {"batch_size": 1024, "patch_size": 8192, "val_patches": 4096, "workers": 256}


def _check_counts(cfg: TrainConfig) -> None:
    """Whole numbers at least their least value (``stop_after``: None = off)."""
    least = {"steps": 1, "batch_size": 1, "patch_size": 1, "val_patches": 1, "val_every": 0}
    least.update(checkpoint_every=1, seed=0, stop_after=1, warmup=0, workers=0)
    for name, low in least.items():
        value = getattr(cfg, name)
        if name == "stop_after" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        if value > MOST.get(name, value):
            raise ValueError(f"{name} must be at most {MOST[name]}, got {value}")


def _check_weights(cfg: TrainConfig) -> None:
    """Weights and shares: finite, not negative (a NaN Dice weight was silently no Dice)."""
    shares = {"pseudo_threshold": 1.0, "pseudo_weight": None, "dice": None}
    for name in ("weight_decay", "anchor", "border_w0", "contact_w0", *shares):
        value = getattr(cfg, name)
        top = shares.get(name)
        if value is None and name in ("border_w0", "contact_w0"):
            continue  # (the base model's, see class_weighting)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
            or (top is not None and value > top)
        ):
            what = f"between 0 and {top}" if top is not None else "a finite number >= 0"
            raise ValueError(f"{name} must be {what}, got {value!r}")
