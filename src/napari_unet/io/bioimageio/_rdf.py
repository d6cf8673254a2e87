"""Parsing an RDF (format 0.5 and 0.4) into one description: _Spec, _Tensor, _Axis."""

from __future__ import annotations

from dataclasses import dataclass, field

from napari_unet.io.safe_files import ModelFileError

ENGINE_IN = ("b", "c", "y", "x")
ENGINE_OUT = ("b", "c", "y", "x")


@dataclass
class _Axis:
    """One tensor axis; ``kind`` is ``b``, ``c``, ``y``, ``x`` or ``other``."""

    kind: str
    id: str
    size: object = None  # int, ("param", min, step), ("ref", tensor, axis, offset) or None
    halo: int = 0
    names: list | None = None
    scale: float = 1.0
    unit: str | None = None


@dataclass
class _Tensor:
    id: str
    axes: list
    ops: list
    test: tuple | None = None  # (path, sha256 or None)

    def axis(self, kind: str) -> _Axis | None:
        return next((a for a in self.axes if a.kind == kind), None)

    @property
    def names(self) -> tuple:
        return tuple(a.kind if a.kind != "other" else f"other:{a.id}" for a in self.axes)


@dataclass
class _Spec:
    """The parts of an RDF the loader uses, the same for format 0.4 and 0.5."""

    rdf: dict
    version: str
    inputs: list
    outputs: list
    weights: dict
    files: list = field(default_factory=list)  # declared (path, sha256)


def _parse(rdf: dict, label: str) -> _Spec:
    version = str(rdf.get("format_version", ""))
    try:
        if version.startswith("0.5"):
            spec = _parse_v05(rdf)
        elif version.startswith("0.4"):
            spec = _parse_v04(rdf)
        else:
            raise ModelFileError(
                f"{label}: format_version {version!r} is not supported (0.4, 0.5)"
            )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        if isinstance(err, ModelFileError):
            if str(err).startswith(f"{label}:"):
                raise
            raise ModelFileError(f"{label}: {err}") from None
        raise ModelFileError(f"{label}: invalid bioimage.io description ({err!r})") from None
    spec.files = _declared_files(rdf) + spec.files
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise ModelFileError(
            f"{label}: {len(spec.inputs)} inputs and {len(spec.outputs)} outputs; "
            "only one input and one output tensor are supported"
        )
    return spec


def _declared_files(rdf) -> list:
    """Every ``{source, sha256}`` pair in the RDF (0.5 style).

    Each dict or list is visited once: YAML aliases make one node appear under many
    parents, and walking every path through nested aliases takes exponential time
    (a few hundred bytes of YAML could hang the loader for hours).
    """
    found, seen, todo = [], set(), [rdf]
    while todo:
        node = todo.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if isinstance(node.get("source"), str) and isinstance(node.get("sha256"), str):
                found.append((node["source"], node["sha256"]))
            todo.extend(reversed(list(node.values())))
        else:
            todo.extend(reversed(node))
    return found


_DEFAULT_IDS = {"batch": "batch", "channel": "channel", "index": "index", "time": "time"}


def _axes_v05(raw: list) -> list:
    axes = []
    for a in raw:
        kind_of = a.get("type")
        aid = str(a.get("id", _DEFAULT_IDS.get(kind_of, "x")))
        if kind_of in ("batch", "channel"):
            kind = kind_of[0]
        else:
            kind = aid if kind_of == "space" and aid in ("x", "y") else "other"
        names = a.get("channel_names") if kind == "c" else None
        names = names if isinstance(names, list) else None
        size = _size_v05(a.get("size"), len(names) if names else None)
        axes.append(
            _Axis(
                kind, aid, size, int(a.get("halo", 0)), names, a.get("scale", 1.0), a.get("unit")
            )
        )
    return axes


def _size_v05(size, n_names):
    if size is None:
        return n_names
    if isinstance(size, int):
        return size
    if "tensor_id" in size:
        return ("ref", str(size["tensor_id"]), str(size["axis_id"]), int(size.get("offset", 0)))
    if "step" in size:
        return _param(int(size["min"]), int(size["step"]))
    return None  # data-dependent


def _param(lo: int, step: int) -> tuple:
    """A ``min + n * step`` size; both must be positive (a zero step divides by zero)."""
    if lo < 1 or step < 1:
        raise ModelFileError(f"axis size min {lo} and step {step}: both must be >= 1")
    return ("param", lo, step)


