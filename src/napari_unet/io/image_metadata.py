"""What an image file records about its axes and calibration: OME-TIFF, ImageJ TIFF
and OME-Zarr metadata (pixel size, Z spacing, frame interval), and what made a result."""

from __future__ import annotations

import math
from pathlib import Path


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
    as time) or the metadata is malformed (then they are guessed, as for a TIFF)."""
    import json

    for group in (path.parent, path):
        for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
            try:
                attrs = json.loads((group / name).read_text())
            except (OSError, ValueError):
                continue
            try:
                letters = _multiscales_axes(attrs, key, group == path, path.name)
            except (AttributeError, TypeError):  # (a list or a string where a dict goes)
                return None
            if letters is not None:
                ok = len(set(letters)) == len(letters) and letters.endswith("YX")
                return letters if ok and set(letters) <= set("TCZYX") else None
    return None


def _multiscales_axes(attrs, key, own: bool, name: str) -> str | None:
    """The axis letters of the ``multiscales`` entry in ``attrs`` (a group's metadata)
    that holds array ``name`` (any, for the array's ``own`` metadata), as written; None
    when no entry holds it."""
    attrs = (attrs.get(key) or {}) if key else attrs
    attrs = attrs.get("ome", attrs)  # (NGFF 0.5 nests it)
    for scales in attrs.get("multiscales") or []:
        paths = [str(d.get("path")) for d in scales.get("datasets") or []]
        if own or name in paths:
            return "".join(
                str(a.get("name", "") if isinstance(a, dict) else a)[:1].upper()
                for a in scales.get("axes") or []
            )
    return None


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


def image_about(path: str | Path) -> str | None:
    """What made a TIFF that napari-unet wrote (``write_image``'s ``about``: ImageJ's
    Info, the OME image's Description or tifffile's description), or None, also for
    TIFFs that other software wrote (their Info or Description is theirs)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            if not str(tf.pages[0].software or "").startswith("napari-unet"):
                return None
            if tf.is_imagej:
                about = (tf.imagej_metadata or {}).get("Info")
            elif tf.is_ome:
                about = _ome_image_description(tf.ome_metadata or "")
            else:
                about = (tf.shaped_metadata or [{}])[0].get("napari_unet")
    except Exception:  # noqa: BLE001 - unreadable metadata: nothing known
        return None
    return about if isinstance(about, str) else None


def _ome_image_description(xml: str) -> str | None:
    """The first OME Image's Description (not an instrument's or experiment's)."""
    from xml.etree import ElementTree

    for element in ElementTree.fromstring(xml).iter():
        if element.tag.rsplit("}", 1)[-1] == "Image":
            for child in element:
                if child.tag.rsplit("}", 1)[-1] == "Description":
                    return child.text or ""
            return None
    return None


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
# the pixel types an OME-TIFF holds, which keeps the Z step and interval of other types
# and orders (int64, uint64 and float16 failed to write at all)
