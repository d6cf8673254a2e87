"""TorchScript networks: loaded without unpickling, checked against the metadata they
carry (``napari_unet.json``), or probed for what they take and give (channels, sizes,
halo) when they carry none."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from napari_unet.io.files import TORCHSCRIPT_META, _check_finite, _parse_metadata, _refuse_nan
from napari_unet.io.safe_files import ModelFileError
from napari_unet.io.safe_files import first_line as _first_line
from napari_unet.io.scripted import load_script
from napari_unet.model.info import LoadedModel, ModelInfo
from napari_unet.model.shapes import Geometry


def load_torchscript(path: Path) -> LoadedModel:
    extra = {TORCHSCRIPT_META: ""}
    net = load_script(path, path.name, extra).eval()
    _check_finite(net, path.name)  # before the probing passes, which NaN would derail
    with contextlib.suppress(Exception):  # scripted code may refuse: probing will say
        net.float()  # the engine feeds float32 tiles
    if extra[TORCHSCRIPT_META]:
        info, _ = _parse_metadata(path, extra[TORCHSCRIPT_META], architecture=False)
        _check_outputs(net, info, path.name)
        _check_halo(net, info, path.name)
    else:
        info = probe_network(net, name=path.stem)
    info.source = str(path)
    info.format = "torchscript"
    return LoadedModel(net, info)


def _measure_multiple(net, channels: int, base: int, shrink: int) -> int:
    """Smallest shift (a power of two) under which the network is translation-equivariant.

    Outputs of an input and of the same input shifted by ``m`` are compared away from the
    borders, where zero padding changes them: the halo is not known yet, so the margin
    grows with the input (a quarter of it) until one shift fits. A valid-padding
    network's output is already ``shrink / 2`` inside its input.
    """
    gen = torch.Generator().manual_seed(0)
    for size in (base, 2 * base, 4 * base):
        margin = max(0, size // 4 - shrink // 2)  # in output pixels
        x = torch.rand(1, channels, size + 64, size + 64, generator=gen)
        with torch.inference_mode():
            try:
                ref = net(x[..., :size, :size])
            except Exception:  # noqa: BLE001, S112 - a size the network refuses
                continue
            _refuse_nan(ref)
            for m in (1, 2, 4, 8, 16, 32, 64):
                lo, hi = margin, ref.shape[-1] - m - margin
                if hi - lo < 8:
                    continue
                try:
                    moved = net(x[..., m : size + m, m : size + m])
                except Exception:  # noqa: BLE001, S112 - size refused: try a larger shift
                    continue
                if moved.shape != ref.shape:
                    continue
                a = ref[..., lo + m : hi + m, lo + m : hi + m]
                b = moved[..., lo:hi, lo:hi]
                if torch.allclose(a, b, atol=1e-6 * (1 + float(a.abs().max())), rtol=0):
                    return m
    raise ModelFileError("cannot find the network's pooling stride (not translation-equivariant)")


def _aligned_valid_size(net, channels: int, base: int, multiple: int, name: str):
    """``(size, shrink)``: an input size on a valid-padding network's grid.

    Off the grid the network still answers, but its poolings drop the odd rows, so its
    output is smaller and no longer centred on the input: tiles of such sizes would not
    line up (a trace of the bundled em-membrane model answered a 256 px input with 68 px,
    2 px off centre; its grid is 188 + 16 k, where 252 px give 68 px). On the grid the
    border lost (the shrink) is the least, and a larger input by ``multiple`` gives the
    same output plus more pixels at its end.
    """
    sizes = {}
    for size in range(base, base + multiple):
        n = _output_size(net, channels, size)
        if n is not None and n >= 1:
            sizes[size] = size - n
    if sizes:
        size = min(sizes, key=lambda s: (sizes[s], s))
        shrink = sizes[size]
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(1, channels, size + multiple, size + multiple, generator=gen)
        n = size - shrink
        with torch.inference_mode():
            small = net(x[..., :size, :size])
            big = net(x)
        if big.shape[-2:] == (n + multiple, n + multiple):
            top = big[..., :n, :n]
            if torch.allclose(small, top, atol=1e-5 * (1 + float(top.abs().max())), rtol=0):
                return size, shrink
    raise ModelFileError(
        f"{name}: no input size from {base} to {base + multiple - 1} px gives outputs that "
        "line up with a larger input's: the network cannot be run tile by tile"
    )


def _output_size(net, channels: int, size: int) -> int | None:
    """The output width for a ``size`` x ``size`` input, or None if it is refused."""
    try:
        with torch.inference_mode():
            return int(net(torch.zeros(1, channels, size, size)).shape[-1])
    except Exception:  # noqa: BLE001 - refused
        return None


def _output(net, x: torch.Tensor, name: str) -> torch.Tensor:
    """``net(x)``, which must be one ``(N, K, H, W)`` tensor."""
    with torch.inference_mode():
        return _checked(net(x), x, name)


def _checked(y, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim != 4 or y.shape[0] != x.shape[0]:
        got = (
            f"a tensor of shape {tuple(y.shape)} for an input of shape {tuple(x.shape)}"
            if isinstance(y, torch.Tensor)
            else type(y).__name__
        )
        raise ModelFileError(
            f"{name}: the network returns {got}, not one (batch, classes, y, x) tensor "
            "per input (2D networks only)"
        )
    return y


MAX_HALO = 512  # px, as for bioimage.io packages: each check builds inputs of 2 x halo


def _check_outputs(net, info: ModelInfo, name: str) -> None:
    """One small forward pass: the network gives the classes and size its metadata says."""
    g = info.geometry
    if not 0 <= g.halo <= MAX_HALO:
        raise ModelFileError(
            f"{name}: its metadata declares a halo of {g.halo} px; napari-unet takes 0 to "
            f"{MAX_HALO}"
        )
    n = info.fixed_input or (g.snap(max(g.min_input, 2 * g.halo + g.multiple), "up"),) * 2
    x = torch.zeros(1, info.in_channels, *n)
    try:
        with torch.inference_mode():
            y = net(x)
    except Exception as err:  # noqa: BLE001
        raise ModelFileError(
            f"{name}: the network refuses a {n[0]} x {n[1]} input with {info.in_channels} "
            f"channel(s), as its metadata describes ({_first_line(err)})"
        ) from None
    y = _checked(y, x, name)
    want = (info.num_classes, n[0] - g.shrink, n[1] - g.shrink)
    if tuple(y.shape[1:]) != want:
        raise ModelFileError(
            f"{name}: for a {n[0]} x {n[1]} input the network returns {tuple(y.shape[1:])} "
            f"(classes, y, x), its metadata says {want}"
        )


def _check_halo(net, info: ModelInfo, name: str) -> None:
    """The halo a TorchScript file's metadata declares, checked against the network's
    gradient: too small a halo makes tiles show seams (a file saying 0 for the nuclei
    network differed from the real model by 0.72)."""
    from napari_unet.model.receptive import NoGradient, measure_halo

    g = info.geometry
    if info.fixed_input is not None:
        return  # one tile is the whole input: no seams to make
    if g.shrink:  # valid padding: the context is the border the output loses (checked)
        if g.halo != g.shrink // 2:
            raise ModelFileError(
                f"{name}: its metadata declares a halo of {g.halo} px, but the network's "
                f"output is {g.shrink} px smaller than its input (a halo of {g.shrink // 2})"
            )
        return
    size = g.snap(max(g.min_input, 2 * g.halo + 4 * g.multiple), "up")
    try:
        halo = measure_halo(
            net, info.in_channels, size, g.multiple, 0, trials=1, dtype=torch.float32
        )
    except NoGradient:
        return  # no gradient through the trace: nothing to check it with
    if halo > g.halo:
        raise ModelFileError(
            f"{name}: its metadata declares a halo of {g.halo} px, but the network's "
            f"output depends on pixels {halo} px away: tiles would show seams"
        )


def probe_network(net, name: str = "model", max_channels: int = 4) -> ModelInfo:
    """Find input channels, classes, accepted sizes and halo of an opaque network."""
    base = 256
    found, error = _accepted(net, base, max_channels, name)
    if found is None:  # one size only (traced or scripted for it)?
        for size in FIXED_SIZES:
            found, _ = _accepted(net, size, max_channels, name)
            if found is not None:
                return _fixed_info(net, name, size, *found)
        raise ModelFileError(
            f"{name}: the network does not accept 2D float32 images with 1-{max_channels} "
            f"channels of {base} x {base} or of {', '.join(map(str, FIXED_SIZES))} px a side "
            f"({error})"
        )
    c, y = found
    shrink = base - y.shape[-1]
    if y.shape[-2] != y.shape[-1] or shrink < 0 or shrink % 2:
        raise ModelFileError(
            f"{name}: a {base} x {base} input gives a {y.shape[-2]} x {y.shape[-1]} output; "
            "only networks whose output is the input, or the input less a border, are supported"
        )
    if _accepted(net, 2 * base, c, name, least=c)[0] is None:  # 256 x 256 only
        return _fixed_info(net, name, base, c, y)
    multiple = _measure_multiple(net, c, base, shrink)
    if shrink == 0:
        geometry = Geometry(multiple, 0, multiple, 0, _same_padding_halo(net, c, multiple, name))
    else:
        size, shrink = _aligned_valid_size(net, c, base, multiple, name)
        while size - multiple > shrink and _output_size(net, c, size - multiple) == (
            size - multiple - shrink
        ):
            size -= multiple
        geometry = Geometry(multiple, size % multiple, size, shrink, shrink // 2)
    return _opaque_info(name, c, y.shape[1], geometry)


# the frames a same-padding network's halo is measured on: the halo found on one frame is
# checked on the next (a 20-layer dilated network reaching 320 px measured 256 on 512)
HALO_FRAMES = (512, 1024, 2048)


def _same_padding_halo(net, c: int, multiple: int, name: str) -> int:
    """The halo of a same-padding network, measured on growing frames until the next
    frame shows nothing further away."""
    from napari_unet.model.receptive import NoGradient, measure_halo, perturb_halo, reaches_beyond

    def run(x):
        return _output(net, torch.from_numpy(x), name).numpy()

    for size, larger in zip(HALO_FRAMES, HALO_FRAMES[1:]):
        size = size // multiple * multiple
        try:
            halo = measure_halo(net, c, size, multiple, 0, dtype=torch.float32)
        except NoGradient:  # thresholded output: measure by perturbing the input
            halo = perturb_halo(run, c, (size, size), multiple * 4, 0)
            if halo is None:
                continue  # it exceeds this frame
        try:
            further = reaches_beyond(run, c, larger // multiple * multiple, multiple, halo)
        except Exception:  # noqa: BLE001 - a network that takes no larger input: its tiles
            return halo  # are no larger either
        if not further:
            return halo
    raise ModelFileError(
        f"{name}: cannot measure the network's halo: it reaches beyond a {HALO_FRAMES[-2]} px "
        "frame, and tiles would show seams"
    )


# input sides tried when a network refuses 256 x 256: sizes networks are traced for
FIXED_SIZES = (512, 128, 1024, 64, 572, 384)


def _accepted(net, size: int, channels: int, name: str, least: int = 1):
    """``((channels, output), "")`` for the first channel count from ``least`` to
    ``channels`` the network takes at ``size`` x ``size``, else ``(None, why)``."""
    error = ""
    for c in range(least, channels + 1):
        x = torch.zeros(1, c, size, size)
        try:
            with torch.inference_mode():
                y = net(x)
        except Exception as err:  # noqa: BLE001 - try the next channel count
            error = _first_line(err)
            continue
        return (c, _checked(y, x, name)), ""
    return None, error


def _fixed_info(net, name: str, size: int, c: int, y: torch.Tensor) -> ModelInfo:
    """A network that takes ``size`` x ``size`` inputs only: tiles of that size, its
    halo and pooling grid measured inside one input (as for bioimage.io packages
    declared with one size)."""
    from napari_unet.io.bioimageio._geometry import _Declared, _find_multiple, _fixed_geometry

    shrink = size - y.shape[-1]
    if y.shape[-2] != y.shape[-1] or shrink < 0 or shrink % 2:
        raise ModelFileError(
            f"{name}: a {size} x {size} input gives a {y.shape[-2]} x {y.shape[-1]} output; "
            "only networks whose output is the input, or the input less a border, are supported"
        )

    def run(x):
        return _output(net, torch.from_numpy(x), name).numpy()

    k = y.shape[1]
    declared = _Declared((size, size), size, 0, shrink, 0, c, k)
    if shrink:  # valid padding: the context is the border the output loses
        m = _find_multiple(run, c, (size, size), 0, (8, 16, 32, 64, 128)) or 8
        geometry = Geometry(m, size % m, size, shrink, shrink // 2)
    else:
        geometry = _fixed_geometry(run, declared)[0]
        halo = _gradient_halo(net, c, size)  # where perturbing could not measure it
        if geometry.halo == 0 and halo and 2 * halo < size:
            m = geometry.multiple
            geometry = Geometry(m, geometry.offset, size, 0, -(-halo // m) * m)
    return _opaque_info(name, c, k, geometry, fixed=size)


def _opaque_info(name: str, c: int, k: int, geometry: Geometry, fixed: int | None = None):
    """What is known of a network without metadata: what was measured."""
    takes = f" that takes {fixed} x {fixed} inputs only" if fixed else ""
    return ModelInfo(
        name=name,
        classes=[f"class{i}" for i in range(k)],
        in_channels=c,
        geometry=geometry,
        activation="softmax" if k > 1 else "sigmoid",
        description=f"opaque network{takes}: geometry measured on load, outputs taken as logits",
        fixed_input=(fixed, fixed) if fixed else None,
    )


def _gradient_halo(net, channels: int, size: int) -> int | None:
    """The halo from the network's gradient at ``size`` (None: none reaches the input)."""
    from napari_unet.model.receptive import measure_halo

    try:
        return measure_halo(net, channels, size, 1, 0, trials=1, dtype=torch.float32)
    except Exception:  # noqa: BLE001 - no gradient, or the code refuses float32 grads
        return None
