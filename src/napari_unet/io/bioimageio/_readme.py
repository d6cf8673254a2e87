"""The README.md of an exported bioimage.io package: what a reader of the zip needs."""

from __future__ import annotations

from napari_unet.model.info import ModelInfo
from napari_unet.model.shapes import Geometry

UNET_CITATION = {
    "text": "Ronneberger, O., Fischer, P., Brox, T. U-Net: Convolutional Networks for "
    "Biomedical Image Segmentation. MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}


def declared_halo(g: Geometry) -> int:
    """The halo a package declares: the context napari-unet's tiles read
    (:func:`~napari_unet.core.tile_plan.tiling_geometry`: a same-padding network's halo
    rounded up to its size step). bioimage.io tools pad the input by the halo on each
    side, so twice it must be a step (94 px on a 16-px grid gave 388 x 388 predictions of
    400 x 400 inputs), and padded by a whole step the image lies on the pooling grid as
    in napari-unet's tiles (half a step put a depth-2 network's image 2 px off it)."""
    from napari_unet.core.tile_plan import tiling_geometry

    return tiling_geometry(g).halo


def smallest_input(g: Geometry) -> int:
    """The smallest input the package declares: a same-padding network's smallest
    with a pixel of full context (its true smallest input is all border)."""
    return g.min_input if g.valid else g.snap(2 * declared_halo(g) + 1, "up")


_NOT_IN_README = ("train_config", "model_card")


def package_readme(info: ModelInfo, g: Geometry, names: dict) -> str:
    a = info.architecture or {}
    spec = ", ".join(f"{k} {v}" for k, v in info.normalization.items())
    lines = [
        f"# {info.name}",
        "",
        info.description or "A U-Net segmentation model exported from napari-unet.",
        "",
        "## Model",
        "",
        f"- classes: {', '.join(info.classes)} ({info.activation})",
        f"- input: {info.in_channels} channel(s); normalisation per image and channel: {spec}",
        f"- architecture: U-Net (Ronneberger et al. 2015), depth {a.get('depth')}, base width "
        f"{a.get('base_width')}, {a.get('padding')} padding, {a.get('norm')} norm",
        f"- input sizes: {smallest_input(g)} + k*{g.multiple} px; context (halo) {g.halo} "
        "px per side" + (f"; the output is {g.shrink} px smaller" if g.valid else ""),
        "",
        "## Weights",
        "",
        f"- `{names['torchscript']}`: TorchScript (traced; accepts every input size above)",
        f"- `{names['state_dict']}`: PyTorch state dict for `UNet(**kwargs)` in "
        f"`{names['architecture']}`",
        "",
        "## Use",
        "",
        "In napari with napari-unet, or on the command line:",
        "`napari-unet predict IMAGE --model THIS.zip`. Large images are segmented with",
        "overlap-tile inference; tiled and one-pass results agree.",
        "",
        "## Validation",
        "",
        "`test_output.npy` is the output for `test_input.npy` (pre-processing with statistics",
        "of the whole tensor, one forward pass, post-processing), as the bioimage.io spec",
        "runs it; napari-unet checks it with `napari_unet.io.bioimageio.run_test_tensors`.",
    ]
    extra = [f"- {k}: {v}" for k, v in info.provenance.items() if k not in _NOT_IN_README]
    if info.provenance.get("model_card"):  # a file of the project, not of this package
        card = str(info.provenance["model_card"]).split()[0]
        extra.append(f"- model card: {card} in napari-unet's docs/models/ (not in this package)")
    extra += [f"- {k}: {v}" for k, v in info.metrics.items()]
    if extra:
        lines += ["", "## Training and evaluation", "", *extra]
    lines += ["", "## Citation", "", f"{UNET_CITATION['text']} doi:{UNET_CITATION['doi']}"]
    return "\n".join(lines) + "\n"
