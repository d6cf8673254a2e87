"""What a loaded model is: a network plus the metadata the engine and UI need."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, replace

from torch import nn

from napari_unet.model.shapes import Geometry


@dataclass
class ModelInfo:
    """Metadata of a segmentation network (the model card).

    Attributes
    ----------
    name : str
        Short name, e.g. ``"nuclei"``.
    classes : list of str
        One name per output channel (``["background", "interior", "boundary"]``).
    in_channels : int
        Number of input channels.
    geometry : Geometry
        Accepted input sizes, output size and halo.
    normalization : dict
        Input normalisation spec (see :mod:`napari_unet.core.normalize`).
    activation : str
        ``"softmax"`` (classes sum to 1), ``"sigmoid"`` (independent) or ``"none"``.
    architecture : dict or None
        :class:`~napari_unet.model.unet.UNetConfig` as a dict for the project's models.
    instances : dict or None
        How to turn probabilities into instances, e.g.
        ``{"method": "watershed", "seed": "interior", "boundary": "boundary"}``.
    fixed_input : tuple of int or None
        ``(H, W)`` when the network only takes one input size (some ONNX files).
    object_diameter : float or None
        Typical diameter (px) of the objects the model was trained on (median of
        its training objects). With it, images whose objects are larger or smaller
        can be rescaled to it (:class:`~napari_unet.core.segment.SegmentOptions`
        ``diameter``).
    """

    name: str
    classes: list[str]
    in_channels: int
    geometry: Geometry
    normalization: dict = field(default_factory=lambda: {"mode": "percentile"})
    activation: str = "softmax"
    architecture: dict | None = None
    instances: dict | None = None
    pixel_size: list[float] | None = None
    description: str = ""
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: str = ""
    format: str = "napari-unet"
    fixed_input: tuple[int, int] | None = None
    object_diameter: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["geometry"] = self.geometry.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming the field for values of the
        wrong type or range (metadata comes from files, like any other input)."""
        if not isinstance(d, dict):
            raise ValueError(f"model metadata must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if not isinstance(d.get("geometry"), dict):
            raise ValueError("model metadata has no geometry object")
        d["geometry"] = Geometry(**d["geometry"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, Geometry):
            raise ValueError(f"geometry must be a Geometry, got {self.geometry!r:.80}")
        fields = self.__dataclass_fields__
        for key, (test, what) in _FIELD_CHECKS.items():
            value = getattr(self, key)
            if value is None and fields[key].default is None:
                continue  # optional, and not given
            if not test(value):
                raise ValueError(f"metadata field {key!r} must be {what}, got {value!r:.80}")
        if self.fixed_input is not None:
            self.fixed_input = tuple(int(n) for n in self.fixed_input)

    def card(self) -> str:
        """Human-readable model card."""
        g = self.geometry
        norm = ", ".join(f"{k} {v}" for k, v in self.normalization.items())
        lines = [
            f"name:          {self.name}",
            f"format:        {self.format}",
            f"source:        {self.source}",
            f"classes:       {', '.join(self.classes)} ({self.activation})",
            f"input:         {self.in_channels} channel(s), normalisation: {norm}",
            f"padding:       {'valid' if g.valid else 'same'}; halo {g.halo} px per side; "
            f"tile sizes {g.min_input} + k*{g.multiple}"
            + (f" -> output -{g.shrink}" if g.valid else ""),
        ]
        if self.fixed_input:
            lines.append(f"fixed input:   {self.fixed_input[0]} x {self.fixed_input[1]}")
        if self.architecture:
            a = self.architecture
            extra = {
                ("upsample", "bilinear"): ", bilinear up-sampling",
                ("relu", "last"): ", one ReLU per block",
            }
            lines.append(
                f"architecture:  U-Net depth {a.get('depth')}, base width {a.get('base_width')}, "
                f"{a.get('padding')} padding, {a.get('norm')} norm"
                + "".join(text for (k, v), text in extra.items() if a.get(k) == v)
            )
        if self.pixel_size:
            lines.append(f"pixel size:    {self.pixel_size}")
        if self.object_diameter:
            lines.append(f"object size:   {self.object_diameter:.1f} px diameter (median)")
        if self.description:
            lines.append(f"description:   {self.description}")
        for key, value in self.provenance.items():
            if key == "cite" and isinstance(value, list):  # one reference per line
                for entry in value:
                    entry = entry if isinstance(entry, dict) else {"text": entry}
                    link = entry.get("doi") or entry.get("url")
                    lines.append(
                        f"{'cite:':<14} {entry.get('text', '')}" + (f" ({link})" if link else "")
                    )
            elif key != "train_config":
                lines.append(f"{key + ':':<14} {value}")
            elif isinstance(value, dict) and _is_int(value.get("steps")):
                # what `train --steps PLANNED` needs to repeat a budgeted or stopped run
                lines.append(f"{'steps planned:':<14} {value['steps']}")
                lines.append(f"{'settings:':<14} {_settings(value)}")
        for key, value in self.metrics.items():
            lines.append(f"metric {key}: {_readable(value)}")
        return "\n".join(lines)


# the training settings a card shows (all are in the provenance's train_config, which
# `napari-unet train --settings-from` repeats)
SHOWN_SETTINGS = (
    "seed", "lr", "batch_size", "patch_size", "class_weighting", "augment",
    "freeze_encoder", "adapt_norm", "pseudo_weight", "anchor", "stop_after", "bf16",
)  # fmt: skip
AUG = ("flips", "rotations", "intensity", "noise", "elastic", "zoom")  # augmentations shown


def _settings(config: dict) -> str:
    """``seed 0, lr 0.001, ..., augment flips+rotations+intensity 0.2+noise 0.03``."""
    parts = []
    for key in SHOWN_SETTINGS:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if isinstance(value, dict):  # augment: what is on
            on = [k if v is True else f"{k} {v}" for k, v in value.items() if v and k in AUG]
            value = "+".join(on) or "off"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def _readable(value) -> str:
    """A metric as a person reads it: ``f1@0.5 0.833, pixel_iou 0.805`` for a dict,
    numbers to four significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_readable(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_readable(v) for v in value)
    return str(value)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _valid_normalization(v) -> bool:
    from napari_unet.core.normalize import validate

    try:
        validate(v)
    except (ValueError, TypeError):
        return False
    return isinstance(v, dict)


def _positive_numbers(v) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_number(x) and x > 0 for x in v)


# field -> (test, what it must be); None passes where the field's default is None
_FIELD_CHECKS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "classes": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(c, str) for c in v),
        "a non-empty list of class names",
    ),
    # bounds: sizes from a file are allocated (a probe tensor of 100,000 channels was 17 GB)
    "in_channels": (lambda v: _is_int(v) and 1 <= v <= 1024, "an integer from 1 to 1024"),
    "normalization": (_valid_normalization, "a normalisation spec (mode and numbers)"),
    "activation": (lambda v: v in ("softmax", "sigmoid", "none"), "softmax, sigmoid or none"),
    "architecture": (lambda v: isinstance(v, dict), "an object"),
    "instances": (lambda v: isinstance(v, dict), "an object"),
    "pixel_size": (_positive_numbers, "a list of positive numbers"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "provenance": (lambda v: isinstance(v, dict), "an object"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "format": (lambda v: isinstance(v, str), "a string"),
    "fixed_input": (
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(_is_int(n) and 0 < n <= 16384 for n in v)
        ),
        "two integers from 1 to 16384",
    ),
    "object_diameter": (lambda v: _is_number(v) and 0 < v < 1e6, "a positive number"),
}


@dataclass
class LoadedModel:
    """A network ready for inference: ``net(x)`` maps ``(N, C, H, W)`` to logits."""

    net: nn.Module
    info: ModelInfo

    def with_info(self, **changes) -> LoadedModel:
        return LoadedModel(self.net, replace(self.info, **changes))


def wrap_unet(net, name: str = "unet", classes: list[str] | None = None, **info) -> LoadedModel:
    """Wrap a bare :class:`~napari_unet.model.unet.UNet` with default metadata."""
    c = net.config
    classes = classes or [f"class{i}" for i in range(c.num_classes)]
    return LoadedModel(
        net,
        ModelInfo(
            name=name,
            classes=classes,
            in_channels=c.in_channels,
            geometry=net.geometry,
            architecture=c.to_dict(),
            activation="softmax" if c.num_classes > 1 else "sigmoid",
            **info,
        ),
    )
