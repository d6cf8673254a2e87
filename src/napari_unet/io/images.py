"""Reading microscopy images and writing results (TIFF, PNG, NPY, zarr), atomically."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from napari_unet.io.image_metadata import UNITS
from napari_unet.io.safe_files import atomic_write

READ_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")
WRITE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")


def corrupt_data(err: BaseException) -> bool:
    """Whether ``err`` is a decoder's answer to corrupt pixel data. TIFFs are read
    lazily, tile by tile, so a damaged tile shows only when the run reaches it, raised
    by zlib or lzma (Python's own decoders) or by imagecodecs (all other codecs)."""
    import lzma
    import zlib

    return isinstance(err, (zlib.error, lzma.LZMAError)) or type(err).__module__.startswith(
        "imagecodecs"
    )


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES and any(p.suffix.lower() == ".zarr" for p in path.parents):
        suffix = ".zarr"  # an array inside a zarr group: "plate.zarr/raw"
    return suffix


def check_readable(path: str | Path) -> None:
    """Refuse, before any work, an input that :func:`read_image` would refuse by its name
    or kind (a format it does not read, a zarr group rather than an array)."""
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir() and suffix != ".zarr":
        raise ValueError(
            f"{path.name} is a folder: pass its images, e.g. {path.name}/*.tif "
            "(a folder is read as an image only if it is a zarr array, named .zarr)"
        )
    if suffix not in READ_SUFFIXES:
        raise ValueError(f"{path.name}: unsupported image format; use one of {READ_SUFFIXES}")
    if suffix == ".zarr":
        read_image(path)  # opened lazily: cheap


def read_image(path: str | Path):
    """Open an image lazily where the format allows (TIFF and zarr as zarr, NPY memory-mapped);
    a palette PNG as its indices (the data; its palette only colours them)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if suffix not in READ_SUFFIXES:
        raise ValueError(f"{path.name}: unsupported image format; use one of {READ_SUFFIXES}")
    try:
        arr = _open(path, suffix)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder error (tifffile's are ValueErrors)
        raise ValueError(f"{path.name}: cannot read image ({err})") from None
    if not hasattr(arr, "shape"):
        raise ValueError(f"{path.name}: a zarr group, not an array; pass the array path")
    if suffix in (".tif", ".tiff") and (len(arr.shape) < 2 or 0 in arr.shape):
        # tifffile answers a TIFF whose pages cannot be found with an empty array
        raise ValueError(f"{path.name}: cannot read image (no image data: a corrupt TIFF?)")
    if suffix in (".tif", ".tiff"):
        _check_tiff_pages(path, tuple(arr.shape))
    return arr


def _check_tiff_pages(path: Path, shape: tuple) -> None:
    """Refuse a TIFF stack cut short (a copy interrupted): its readable pages were read
    as one plane, and segmented without a word; warn of pages beyond the first series
    (frames appended one by one, a second image), which are left out."""
    import warnings

    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            pages = len(tf.pages)
            series = tf.series
            used = len(series[0].pages) if series else pages
            declared = int((tf.imagej_metadata or {}).get("images", 0) or 0)
    except Exception:  # noqa: BLE001 - read above all the same: its reader said nothing
        return
    if declared > pages or (declared > 1 and len(shape) == 2):
        raise ValueError(
            f"{path.name}: a truncated or corrupt TIFF: its ImageJ header declares "
            f"{declared} planes, {pages} can be read"
        )
    if len(series) > 1 or pages > used:
        warnings.warn(
            f"{path.name} holds {pages} image pages in {len(series)} series; only the "
            f"first series ({' x '.join(map(str, shape))}) is read (frames saved one by "
            "one? save them as one stack, e.g. tifffile.imwrite(path, numpy.stack(frames)))",
            stacklevel=3,
        )


def _open(path: Path, suffix: str):
    if suffix in (".tif", ".tiff"):
        import logging

        import tifffile
        import zarr

        # a corrupt file is refused in one line (read_image), not logged page by page
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)

        try:  # lazily, tile by tile
            arr = zarr.open(tifffile.imread(str(path), aszarr=True), mode="r")
            if hasattr(arr, "shape"):
                return arr
        except Exception:  # noqa: BLE001 - a tifffile and a zarr that cannot talk (zarr 2
            pass  # with tifffile >= 2025.x, zarr 3 with older tifffile): read it whole
        return tifffile.imread(str(path))
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if suffix == ".zarr":
        import zarr

        return zarr.open(str(path), mode="r")
    from PIL import Image

    with Image.open(path) as im:  # a palette PNG (an 8-bit image with a LUT, as Fiji
        if im.mode == "P":  # saves it, or a class mask) as its indices: its colours were
            return np.asarray(im)  # read as RGB, classes lost, intensities scrambled
    from skimage.io import imread

    return imread(str(path))


_IMAGEJ_ORDER, _IMAGEJ_DTYPES = "TZCYX", ("uint8", "uint16", "float32")
_OME_DTYPES = ("bool", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64")


def write_image(
    path: str | Path,
    data: np.ndarray,
    axes: str | None = None,
    calibration: dict | None = None,
    about: str | None = None,
) -> Path:
    """Write ``data`` to TIFF or NPY atomically.

    ``axes`` (e.g. ``"ZYX"``; ``C`` for classes) and ``calibration`` (see
    :func:`image_calibration`) go into a TIFF: an ImageJ hyperstack where its axes are in
    ImageJ's order and its type is one ImageJ reads, so that Fiji shows the planes and
    pixel size of the image it came from; an OME-TIFF for other types (uint32 instances)
    and orders of those axes. ``about`` (what made the data) goes into the TIFF's
    description: ImageJ's Info (Fiji's Image > Show Info), OME's image Description, or
    tifffile's own description under ``napari_unet``; its Software tag names napari-unet."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        from napari_unet import __version__

        kwargs = _tiff_metadata(np.asarray(data), axes, calibration or {})
        if about is not None:
            key = "Info" if kwargs.get("imagej") else "Description" if "ome" in kwargs else None
            kwargs["metadata"] = {**kwargs.get("metadata", {}), key or "napari_unet": about}
        kwargs["software"] = f"napari-unet {__version__}"

        def write(tmp):
            # minisblack: a stack of three or four planes is not an RGB picture
            try:
                tifffile.imwrite(tmp, np.asarray(data), compression="zlib", **kwargs)
            except (ValueError, TypeError, OverflowError, ZeroDivisionError) as err:
                # metadata tifffile cannot write: the result without it, not no result
                warnings.warn(
                    f"{path.name}: written without the image's calibration ({err})",
                    stacklevel=2,
                )
                tifffile.imwrite(
                    tmp,
                    np.asarray(data),
                    compression="zlib",
                    photometric="minisblack",
                    software=kwargs["software"],
                    metadata={} if about is None else {"napari_unet": about},
                )

        return atomic_write(path, write)
    if suffix == ".npy":

        def write_npy(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(data))

        return atomic_write(path, write_npy)
    raise ValueError(f"{path.name}: write .tif, .npy or .zarr")


