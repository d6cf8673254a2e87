"""How long Cancel takes to stop a segmentation, on this machine.

A segmentation runs in a thread the way napari's worker runs it (the generator is
advanced, and the abort flag checked after each report); Cancel is pressed after
``--after`` seconds, in the middle of a tile. Printed: the time from the press until
the run has stopped, with the stop flag given to the core (``should_stop``: checked
before every layer of the network) and without it (only between tiles).

    python benchmarks/cancel_latency.py --size 4096 --after 5
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def run_once(image, model, after: float, pass_flag: bool) -> tuple[float, int]:
    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.segment import SegmentOptions, segment_iter

    abort = threading.Event()
    stopped_at = []
    reports = []

    def worker():
        stop = abort.is_set if pass_flag else None
        gen = segment_iter(image, model, SegmentOptions("labels", device="cpu", should_stop=stop))
        try:
            for report in gen:  # napari's GeneratorWorker: abort checked between reports
                reports.append(report)
                if abort.is_set():
                    break
        except Cancelled:
            pass
        finally:
            gen.close()
            stopped_at.append(time.perf_counter())

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(after)
    pressed = time.perf_counter()
    abort.set()
    thread.join()
    if stopped_at[0] < pressed:
        raise SystemExit(
            f"the run ended {pressed - stopped_at[0]:.1f} s before Cancel: choose a larger "
            "--size or a smaller --after"
        )
    return stopped_at[0] - pressed, len(reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="image side (px)")
    parser.add_argument("--after", type=float, default=5.0, help="seconds before Cancel")
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from napari_unet.io import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (args.size, args.size)).astype(np.float32)
    for pass_flag in (False, True):
        latency, n = run_once(image, model, args.after, pass_flag)
        what = "stop flag checked before every layer" if pass_flag else "between tiles only"
        print(
            f"{args.size}^2, Cancel after {args.after:.1f} s ({n} reports), {what}: "
            f"{latency:.2f} s"
        )


if __name__ == "__main__":
    main()
