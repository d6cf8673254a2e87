"""What a loaded model is: a network plus the metadata the engine and UI need."""

from __future__ import annotations

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
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["geometry"] = Geometry(**d["geometry"])
        if d.get("fixed_input") is not None:
            d["fixed_input"] = tuple(d["fixed_input"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

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
            lines.append(
                f"architecture:  U-Net depth {a.get('depth')}, base width {a.get('base_width')}, "
                f"{a.get('padding')} padding, {a.get('norm')} norm"
            )
        if self.pixel_size:
            lines.append(f"pixel size:    {self.pixel_size}")
        if self.object_diameter:
            lines.append(f"object size:   {self.object_diameter:.1f} px diameter (median)")
        if self.description:
            lines.append(f"description:   {self.description}")
        for key, value in self.provenance.items():
            if key != "train_config":
                lines.append(f"{key + ':':<14} {value}")
        for key, value in self.metrics.items():
            lines.append(f"metric {key}: {value}")
        return "\n".join(lines)


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
