"""``napari-unet models | info | export``: list, describe and export models."""

from __future__ import annotations

import sys
from pathlib import Path


def model_by_name(name: str | None, trust_code: bool = False):
    from napari_unet.io import load_model, registry

    if name is not None and not name.strip():
        raise ValueError("the model name is empty: give a bundled name or a file")
    name = name or registry.default_model()
    if name is None:
        raise ValueError("no bundled model is installed; pass --model FILE")
    return load_model(name, trust_code=trust_code)


def cmd_models(args) -> int:
    from napari_unet.io import load_model, registry

    models = registry.bundled_models()
    if not models:
        print("no bundled models installed")
    for name in models:
        info = load_model(name).info
        default = " (default)" if name == registry.default_model() else ""
        print(f"{name}{default}: {info.description or ', '.join(info.classes)}")
    return 0


def cmd_info(args) -> int:
    if Path(args.model).suffix.lower() in (".tif", ".tiff"):  # a result: what made it
        print(_result_record(Path(args.model)))
        return 0
    print(model_by_name(args.model, getattr(args, "trust_code", False)).info.card())
    return 0


def _result_record(path: Path) -> str:
    """What a TIFF result of ``napari-unet predict`` records about its making, a line
    per entry; ValueError for other TIFFs."""
    import json

    from napari_unet.io.image_metadata import image_about

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    about = image_about(path)
    if about is None:
        raise ValueError(
            f"{path.name}: an image that records no napari-unet run (only TIFF results "
            "of napari-unet predict do); info takes a model name, model file or package"
        )
    try:
        record = json.loads(about)
    except ValueError:
        return about
    if not isinstance(record, dict):
        return about
    width = max(map(len, record), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in record.items())


def cmd_export(args) -> int:
    from napari_unet.io import outputs
    from napari_unet.io.bioimageio import export_package

    outputs.check_writable(Path(args.bioimageio), [args.model])
    model = model_by_name(args.model)
    out = export_package(
        model, args.bioimageio, cover=args.cover, license=args.license, authors=args.author
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def model_failure(err: Exception) -> str | None:
    """ "the model failed: ..." for an error raised by a model's own code (torch.jit.Error
    is not a RuntimeError); None for any other error, a defect whose traceback is the
    report."""
    if type(err).__module__.split(".")[0] != "torch":
        return None
    from napari_unet.io.safe_files import first_line as _first_line

    return f"the model failed: {_first_line(err)}"