def _tiff_metadata(data: np.ndarray, axes: str | None, cal: dict) -> dict:
    """tifffile keywords for ``data``'s axes and pixel size."""
    kwargs: dict = {"photometric": "minisblack"}
    order = [_IMAGEJ_ORDER.find(a) for a in axes or ""]
    imagej = axes is not None and len(axes) == data.ndim and -1 not in order
    # tifffile's ImageJ hyperstack drops the X axis of planes one pixel wide: such a file
    # read back as a plane fewer (or not at all), so they are OME-TIFFs
    wide = data.ndim >= 2 and min(data.shape[-2:]) > 1
    if imagej and wide and order == sorted(order) and data.dtype.name in _IMAGEJ_DTYPES:
        meta = {"axes": axes, "unit": cal.get("unit"), "spacing": cal.get("z")}
        meta["finterval"] = cal.get("t")
        kwargs.update(imagej=True, metadata={k: v for k, v in meta.items() if v is not None})
        if "x" in cal and "y" in cal:  # pixels per unit, the unit in ImageJ's description
            kwargs["resolution"] = (1 / cal["x"], 1 / cal["y"])
        return kwargs
    um = UNITS.get(str(cal.get("unit")))
    if imagej and data.dtype.name in _OME_DTYPES:  # (uint32 instances; another order)
        kwargs.update(ome=True, metadata=_ome_metadata(axes, cal, um))
    elif axes is not None and len(axes) == data.ndim:  # tifffile's own description
        kwargs["metadata"] = {"axes": axes}
    per_cm = 1e4 / um if um else None
    if "x" in cal and "y" in cal and per_cm:  # TIFF's own units: inch or centimetre
        kwargs.update(resolution=(per_cm / cal["x"], per_cm / cal["y"]), resolutionunit=3)
    return kwargs


def _ome_metadata(axes: str, cal: dict, um: float | None) -> dict:
    """tifffile's OME metadata: the axes, sizes in micrometres, the interval in seconds."""
    meta: dict = {"axes": axes}
    for key in "xyz" if um else "":
        if key in cal:
            meta[f"PhysicalSize{key.upper()}"] = cal[key] * um
            meta[f"PhysicalSize{key.upper()}Unit"] = "µm"
    if "t" in cal:
        meta.update(TimeIncrement=cal["t"], TimeIncrementUnit="s")
    return meta


def _plain(value):
    """A numpy number (or anything else) as JSON can hold it."""
    return value.item() if hasattr(value, "item") else str(value)


class ZarrOutput:
    """A zarr array written in a temporary folder and renamed into place on commit."""

    def __init__(self, path: str | Path, shape, dtype, chunks=None, attrs=None) -> None:
        import json

        import zarr

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        chunks = chunks or tuple([1] * (len(shape) - 2) + [min(1024, s) for s in shape[-2:]])
        self.array = zarr.open_array(
            str(self.tmp / "data.zarr"), mode="w", shape=shape, dtype=dtype, chunks=chunks
        )
        if attrs:  # (JSON: a calibration's numpy numbers as plain ones)
            self.array.attrs.update(json.loads(json.dumps(attrs, default=_plain)))

    def commit(self) -> Path:
        """Move the finished array into place; an older one at the path is kept until then."""
        old = None
        if self.path.exists() or self.path.is_symlink():
            old = self.tmp / "previous"
            self.path.rename(old)
        try:
            (self.tmp / "data.zarr").rename(self.path)
        except OSError:
            if old is not None:
                old.rename(self.path)
            raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