def _ops(raw, axes: list, v04: bool) -> list:
    """Processing steps as ``(op, kwargs)`` with axis ids replaced by axis kinds."""
    kinds = {a.id: a.kind for a in axes}
    ops = []
    for step in raw or []:
        op = step["name"] if v04 else step["id"]
        kw = dict(step.get("kwargs") or {})
        if v04 and op == "zero_mean_unit_variance" and kw.get("mode") == "fixed":
            op = "fixed_zero_mean_unit_variance"
        if kw.get("axes") is not None:
            kw["axes"] = {
                kinds.get(str(i), "b" if str(i) == "batch" else "other") for i in kw["axes"]
            }
        if "axis" in kw:
            kw["axis"] = kinds.get(str(kw["axis"]), "other")
        ops.append((op, kw))
    return ops


def _tensor_v05(t: dict, default_id: str, ops_key: str) -> _Tensor:
    axes = _axes_v05(t["axes"])
    test = t.get("test_tensor")
    return _Tensor(
        str(t.get("id", default_id)),
        axes,
        _ops(t.get(ops_key), axes, v04=False),
        (test["source"], test.get("sha256")) if test else None,
    )


def _parse_v05(rdf: dict) -> _Spec:
    weights = {}
    for fmt, entry in (rdf.get("weights") or {}).items():
        if entry:
            weights[fmt] = dict(entry)
    return _Spec(
        rdf,
        str(rdf["format_version"]),
        [_tensor_v05(t, "input", "preprocessing") for t in rdf["inputs"]],
        [_tensor_v05(t, "output", "postprocessing") for t in rdf["outputs"]],
        weights,
    )


def _axes_v04(t: dict) -> list:
    letters, shape = t["axes"], t["shape"]
    halo = t.get("halo") or [0] * len(letters)
    axes = []
    for i, ch in enumerate(letters):
        kind = ch if ch in ENGINE_IN else "other"
        if isinstance(shape, list):
            size = int(shape[i])
        elif "min" in shape:
            step = int(shape["step"][i])
            size = _param(int(shape["min"][i]), step) if step else int(shape["min"][i])
        else:
            size = _ref_v04(shape, i, ch)
        axes.append(_Axis(kind, ch, size, int(halo[i])))
    return axes


def _ref_v04(shape: dict, i: int, ch: str):
    """0.4 implicit shape: ``ref * scale + 2 * offset``."""
    scale, offset = shape["scale"][i], shape["offset"][i]
    if scale in (0, None):
        return int(round(2 * offset))
    if scale != 1:
        raise ModelFileError(f"output axis {ch!r} is rescaled (scale {scale}); not supported")
    return ("ref", str(shape["reference_tensor"]), ch, int(round(2 * offset)))


def _arch_v04(entry: dict) -> dict:
    arch = str(entry.get("architecture", ""))
    kwargs = entry.get("kwargs") or {}
    if ".py:" in arch:
        source, name = arch.rsplit(":", 1)
        return {
            "source": source,
            "sha256": entry.get("architecture_sha256"),
            "callable": name,
            "kwargs": kwargs,
        }
    module, _, name = arch.rpartition(".")
    return {"import_from": module, "callable": name, "kwargs": kwargs}


def _parse_v04(rdf: dict) -> _Spec:
    tensors = {}
    for key, ops_key, tests in (
        ("inputs", "preprocessing", "test_inputs"),
        ("outputs", "postprocessing", "test_outputs"),
    ):
        tensors[key] = []
        for i, t in enumerate(rdf[key]):
            axes = _axes_v04(t)
            test = rdf.get(tests) or []
            ops = _ops(t.get(ops_key), axes, v04=True)
            tensors[key].append(
                _Tensor(str(t["name"]), axes, ops, (test[i], None) if test else None)
            )
    weights, files = {}, []
    for fmt, entry in (rdf.get("weights") or {}).items():
        entry = dict(entry)
        if fmt == "pytorch_state_dict":
            entry["architecture"] = _arch_v04(entry)
            arch = entry["architecture"]
            if arch.get("source") and arch.get("sha256"):
                files.append((arch["source"], arch["sha256"]))
        weights[fmt] = entry
    return _Spec(
        rdf, str(rdf["format_version"]), tensors["inputs"], tensors["outputs"], weights, files
    )
