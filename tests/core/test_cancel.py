"""Cancel stops a run within a layer of the network, not at the end of its tile."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import tiny_model
from napari_unet.core.cancel import Cancelled, stoppable
from napari_unet.core.features import capture_iter
from napari_unet.core.segment import SegmentOptions, segment_iter
from napari_unet.core.tiling import predict_iter, run_to_end


def _hooks(net) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


def _stop_after(calls: int):
    """A ``should_stop`` that turns true after ``calls`` questions, and counts them."""
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > calls

    return should_stop, asked


def test_a_run_stops_inside_its_first_tile_and_says_so_once_more():
    model = tiny_model("same")
    n_modules = len(list(model.net.modules()))
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    should_stop, asked = _stop_after(5)
    gen = predict_iter(image, model, tile=64, device="cpu", should_stop=should_stop)
    reports = []
    with pytest.raises(Cancelled):
        for report in gen:
            reports.append(report)
    # the first report (0 of 1 tiles), then "cancelled" before the tile was done
    assert [r.done for r in reports] == [0, 0]
    assert reports[-1].message == "cancelled"
    # asked once before the tile, then before each layer until the sixth question
    assert len(asked) == 6 < n_modules
    assert _hooks(model.net) == 0  # nothing left on the (shared) network


def test_segment_options_carry_the_stop_flag_to_the_network():
    model = tiny_model("same")
    image = np.random.default_rng(1).random((48, 48)).astype(np.float32)
    stop = threading.Event()
    stop.set()
    gen = segment_iter(
        image, model, SegmentOptions("labels", device="cpu", should_stop=stop.is_set)
    )
    with pytest.raises(Cancelled):
        list(gen)
    # without the flag set, the same run ends with its result
    stop.clear()
    result = run_to_end(segment_iter(image, model, SegmentOptions("labels", device="cpu")))
    assert result.shape == (48, 48)


def test_only_the_thread_that_asked_is_stopped():
    """A network shared by two panels: one panel's Cancel leaves the other's run alone."""
    net = tiny_model("same").net
    x = torch.zeros(1, 1, 32, 32)
    answers = []
    with stoppable(net, lambda: True):
        worker = threading.Thread(target=lambda: answers.append(net(x).shape))
        worker.start()
        worker.join()
        with pytest.raises(Cancelled):
            net(x)
    assert answers == [torch.Size([1, 3, 32, 32])]
    assert _hooks(net) == 0


def test_torchscript_networks_stop_between_tiles():
    model = tiny_model("same")
    scripted = torch.jit.trace(model.net, torch.zeros(1, 1, 48, 48))
    from napari_unet.model.info import LoadedModel

    model = LoadedModel(scripted, model.info)
    image = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    should_stop, asked = _stop_after(1)  # true when asked before the second tile
    reports = []
    with pytest.raises(Cancelled):
        for report in predict_iter(image, model, tile=48, device="cpu", should_stop=should_stop):
            reports.append(report)
    assert [r.done for r in reports][-2:] == [1, 1]  # one tile done, then "cancelled"
    assert len(asked) == 2


def test_a_bioimageio_package_segments_with_a_stop_flag_and_stops(tmp_path):
    """A package's network is a module around a TorchScript one, which refuses hooks
    (every package failed in the panels, which pass a stop flag): the wrapper is hooked,
    the scripted network inside it is not."""
    from napari_unet.io.bioimageio import export_package, load_package

    model = load_package(export_package(tiny_model("same"), tmp_path / "tiny.zip"))
    assert any(isinstance(m, torch.jit.ScriptModule) for m in model.net.modules())
    image = np.random.default_rng(4).random((64, 64)).astype(np.float32)
    free = run_to_end(segment_iter(image, model, SegmentOptions("labels", device="cpu")))
    options = SegmentOptions("labels", device="cpu", should_stop=lambda: False)
    np.testing.assert_array_equal(run_to_end(segment_iter(image, model, options)), free)
    should_stop, asked = _stop_after(1)  # before the tile, then inside it
    with pytest.raises(Cancelled):
        run_to_end(predict_iter(image, model, tile=64, device="cpu", should_stop=should_stop))
    assert len(asked) == 2
    assert _hooks(model.net) == 0


def test_a_feature_capture_stops_and_removes_its_hooks():
    model = tiny_model("same")
    image = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    should_stop, _ = _stop_after(2)
    gen = capture_iter(image, model, device="cpu", should_stop=should_stop)
    messages = []
    with pytest.raises(Cancelled):
        for report in gen:
            messages.append(report.message)
    assert messages[-1] == "cancelled"
    assert _hooks(model.net) == 0
    # and without a stop, every stage comes back
    maps = run_to_end(capture_iter(image, model, device="cpu"))
    assert set(maps) and all(m.data.size for m in maps.values())


def test_finding_objects_in_a_stack_stops_between_planes():
    """Post-processing a stack takes seconds a plane, and Cancel waited for all of them."""
    from napari_unet.core import postprocess

    probs = np.random.default_rng(5).random((3, 6, 32, 32)).astype(np.float32)
    probs /= probs.sum(0)
    should_stop, asked = _stop_after(2)  # true before the third plane
    with pytest.raises(Cancelled):
        postprocess.instances(probs, should_stop=should_stop)
    assert len(asked) == 3
    whole = postprocess.instances(probs, should_stop=lambda: False)
    np.testing.assert_array_equal(whole, postprocess.instances(probs))
    # segmenting passes its stop flag on
    image = np.random.default_rng(6).random((4, 48, 48)).astype(np.float32)
    stop = threading.Event()
    options = SegmentOptions("instances", device="cpu", should_stop=stop.is_set)
    gen = segment_iter(image, tiny_model("same"), options)
    with pytest.raises(Cancelled):
        for report in gen:
            if report.message == "finding objects":
                stop.set()
