"""Put evaluation metrics, licence, citations and the model card into a bundled model.

    python scripts/finalize_model.py nuclei --metrics runs/nuclei/metrics.json \
        --card docs/models/nuclei.md --license BSD-3-Clause \
        --cite '[{"text": "Mahbod et al. ...", "doi": "10.3390/diagnostics11060967"}]'

Re-saves ``src/napari_unet/weights/NAME.safetensors`` (float16; the weights are
unchanged) with the metrics, the weights' licence and what to cite in its metadata
(kept through fine-tuning, written into exported bioimage.io packages) and copies
the card beside it as ``NAME.md``.
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
    p.add_argument("--metrics", help="JSON file of metrics (default: keep the stored ones)")
    p.add_argument("--license", help="licence of the weights: SPDX identifier or the terms")
    p.add_argument("--cite", help='JSON list of {"text": ..., "doi" or "url": ...}')
    p.add_argument("--card", required=True)
    p.add_argument("--split", default="", help="text describing the validation split")
    args = p.parse_args()
    path = ROOT / "src" / "napari_unet" / "weights" / f"{args.name}.safetensors"
    model = load_model(path)
    if args.metrics:
        with open(args.metrics) as fh:
            model.info.metrics = json.load(fh)
    if args.split:
        model.info.provenance["validation"] = args.split
    if args.license:
        model.info.provenance["license"] = args.license
    if args.cite:
        model.info.provenance["cite"] = json.loads(args.cite)
    # where an installed copy has its card: beside the weights (docs/ is not installed)
    model.info.provenance["model_card"] = f"{args.name}.md beside the weights file"
    save_model(model, path, half=True, allow_bundled=True)
    shutil.copy(args.card, path.with_suffix(".md"))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
