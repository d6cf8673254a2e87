"""Reading microscopy images and writing results (TIFF, PNG, NPY, zarr), atomically."""

from __future__ import annotations

import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

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


def image_axes(path: str | Path) -> str | None:
    """The axes an OME-TIFF or ImageJ TIFF records (e.g. ``"TZCYX"``; RGB samples ``S``
    read as ``C``), or None where the file says nothing (then they are guessed)."""
    path = Path(path)
    if path.is_dir():  # an OME-Zarr image's array (img.ome.zarr/0)
        return _ome_zarr_axes(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            if not (tf.is_ome or tf.is_imagej):
                return None
            axes = tf.series[0].axes.upper()
    except Exception:  # noqa: BLE001 - unreadable metadata: guess as for any other file
        return None
    if "S" in axes and "C" not in axes:
        axes = axes.replace("S", "C")
    if "Y" not in axes or "X" not in axes or len(set(axes)) != len(axes):
        return None
    return axes


def _ome_zarr_axes(path: Path) -> str | None:
    """The axes an OME-Zarr (NGFF) image's ``multiscales`` name for its array at
    ``path`` (e.g. ``"TCZYX"``), or None where there are none (its channel axis was read
    as time)."""
    import json

    for group in (path.parent, path):
        for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
            try:
                attrs = json.loads((group / name).read_text())
            except (OSError, ValueError):
                continue
            attrs = attrs.get(key, {}) if key else attrs
            attrs = attrs.get("ome", attrs)  # (NGFF 0.5 nests it)
            for scales in attrs.get("multiscales") or []:
                paths = [str(d.get("path")) for d in scales.get("datasets", [])]
                if group == path or path.name in paths:
                    letters = "".join(
                        str(a.get("name", "") if isinstance(a, dict) else a)[:1].upper()
                        for a in scales.get("axes", [])
                    )
                    ok = len(set(letters)) == len(letters) and letters.endswith("YX")
                    return letters if ok and set(letters) <= set("TCZYX") else None
    return None


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


def image_calibration(path: str | Path) -> dict:
    """What an ImageJ or OME TIFF records of its pixels, as ``{"x": size, "y": size,
    "z": spacing, "t": interval, "unit": unit}`` (sizes in ``unit``, the interval in
    seconds), so that results keep it. Only what is given, readable and sane is kept:
    positive finite numbers, a unit written in ASCII (a pixel size without a unit, or a
    unit without a pixel size, says nothing); ``{}`` for other files. Units in
    :data:`UNITS` also go into the TIFF resolution tags of files that are not ImageJ's."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return {}
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            if tf.is_ome:
                return _sane(_ome_calibration(tf.ome_metadata))
            if not tf.is_imagej:
                return {}
            meta, page = tf.imagej_metadata or {}, tf.pages[0]
            cal = {"unit": meta.get("unit"), "z": meta.get("spacing")}
            # ImageJ's interval is in its tunit (seconds where it names none)
            cal["t"] = _number(meta.get("finterval")) * _IJ_TIMES.get(
                str(meta.get("tunit", "sec")), math.nan
            )
            for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                value = page.tags.get(tag)
                if value is not None and value.value[0]:
                    cal[axis] = value.value[1] / value.value[0]  # pixels per unit: inverted
    except Exception:  # noqa: BLE001 - unreadable metadata: the results go without it
        return {}
    return _sane(cal)


# length units as ImageJ names them, and their size in micrometres
UNITS = {"nm": 1e-3, "micron": 1.0, "mm": 1e3, "cm": 1e4}
_UNIT_NAMES = {"µm": "micron", "μm": "micron", "um": "micron", "microns": "micron"}
# ImageJ writes the micro sign escaped, as the six characters \u00B5
_UNIT_NAMES.update({"\\u00B5m": "micron", "\\u00b5m": "micron"})
_OME_LENGTHS = {"Å": 1e-4, "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3}
_OME_LENGTHS.update({"μm": 1.0, "cm": 1e4, "m": 1e6})
_OME_TIMES = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "min": 60.0, "h": 3600.0}
_IJ_TIMES = {"sec": 1.0, "s": 1.0, "ms": 1e-3, "msec": 1e-3, "min": 60.0, "hr": 3600.0}
_IJ_TIMES.update({"h": 3600.0, "hour": 3600.0})


def _sane(cal: dict) -> dict:
    """``cal`` less what a result cannot carry or would carry wrong."""
    unit = _UNIT_NAMES.get(str(cal.get("unit")), cal.get("unit"))
    out = {}
    for key in "xyzt":
        value = cal.get(key)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and 1e-9 < value < 1e9:
            out[key] = value
    # a unit ImageJ can write back (its description is ASCII); "pixel" says nothing
    named = isinstance(unit, str) and unit.isascii() and unit.strip() not in ("", "pixel")
    if not named or "x" not in out or "y" not in out:
        out = {k: v for k, v in out.items() if k == "t"}  # sizes in an unknown unit: none
    else:
        out["unit"] = unit
    return out


def _ome_calibration(xml: str | None) -> dict:
    """An OME-TIFF's sizes in micrometres and interval in seconds (the units each
    names, OME's defaults where it names none)."""
    import xml.etree.ElementTree as ET

    try:
        pixels = next(e for e in ET.fromstring(xml or "").iter() if e.tag.endswith("Pixels"))
    except (ET.ParseError, StopIteration):
        return {}
    cal: dict = {"unit": "micron"}
    for axis in "XYZ":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit")
        factor = _OME_LENGTHS.get(unit or "µm")
        if value is not None and factor is not None:
            cal[axis.lower()] = _number(value) * factor
    value, unit = pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit")
    factor = _OME_TIMES.get(unit or "s")
    if value is not None and factor is not None:
        cal["t"] = _number(value) * factor
    return cal


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# what an ImageJ hyperstack holds: its axes in this order, and these types
_IMAGEJ_ORDER, _IMAGEJ_DTYPES = "TZCYX", ("uint8", "uint16", "float32")
# the pixel types an OME-TIFF holds, which keeps the Z step and interval of other types
# and orders (int64, uint64 and float16 failed to write at all)
_OME_DTYPES = ("bool", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64")


def write_image(
    path: str | Path, data: np.ndarray, axes: str | None = None, calibration: dict | None = None
) -> Path:
    """Write ``data`` to TIFF or NPY atomically.

    ``axes`` (e.g. ``"ZYX"``; ``C`` for classes) and ``calibration`` (see
    :func:`image_calibration`) go into a TIFF: an ImageJ hyperstack where its axes are in
    ImageJ's order and its type is one ImageJ reads, so that Fiji shows the planes and
    pixel size of the image it came from; an OME-TIFF for other types (uint32 instances)
    and orders of those axes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        kwargs = _tiff_metadata(np.asarray(data), axes, calibration or {})

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
                    tmp, np.asarray(data), compression="zlib", photometric="minisblack"
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
    if imagej and order == sorted(order) and data.dtype.name in _IMAGEJ_DTYPES:
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


class ZarrOutput:
    """A zarr array written in a temporary folder and renamed into place on commit."""

    def __init__(self, path: str | Path, shape, dtype, chunks=None) -> None:
        import zarr

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        chunks = chunks or tuple([1] * (len(shape) - 2) + [min(1024, s) for s in shape[-2:]])
        self.array = zarr.open_array(
            str(self.tmp / "data.zarr"), mode="w", shape=shape, dtype=dtype, chunks=chunks
        )

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
