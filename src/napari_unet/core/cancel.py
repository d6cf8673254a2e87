"""Stopping a forward pass part-way: Cancel is not kept waiting for a whole tile.

Progress generators stop between their reports; a large tile on a CPU takes seconds,
so :func:`stoppable` also checks a ``should_stop`` callable before every layer of the
network and raises :class:`Cancelled` there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager

import torch


class Cancelled(Exception):
    """A run stopped because its ``should_stop`` said so."""


@contextmanager
def stoppable(net, should_stop: Callable[[], bool] | None):
    """Within this block, ``net``'s forward pass raises :class:`Cancelled` before the
    next layer once ``should_stop()`` is true.

    Only calls made by this thread are stopped: the network may be shared with another
    panel's run. Networks without module hooks (TorchScript, ONNX) stop between calls.
    """
    modules = list(_hookable(net)) if should_stop is not None else []
    if not modules:
        yield
        return
    thread = threading.get_ident()

    def check(module, args) -> None:
        if threading.get_ident() == thread and should_stop():
            raise Cancelled("cancelled")

    handles = [m.register_forward_pre_hook(check) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hookable(module):
    """``module`` and its submodules, less TorchScript ones and all they hold (a
    bioimage.io package's network wraps a scripted one, which refuses hooks)."""
    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return
    yield module
    for child in module.children():
        yield from _hookable(child)
