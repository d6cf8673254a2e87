"""Train the flow-field nuclei experiment (see flow.py) on the shared DAPI data.

    python scripts/flow_nuclei/train.py --max-seconds 3900 --out runs/flow/f1

Time-based cosine schedule (lr 2e-3, 50 warm-up steps), AdamW, batch 8 of 256 px,
half of the patches near touching nuclei, bfloat16 autocast, 2 CPU threads,
seed 0; the weights go to OUT.safetensors every 250 steps and at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _dense_experiment import init_weights, start, train_loop  # noqa: E402
from flow import FlowNet, Sampler, flow_loss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    a, train, rng = start(p, out="runs/flow/flow", max_seconds=3900)
    net = FlowNet(a.width)
    init_weights(p, a, net)
    sampler = Sampler(train, rng)
    train_loop(net, sampler, flow_loss, a, {"width": str(a.width)}, ("flow", "fg"))


if __name__ == "__main__":
    main()
