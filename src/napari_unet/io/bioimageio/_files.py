"""Reading a package: folders, zips and RDF files, safe member names, sha256."""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
import zipfile
import zlib
from pathlib import Path

from napari_unet.io.safe_files import ModelFileError, check_zip_member

RDF_NAMES = ("bioimageio.yaml", "rdf.yaml")
# the largest package file read into memory (weights, tensors)
MAX_READ = 2 << 30
# the largest RDF: real ones are kilobytes (a 1.9 GB one in a 7 MB zip was parsed for
# minutes, a 4 MiB list of numbers for a minute and 1.6 GB)
MAX_RDF = 256 << 10
# the most entries an RDF may hold once its YAML aliases are followed (a 3 KB file of
# nested aliases expands to billions, and turning them into text took gigabytes)
MAX_RDF_ENTRIES = 100_000


class _Files:
    """Files of a package folder or zip, addressed by their path inside the package."""

    def __init__(self, path: Path, prefix: str = "", members: frozenset = frozenset()):
        self.path, self.prefix, self.members = path, prefix, members
        self.is_zip = bool(members)

    def has(self, name: str) -> bool:
        name = _safe_name(name)
        if self.is_zip:
            return self.prefix + name in self.members
        return self._local(name).is_file()

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A file's bytes; one larger than ``limit`` (default ``MAX_READ``) unpacked is
        refused (a zip bomb declaring gigabytes was unpacked whole before its sha256 was
        checked)."""
        limit = MAX_READ if limit is None else limit
        with self._stream(name) as (size, fh):
            if size > limit:
                raise ModelFileError(
                    f"{name}: {size / 2**20:.1f} MiB unpacked, more than a package file "
                    f"may hold ({limit / 2**20:.0f} MiB); refused"
                )
            return self._guarded(name, fh.read)

    def sha256(self, name: str) -> str:
        """A file's sha256, read in chunks (whatever its size, memory stays small)."""
        digest = hashlib.sha256()
        with self._stream(name) as (_, fh):
            for chunk in iter(lambda: self._guarded(name, fh.read, 1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @contextlib.contextmanager
    def _stream(self, name: str):
        name = _safe_name(name)
        if not self.is_zip:
            path = self._local(name)
            with open(path, "rb") as fh:
                yield path.stat().st_size, fh
            return
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelFileError(f"{self.path.name}: cannot open ({_first_line(err)})") from None
        with zf:
            try:
                info = zf.getinfo(self.prefix + name)
                fh = zf.open(info)
            except (KeyError, zipfile.BadZipFile, NotImplementedError) as err:
                raise ModelFileError(
                    f"{self.path.name}: {name} cannot be read ({_first_line(err)})"
                ) from None
            with fh:
                check_zip_member(info, self.path.name)
                yield info.file_size, fh

    def _guarded(self, name: str, read, *args):
        try:
            return read(*args)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise ModelFileError(
                f"{self.path.name}: {name} is corrupt ({_first_line(err)})"
            ) from None

    def _local(self, name: str) -> Path:
        root = self.path.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ModelFileError(f"{name}: points outside the package folder; refused")
        return path


def _safe_name(name: str) -> str:
    """A package-relative POSIX path; absolute paths and ``..`` are refused."""
    name = str(name).replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
        raise ModelFileError(f"{name!r}: absolute or '..' path inside a package; refused")
    return posixpath.normpath(name)


def _is_remote(source: str) -> bool:
    return "://" in str(source) or str(source).startswith("doi:")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(source) -> tuple[_Files, str]:
    """The package's files and the name of its RDF among them."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelFileError(f"{source}: no such bioimage.io package")
    if path.is_dir():
        return _Files(path), _rdf_in(path.name, [p.name for p in path.iterdir()])
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if path.suffix in (".yaml", ".yml"):
        return _Files(path.parent), path.name
    raise ModelFileError(f"{path.name}: not a bioimage.io package (folder, RDF .yaml or .zip)")


def _rdf_in(label: str, names: list[str]) -> str:
    found = [n for n in names if n in RDF_NAMES or n.endswith(".bioimageio.yaml")]
    if not found:
        raise ModelFileError(f"{label}: no bioimageio.yaml or rdf.yaml in the package")
    return min(found, key=_rdf_rank)


def _rdf_rank(name: str) -> tuple:
    """Which RDF a package uses when it holds several: the shallowest, then
    ``bioimageio.yaml``, then ``rdf.yaml``, then ``*.bioimageio.yaml`` by name (the same
    for a folder and its zip, whatever the order of the zip's members)."""
    base = posixpath.basename(name)
    known = RDF_NAMES.index(base) if base in RDF_NAMES else len(RDF_NAMES)
    return name.count("/"), known, base


def _open_zip(path: Path) -> tuple[_Files, str]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    for name in names:
        try:
            _safe_name(name)
        except ModelFileError:
            raise ModelFileError(
                f"{path.name}: unsafe member {name!r} (absolute path or '..'); refused"
            ) from None
    rdfs = [
        n for n in names if posixpath.basename(n) in RDF_NAMES or n.endswith(".bioimageio.yaml")
    ]
    if not rdfs:
        raise ModelFileError(f"{path.name}: a zip without bioimageio.yaml or rdf.yaml")
    top = min(rdfs, key=_rdf_rank)
    prefix = top.rsplit("/", 1)[0] + "/" if "/" in top else ""
    members = frozenset(n for n in names if not n.endswith("/"))
    return _Files(path, prefix, members), top[len(prefix) :]


def is_package(source) -> bool:
    """Whether ``source`` looks like a bioimage.io package (never raises).

    Parameters
    ----------
    source : str or Path
        A folder, an RDF ``.yaml`` file or a ``.zip``.
    """
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            return any((path / n).is_file() for n in RDF_NAMES) or any(
                path.glob("*.bioimageio.yaml")
            )
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            return True
        if path.is_file() and zipfile.is_zipfile(path):
            # a description inside makes it a package: whatever else is wrong with it (an
            # unsafe member name) is then said by the loader, not "not a model file"
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            return any(
                posixpath.basename(n) in RDF_NAMES or n.endswith(".bioimageio.yaml") for n in names
            )
    except (OSError, ModelFileError, zipfile.BadZipFile):
        return False
    return False


def _read_rdf(files: _Files, name: str) -> dict:
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # (libyaml where there)
        rdf = yaml.load(files.read(name, MAX_RDF), Loader=loader)  # noqa: S506 - safe loader
    except yaml.YAMLError as err:
        raise ModelFileError(f"{name}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ModelFileError(f"{name}: nested too deeply to be a model description") from None
    if _expanded_size(rdf, {}) > MAX_RDF_ENTRIES:
        raise ModelFileError(
            f"{name}: holds more than {MAX_RDF_ENTRIES:,} entries (its YAML aliases "
            "followed); not a model description"
        )
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise ModelFileError(f"{name}: not a bioimage.io model description (type: model)")
    return rdf


def _expanded_size(node, seen: dict, depth: int = 0) -> int:
    """How many entries ``node`` holds with every alias followed (each shared object is
    counted once per use, but walked once: the count itself stays cheap)."""
    if depth > 200:
        raise ModelFileError("the package description is nested too deeply")
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key not in seen:
        seen[key] = 0  # (a cycle counts as nothing more)
        items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for item in items:
            total += _expanded_size(item, seen, depth + 1)
            if total > MAX_RDF_ENTRIES:
                break
        seen[key] = total
    return seen[key]


def _read_checked(files: _Files, name: str, sha: str | None, what: str) -> bytes:
    if _is_remote(name):
        raise ModelFileError(
            f"{what} {posixpath.basename(name)} is not in the package (it points to {name}); "
            "napari-unet downloads nothing"
        )
    if not files.has(name):
        raise ModelFileError(f"{what} {name} is declared but missing from the package")
    data = files.read(name)
    if sha and _sha256(data) != str(sha).lower():
        raise ModelFileError(f"{name}: sha256 does not match the package description")
    return data
