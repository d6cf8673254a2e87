"""The shipped models: they load by name, carry their cards, and segment the samples."""

import pytest

from napari_unet.core import metrics, synthetic
from napari_unet.core.segment import SegmentOptions, segment_iter
from napari_unet.core.tiling import run_to_end
from napari_unet.io import load_model, registry


def _run(image, model, mode):
    return run_to_end(segment_iter(image, model, SegmentOptions(mode=mode, device="cpu")))


def test_every_bundled_model_is_small_documented_and_loads():
    models = registry.bundled_models()
    assert "nuclei" in models and registry.default_model() == "nuclei"
    for name, path in models.items():
        assert path.stat().st_size < 10 * 2**20
        assert path.with_suffix(".md").exists(), f"{name} has no model card"
        info = load_model(name).info
        assert info.metrics, f"{name} has no metrics in its metadata"
        assert info.provenance["steps"] > 0 and "training_data" in info.provenance
        # the weights say under which terms they come and whose data to cite
        assert info.provenance["license"] and info.provenance["cite"][0]["doi"]
        assert info.provenance["model_card"] == f"{name}.md beside the weights file"
    assert load_model("nuclei").info.provenance["license"] == "BSD-3-Clause"
    card = load_model("nuclei").info.card()
    assert "(2021). (10.3390/diagnostics11060967)" in card
    # metrics read as text, not as Python dicts
    assert "metric overall: f1@0.5 0.8199, mean_matched_iou 0.7771" in card and "{" not in card
    assert "non-commercial" in load_model("em-membrane").info.provenance["license"]


def test_nuclei_model_segments_the_synthetic_sample():
    image, truth = synthetic.nuclei()
    labels = _run(image, load_model("nuclei"), "instances")
    scores = metrics.object_scores(truth, labels)
    assert scores["f1"] > 0.8, scores
    assert scores["mean_matched_iou"] > 0.75, scores


@pytest.mark.skipif("em-membrane" not in registry.bundled_models(), reason="not bundled")
def test_em_model_finds_the_synthetic_membranes():
    image, truth = synthetic.membranes()
    model = load_model("em-membrane")
    probs = _run(image, model, "probabilities")
    cell = probs[model.info.classes.index("cell")] > 0.5
    assert metrics.pixel_error(truth > 0, cell) < 0.15
