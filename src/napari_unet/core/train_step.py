"""One optimisation step of a training run (:class:`Stepper`: forward, loss with the
L2-SP anchor, update), its learning-rate schedule (:func:`learning_rate`) and how many
steps fit in a time budget (:func:`planned_steps`)."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from napari_unet.core.loss import loss_fn
from napari_unet.core.samples import PatchSampler
from napari_unet.core.train_config import TrainConfig
from napari_unet.model.info import LoadedModel
from napari_unet.model.unet import to_layout


def diverged(step: int, cfg: TrainConfig):
    """Stop a run whose loss or weights are no longer finite (nothing is saved)."""
    raise ValueError(
        f"training diverged by step {step} (the loss or the weights are no longer finite "
        f"numbers): nothing was saved; lower the learning rate (it was {cfg.lr:g})"
    )


def _trainable(net, cfg: TrainConfig):
    """The parameters ``cfg`` trains (all, or all but the frozen encoder's)."""
    for p in net.parameters():  # whatever an earlier run or the caller left
        p.requires_grad_(True)
    if not cfg.freeze_encoder:
        return list(net.parameters())
    for p in _frozen(net).parameters():
        p.requires_grad_(False)
    return [p for p in net.parameters() if p.requires_grad]


def _frozen(net) -> torch.nn.ModuleList:
    """The encoder stages (frozen by ``freeze_encoder``)."""
    names = getattr(net, "stage_names", [])
    return torch.nn.ModuleList(getattr(net, n) for n in names if n.startswith("enc"))


def planned_steps(net, samples, model: LoadedModel, cfg: TrainConfig, dev) -> int:
    """How many steps fit in ``cfg.max_seconds`` (at most ``cfg.steps``), from four
    training steps of a copy of ``net`` on batches of its own: the run's network,
    random streams and schedule are left as they were."""
    if cfg.max_seconds is None:
        return cfg.steps
    torch_state = torch.get_rng_state()
    trial = Stepper(copy.deepcopy(net).train(), cfg, dev)
    sampler = PatchSampler(samples, model, cfg, np.random.default_rng(cfg.seed + 2))
    draws, steps = [], []
    for _ in range(4):  # whole steps, optimiser and anchor included
        t0 = time.perf_counter()
        batch = sampler.batch(cfg.batch_size)
        t1 = time.perf_counter()
        trial.step(batch, cfg.lr, 0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        draws.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
    torch.set_rng_state(torch_state)
    # the first step pays for allocations; a run that turns out slower stops at
    # OVERRUN x the budget (and is repeated by stop_after), one that turns out faster
    # leaves time unused: the median of the others. Workers draw beside the steps.
    draw, step = float(np.median(draws[1:])), float(np.median(steps[1:]))
    per_step = max(step, draw / cfg.workers) if cfg.workers else draw + step
    spent = sum(draws) + sum(steps)
    return max(1, min(cfg.steps, int((cfg.max_seconds - spent) / per_step)))


class Stepper:
    """One optimisation step of ``net``: forward, loss (with the L2-SP anchor), update."""

    def __init__(self, net, cfg: TrainConfig, dev) -> None:
        self.net, self.cfg, self.dev = net, cfg, dev
        self.params = _trainable(net, cfg)
        self.anchor = [p.detach().clone() for p in self.params] if cfg.anchor > 0 else None
        decay = 0.0 if self.anchor else cfg.weight_decay
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=decay)

    def step(self, batch, lr: float, step: int) -> torch.Tensor:
        cfg, net = self.cfg, self.net
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, t, w = (a.to(self.dev) for a in batch)
        if cfg.freeze_encoder:  # its batch-norm statistics stay as they are too
            _frozen(net).eval()
        with torch.autocast(self.dev.type, torch.bfloat16, enabled=cfg.bf16):
            logits = net(to_layout(x, net))
        loss = loss_fn(logits.float(), t, w, cfg.dice, cfg.hard_fraction)
        total = loss
        if self.anchor is not None:
            pull = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.anchor))
            total = loss + cfg.anchor * pull
        if not torch.isfinite(total):
            diverged(step, cfg)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return loss


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 2 % (or constant) at ``step`` (from 1)."""
    # at most a fifth of the run warms up (5 steps with a warm-up of 20 never reached lr)
    warmup = min(cfg.warmup, cfg.steps // 5)
    if step <= warmup:
        return cfg.lr * step / max(1, warmup)
    if cfg.schedule == "constant":
        return cfg.lr
    t = min((step - warmup) / max(1, cfg.steps - warmup), 1.0)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))
