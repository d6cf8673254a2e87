"""The project's model files, and refusing unsafe checkpoints (TorchScript: :mod:`.torchscript`).

Own format: one ``.safetensors`` file. Its string metadata holds
``"napari_unet"``: a JSON :class:`~napari_unet.model.info.ModelInfo` (architecture,
classes, normalisation, axes, pixel size, provenance, metrics) and
``"format"``: ``"napari-unet/1"``. Loading never unpickles anything: safetensors
is plain tensors, TorchScript is TorchScript, and a PyTorch pickle is only read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch

from napari_unet.io import registry
from napari_unet.io.safe_files import ModelFileError, atomic_write, check_zip_archive
from napari_unet.io.safe_files import first_line as _first_line
from napari_unet.model.info import LoadedModel, ModelInfo
from napari_unet.model.unet import UNet, UNetConfig

FORMAT = "napari-unet/1"
META_KEY = "napari_unet"
TORCHSCRIPT_META = "napari_unet.json"


def save_model(
    model: LoadedModel, path: str | Path, half: bool = False, allow_bundled: bool = False
) -> Path:
    """Save a project U-Net as one ``.safetensors`` file, atomically.

    ``half=True`` stores float weights as float16 (they are loaded back as
    float32). Overwriting a bundled model needs ``allow_bundled=True``. A trained
    model still called by its base model's name (``train(load_model("nuclei"), ...)``)
    is saved under its file's name, so that it is not taken for its base.
    """
    from safetensors.torch import save_file

    if not isinstance(model.net, UNet):
        raise ModelFileError(
            "only napari-unet U-Nets can be saved as .safetensors; "
            "export other networks as a bioimage.io package"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model files end in .safetensors, got {path.name!r}")
    if registry.is_bundled(path) and not allow_bundled:
        raise ModelFileError(f"refusing to overwrite the bundled model {path.name}")
    tensors = {}
    for key, value in model.net.state_dict().items():
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        tensors[key] = value.contiguous()
    info = model.info.to_dict()
    info["name"] = saved_name(model, path)
    info["architecture"] = model.net.config.to_dict()
    info["source"] = ""
    meta = {META_KEY: json.dumps(info), "format": FORMAT}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def saved_name(model: LoadedModel, path: str | Path) -> str:
    """The name ``model`` is saved (or exported) under: its own, but a trained model
    still called by its base model's name takes its file's, so that it is not taken
    for its base."""
    base = str(model.info.provenance.get("base_model", ""))
    if not model.info.source and base.split(" (")[0] == model.info.name:
        return Path(path).stem
    return model.info.name


def load_model(source: str | Path, trust_code: bool = False) -> LoadedModel:
    """Load a bundled model by name, a ``.safetensors`` model file, a TorchScript file
    or a bioimage.io package (folder, RDF ``.yaml`` or ``.zip``).

    ``trust_code`` allows a bioimage.io package's architecture code to run (see
    :func:`napari_unet.io.bioimageio.load_package`). Raises
    :class:`ModelFileError` with a one-line reason for anything else.
    """
    name = Path(str(source)).name
    try:
        model = _bounded(LOAD_SECONDS, _load, source, trust_code, name)
    except _TooLong:
        raise ModelFileError(
            f"{name}: its network did not answer small test inputs within {LOAD_SECONDS:.0f} s "
            "(a network that never ends, from a broken or hostile file, or one far too large "
            "for this machine); its check goes on using the CPU until this program closes"
        ) from None
    except (RuntimeError, MemoryError, torch.jit.Error) as err:  # (RecursionError too)
        # torch's allocator refusing sizes a file declares, recursion in nested metadata:
        # one line naming the file (a RuntimeError also stopped the GUI's worker dead)
        raise ModelFileError(f"{name}: cannot load it ({_first_line(err)})") from None
    except ModelFileError as err:
        if name in str(err):
            raise
        raise ModelFileError(f"{name}: {err}") from None  # which file, in a batch or a panel
    except (TypeError, AttributeError, ValueError, KeyError) as err:
        # a package's values of the wrong kind (a gain "two", a network returning a
        # tuple) reached torch or numpy: a traceback in the CLI, a bare "Error: new():
        # invalid data type 'str'" in the panel
        raise ModelFileError(f"{name}: cannot load it ({_first_line(err)})") from None
    return model


# how long loading may take: a file's network is run on small test inputs, and a
# TorchScript network that loops (a hostile file) hung the CLI and the model panel for
# good, deaf to Ctrl-C and SIGTERM inside TorchScript's interpreter
LOAD_SECONDS = 300.0


class _TooLong(Exception):
    pass


def _bounded(seconds: float, fn, *args):
    """``fn(*args)``, or :class:`_TooLong` after ``seconds``. It runs in a daemon thread
    (TorchScript lets go of Python's lock while it runs), which the caller stops waiting
    for: a thread cannot be stopped, but it holds nothing up and ends with the program."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=run, name="napari-unet: loading a model", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _TooLong
    if "error" in out:
        raise out["error"]
    return out["value"]


def _load(source, trust_code: bool, name: str) -> LoadedModel:
    from napari_unet.io import bioimageio

    if registry.bundled_path(str(source)) is None and bioimageio.is_package(source):
        model = bioimageio.load_package(source, trust_code=trust_code)
    else:
        path = _resolve(source)
        kind = _sniff(path)
        if kind == "safetensors":
            model = _load_safetensors(path)
        elif kind == "torchscript":
            from napari_unet.io.torchscript import load_torchscript

            model = load_torchscript(path)
        elif kind == "pickle":
            model = _load_pickle(path)
        elif kind == "zip":
            raise ModelFileError(
                f"{path.name}: a zip file that is corrupt or truncated, or holds no "
                "bioimage.io model description (rdf.yaml / bioimageio.yaml)"
            )
        else:
            raise ModelFileError(
                f"{path.name}: not a model file this plugin reads (napari-unet "
                ".safetensors, TorchScript .pt, or a bioimage.io package .zip / rdf.yaml)"
            )
    if model.info.format != "torchscript":  # _load_torchscript checks before it probes
        _check_finite(model.net, name)
    _check_answers(model, name)
    if model.info.instances:
        from napari_unet.core.postprocess import check_recipe

        try:
            check_recipe(model.info.instances, model.info.classes, model.info.num_classes)
        except ValueError as err:
            raise ModelFileError(f"{name}: {err}") from None
    return model


def _check_answers(model: LoadedModel, name: str) -> None:
    """Refuse a network that answers NaN or infinity to an ordinary input (finite
    weights can: a negative batch-norm variance), whose every prediction would be NaN,
    written without a word, or that answers another size than its description says
    (a package declaring sizes its network does not take failed on the first tile of
    every image). Passes at the smallest size it takes and the next one."""
    from napari_unet.core.tiling import check_answer

    g, net = model.info.geometry, model.net
    if g is None or not isinstance(net, torch.nn.Module):
        return
    sizes = [model.info.fixed_input or (g.min_input, g.min_input)]
    if not model.info.fixed_input:
        sizes.append((g.min_input + g.multiple,) * 2)
    device = next(iter(net.parameters()), torch.zeros(0)).device
    for size in sizes:
        seed = torch.Generator().manual_seed(0)
        x = torch.rand((1, model.info.in_channels, *size), generator=seed)
        try:
            with torch.no_grad():
                out = net(x.to(device))
        except Exception as err:  # noqa: BLE001 - whatever the network raised
            raise ModelFileError(
                f"{name}: the network fails on a {size[0]} x {size[1]} input, a size it "
                f"was declared or measured to take ({_first_line(err)})"
            ) from None
        _refuse_nan(out, name)
        try:
            check_answer(out, x, model.info)
        except ValueError as err:
            want = tuple(n - g.shrink for n in x.shape[-2:])
            sizes = isinstance(out, torch.Tensor) and tuple(out.shape[-2:]) != want
            why = " (the input sizes it declares are not those its network takes)"
            raise ModelFileError(f"{name}: {err}{why if sizes else ''}") from None


def _refuse_nan(out, name: str = "") -> None:
    """Refuse a network whose answer ``out`` to an ordinary input holds NaN or infinity
    (``name``: the file; :func:`load_model` names it where it is not given)."""
    if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
        raise ModelFileError(
            (f"{name}: " if name else "")
            + "the network answers NaN or infinity to an ordinary image (broken weights "
            "or statistics, e.g. a negative batch-norm variance); not loaded"
        )


def _check_finite(net, name: str) -> None:
    """Refuse weights holding NaN or infinity: every prediction would be NaN (written as
    a result without a word) and so would every fine-tuned version."""
    if not isinstance(net, torch.nn.Module):
        return
    for key, tensor in [*net.named_parameters(), *net.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{name}: the weights hold NaN or infinite values ({key})")


def _resolve(source) -> Path:
    bundled = registry.bundled_path(str(source))
    if bundled is not None:
        return bundled
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(registry.bundled_models()) or "none installed"
        raise ModelFileError(f"no model file or bundled model named {source!r} (bundled: {names})")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    return path


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "zip"
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _load_safetensors(path: Path) -> LoadedModel:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - any parse error means a corrupt file
        raise ModelFileError(
            f"{path.name}: corrupt or truncated safetensors file ({err})"
        ) from None
    if META_KEY not in meta:
        raise ModelFileError(f"{path.name}: safetensors file without napari-unet metadata")
    info, config = _parse_metadata(path, meta[META_KEY])
    net = _build(path, info, config, state)
    info.geometry = net.geometry
    info.source = str(path)
    return LoadedModel(net.eval(), info)


def _build(path: Path, info: ModelInfo, config: UNetConfig, state) -> UNet:
    """The U-Net of ``config`` holding ``state``, after checking, before allocating
    anything, that the weights and the metadata describe the same network (a small
    file must not make us build a huge network only to find they differ)."""
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFileError(f"{path.name}: the weights are not a dict of named tensors")
    if info.in_channels != config.in_channels or info.num_classes != config.num_classes:
        raise ModelFileError(
            f"{path.name}: its metadata disagrees with itself: {info.in_channels} input "
            f"channel(s) and {info.num_classes} classes, but an architecture of "
            f"{config.in_channels} and {config.num_classes}"
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"
            if unexpected
            else f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, expected {expected[shapes[0]]}"
        )
        raise ModelFileError(
            f"{path.name}: weights do not match the architecture in its metadata: {detail}"
        )
    ints = [
        k for k in expected if "num_batches_tracked" not in k and not state[k].is_floating_point()
    ]
    if ints:
        raise ModelFileError(
            f"{path.name}: weight {ints[0]} is {state[ints[0]].dtype}, not floating point"
        )
    net = UNet(config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. a dtype torch cannot copy
        raise ModelFileError(
            f"{path.name}: cannot load its weights ({_first_line(err)})"
        ) from None
    return net


def _parse_metadata(path: Path, text, architecture: bool = True):
    """``(ModelInfo, UNetConfig or None)`` from a file's napari-unet metadata (JSON), or a
    :class:`ModelFileError` naming the file: metadata is input like any other."""
    try:
        info = ModelInfo.from_dict(json.loads(text))
        config = UNetConfig.from_dict(info.architecture or {}) if architecture else None
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelFileError(
            f"{path.name}: invalid napari-unet metadata ({type(err).__name__}: {err})"
        ) from None
    return info, config


def _load_pickle(path: Path) -> LoadedModel:
    check_zip_archive(path, path.name)  # torch.save's zip: no bomb unpacked
    try:
        with warnings.catch_warnings():  # torch's advice on a plain pickle's protocol:
            warnings.simplefilter("ignore", UserWarning)  # it is refused just below
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - UnpicklingError and friends
        raise ModelFileError(
            f"{path.name}: a pickled PyTorch checkpoint that needs arbitrary code to load; "
            "refused for safety. Save its state_dict as .safetensors (or TorchScript) instead."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get(META_KEY), str) and "state_dict" in obj:
        info, config = _parse_metadata(path, obj[META_KEY])
        net = _build(path, info, config, obj["state_dict"])
        info.geometry = net.geometry
        info.source = str(path)
        return LoadedModel(net.eval(), info)
    raise ModelFileError(
        f"{path.name}: holds weights only, without the network's architecture; "
        "load it into a UNet in Python and save it with napari_unet.io.save_model"
    )
