"""Inference throughput: tiled (default settings) vs one forward pass, and efficiency.

    python benchmarks/throughput.py [--model nuclei] [--size 2048] [--repeats 2]

Prints megapixels/s for the overlap-tile engine with its default (automatic)
tile size, for one forward pass over the same mirrored image (the result the
tiles reproduce), and for one forward pass over the bare image; the model's
FLOPs per pixel; and the machine's measured float32 matrix-multiply FLOP/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_unet.core import normalize as norm
from napari_unet.core.device import resolve_device
from napari_unet.core.tile_plan import auto_tile, plan_tiles
from napari_unet.core.tiling import predict
from napari_unet.io import load_model
from napari_unet.model.unet import for_inference, to_layout


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def flops(net, h: int, w: int) -> float:
    """FLOPs of one pass of ``net`` over a ``(1, 1, h, w)`` input."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.rand(1, 1, h, w))
    return counter.get_total_flops()


def flops_per_pixel(net, g, size: int = 1024) -> float:
    """FLOPs per output pixel on a large input the network accepts (a valid-padding
    network's output is smaller than its input; its halo costs less the larger it is)."""
    size = g.snap(size, "up")
    out = size - g.shrink if g.valid else size
    return flops(net, size, size) / out**2


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="nuclei")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    model = load_model(args.model)
    g = model.info.geometry
    rng = np.random.default_rng(0)
    image = (rng.random((args.size, args.size)) * 4000).astype(np.uint16)
    mp = args.size**2 / 1e6
    dev = resolve_device("cpu")
    (ty, tx), _ = auto_tile(model, dev, image.shape)
    plan = plan_tiles(image.shape, g, (ty, tx))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    print(f"image {args.size}x{args.size}; default tiles {ty}x{tx}, {plan.n_tiles} tile(s)")

    tiled = best_of(lambda: predict(image, model, device="cpu"), args.repeats)
    net = for_inference(model.net, "cpu")  # exactly what the engine runs
    spec = norm.validate(model.info.normalization)
    x = norm.apply(image[None], *norm.plane_stats(image.reshape(1, -1), spec))
    h = g.halo
    side = g.snap(args.size + 2 * h, "up")
    canvas = np.pad(x, ((0, 0), (h, side - args.size - h), (h, side - args.size - h)), "reflect")
    # the network on the image without mirrored context: the largest input it accepts
    # within the image, and the pixels it answers for (fewer for valid padding)
    bare = g.snap(args.size, "down")
    bare_mp = (bare - g.shrink if g.valid else bare) ** 2 / 1e6
    with torch.inference_mode():
        one = best_of(lambda: net(to_layout(torch.from_numpy(canvas[None]), net)), args.repeats)
        plain = best_of(
            lambda: net(to_layout(torch.from_numpy(x[None, :, :bare, :bare]), net)), args.repeats
        )
    fpp = flops_per_pixel(net, g)
    peak = matmul_flops()
    print(f"tiled (default):            {mp / tiled:6.3f} MP/s  ({tiled:.2f} s)")
    print(f"one pass, mirrored image:   {mp / one:6.3f} MP/s  ({one:.2f} s)")
    print(
        f"one pass, bare image:       {bare_mp / plain:6.3f} MP/s  ({plain:.2f} s, {bare} px in)"
    )
    print(f"tiled / one pass (mirrored): {one / tiled:.3f}")
    print(f"tiled / one pass (bare):     {(plain / bare_mp) / (tiled / mp):.3f}  (per pixel)")
    print(f"model: {fpp / 1e6:.2f} MFLOP per pixel; matmul peak {peak / 1e9:.1f} GFLOP/s")
    done = plan.n_tiles * flops(net, ty, tx)  # what the tiled run computed, halos included
    print(f"efficiency: tiled {done / tiled / peak:.1%} of matmul FLOP/s ({done / 1e9:.1f} GFLOP)")


if __name__ == "__main__":
    main()
