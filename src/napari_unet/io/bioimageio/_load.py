"""Loading a package for the overlap-tile engine, and the spec's own test-tensor check."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_unet.core import normalize as norm
from napari_unet.io.bioimageio._files import _Files, _open, _read_checked, _read_rdf
from napari_unet.io.bioimageio._geometry import _declared, _geometry
from napari_unet.io.bioimageio._processing import (
    EXPORT_EPS,
    PackageNet,
    _arrange,
    _split_post,
    _split_pre,
)
from napari_unet.io.bioimageio._rdf import ENGINE_IN, ENGINE_OUT, _parse, _Spec, _Tensor
from napari_unet.io.bioimageio._weights import _check_hashes, _choose_weights, _load_weights
from napari_unet.io.safe_files import ModelFileError, first_line
from napari_unet.model.info import LoadedModel, ModelInfo


def _person(a) -> str:
    name = a.get("name", "") if isinstance(a, dict) else str(a)
    return str(name).split(";")[0].strip()


def _citation(c) -> dict:
    """A reference as the weights files keep them (``text`` and ``doi`` or ``url``): the
    card shows one per line (joined into one string, they ran together)."""
    if not isinstance(c, dict):
        return {"text": " ".join(str(c).split())}
    out = {"text": " ".join(str(c.get("text", "")).split())}
    for key in ("doi", "url"):
        if c.get(key):
            out[key] = str(c[key])
    return out


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def _provenance(spec: _Spec, fmt: str, entry: dict, notes: dict, own: dict, label: str) -> dict:
    """The package's credit and weights, after how the model was made where napari-unet
    exported it (``config.napari_unet.provenance``: base model, data, steps, settings)."""
    rdf = spec.rdf
    made = own.get("provenance") or {}
    if not isinstance(made, dict) or not all(isinstance(k, str) for k in made):
        raise ModelFileError(f"{label}: 'config.napari_unet.provenance' must be a mapping")
    p = dict(made)
    if rdf.get("authors"):
        p["authors"] = ", ".join(_person(a) for a in _listed(rdf["authors"]))
    if rdf.get("license"):
        p["license"] = str(rdf["license"])
    if rdf.get("cite"):
        p["cite"] = [_citation(c) for c in _listed(rdf["cite"])]
    data = rdf.get("training_data")
    if "training_data" not in p and data:  # (the card said nothing of it)
        p["training_data"] = _data_set(data)
    p["weights"] = f"{fmt} ({entry['source']})"
    p["bioimageio"] = f"format {spec.version}" + (f", id {rdf['id']}" if rdf.get("id") else "")
    p.update(notes)
    return p


def _data_set(data) -> str:
    """A package's ``training_data``: a zoo data set's id, or one described inline (its
    name and where it lies)."""
    if not isinstance(data, dict):
        return str(data)
    if data.get("id"):
        return f"bioimage.io dataset {data['id']}"
    parts = [str(data[k]) for k in ("name", "source") if data.get(k)]
    return " - ".join(parts) or "described in the package (no name or source)"


def _classes(out: _Tensor, k: int) -> list[str]:
    a = out.axis("c")
    if a is not None and a.names and len(a.names) == k:
        return [str(n) for n in a.names]
    return [out.id] if k == 1 else [f"class{i}" for i in range(k)]


def _pixel_size(inp: _Tensor) -> list[float] | None:
    axes = [inp.axis(k) for k in "yx"]
    if all(a is not None and a.unit for a in axes):
        return [float(a.scale) for a in axes]
    return None


def _single_sample(inp: _Tensor, out: _Tensor) -> bool:
    b_in, b_out = inp.axis("b"), out.axis("b")
    return b_in is None or b_out is None or b_in.size == 1


def load_package(source, trust_code: bool = False, weights_format: str | None = None):
    """Load a bioimage.io model package for the overlap-tile engine.

    Parameters
    ----------
    source : str or Path
        A package folder, its RDF (``bioimageio.yaml`` / ``rdf.yaml``) or a ``.zip``.
    trust_code : bool
        Allow running the package's architecture code (``pytorch_state_dict`` weights).
    weights_format : str, optional
        ``"torchscript"``, ``"pytorch_state_dict"`` or ``"onnx"``; default: the
        first usable one in that order.

    Returns
    -------
    LoadedModel
        ``net`` is a :class:`PackageNet`; ``info.format`` is ``"bioimageio"``.

    Raises
    ------
    ModelFileError
        Unreadable, unsafe, unsupported or tampered packages (one-line reason).
    """
    files, rdf_name = _open(source)
    spec = _parse(_read_rdf(files, rdf_name), rdf_name)
    config = _own_config(spec.rdf, rdf_name)  # before the slow geometry measurement
    _check_hashes(files, spec)
    fmt, entry, passed_over = _choose_weights(spec, files, weights_format, trust_code)
    inp, out = spec.inputs[0], spec.outputs[0]
    declared = _declared(inp, out)
    normalization, pre = _split_pre(inp, declared.channels)
    normalization = _own_normalization(normalization, config)
    activation, post = _split_post(out)
    core = _load_weights(fmt, entry, files)
    net = PackageNet(core, spec, files, pre, post, _single_sample(inp, out)).eval()
    try:
        geometry, fixed, notes = _geometry(net, fmt != "onnx", declared)
    except (ModelFileError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever the package's network raised
        # (the network's own words, as the first thing said, read as a napari-unet fault)
        d = declared
        sizes = " x ".join(map(str, d.fixed)) if d.fixed else f"{d.min} + k x {d.step} px"
        raise ModelFileError(
            f"the network fails on inputs {rdf_name} declares ({d.channels} channel(s), "
            f"{sizes}) while napari-unet measures it: {first_line(err)}"
        ) from None
    if trust_code and passed_over:  # (trusted for the network itself, which it could not
        # load: said, not to be taken for it, e.g. by the feature-map panel)
        notes["trust_note"] = f"trusted, but {'; '.join(passed_over)}: {fmt} weights used"
    rdf = spec.rdf
    try:  # the RDF's values are checked like any file's metadata
        info = ModelInfo(
            name=str(rdf.get("name") or Path(source).stem),
            classes=_classes(out, declared.classes),
            in_channels=declared.channels,
            geometry=geometry,
            normalization=normalization,
            activation=activation,
            instances=config.get("instances"),
            pixel_size=_pixel_size(inp) or config.get("pixel_size"),
            description=" ".join(str(rdf.get("description", "")).split()),
            provenance=_provenance(spec, fmt, entry, notes, config, rdf_name),
            source=str(source),
            format="bioimageio",
            fixed_input=fixed,
            object_diameter=config.get("object_diameter"),
            metrics=config.get("metrics") or {},
        )
    except ValueError as err:
        raise ModelFileError(f"{rdf_name}: {err}") from None
    return LoadedModel(net, info)


def _own_config(rdf: dict, label: str) -> dict:
    """The RDF's ``config.napari_unet`` (written by this plugin's export), or ``{}``."""
    config = rdf.get("config") or {}
    own = config.get("napari_unet") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(own or {}, dict):
        raise ModelFileError(f"{label}: 'config' (and its 'napari_unet') must be a mapping")
    return own or {}


def _own_normalization(normalization, config: dict):
    """The exported model's own normalisation where the package's pre-processing is its
    export: the spec's ``scale_range`` needs an eps above 0, which turned off the
    model's rule for planes whose percentiles coincide (a dark field with a few bright
    nuclei: 21 objects where the model file found 2)."""
    own = config.get("normalization")
    if not isinstance(own, dict) or not isinstance(normalization, dict):
        return normalization
    if normalization.get("eps") != EXPORT_EPS or "eps" in own:
        return normalization
    rest = {k: v for k, v in normalization.items() if k != "eps"}
    return dict(own) if rest == own else normalization


# ------------------------------------------------------------------- the spec's test


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    return y


def _device(module: nn.Module) -> torch.device:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def _direct(forward, device, info: ModelInfo, x: np.ndarray, in_names, out_names) -> np.ndarray:
    """The spec's way: whole-tensor statistics, one forward pass, no tiling."""
    t = _arrange(torch.from_numpy(np.asarray(x, dtype=np.float64)), in_names, ENGINE_IN).numpy()
    spec = norm.validate(info.normalization)
    planes = [norm.apply(s, *norm.plane_stats(s.reshape(s.shape[0], -1), spec)) for s in t]
    with torch.inference_mode():
        y = forward(torch.from_numpy(np.stack(planes)).to(device)).float().cpu()
        y = _activate(y, info.activation)
    return _arrange(y, ENGINE_OUT, out_names).numpy()


