"""Files written and read safely: atomic writes, and zip archives (packages,
TorchScript files) refused when they hold a zip bomb."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path


class ModelFileError(ValueError):
    """A model file is missing, corrupt, unsafe or does not match its metadata."""


# a zipped member larger than BOMB_SIZE that unpacks to more than BOMB_RATIO times its
# packed size is refused unread (a 5 MB package whose weights unpacked to 1.9 GiB of
# zeros took 6 GB of memory and 44 s before it was refused; weights compress 1-2x)
BOMB_SIZE, BOMB_RATIO = 64 << 20, 20


def check_zip_member(info: zipfile.ZipInfo, where: str) -> None:
    """Refuse a zip member that unpacks far beyond its packed size (a zip bomb)."""
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > BOMB_SIZE and ratio > BOMB_RATIO:
        raise ModelFileError(
            f"{where}: {info.filename} unpacks to {info.file_size / 2**20:.0f} MiB from "
            f"{info.compress_size / 2**20:.1f} MiB ({ratio:.0f} times): not weights or "
            "tensors but a zip bomb; refused"
        )


def check_zip_archive(source, where: str) -> None:
    """Refuse a zip archive (a TorchScript file is one) holding a zip bomb, before
    anything unpacks it (a 1 MB TorchScript file unpacked a 1 GiB buffer: 3 GB of memory)."""
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
            for info in infos:
                check_zip_member(info, where)
            # many members under the limit each (24 of 60 MiB: 1.4 GiB from 1.4 MB)
            whole = zipfile.ZipInfo("the archive")
            whole.file_size = sum(i.file_size for i in infos)
            whole.compress_size = sum(i.compress_size for i in infos)
            check_zip_member(whole, where)
    except zipfile.BadZipFile:
        return  # not a zip (or a broken one): its loader says so
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def file_in_the_way(folder: Path) -> Path | None:
    """The file (not a folder) at ``folder`` or above it, which no folder can be made in."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _read_umask() -> int:
    """The process's umask. Reading it means setting it (os.umask), for the whole
    process: done during a save, a file another thread made in that instant (saves
    run in worker threads) would get mode 0666. So it is read once, on import."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        # name the file asked for and its folder, not the hidden temporary file
        blocking = file_in_the_way(path.parent)
        if blocking is not None:  # ("file exists in the folder", said of that file)
            raise OSError(f"cannot write {path}: {blocking} is a file, not a folder") from err
        reason = (err.strerror or type(err).__name__).lower()
        raise OSError(f"cannot write {path}: {reason} in the folder {path.parent}") from err
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, ValueError, TypeError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - e.g. SafetensorError on a full disk
            raise OSError(f"cannot write {path}: {first_line(err)}") from err
        # mkstemp's 0600 would hide the file from other users; after writing, as some
        # writers (safetensors) replace the file
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the file asked for, not the hidden temporary one
            reason = (err.strerror or type(err).__name__).lower()
            raise OSError(f"cannot write {path}: {reason}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def first_line(err: Exception) -> str:
    """The first line of an error's message (its type where it has none); for an error
    inside TorchScript code, its last line, which says what the code raised."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1].removeprefix("builtins.")  # e.g. "ValueError: need 256"
    return lines[0]
