"""Put evaluation metrics and the model card into a bundled model.

    python scripts/finalize_model.py nuclei --metrics runs/nuclei/metrics.json \
        --card docs/models/nuclei.md

Re-saves ``src/napari_unet/weights/NAME.safetensors`` (float16) with the metrics
in its metadata and copies the card beside it as ``NAME.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil

from _shared_data import ROOT

from napari_unet.io.files import load_model, save_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--metrics", required=True)
    p.add_argument("--card", required=True)
    p.add_argument("--split", default="", help="text describing the validation split")
    args = p.parse_args()
    path = ROOT / "src" / "napari_unet" / "weights" / f"{args.name}.safetensors"
    model = load_model(path)
    with open(args.metrics) as fh:
        model.info.metrics = json.load(fh)
    if args.split:
        model.info.provenance["validation"] = args.split
    model.info.provenance["model_card"] = f"docs/models/{args.name}.md"
    save_model(model, path, half=True, allow_bundled=True)
    shutil.copy(args.card, path.with_suffix(".md"))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
