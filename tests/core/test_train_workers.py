"""Training patches drawn by worker processes (``TrainConfig.workers``)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core import synthetic
from napari_unet.core.augment import AugmentConfig
from napari_unet.core.training import TrainConfig, train, train_iter


@pytest.fixture(scope="module")
def data():
    return synthetic.nuclei((160, 160), n=25, seed=3)


def _cfg(**kw):
    base = dict(steps=30, lr=5e-3, batch_size=4, patch_size=64, warmup=2, val_every=10,
                augment=AugmentConfig(elastic=0.3, zoom=0.2), device="cpu")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _children() -> set[int]:
    return {c.pid for c in multiprocessing.active_children()}


def test_workers_draw_the_same_batches_whatever_their_number(data):
    image, labels = data
    runs = {}
    for workers in (0, 1, 3):
        cfg = _cfg(steps=6, workers=workers)
        r = train(tiny_model("same", depth=2), [image], [labels], "instances", cfg)
        runs[workers] = r.net.state_dict()
        assert r.info.provenance["train_config"]["workers"] == workers
    for k in runs[1]:  # batch n comes from (seed, n) in whichever process draws it
        assert torch.equal(runs[1][k], runs[3][k]), k
    # ... a stream of its own: not the run without workers (documented)
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not _children()  # the workers ended with the run


def test_a_worker_that_dies_ends_the_run_with_a_message_not_a_wait_forever(data):
    image, labels = data
    gen = train_iter(tiny_model("same", depth=2), [image], [labels], "instances",
                     _cfg(steps=200, workers=2))  # fmt: skip
    next(gen)
    with pytest.raises(RuntimeError, match="drawing training patches ended unexpectedly"):
        for _ in range(3):  # (as the out-of-memory killer does; a lost batch hung the run)
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
            next(gen)
    assert not _children()


def test_workers_started_by_spawn_draw_the_same_batches(data, monkeypatch):
    """macOS and Windows have no fork: their workers get the sampler pickled."""
    image, labels = data
    cfg = _cfg(steps=3, workers=1)
    forked = train(tiny_model("same", depth=2), [image], [labels], "instances", cfg)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    methods, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(
        multiprocessing, "get_context", lambda m: methods.append(m) or get_context(m)
    )
    spawned = train(tiny_model("same", depth=2), [image], [labels], "instances", cfg)
    assert methods == ["spawn"]
    a, b = forked.net.state_dict(), spawned.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_workers_learns_and_a_stopped_one_ends_its_workers(data):
    image, labels = data
    model = tiny_model("same", depth=2)
    steps = []
    cfg = _cfg(steps=40, lr=1e-2, val_every=20, workers=2)
    train(model, [image], [labels], "instances", cfg, callback=steps.append)
    assert [s.step for s in steps] == list(range(1, 41))
    assert np.mean([s.loss for s in steps[-8:]]) < np.mean([s.loss for s in steps[:8]])
    gen = train_iter(model, [image], [labels], "instances", _cfg(steps=100, workers=2))
    for _ in range(3):
        next(gen)
    assert len(_children()) == 2
    gen.close()  # (Cancel in the panels)
    assert not _children()
    with pytest.raises(ValueError, match="workers must be a whole number of at least 0"):
        _cfg(workers=-1)
    with pytest.raises(ValueError, match="workers must be at most 256"):
        _cfg(workers=10_000)


# a training run in a process of its own: its workers busy drawing (as scipy's
# interpolation keeps them), a file written once the first batch has come
_RUN = """
import sys, time
from pathlib import Path
from napari_unet.core import samples, training

draw, stream = samples._draw_batch, samples.batch_stream

def busy_draw(job):
    t = time.time()
    while time.time() - t < 0.2:
        pass
    return draw(job)

def marked_stream(*args):
    for i, batch in enumerate(stream(*args)):
        if i == 1:
            Path(sys.argv[1]).touch()
        yield batch

samples._draw_batch = busy_draw
training.batch_stream = marked_stream
"""


def _start(tmp_path, code: str) -> subprocess.Popen:
    """``code`` after :data:`_RUN` in a new process group; returns once it trains."""
    started = tmp_path / "started"
    script = textwrap.dedent(_RUN) + textwrap.dedent(code)
    proc = subprocess.Popen([sys.executable, "-c", script, str(started)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)
    return proc


def _group_gone(pgid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM: POSIX")
def test_one_sigterm_to_the_process_group_stops_the_command_after_a_step_and_saves(tmp_path):
    """As `timeout` and cluster time limits send it: forked workers ran the command's
    handlers too, and their wake-up bytes counted as a second SIGTERM (abort, unsaved)."""
    image, labels = synthetic.nuclei((64, 64), n=5, seed=2)
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    proc = _start(
        tmp_path,
        """
        from napari_unet.cli import main
        sys.exit(main(["train", "--images", "img.tif", "--labels", "lab.tif", "-m",
                       '{"depth": 2, "base_width": 4, "padding": "same"}', "--label-kind",
                       "instances", "-o", "out.safetensors", "--steps", "100000",
                       "--patch-size", "32", "--batch-size", "2", "--device", "cpu", "-q",
                       "--workers", "3"]))
    """,
    )
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert err.count("stopping after this step and saving") == 1, err
    assert "nothing to save" not in err and "Traceback" not in err, err
    assert "saved out.safetensors" in err and (tmp_path / "out.safetensors").exists()
    assert _group_gone(proc.pid)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL: POSIX")
def test_workers_end_when_their_run_is_killed(tmp_path):
    """(the out-of-memory killer picks the run, the largest process): orphaned workers
    held their memory and the run's output pipe for good."""
    proc = _start(
        tmp_path,
        """
        from napari_unet.core import synthetic
        from napari_unet.core.training import TrainConfig, train
        from napari_unet.model import UNet, UNetConfig
        from napari_unet.model.info import wrap_unet
        image, labels = synthetic.nuclei((96, 96), n=10, seed=3)
        net = UNet(UNetConfig(num_classes=3, depth=2, base_width=4, padding="same"))
        model = wrap_unet(net, name="tiny", classes=["bg", "interior", "boundary"])
        cfg = TrainConfig(steps=100000, batch_size=2, patch_size=32, val_every=0,
                          device="cpu", workers=2)
        train(model, [image], [labels], "instances", cfg)
    """,
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _group_gone(proc.pid)


def test_a_callback_that_raises_ends_the_workers_at_once(data):
    """(not when the traceback is dropped: a notebook keeps it, and the workers with it)"""
    image, labels = data

    def fails(step):
        if step.step == 2:
            raise KeyError("the caller's own error")

    kept = None
    try:
        train(tiny_model("same", depth=2), [image], [labels], "instances",
              _cfg(steps=50, workers=2), callback=fails)  # fmt: skip
    except KeyError as err:
        kept = err  # (its traceback holds the run's frames)
    assert kept is not None and not _children()