def _load_array(files: _Files, test, what: str) -> np.ndarray:
    if test is None:
        raise ModelFileError(f"the package declares no {what}")
    data = _read_checked(files, test[0], test[1], what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ModelFileError(f"{test[0]}: not a plain .npy array ({err})") from None


def run_test_tensors(
    model_or_package, *, weights_format=None, trust_code=False, atol: float = 1e-4
) -> float:
    """Run a package on its ``test_input`` as the spec does and compare with ``test_output``.

    Pre-processing with statistics of the whole tensor, one forward pass on
    the whole tensor, post-processing; no tiling.

    Parameters
    ----------
    model_or_package : LoadedModel or str or Path
        A model from :func:`load_package`, or a package to load.
    atol : float
        Largest accepted absolute difference.

    Returns
    -------
    float
        The largest absolute difference from ``test_output``.

    Raises
    ------
    ModelFileError
        If the difference exceeds ``atol`` or the shapes differ.
    """
    model = model_or_package
    if not isinstance(model, LoadedModel):
        model = load_package(model, trust_code=trust_code, weights_format=weights_format)
    net = model.net
    if not isinstance(net, PackageNet):
        raise ModelFileError("run_test_tensors needs a model loaded from a bioimage.io package")
    inp, out = net.package.inputs[0], net.package.outputs[0]
    x = _load_array(net.files, inp.test, "test input")
    expected = _load_array(net.files, out.test, "test output")
    got = _direct(net.uncropped, _device(net), model.info, x, net.in_names, net.out_names)
    if got.shape != expected.shape:
        raise ModelFileError(
            f"{out.test[0]}: shape {expected.shape}, the network gives {got.shape}"
        )
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    if not diff <= atol:
        raise ModelFileError(
            f"{out.test[0]}: the output differs by {diff:.3g} (tolerance {atol:g})"
        )
    return diff
