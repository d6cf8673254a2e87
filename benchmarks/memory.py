"""Peak memory predicting a huge image to zarr.

    python benchmarks/memory.py [--size 16384] [--model nuclei] [--mode labels]

Writes a random uint16 image of size x size to a memory-mapped .npy on disk,
predicts it with the CLI's engine to a zarr array on disk, and prints the peak
resident memory (ru_maxrss) beyond the input array and the time taken.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from napari_unet.core.tiling import predict
from napari_unet.io import load_model


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--mode", default="labels", choices=("labels", "probabilities"))
    args = p.parse_args()
    model = load_model(args.model)
    n = args.size
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        src = np.lib.format.open_memmap(Path(tmp) / "in.npy", "w+", np.uint16, (n, n))
        rng = np.random.default_rng(0)
        for y in range(0, n, 1024):
            src[y : y + 1024] = rng.integers(0, 4000, (min(1024, n - y), n), dtype=np.uint16)
        src.flush()
        del src
        image = np.load(Path(tmp) / "in.npy", mmap_mode="r")
        shape = (n, n) if args.mode == "labels" else (model.info.num_classes, n, n)
        out = zarr.open_array(
            str(Path(tmp) / "out.zarr"),
            mode="w",
            shape=shape,
            dtype="uint8" if args.mode == "labels" else "float32",
            chunks=(1024, 1024) if args.mode == "labels" else (1, 1024, 1024),
        )
        base = rss_mb()
        t = time.perf_counter()
        predict(image, model, device="cpu", output=args.mode, out=out)
        elapsed = time.perf_counter() - t
        peak = rss_mb()
        print(
            f"{n}x{n} uint16 ({n * n * 2 / 2**30:.2f} GiB input, memory-mapped), "
            f"mode {args.mode}: {elapsed:.0f} s, {n * n / 1e6 / elapsed:.2f} MP/s"
        )
        print(
            f"peak RSS {peak:.0f} MB; before predicting {base:.0f} MB; "
            f"beyond that {peak - base:.0f} MB (input never loaded whole)"
        )


if __name__ == "__main__":
    main()
