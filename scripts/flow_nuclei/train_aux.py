"""The bundled nuclei recipe with flows as an auxiliary task (an experiment).

The network has two extra output channels trained on the flow-field targets of
flow.py (Cellpose's loss, weight ``--flow-weight``) next to the three classes of
the bundled recipe (same targets, weights, sampling and augmentation: the
training core's ``prepare`` and sampler). Flows tell each pixel where its
nucleus's centre lies, so learning them may teach the shared layers to keep
touching nuclei apart. The saved model drops the two flow channels: it is an
ordinary 3-class nuclei model, scored and tuned by the usual scripts.

    python scripts/flow_nuclei/train_aux.py --lr 2e-3 --warmup 50 --boundary-width 1 \\
        --core-fraction 0.5 --class-weighting sqrt --shift 0.05 --contact-w0 10 \\
        --max-seconds 3600 --out runs/aux/nuclei.safetensors
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _dense_experiment import train_loop  # noqa: E402
from _shared_data import nuclei_split  # noqa: E402
from flow import flow_term, flows_from_potential, heat_potential  # noqa: E402
from train_nuclei import build, parser  # noqa: E402

from napari_unet.core import samples as samples_mod  # noqa: E402
from napari_unet.core import training  # noqa: E402
from napari_unet.core.loss import loss_fn  # noqa: E402
from napari_unet.io.files import save_model  # noqa: E402
from napari_unet.model import UNet  # noqa: E402


class AuxSampler:
    """The core's patches (image, class target, weights) plus the flows of each patch."""

    def __init__(self, core_sampler):
        self.core = core_sampler

    @property
    def rng(self):
        return self.core.rng

    @rng.setter
    def rng(self, value):
        self.core.rng = value

    def draw(self):
        image, target, w = self.core.draw()
        return image, target, w[0], flows_from_potential(w[1], target)

    def batch(self, n):
        parts = [self.draw() for _ in range(n)]
        x, *rest = (torch.from_numpy(np.ascontiguousarray(np.stack(p))) for p in zip(*parts))
        return (x.contiguous(memory_format=torch.channels_last), *rest)


def main() -> None:
    p = parser()
    p.add_argument("--flow-weight", type=float, default=1.0)
    args = p.parse_args()
    if args.core_ramp or args.magnification_scale or args.dice or args.hard_fraction < 1:
        p.error("this experiment takes the plain core recipe's options only")
    torch.set_num_threads(args.threads or 2)
    train, _ = nuclei_split()
    model, cfg = build(args)
    cfg = samples_mod.with_convention(cfg, model)
    labels = [m for *_, m in train]
    samples = training.prepare(model, [i for _, i, _ in train], labels, "instances", cfg)
    for s, lab in zip(samples, labels):  # the potential travels with the weights
        s.weights = np.stack([s.weights, np.pad(heat_potential(lab), s.pad)])
    sampler = AuxSampler(
        samples_mod.PatchSampler(samples, model, cfg, np.random.default_rng(args.seed))
    )
    arch = model.net.config
    torch.manual_seed(args.seed)
    net = UNet(dataclasses.replace(arch, num_classes=5)).to(memory_format=torch.channels_last)

    def loss(out, target, weights, flow):
        ce = loss_fn(out[:, :3], target, weights)
        lf = flow_term(out[:, 3:], flow, target >= 0)
        return ce + args.flow_weight * lf, float(ce.detach()), float(lf.detach())

    raw = str(Path(args.out).with_name("aux_raw"))
    budget = args.max_seconds or float("inf")
    ns = type(args)(**{**vars(args), "out": raw, "bs": 8, "max_seconds": budget})
    steps = train_loop(
        net, sampler, loss, ns, {"flow_weight": str(args.flow_weight)}, ("ce", "flow")
    )
    finish(model, cfg, raw + ".safetensors", args.out, steps, args.flow_weight, len(train))


def finish(model, cfg, raw: str, out: str, steps: int, flow_weight: float, n_train: int):
    """Save the trained network without its flow channels, with the training provenance."""
    state = load_file(raw)
    state["head.weight"], state["head.bias"] = state["head.weight"][:3], state["head.bias"][:3]
    model.net.load_state_dict(state)
    data = f"nuclei_dapi (BitDepth_NucSeg, Mahbod et al. 2021), {n_train} training images"
    result = training._result(model.net, model, cfg, steps, data, "instances", {})
    result.info.provenance["auxiliary_task"] = (
        f"flows to each nucleus's centre (Cellpose targets), weight {flow_weight}, "
        "2 output channels dropped at save (scripts/flow_nuclei/train_aux.py)"
    )
    save_model(result, out, half=True, allow_bundled=True)
    print("saved", out)


if __name__ == "__main__":
    main()
