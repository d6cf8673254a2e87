"""Where the command line writes its results, checked before any work: outputs that
would replace an input, land inside a zarr store, or go to a folder that cannot be
written are refused with a one-line reason."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from napari_unet.io import registry


def _default_place(src) -> tuple[Path, str]:
    """Folder and stem of ``src``'s result by default: beside it, or beside the zarr store
    that holds it (never inside the user's store: ``plate.zarr/raw`` gives ``plate_raw``)."""
    src = Path(src)
    store = next((p for p in src.parents if p.suffix.lower() == ".zarr"), None)
    if store is None:
        return src.parent, src.stem
    inner = src.relative_to(store).with_suffix("")
    return store.parent, "_".join([store.stem, *inner.parts])


def targets(inputs, output, mode) -> list[tuple[str, Path]]:
    """(input, output file) pairs; refused before any work if an output would replace
    an input or another input's result."""
    suffix = ".tif"
    out = Path(output) if output else None
    # an existing folder is a folder whatever its name ("run.2024"); a .zarr is a result
    folder_given = out is not None and out.is_dir() and out.suffix.lower() != ".zarr"
    if out is not None and not out.suffix and out.exists() and not out.is_dir():
        raise ValueError(
            f"--output {out}: a name without an extension is a folder for the results, and "
            f"{out} is a file; give the result a name with its type (e.g. {out}.tif)"
        )
    if out is not None and len(inputs) == 1 and out.suffix and not folder_given:
        pairs = [(inputs[0], out)]
    else:
        if out is not None and out.suffix and not folder_given:
            raise ValueError("several inputs need --output to be a folder")
        pairs = []
        for src in inputs:
            folder, stem = _default_place(src)
            pairs.append((src, (out or folder) / f"{stem}_{mode}{suffix}"))
    sources = {Path(src).resolve(): src for src in inputs}
    # the zarr stores that hold inputs (a store, or an array inside one): never written into
    stores = {
        store
        for s in sources
        for store in (s, *s.parents)
        if store.suffix.lower() == ".zarr" and store.is_dir()
    }
    seen: dict[Path, str] = {}
    for src, dst in pairs:
        where = dst.resolve()
        if where in sources or any(where in s.parents for s in sources):
            raise ValueError(f"{dst} is or holds an input: the result would replace it")
        store = next((st for st in stores if st in where.parents), None)
        if store is not None:
            raise ValueError(
                f"{dst} lies inside the zarr store {store.name}, which holds an input: "
                "write the result beside it"
            )
        if where.is_dir() and not _is_zarr_array(where):
            raise ValueError(
                f"{dst} is a folder or a zarr group, not a result of ours to replace: "
                "give a new name"
            )
        if where in seen:
            raise ValueError(
                f"{seen[where]} and {src} would both be written to {dst}: "
                "give them different names, or one --output folder each"
            )
        seen[where] = src
    return pairs


def _is_zarr_array(path: Path) -> bool:
    """Whether ``path`` is a zarr array (v2 or v3), which a .zarr output may replace."""
    if (path / ".zarray").is_file():
        return True
    try:
        return json.loads((path / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def check_folder(folder: Path) -> None:
    """Refuse a folder results cannot be written to (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".napari-unet.", suffix=".probe"):
            pass
    except OSError as err:
        from napari_unet.io.safe_files import file_in_the_way

        blocking = file_in_the_way(folder)
        if blocking is not None:
            raise ValueError(
                f"cannot write to {folder}/: {blocking} is a file, not a folder"
            ) from None
        raise ValueError(f"cannot write to {folder}/: {err.strerror or err}") from None


def check_writable(path: Path, protect=()) -> None:
    """Refuse an output that cannot be written (a bundled model, a folder without write
    permission) or must not be (one of the files in ``protect``: the base model, the
    images and labels) before hours of training, not after them."""
    if registry.is_bundled(path):
        raise ValueError(f"{path.name} is a bundled model: write the result elsewhere")
    for given in protect:
        given = Path(given)
        if given.exists() and path.exists() and path.resolve() == given.resolve():
            raise ValueError(f"{path} is one of the inputs ({given}): write the result elsewhere")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name")
    check_folder(path.parent)
