"""The licence a bioimage.io package is exported under: an SPDX identifier on the list
bioimage.io checks against."""

from __future__ import annotations

import json
import re

from napari_unet.io.safe_files import ModelFileError

DEFAULT_LICENSE = "CC-BY-4.0"  # for weights that record no licence of their own


def checked_licence(license: str | None, model) -> str:
    """``license``, else the model's own (kept through fine-tuning), else
    :data:`DEFAULT_LICENSE`; refused where it is not an SPDX identifier (bioimage.io
    refuses the package), with the right case suggested."""
    own = model.info.provenance.get("license")
    if license is None and own and not _is_spdx(own):
        raise ModelFileError(
            f"{model.info.name or 'this model'}'s weights are licensed as {own!r}, which has "
            "no SPDX identifier: save it as a .safetensors file, or export with a licence "
            "that respects those terms (napari-unet export --license ...)"
        )
    if license is not None and not str(license).strip():
        raise ModelFileError("the licence given is empty: give an SPDX identifier, e.g. MIT")
    license = license or own or DEFAULT_LICENSE
    known = _spdx_ids()
    if not _is_spdx(license) or (known is not None and license not in known):
        same = [k for k in known or () if k.lower() == str(license).lower()]
        hint = f": did you mean {same[0]}?" if same else ""
        raise ModelFileError(
            f"{license!r} is not an SPDX licence identifier (e.g. CC-BY-4.0, MIT, "
            f"BSD-3-Clause){hint}"
        )
    return license


def _spdx_ids() -> set | None:
    """The SPDX licence list bioimage.io checks against (bioimageio.spec's copy), or None
    where it is not installed (then the identifier's form alone is checked)."""
    try:
        from importlib.resources import files

        text = files("bioimageio.spec").joinpath("static/spdx_licenses.json").read_text()
        return {str(entry["licenseId"]) for entry in json.loads(text)["licenses"]}
    except Exception:  # noqa: BLE001 - not installed, or a layout of another version
        return None


def _is_spdx(text) -> bool:
    return isinstance(text, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", text) is not None
