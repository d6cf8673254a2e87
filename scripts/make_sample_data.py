"""Regenerate sample_data/ deterministically (synthetic images + ground truth).

python scripts/make_sample_data.py
"""

from __future__ import annotations

from pathlib import Path

import tifffile

from napari_unet.core.synthetic import membranes, nuclei

OUT = Path(__file__).resolve().parent.parent / "sample_data"


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # (--help)
    OUT.mkdir(exist_ok=True)
    image, labels = nuclei()
    tifffile.imwrite(OUT / "nuclei.tif", image, compression="zlib")
    tifffile.imwrite(OUT / "nuclei_labels.tif", labels, compression="zlib")
    image, labels = membranes()
    tifffile.imwrite(OUT / "membranes.tif", image, compression="zlib")
    tifffile.imwrite(OUT / "membranes_labels.tif", labels, compression="zlib")
    for p in sorted(OUT.glob("*.tif")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
