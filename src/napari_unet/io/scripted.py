"""Loading TorchScript without letting it touch files.

A TorchScript file is code: its methods (``forward``, and ``__setstate__``, which
``torch.jit.load`` runs while loading) may call any operator torch has, among them
``torch.from_file`` (whose ``shared=True`` writes through to the file) and
``torch.save``, and the operators of torch's distributed and debugging namespaces. A
network needs none of them. :func:`load_script` refuses a file whose code names one,
first in the archive's text (before anything runs), then in every method's graph once
loaded (what will run). It checks what the code names; it is not a sandbox.
"""

from __future__ import annotations

import io
import re
import zipfile

import torch

from napari_unet.io.safe_files import ModelFileError, check_zip_archive
from napari_unet.io.safe_files import first_line as _first_line

# operators that read or write files
FILE_OPERATORS = ("from_file", "save", "load_tensor")
# the namespaces of operators that compute (tensor maths, control flow, quantised and
# CPU-library kernels, the profiler's labels); others (c10d, symm_mem, debugprims, ...)
# are refused
COMPUTE_NAMESPACES = frozenset(
    {"aten", "prim", "prims", "quantized", "_quantized", "mkldnn", "mkldnn_prepacked"}
    | {"onednn", "mkl", "sparse", "xnnpack", "rnn", "profiler"}
)
# in the code's text: the names of the file operators (``save`` as torch's: the word
# alone may be in a message, "model.save(path)")
_FILE_NAME = re.compile(r"\b(from_file|load_tensor)\b|\b(?:torch|aten)\s*\.\s*(save)\s*\(")
# ... and the namespaces of the operators (``ops.ns.op(``) and classes (``classes.ns.C``)
_NAMESPACE = re.compile(r"\b(?:ops\s*\.\s*(\w+)\s*\.\s*\w+\s*\(|classes\s*\.\s*(\w+)\s*\.)")


def load_script(source, where: str, extra_files: dict | None = None) -> torch.nn.Module:
    """``torch.jit.load(source)`` (a path or bytes) on the CPU, refused with a
    :class:`ModelFileError` naming ``where`` if it is no TorchScript or its code could
    touch files."""

    def opened():  # (each reader its own stream)
        return io.BytesIO(source) if isinstance(source, bytes) else str(source)

    check_zip_archive(opened(), where)
    check_code_text(opened(), where)
    try:
        net = torch.jit.load(
            opened(),
            map_location="cpu",
            _extra_files=extra_files if extra_files is not None else {},
        )
    except Exception as err:  # noqa: BLE001 - any parse error means a bad file
        raise ModelFileError(f"{where}: cannot load as TorchScript ({_first_line(err)})") from None
    check_operators(net, where)
    return net


def check_code_text(source: str | io.BytesIO, where: str) -> None:
    """Refuse an archive whose text (its code, and the strings of its pickles: every
    entry but the tensors' data) names a file operator or a namespace outside
    :data:`COMPUTE_NAMESPACES`, before ``torch.jit.load`` compiles and runs any of it."""
    try:
        with zipfile.ZipFile(source) as zf:
            # every entry but the tensors' data: torch finds its code under any case
            # ("CODE/") and keeps strings in its pickles
            for info in zf.infolist():
                parts = info.filename.lower().split("/")
                if not (len(parts) > 1 and parts[-2] == "data" and parts[-1].isdigit()):
                    _check_text(zf.read(info).decode("utf-8", "replace"), where)
    except zipfile.BadZipFile:
        return  # not a zip: torch.jit.load says what it is


def _check_text(text: str, where: str) -> None:
    for match in _FILE_NAME.finditer(text):
        _refuse(where, f"torch.{match.group(1) or match.group(2)}", files=True)
    for match in _NAMESPACE.finditer(text):
        namespace = match.group(1) or match.group(2)
        if namespace not in COMPUTE_NAMESPACES:
            _refuse(where, f"the operators of {namespace!r}", files=False)


def check_operators(net: torch.jit.ScriptModule, where: str) -> None:
    """Refuse a loaded network whose methods (functions they call inlined) hold a node of
    a file operator or of a namespace outside :data:`COMPUTE_NAMESPACES`."""
    modules = net.modules() if hasattr(net, "modules") else [net]
    for module in modules:
        scripted = getattr(module, "_c", None)
        if scripted is None or not hasattr(scripted, "_method_names"):
            continue
        for name in scripted._method_names():
            graph = scripted._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            _check_nodes(graph.nodes(), where)


def _check_nodes(nodes, where: str) -> None:
    for node in nodes:
        namespace, _, op = node.kind().partition("::")
        if namespace not in COMPUTE_NAMESPACES or op in FILE_OPERATORS:
            _refuse(where, node.kind(), files=op in FILE_OPERATORS)
        for block in node.blocks():
            _check_nodes(block.nodes(), where)


def _refuse(where: str, what: str, files: bool) -> None:
    why = "which reads or writes files" if files else "which is not computation (a network's)"
    raise ModelFileError(
        f"{where}: refused: its TorchScript code calls {what}, {why}; a network needs none "
        "of it (a file made to harm, or one scripted with code that is not a network's)"
    )
