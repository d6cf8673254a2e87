"""What the star-convex and flow-field nuclei experiments share (scripts/*_nuclei/).

Both train the project's U-Net body with a different output on the shared DAPI
data, on the CPU (or a lent GPU: ``--device cuda --workers N`` draws the patches in
N worker processes), with the bundled model's input normalisation; this module holds
their command-line options, weight initialisation, training loop, whole-image
prediction and pooled scoring.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from _shared_data import nuclei_split
from safetensors.torch import load_file, save_file

from napari_unet.core import normalize as norm


def normalized(img) -> np.ndarray:
    """The bundled nuclei model's input normalisation (percentiles 1 / 99.8)."""
    plane = np.asarray(img)[None]
    return norm.apply(plane, *norm.plane_stats(plane.reshape(1, -1), norm.DEFAULT))[0]


def start(p, out: str, max_seconds: float):
    """Add the shared options, parse them and seed the run (2 CPU threads, seed 0):
    ``(args, training items, rng)``."""
    add_train_args(p, out, max_seconds)
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train, _ = nuclei_split()
    return a, train, np.random.default_rng(0)


def add_train_args(p, out: str, max_seconds: float) -> None:
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--width", type=int, default=16, help="the U-Net's base width")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-seconds", type=float, default=max_seconds)
    p.add_argument("--out", default=out)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="draw batches in this many processes (each seeded by its number); "
        "0: in the training process, as the CPU runs in the model card",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="continue from these weights (.safetensors)")
    start.add_argument(
        "--init-unet",
        help="start the U-Net body from a class model's weights (all but its 1x1 head), "
        "e.g. runs/n7/checkpoint.safetensors",
    )


def init_weights(p, a, net) -> None:
    """``--init`` (whole network) or ``--init-unet`` (``net.unet`` but its head)."""
    if a.init:
        net.load_state_dict(load_file(a.init))
    elif a.init_unet:
        body = {
            k: v.float() for k, v in load_file(a.init_unet).items() if not k.startswith("head.")
        }
        own = net.unet.state_dict()
        if any(k in own and own[k].shape != v.shape for k, v in body.items()):
            p.error(f"{a.init_unet} is not a depth-4 class U-Net of this width")
        missing, unexpected = net.unet.load_state_dict(body, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            p.error(f"{a.init_unet} is not a depth-4 class U-Net of this width")
    print(sum(q.numel() for q in net.parameters()), "params", flush=True)


class _Batches(torch.utils.data.IterableDataset):
    """Endless batches from ``sampler``; worker ``i`` draws with seed ``(seed, i)``."""

    def __init__(self, sampler, bs: int, seed: int):
        super().__init__()
        self.sampler, self.bs, self.seed = sampler, bs, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        torch.set_num_threads(1)
        self.sampler.rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield self.sampler.batch(self.bs)


def batches(sampler, a, seed: int = 0):
    """The training batches: drawn here (``a.workers == 0``) or in worker processes."""
    if not a.workers:
        while True:
            yield sampler.batch(a.bs)
    loader = torch.utils.data.DataLoader(
        _Batches(sampler, a.bs, seed),
        batch_size=None,
        num_workers=a.workers,
        pin_memory=a.device != "cpu",
        prefetch_factor=4,
    )
    yield from loader


def train_loop(
    net, sampler, loss_fn, a, metadata: dict, parts: tuple[str, str], prepare=None
) -> int:
    """AdamW (weight decay 1e-4), lr with 50 warm-up steps and a cosine decay over
    ``a.steps`` or ``a.max_seconds``, whichever ends first; bfloat16 autocast on
    ``a.device``; ``prepare(batch, device)`` may finish each batch there (e.g. targets
    computed on the GPU); the weights go to ``a.out``.safetensors every 250 steps and
    at the end. Returns the number of steps made."""
    dev = torch.device(a.device)
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    net.train()
    source = batches(sampler, a)
    for step in range(1, a.steps + 1):
        frac = min(1.0, max(step / a.steps, (time.time() - t0) / a.max_seconds))
        lr = a.lr * min(1, step / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [t.to(dev, non_blocking=True) for t in next(source)]
        x, *targets = prepare(batch, dev) if prepare else batch
        with torch.autocast(dev.type, torch.bfloat16):
            out = net(x)
        loss, l1, l2 = loss_fn(out.float(), *targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(
                f"step {step} loss {float(loss.detach()):.4f} {parts[0]} {l1:.4f} "
                f"{parts[1]} {l2:.4f} lr {lr:.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
        if step % 250 == 0 or frac >= 1:
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, a.out + ".tmp", metadata=metadata)
            os.replace(a.out + ".tmp", a.out + ".safetensors")
        if frac >= 1:
            break
    print("done", step, time.time() - t0, flush=True)
    return step


@torch.no_grad()
def predict_raw(net, img, pad: int = 64) -> np.ndarray:
    """The network's raw ``(C, H, W)`` output on a whole image, mirror-padded."""
    x = np.pad(normalized(img), pad, mode="reflect")
    h, w = x.shape
    H, W = -(-h // 16) * 16, -(-w // 16) * 16
    x = np.pad(x, ((0, H - h), (0, W - w)), mode="reflect")
    net.eval()
    out = net(torch.from_numpy(np.ascontiguousarray(x))[None, None]).float()[0].numpy()
    return out[:, pad : pad + img.shape[0], pad : pad + img.shape[1]]


def f1(r: dict) -> float:
    return 2 * r["tp"] / max(1, 2 * r["tp"] + r["fp"] + r["fn"])


def add_scores(res: dict, keys, sc: dict) -> None:
    """Pool ``metrics.object_scores`` output into ``res[key]`` for each key."""
    for key in keys:
        r = res.setdefault(key, dict(tp=0, fp=0, fn=0, iou=0.0))
        r["tp"] += sc["tp"]
        r["fp"] += sc["fp"]
        r["fn"] += sc["fn"]
        r["iou"] += sc["sum_matched_iou"]


def print_scores(res: dict) -> None:
    for k, r in sorted(res.items()):
        print(
            f"{k:>8}: F1 {f1(r):.3f} tp {r['tp']} fp {r['fp']} fn {r['fn']} "
            f"mIoU {r['iou'] / max(1, r['tp']):.3f}"
        )
