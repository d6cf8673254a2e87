import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import tiny_model
from napari_unet.cli import main
from napari_unet.core.postprocess import instances
from napari_unet.core.tiling import predict
from napari_unet.io import save_model


@pytest.fixture
def model_file(tmp_path):
    return save_model(tiny_model("valid"), tmp_path / "tiny.safetensors")


@pytest.fixture
def image():
    return (np.random.default_rng(0).random((64, 80)) * 1000).astype(np.uint16)


def test_predict_probabilities_labels_instances(tmp_path, model_file, image):
    src = tmp_path / "img.tif"
    tifffile.imwrite(src, image)
    ref = predict(image, tiny_model("valid"))
    for mode in ("probabilities", "labels", "instances"):
        out = tmp_path / f"{mode}.tif"
        rc = main(
            [
                "predict",
                str(src),
                "-m",
                str(model_file),
                "-o",
                str(out),
                "--mode",
                mode,
                "-q",
                "--tile",
                "60",
            ]
        )
        assert rc == 0
        result = tifffile.imread(out)
        if mode == "probabilities":
            np.testing.assert_allclose(result, ref, atol=1e-5)
        elif mode == "labels":
            np.testing.assert_array_equal(result, ref.argmax(0))
        else:
            np.testing.assert_array_equal(
                result, instances(ref, classes=["background", "interior", "boundary"])
            )
    # one object covering the image (seeds anywhere), mean confidence ~0.56
    recipe = {"method": "watershed", "seed_threshold": 0.0, "min_confidence": 0.9}
    strict = save_model(tiny_model("valid", instances=recipe), tmp_path / "strict.safetensors")
    out = tmp_path / "sure.tif"
    args = ["predict", str(src), "-m", str(strict), "-o", str(out), "-q"]
    assert main(args) == 0
    assert tifffile.imread(out).max() == 0  # the model's recipe drops it
    assert main([*args, "--min-confidence", "0.5"]) == 0
    assert tifffile.imread(out).max() == 1
    out = tmp_path / "tta.tif"
    args = ["predict", str(src), "-m", str(model_file), "-o", str(out), "-q", "--tta"]
    assert main([*args, "--mode", "probabilities"]) == 0
    tta = predict(image, tiny_model("valid"), tta=True)
    np.testing.assert_allclose(tifffile.imread(out), tta, atol=5e-5)
    assert np.abs(tta - ref).max() > 1e-3


def test_frames_saved_one_by_one_are_said_once_and_a_cut_stack_fails(
    tmp_path, model_file, image, capsys
):
    frames = tmp_path / "frames.tif"
    for _ in range(3):
        tifffile.imwrite(frames, image, append=True)
    assert main(["predict", str(frames), "-m", str(model_file), "-q"]) == 0
    assert capsys.readouterr().err.count("frames.tif holds 3 image pages in 3 series") == 1
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, np.stack([image] * 30), imagej=True, metadata={"axes": "ZYX"})
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert main(["predict", str(cut), "-m", str(model_file), "-q"]) == 1
    err = capsys.readouterr().err
    assert "cut.tif: a truncated or corrupt TIFF" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cut_instances.tif").exists()


def test_predict_writes_beside_a_zarr_store_not_into_it(tmp_path, model_file, image):
    import zarr

    group = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w")
    group.create_array("raw", shape=image.shape, dtype=image.dtype)[:] = image
    assert (
        main(["predict", str(tmp_path / "plate.zarr" / "raw"), "-m", str(model_file), "-q"]) == 0
    )
    assert (tmp_path / "plate_raw_instances.tif").is_file()
    assert sorted(p.name for p in (tmp_path / "plate.zarr").iterdir()) == ["raw", "zarr.json"]


@pytest.mark.parametrize("arg", [["--tile", "0"], ["--tile", "-8"], ["--batch-size", "0"]])
def test_predict_refuses_tiles_and_batches_below_one(tmp_path, model_file, image, arg, capsys):
    np.save(tmp_path / "i.npy", image)
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "i.npy"), "-m", str(model_file), *arg])
    assert "must be 1 or more" in capsys.readouterr().err


def _corrupt_tiff(path, image, compression):
    """A tiled, compressed TIFF whose second tile is damaged."""
    tifffile.imwrite(path, image, tile=(16, 16), compression=compression)
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[0].dataoffsets[1]
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_train_names_a_corrupt_or_unusable_file(tmp_path, model_file, image, capsys):
    labels = np.zeros(image.shape, np.uint8)
    labels[:8], labels[-8:] = 1, 2
    tifffile.imwrite(tmp_path / "good.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    _corrupt_tiff(tmp_path / "bad.tif", image, "lzma")
    _corrupt_tiff(tmp_path / "bad_labels.tif", labels, "zlib")
    tifffile.imwrite(tmp_path / "mask.tif", image > 500)  # a boolean image
    for images, labelled, named in (
        ("bad.tif", "labels.tif", "bad.tif: its image data is corrupt"),
        ("good.tif", "bad_labels.tif", "bad_labels.tif: its image data is corrupt"),
        ("mask.tif", "labels.tif", "mask.tif: an image of dtype bool cannot be used"),
    ):
        out = tmp_path / "out.safetensors"
        rc = main(["train", "-m", str(model_file), "--images", str(tmp_path / images),
                   "--labels", str(tmp_path / labelled), "--steps", "1", "-o", str(out),
                   "-q"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 1 and named in err and "Traceback" not in err, err
        assert not out.exists()
    # as a command: the one line, without the zarr reader's abandoned reads reported at exit
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "napari_unet", "predict", str(tmp_path / "bad.tif"), "-m",
         str(model_file), "-q"], capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "bad.tif: its image data is corrupt" in run.stderr


def test_class_labels_past_255_are_written_whole_to_every_format(tmp_path, image):
    import zarr

    model = tiny_model("valid", depth=1, classes=300)
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.zero_()
        model.net.head.bias[280] = 1.0  # every pixel: class 280
    path = save_model(model, tmp_path / "many.safetensors")
    np.save(tmp_path / "i.npy", image)
    for suffix in (".tif", ".npy", ".zarr"):
        out = tmp_path / f"labels{suffix}"
        args = ["predict", str(tmp_path / "i.npy"), "-m", str(path), "--mode", "labels"]
        assert main([*args, "-o", str(out), "-q"]) == 0
        if suffix == ".zarr":
            labels = zarr.open_array(str(out), mode="r")[:]
        else:
            labels = tifffile.imread(out) if suffix == ".tif" else np.load(out)
        assert labels.dtype == np.uint16 and np.unique(labels).tolist() == [280], suffix
    with pytest.raises(ValueError, match="cannot hold class 299"):  # nor a given array
        predict(image, model, output="labels", out=np.zeros(image.shape, np.uint8))


def test_predict_npy_stack_to_zarr_and_folder_outputs(tmp_path, model_file, image):
    import zarr

    stack = np.stack([image, image[::-1]])
    np.save(tmp_path / "stack.npy", stack)
    out = tmp_path / "probs.zarr"
    assert (
        main(
            [
                "predict",
                str(tmp_path / "stack.npy"),
                "-m",
                str(model_file),
                "-o",
                str(out),
                "--mode",
                "probabilities",
                "--axes",
                "ZYX",
                "-q",
            ]
        )
        == 0
    )
    z = zarr.open_array(str(out), mode="r")
    assert z.shape == (3, 2, 64, 80)
    np.testing.assert_allclose(z[:, 1], predict(image[::-1], tiny_model("valid")), atol=1e-5)
    # what it is, in its attributes (a .zarr result carried none)
    said = dict(z.attrs)["napari_unet"]
    assert said["axes"] == "CZYX" and said["mode"] == "probabilities"
    assert said["model"] == "unet" and said["calibration"] == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # several inputs go to a folder, one file each
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "b.tif", image)
    assert (
        main(
            [
                "predict",
                str(tmp_path / "a.tif"),
                str(tmp_path / "b.tif"),
                "-m",
                str(model_file),
                "-o",
                str(tmp_path / "res"),
                "--mode",
                "labels",
                "-q",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["a_labels.tif", "b_labels.tif"]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: None, ["missing.tif"], "no such file"),
        (lambda p: (p / "x.txt").write_text("hi"), ["x.txt"], "unsupported image format"),
        (lambda p: np.save(p / "nan.npy", np.full((9, 9), np.nan)), ["nan.npy"], "NaN"),
        (lambda p: np.save(p / "e.npy", np.zeros((0, 9))), ["e.npy"], "empty"),
        (lambda p: np.save(p / "ok.npy", np.zeros((9, 9))), ["ok.npy", "--axes", "ZYX"], "axes"),
        # the axes as given: they were named after the letter C is rewritten to, 'ZQYX'
        (
            lambda p: np.save(p / "z.npy", np.ones((3, 9, 9))),
            ["z.npy", "--axes", "ZCYX"],
            "axes 'ZCYX' has 4 letters",
        ),
        (
            lambda p: np.save(p / "z.npy", np.ones((3, 9, 9))),
            ["z.npy", "--axes", "YXCC"],
            "axes 'YXCC'",
        ),
    ],
)
def test_bad_input_exits_1_with_one_line(
    tmp_path, model_file, capsys, monkeypatch, setup, args, message
):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    rc = main(["predict", *args, "-m", str(model_file), "-o", "out.tif", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("napari-unet: error:") and message in err[0]
    assert not (tmp_path / "out.tif").exists()


def test_predict_diameter_rescales_for_models_that_record_an_object_size(tmp_path, capsys):
    from napari_unet import __version__
    from napari_unet.core.segment import SegmentOptions, segment_iter
    from napari_unet.core.tiling import run_to_end
    from napari_unet.io.image_metadata import image_about

    image = (np.random.default_rng(1).random((48, 64)) * 1000).astype(np.uint16)
    np.save(tmp_path / "i.npy", image)
    sized = save_model(tiny_model("same", object_diameter=20.0), tmp_path / "sized.safetensors")
    out = tmp_path / "p.tif"
    args = ["predict", str(tmp_path / "i.npy"), "-m", str(sized), "-o", str(out), "-q"]
    args += ["--mode", "probabilities"]

    def expected(diameter):
        options = SegmentOptions(mode="probabilities", diameter=diameter)
        return run_to_end(segment_iter(image, tiny_model("same", object_diameter=20.0), options))

    loud = [a for a in args if a != "-q"]  # not quiet: the size is said
    assert main([*loud, "--diameter", "10"]) == 0
    said = "objects given at 10.0 px, model's 20.0 px: image resized by 2"
    assert said in capsys.readouterr().err
    record = json.loads(image_about(out))  # and what made it is in the file
    assert record["model_source"] == str(sized) and record["mode"] == "probabilities"
    assert record["diameter"] == "10" and record["object_diameter"] == 10.0
    assert record["resized_by"] == 2.0 and record["napari_unet"] == __version__
    assert record["device"] == "cpu" and record["amp"] is False  # as it took effect
    assert main(["info", str(out)]) == 0  # the record, read back a line per entry
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(record) and lines[0].split() == ["model", record["model"]]
    assert [line.split() for line in lines if line.startswith("resized_by")] == [
        ["resized_by", "2.0"]
    ]
    tifffile.imwrite(tmp_path / "other.tif", image)  # an image napari-unet did not write
    assert main(["info", str(tmp_path / "other.tif")]) == 1
    assert "records no napari-unet run" in capsys.readouterr().err
    result = tifffile.imread(out)
    assert result.shape == (3, 48, 64)
    np.testing.assert_allclose(result, expected(10.0), atol=1e-5)
    assert np.abs(result - expected(None)).max() > 1e-3  # the network saw a larger image
    assert main(args) == 0  # default for such a model: auto
    np.testing.assert_allclose(tifffile.imread(out), expected("auto"), atol=1e-5)
    assert main([*args, "--diameter", "off"]) == 0
    np.testing.assert_allclose(tifffile.imread(out), expected(None), atol=1e-5)
    assert "objects" not in capsys.readouterr().err  # quiet, and no sizing asked
    for bad, message in (("huge", "takes pixels, 'auto' or 'off'"), ("-2", "positive")):
        assert main([*args, "--diameter", bad]) == 1
        assert message in capsys.readouterr().err
    zarr = ["predict", str(tmp_path / "i.npy"), "-m", str(sized), "-q"]
    assert (
        main([*zarr, "-o", str(tmp_path / "o.zarr"), "--mode", "labels", "--diameter", "10"]) == 1
    )
    assert "write .tif or .npy" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    assert main([*zarr, "-o", str(tmp_path / "o.zarr"), "--mode", "labels"]) == 0  # own scale
    assert (tmp_path / "o.zarr").exists()


def test_bad_model_file_exits_1(tmp_path, capsys, image):
    (tmp_path / "bad.safetensors").write_bytes(b"12345678{not json")
    np.save(tmp_path / "i.npy", image)
    rc = main(["predict", str(tmp_path / "i.npy"), "-m", str(tmp_path / "bad.safetensors")])
    assert rc == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_info_prints_the_card(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "background, interior, boundary" in out
    assert "halo 20 px per side" in out


def test_train_new_model_from_json_and_fine_tune_it(tmp_path, capsys):
    from napari_unet.core import synthetic
    from napari_unet.io import load_model

    image, labels = synthetic.nuclei((96, 96), n=8, seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    out = tmp_path / "new.safetensors"
    arch = '{"depth": 2, "base_width": 4, "padding": "same"}'
    rc = main(
        [
            "train",
            "--images",
            str(tmp_path / "img.tif"),
            "--labels",
            str(tmp_path / "lab.tif"),
            "-m",
            arch,
            "--classes",
            "background,interior,boundary",
            "--label-kind",
            "instances",
            "-o",
            str(out),
            "--steps",
            "3",
            "--patch-size",
            "48",
            "--batch-size",
            "2",
            "--class-weights",
            "sqrt",
            "--contact-weight",
            "5",
            "--bf16",
            "-q",
        ]
    )
    assert rc == 0
    trained = load_model(out)
    assert trained.info.classes == ["background", "interior", "boundary"]
    assert trained.info.provenance["steps"] == 3
    assert trained.info.provenance["train_config"]["class_weighting"] == "sqrt"
    assert trained.info.provenance["train_config"]["contact_w0"] == 5.0
    assert trained.info.provenance["train_config"]["bf16"] is True
    assert trained.info.provenance["training_data"] == "img.tif"
    # fine-tune the result with sparse strokes
    strokes = np.zeros_like(labels, dtype=np.uint8)
    strokes[labels > 0] = 2
    strokes[:5] = 1
    tifffile.imwrite(tmp_path / "strokes.tif", strokes)
    out2 = tmp_path / "tuned.safetensors"
    assert (
        main(
            [
                "train",
                "--images",
                str(tmp_path / "img.tif"),
                "--labels",
                str(tmp_path / "strokes.tif"),
                "-m",
                str(out),
                "-o",
                str(out2),
                "--finetune",
                "--unlabelled",
                str(tmp_path / "img.tif"),
                "--steps",
                "2",
                "--seconds",
                "30",
                "--patch-size",
                "48",
                "--batch-size",
                "2",
                "-q",
            ]
        )
        == 0
    )
    tuned = load_model(out2).info.provenance
    # the file it was trained from, named after its file (not the network it started as)
    assert tuned["base_model"] == "new (new.safetensors)"
    assert tuned["lineage"] == "none (random weights) -> new (new.safetensors)"
    assert load_model(out).info.provenance["base_model"] == "none (random weights)"
    assert load_model(out2).info.name == "tuned"
    assert tuned["steps"] == 2
    recipe = tuned["train_config"]
    assert recipe["adapt_norm"] and recipe["pseudo_weight"] > 0 and recipe["max_seconds"] == 30
    # a stopped run is repeated with --stop-after: the schedule of --steps, ended early
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels"]
    args += [str(tmp_path / "strokes.tif"), "-m", str(out), "--finetune", "-q"]
    args += ["--steps", "3", "--stop-after", "1", "--patch-size", "48", "--batch-size", "2"]
    assert main([*args, "-o", str(tmp_path / "s.safetensors")]) == 0
    stopped = load_model(tmp_path / "s.safetensors").info.provenance
    assert stopped["steps"] == 1 and stopped["train_config"]["steps"] == 3
    # without --seconds, --steps is not re-timed against the recipe's 60 s budget (a
    # slower machine would plan fewer steps, and the replay would differ)
    assert stopped["train_config"]["max_seconds"] is None
    # mismatched lists and an empty annotation fail with one line
    assert (
        main(
            [
                "train",
                "--images",
                str(tmp_path / "img.tif"),
                "--labels",
                str(out2),
                str(out2),
                "-m",
                str(out),
                "-o",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 1
    )
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros_like(strokes))
    assert (
        main(
            [
                "train",
                "--images",
                str(tmp_path / "img.tif"),
                "--labels",
                str(tmp_path / "empty.tif"),
                "-m",
                str(out),
                "-o",
                str(tmp_path / "y.safetensors"),
                "-q",
            ]
        )
        == 1
    )
    assert "labels are empty" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


def test_outputs_that_would_replace_an_input_or_each_other_are_refused(
    tmp_path, model_file, image, capsys
):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "img.tif", image)
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "a/img.tif"), str(tmp_path / "b/img.tif")]
              + ["-m", str(model_file), "-o", str(out), "-q"])  # fmt: skip
    assert rc == 1 and "would both be written to" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    src = tmp_path / "a/img.tif"
    rc = main(["predict", str(src), "-m", str(model_file), "-o", str(src), "-q"])
    assert rc == 1 and "is or holds an input" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(src), image)


def _train_args(tmp_path, out, steps=50):
    from napari_unet.core import synthetic

    image, labels = synthetic.nuclei((64, 64), n=5, seed=2)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    return ["train", "--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
            "-m", '{"depth": 2, "base_width": 4, "padding": "same"}', "--label-kind", "instances",
            "-o", str(out), "--steps", str(steps), "--patch-size", "32", "--batch-size", "1",
            "-q"]  # fmt: skip


def test_train_refuses_an_unwritable_output_before_training(tmp_path, capsys, monkeypatch):
    from napari_unet.core import training
    from napari_unet.io import registry

    def never(*args, **kwargs):
        raise AssertionError("trained although the output cannot be written")

    monkeypatch.setattr(training, "train_iter", never)
    bundled = registry.bundled_path(registry.default_model())
    assert main(_train_args(tmp_path, bundled)) == 1
    assert "is a bundled model" in capsys.readouterr().err
    (tmp_path / "dir.safetensors").mkdir()
    assert main(_train_args(tmp_path, tmp_path / "dir.safetensors")) == 1
    assert "is a folder" in capsys.readouterr().err
    # the base model is never replaced by its fine-tuned self (nor an image by a model)
    base = tmp_path / "base.safetensors"
    from napari_unet.io.files import save_model

    save_model(tiny_model("same"), base)
    before = base.read_bytes()
    args = _train_args(tmp_path, base)
    args[args.index("-m") + 1] = str(base)
    assert main(args) == 1
    assert "is one of the inputs" in capsys.readouterr().err and base.read_bytes() == before
    assert main(["export", str(base), "--bioimageio", str(base)]) == 1
    assert "is one of the inputs" in capsys.readouterr().err and base.read_bytes() == before


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_first_ctrl_c_stops_training_and_saves_the_result(tmp_path, capsys, monkeypatch, signum):
    """SIGTERM (a cluster job's time limit) too: it threw the run away."""
    import os
    import signal

    from napari_unet.core import training
    from napari_unet.io import load_model

    real = training.train_iter

    def train_iter(*args, **kwargs):
        """The real generator, with Ctrl-C pressed during step 2."""
        gen = real(*args, **kwargs)
        try:
            while True:
                step = next(gen)
                if getattr(step, "step", None) == 2:  # (not a setup Phase)
                    os.kill(os.getpid(), getattr(signal, signum))
                yield step
        except StopIteration as end:
            return end.value

    monkeypatch.setattr(training, "train_iter", train_iter)
    # restored as they were (a shell's background job starts with SIGINT ignored)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    assert "stopped at step 3, saved" in capsys.readouterr().err
    assert load_model(out).info.provenance["steps"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_during_the_first_step_says_the_step_is_saved(tmp_path, capsys, monkeypatch):
    """It said 'stopping before the first step (nothing to save)', then saved the step
    (found by review): the first step had begun, and its report not come yet."""
    import os
    import signal

    from napari_unet.core.train_step import Stepper
    from napari_unet.io import load_model

    real = Stepper.step

    def step(self, batch, lr, n):
        if n == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, lr, n)

    monkeypatch.setattr(Stepper, "step", step)
    out = tmp_path / "first.safetensors"
    assert main(_train_args(tmp_path, out)) == 0
    err = capsys.readouterr().err
    assert "stopping after this step and saving" in err and "nothing to save" not in err
    assert "stopped at step 1, saved" in err and load_model(out).info.provenance["steps"] == 1


def test_train_is_reproducible_from_scratch_and_refuses_bad_settings(tmp_path, capsys):
    from napari_unet.io import load_model

    for name in ("a", "b"):
        assert main(_train_args(tmp_path, tmp_path / f"{name}.safetensors", steps=2)) == 0
    a, b = (load_model(tmp_path / f"{n}.safetensors").net.state_dict() for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the initial weights are seeded too
    # workers draw each batch from its own seed: their number does not change the run
    for name, n in (("w1", "1"), ("w2", "2")):
        out = tmp_path / f"{name}.safetensors"
        assert main([*_train_args(tmp_path, out, steps=2), "--workers", n]) == 0
    w1, w2 = (load_model(tmp_path / f"{n}.safetensors") for n in ("w1", "w2"))
    assert all(torch.equal(w1.net.state_dict()[k], w2.net.state_dict()[k]) for k in a)
    assert w2.info.provenance["train_config"]["workers"] == 2
    capsys.readouterr()
    bad = _train_args(tmp_path, tmp_path / "c.safetensors")
    assert main([*bad, "--batch-size", "0"]) == 1
    assert "batch_size must be a whole number of at least 1" in capsys.readouterr().err
    assert main([*bad, "--val-labels", str(tmp_path / "lab.tif")]) == 1
    assert "0 validation images but 1 label images" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: its usage line and exit status 2
        main([*bad, "--workers", "-1"])
    assert "--workers: must be between 0 and 256, got -1" in capsys.readouterr().err
    # instance masks given as strokes (the default kind): the error says what to do
    strokes = _train_args(tmp_path, tmp_path / "c.safetensors")
    strokes[strokes.index("--label-kind") + 1] = "sparse"
    assert main(strokes) == 1
    assert "--label-kind instances" in capsys.readouterr().err


def test_predict_checks_inputs_and_outputs_before_any_work(tmp_path, model_file, image, capsys):
    import zarr

    group = zarr.open_group(str(tmp_path / "grp.zarr"), mode="w")
    group.create_array("raw", shape=image.shape, dtype=image.dtype)[:] = image
    rc = main(["predict", str(tmp_path / "grp.zarr" / "raw"), "-m", str(model_file),
               "--mode", "labels", "-o", str(tmp_path / "grp.zarr"), "-q"])  # fmt: skip
    assert rc == 1 and "is or holds an input" in capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "grp.zarr" / "raw"))[:], image)
    # one missing input: nothing is processed, so no half-done batch
    tifffile.imwrite(tmp_path / "a.tif", image)
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "a.tif"), str(tmp_path / "gone.tif"),
               "-m", str(model_file), "-o", str(out), "-q"])  # fmt: skip
    assert rc == 1 and "no such file" in capsys.readouterr().err and not out.exists()
    # an input or output it cannot read or write, seen by its name: before the first result
    (tmp_path / "b.jpg").write_bytes(b"jpeg")
    for args in (["b.jpg"], ["-o", str(out / "x.png")], ["--mode", "instances", "-o",
                 str(tmp_path / "i.zarr")]):  # fmt: skip
        if args[0] == "b.jpg":
            args = [str(tmp_path / "b.jpg"), "-o", str(out)]
        rc = main(["predict", str(tmp_path / "a.tif"), *args, "-m", str(model_file), "-q"])
        assert rc == 1 and not out.exists() and not (tmp_path / "i.zarr").exists()
        err = capsys.readouterr().err
        assert any(w in err for w in ("unsupported", "write .tif", "TIFF")), err
    # nothing is written into the zarr store that holds an input
    for dst in ("grp.zarr/seg.zarr", "grp.zarr/raw/x.tif"):
        rc = main(["predict", str(tmp_path / "grp.zarr" / "raw"), "-m", str(model_file),
                   "--mode", "labels", "-o", str(tmp_path / dst), "-q"])  # fmt: skip
        assert rc == 1 and "inside the zarr store grp.zarr" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "grp.zarr").iterdir()) == ["raw", "zarr.json"]
    # a corrupt compressed tile, read lazily while the tiles run: one line, the file named
    for compression in ("zlib", "lzma"):
        _corrupt_tiff(tmp_path / "t.tif", image, compression)
        rc = main(["predict", str(tmp_path / "t.tif"), "-m", str(model_file), "-q"])
        assert rc == 1 and "t.tif: its image data is corrupt" in capsys.readouterr().err
    # an output folder that cannot be made: refused before the model runs
    (tmp_path / "plain").write_text("a file, not a folder")
    rc = main(["predict", str(tmp_path / "a.tif"), "-m", str(model_file),
               "-o", str(tmp_path / "plain" / "o.tif"), "-q"])  # fmt: skip
    assert rc == 1 and "cannot write to" in capsys.readouterr().err
    # an existing folder is a folder, dots in its name or not
    (tmp_path / "run.2024").mkdir()
    rc = main(["predict", str(tmp_path / "a.tif"), "-m", str(model_file),
               "-o", str(tmp_path / "run.2024"), "-q"])  # fmt: skip
    assert rc == 0 and (tmp_path / "run.2024" / "a_instances.tif").exists()
    with pytest.raises(SystemExit):  # argparse: out of range
        main(["predict", str(tmp_path / "a.tif"), "--threshold", "2"])
    capsys.readouterr()


def test_class_names_are_for_new_networks_and_must_be_distinct(tmp_path, model_file, capsys):
    args = _train_args(tmp_path, tmp_path / "c.safetensors", steps=1)
    model = args.index("-m") + 1
    assert main([*args[:model], str(model_file), *args[model + 1 :], "--classes", "a,b,c"]) == 1
    assert "--classes names the classes of a new network" in capsys.readouterr().err
    assert main([*args, "--classes", "a,,b"]) == 1
    assert "distinct, non-empty names" in capsys.readouterr().err


def test_axes_recorded_in_ome_and_imagej_tiffs_are_used(tmp_path, model_file, capsys):
    from napari_unet.io import load_model
    from napari_unet.io.image_metadata import image_axes

    # two channels for a one-channel model: segmented one by one, as the panel does (it
    # was refused without a word of what to do), and written as channels
    stack = (np.random.default_rng(3).random((2, 48, 48)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.ome.tif", stack, metadata={"axes": "CYX"})
    out = tmp_path / "c_classes.tif"
    rc = main(["predict", str(tmp_path / "c.ome.tif"), "-m", str(model_file), "--mode",
               "labels", "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and "the 2 channels are segmented one by one" in capsys.readouterr().err
    model = load_model(model_file)
    expected = [predict(channel, model, output="labels") for channel in stack]
    np.testing.assert_array_equal(tifffile.imread(out), np.stack(expected))
    assert image_axes(out) == "CYX"
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "z_labels.tif"
    rc = main(["predict", str(tmp_path / "z.tif"), "-m", str(model_file), "--mode", "labels",
               "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and tifffile.imread(out).shape == (2, 48, 48)
    # the file's axes give way to --axes
    rc = main(["predict", str(tmp_path / "c.ome.tif"), "-m", str(model_file), "--axes", "ZYX",
               "--mode", "labels", "-o", str(tmp_path / "c_labels.tif"), "-q"])  # fmt: skip
    assert rc == 0


def test_an_empty_model_name_is_an_error_not_the_default(capsys):
    assert main(["info", ""]) == 1
    assert "the model name is empty" in capsys.readouterr().err


def test_output_cut_short_by_a_pipe_ends_quietly(monkeypatch, capsys):
    """`napari-unet models | head -1` printed '[Errno 32] Broken pipe' and exited 1."""
    import sys

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("builtins.print", closed)
    assert main(["models"]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    assert sys.stdout is not None


def test_diameter_must_be_pixels_auto_or_off(tmp_path, model_file, image, capsys):
    """Even for a model that records no object size (it said so, not that 'abc' is no
    diameter)."""
    tifffile.imwrite(tmp_path / "i.tif", image)
    args = [
        "predict",
        str(tmp_path / "i.tif"),
        "-m",
        str(model_file),
        "-o",
        str(tmp_path / "o.tif"),
    ]
    assert main([*args, "--diameter", "abc"]) == 1
    assert "--diameter takes pixels, 'auto' or 'off', got 'abc'" in capsys.readouterr().err


def test_a_batch_stops_before_any_result_for_an_input_the_model_cannot_take(
    tmp_path, model_file, image, capsys
):
    tifffile.imwrite(tmp_path / "a.tif", image)
    np.save(tmp_path / "mask.npy", image > 500)  # a mask, not an image
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "a.tif"), str(tmp_path / "mask.npy"),
               "-m", str(model_file), "-o", str(out), "-q"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "mask.npy" in err and "nothing was processed" in err, err
    assert not out.exists()
    # a folder of images, a corrupt TIFF, and an extension-less output that is a file
    (tmp_path / "folder").mkdir()
    rc = main(["predict", str(tmp_path / "folder"), "-m", str(model_file), "-q"])
    assert rc == 1 and "is a folder: pass its images, e.g. folder/*.tif" in capsys.readouterr().err
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage" * 10)
    rc = main(["predict", str(tmp_path / "bad.tif"), "-m", str(model_file), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.tif: cannot read image" in err and "shape (0,)" not in err, err
    (tmp_path / "notes").write_text("a file")
    rc = main(["predict", str(tmp_path / "a.tif"), "-m", str(model_file),
               "-o", str(tmp_path / "notes"), "-q"])  # fmt: skip
    assert rc == 1 and "is a file; give the result a name" in capsys.readouterr().err


def test_a_zarr_result_of_a_model_with_an_object_size_warns_it_is_not_rescaled(
    tmp_path, image, capsys
):
    model = save_model(tiny_model("valid", object_diameter=20.0), tmp_path / "d.safetensors")
    tifffile.imwrite(tmp_path / "a.tif", image)
    args = ["predict", str(tmp_path / "a.tif"), "-m", str(model), "--mode", "labels", "-q"]
    assert main([*args, "-o", str(tmp_path / "a.zarr")]) == 0
    assert "a .zarr result is segmented at the image's own scale" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "b.zarr"), "--diameter", "off"]) == 0
    assert "own scale" not in capsys.readouterr().err


def test_a_y_x_1_image_is_one_grayscale_plane(tmp_path, model_file, image):
    tifffile.imwrite(tmp_path / "yx1.tif", image[..., None], photometric="minisblack")
    np.save(tmp_path / "yx1.npy", image[..., None])
    tifffile.imwrite(tmp_path / "yx.tif", image)
    for name in ("yx", "yx1", "yx1.npy"):
        src = tmp_path / (name if name.endswith(".npy") else f"{name}.tif")
        dst = tmp_path / f"{src.stem}_{src.suffix[1:]}_out.tif"
        assert main(["predict", str(src), "-m", str(model_file), "-o", str(dst), "-q"]) == 0
    ref = tifffile.imread(tmp_path / "yx_tif_out.tif")
    assert ref.shape == image.shape
    for name in ("yx1_tif_out.tif", "yx1_npy_out.tif"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / name), ref)


def test_a_new_three_class_network_on_instance_masks_gets_their_classes(tmp_path, capsys):
    """Its instances come from the watershed of background / interior / boundary: named
    class0..class2, the boundary class was taken as the objects (F1 0)."""
    from napari_unet.core.postprocess import default_recipe
    from napari_unet.io import load_model

    args = _train_args(tmp_path, tmp_path / "three.safetensors", steps=2)
    args[args.index("-m") + 1] = (
        '{"depth": 2, "base_width": 4, "padding": "same", "num_classes": 3}'
    )
    assert main(args) == 0
    info = load_model(tmp_path / "three.safetensors").info
    assert info.classes == ["background", "interior", "boundary"]
    assert default_recipe(info.classes)["method"] == "watershed"
    # a time budget plans the steps first: how to repeat the run is printed
    capsys.readouterr()
    args = [*args, "--seconds", "2"]
    args[args.index("-o") + 1] = str(tmp_path / "timed.safetensors")
    assert main(args) == 0
    prov = load_model(tmp_path / "timed.safetensors").info.provenance
    planned = prov["train_config"]["steps"]
    err = capsys.readouterr().err
    assert f"{prov['steps']} of {planned} planned steps; to repeat this run exactly: " in err
    assert f"--steps {planned} in place of --seconds with the other options" in err
    assert f"or --settings-from {tmp_path / 'timed.safetensors'}" in err
    # an output named only by its extension is refused before training
    args[args.index("-o") + 1] = str(tmp_path / ".safetensors")
    assert main(args) == 1
    assert "a file name ending in .safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["napari_unet", "napari_unet.cli"])
def test_python_dash_m_runs_the_command(module, tmp_path):
    """`python -m napari_unet.cli train ...` did nothing and exited 0."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, "info", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "napari-unet: error" in done.stderr and "missing.safetensors" in done.stderr


def test_a_trained_model_that_cannot_be_written_is_rescued_not_lost(tmp_path, capsys, monkeypatch):
    """A full disk raised safetensors' own error (not an OSError): a raw traceback, and
    the hour of training was lost."""
    import tempfile

    import safetensors.torch

    from napari_unet.io import load_model

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "rescue" not in str(filename):
            raise Exception("Error while serializing: I/O error: No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    out = tmp_path / "trained.safetensors"
    assert main(_train_args(tmp_path, out, steps=3)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "the trained model was saved to" in err[0]
    (rescued,) = (tmp_path / "rescue").glob("trained-*.safetensors")
    assert rescued.name in err[0] and load_model(rescued).info.provenance["steps"] == 3
    assert not out.exists() and not list(tmp_path.glob(".trained*"))  # no partial file


def test_an_error_in_a_batch_names_its_input(tmp_path, model_file, image, capsys):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, image.astype(np.float32))
    nan = image.astype(np.float32)
    nan[5, 5] = np.nan
    np.save(bad, nan)
    rc = main(
        ["predict", str(good), str(bad), "-m", str(model_file), "-o", str(tmp_path / "out"), "-q"]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert (
        f"error: {bad}: " in err
        and "NaN" in err
        and "the 1 input(s) before it were written" in err
    )
    assert (tmp_path / "out" / "good.tif").exists() or list((tmp_path / "out").glob("good*"))


def test_sigterm_stops_a_command_as_ctrl_c_does():
    import os
    import signal

    from napari_unet.cli import _terminate_interrupts

    with pytest.raises(KeyboardInterrupt), _terminate_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class _OneAtATime(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        if x.shape[0] > 1:
            raise ValueError("one tile at a time")
        return self.conv(x)


def test_an_error_raised_by_a_torchscript_model_is_one_line(tmp_path, image, capsys):
    torch.jit.save(torch.jit.script(_OneAtATime()), str(tmp_path / "one.pt"))
    src = tmp_path / "img.npy"
    np.save(src, np.tile(image, (4, 4)))
    args = ["predict", str(src), "-m", str(tmp_path / "one.pt"), "-o", str(tmp_path / "o.tif")]
    assert main([*args, "-q", "--tile", "128", "--batch-size", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"napari-unet: error: {src}: the model failed: ValueError: one tile at a time "
        "(nothing was written)"
    ]


def test_results_keep_the_image_s_planes_and_pixel_size(tmp_path, model_file):
    """A ZYX ImageJ stack of 0.5 um pixels, 2 um apart, gave a plain TIFF: Fiji opened
    it as uncalibrated pixels (and a T, Z, C stack as one pile of slices)."""
    from napari_unet.io.image_metadata import image_axes, image_calibration

    stack = (np.random.default_rng(3).random((3, 48, 48)) * 1000).astype(np.uint16)
    src = tmp_path / "z.tif"
    tifffile.imwrite(
        src,
        stack,
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"axes": "ZYX", "spacing": 2.0, "unit": "micron"},
    )
    assert image_calibration(src) == {"x": 0.5, "y": 0.5, "z": 2.0, "unit": "micron"}
    # an ImageJ hyperstack where ImageJ can hold it, else an OME-TIFF (uint32 objects,
    # classes before Z: the Z spacing was dropped)
    kinds = [
        ("labels", "ZYX", True),
        ("instances", "ZYX", False),
        ("probabilities", "CZYX", False),
    ]
    for mode, axes, imagej in kinds:
        out = tmp_path / f"{mode}.tif"
        rc = main(["predict", str(src), "-m", str(model_file), "--mode", mode, "-o", str(out),
                   "-q", "--tile", "48"])  # fmt: skip
        assert rc == 0
        assert image_axes(out) == axes
        with tifffile.TiffFile(out) as tf:
            assert (tf.is_imagej, tf.is_ome) == (imagej, not imagej)
            shape = tf.series[0].shape
        assert image_calibration(out) == {"x": 0.5, "y": 0.5, "z": 2.0, "unit": "micron"}
        assert shape == ((3, 3, 48, 48) if mode == "probabilities" else (3, 48, 48))
    # an OME-TIFF's sizes are kept too; a file without any gets none
    tifffile.imwrite(
        tmp_path / "o.ome.tif",
        stack[0],
        metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    assert image_calibration(tmp_path / "o.ome.tif") == {"x": 0.25, "y": 0.25, "unit": "micron"}
    np.save(tmp_path / "n.npy", stack[0])
    assert image_calibration(tmp_path / "n.npy") == {}


def test_odd_calibrations_are_dropped_or_converted_never_a_lost_result(tmp_path, model_file):
    """An OME size of 0, a unit written with a non-ASCII letter, NaN: the result was
    computed, then not written (a ZeroDivisionError traceback, or 'ascii' codec...)."""
    import warnings

    from napari_unet.io.image_metadata import image_calibration
    from napari_unet.io.images import write_image

    plane = (np.random.default_rng(4).random((48, 48)) * 1000).astype(np.uint16)

    def ome(name, **pixels):
        tifffile.imwrite(tmp_path / name, plane, metadata={"axes": "YX", **pixels})
        return image_calibration(tmp_path / name)

    assert ome("zero.ome.tif", PhysicalSizeX=0, PhysicalSizeY=0) == {}
    assert ome("a.ome.tif", PhysicalSizeX=2, PhysicalSizeXUnit="Å", PhysicalSizeY=2,
               PhysicalSizeYUnit="Å") == {"x": 2e-4, "y": 2e-4, "unit": "micron"}  # fmt: skip
    # sizes in nm beside a Z step in um, an interval in ms: one unit, seconds
    cal = ome("mix.ome.tif", PhysicalSizeX=250, PhysicalSizeXUnit="nm", PhysicalSizeY=250,
              PhysicalSizeYUnit="nm", PhysicalSizeZ=2, TimeIncrement=500,
              TimeIncrementUnit="ms")  # fmt: skip
    assert cal.pop("unit") == "micron"
    assert cal == pytest.approx({"x": 0.25, "y": 0.25, "z": 2.0, "t": 0.5})
    assert ome("onlyx.ome.tif", PhysicalSizeX=0.25) == {}  # no Y: no pixel size, no unit
    tifffile.imwrite(tmp_path / "mu.tif", plane, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "YX", "unit": "\\u00b5m"})  # fmt: skip
    assert image_calibration(tmp_path / "mu.tif") == {"x": 0.5, "y": 0.5, "unit": "micron"}
    # ImageJ's interval in its own time unit; a length unit outside the table is kept
    meta = {"axes": "TYX", "unit": "inch", "finterval": 5, "tunit": "min"}
    tifffile.imwrite(tmp_path / "t.tif", plane[None].repeat(2, 0), imagej=True,
                     resolution=(300.0, 300.0), metadata=meta)  # fmt: skip
    cal = image_calibration(tmp_path / "t.tif")
    assert cal == {"x": pytest.approx(1 / 300), "y": pytest.approx(1 / 300), "t": 300.0,
                   "unit": "inch"}  # fmt: skip
    for name in ("zero.ome.tif", "a.ome.tif", "mu.tif"):
        out = tmp_path / f"{name}.labels.tif"
        rc = main(["predict", str(tmp_path / name), "-m", str(model_file), "--mode", "labels",
                   "-o", str(out), "-q"])  # fmt: skip
        assert rc == 0 and tifffile.imread(out).shape == (48, 48)
    # metadata tifffile refuses: the result is written without it, with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_image(
            tmp_path / "nan.tif", plane, "YX", {"x": float("nan"), "y": 1.0, "unit": "micron"}
        )
    assert tifffile.imread(tmp_path / "nan.tif").shape == (48, 48)
    assert any("written without the image's calibration" in str(w.message) for w in caught)


def test_a_signal_while_the_model_is_written_keeps_it(tmp_path, capsys, monkeypatch):
    """One SIGTERM (or Ctrl-C) during the write aborted it: the run was lost."""
    import os
    import signal

    import napari_unet.io.files as files_mod
    from napari_unet.io import load_model

    real = files_mod.save_model

    def save_model(model, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(files_mod, "save_model", save_model)
    out = tmp_path / "m.safetensors"
    assert main(_train_args(tmp_path, out, steps=3)) == 0
    assert load_model(out).info.provenance["steps"] == 3
    err = capsys.readouterr().err
    assert "finishing writing the model" in err and "stopped at step" not in err


def test_a_rescue_that_fails_too_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tempfile

    import napari_unet.io.files as files_mod

    def save_model(model, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_mod, "save_model", save_model)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "rescue"))
    (tmp_path / "rescue").mkdir()
    assert main(_train_args(tmp_path, tmp_path / "m.safetensors", steps=3)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not list((tmp_path / "rescue").iterdir())


def test_predict_reads_rgb_files_as_their_luminance_for_one_channel_models(
    tmp_path, model_file, image, capsys
):
    """PNG / RGB TIFF inputs for a one-channel model: the gray the panel uses, not a
    stack of 3-pixel slivers (the refusal suggested axes 'ZYX', which gave that)."""
    import imageio.v3 as iio

    gray = (image // 4).astype(np.uint8)
    rgb = np.stack([gray, gray, gray], axis=-1)  # luminance of gray RGB is the gray
    ref = predict(gray, tiny_model("valid")).argmax(0)
    for name, write in [
        ("rgb.png", lambda p: iio.imwrite(p, rgb)),
        ("rgb.tif", lambda p: tifffile.imwrite(p, rgb, photometric="rgb")),
        ("rgba.png", lambda p: iio.imwrite(p, np.dstack([rgb, np.full_like(gray, 255)]))),
        ("la.png", lambda p: iio.imwrite(p, np.dstack([gray, np.full_like(gray, 255)]))),
        ("la.tif", lambda p: tifffile.imwrite(p, np.stack([np.dstack([gray, gray])] * 2))),
    ]:
        src = tmp_path / name
        write(src)
        out = tmp_path / f"{name}.labels.tif"
        args = ["predict", str(src), "-m", str(model_file), "-o", str(out), "--mode", "labels"]
        assert main([*args, "-q"]) == 0, name
        result = tifffile.imread(out)
        if name == "la.tif":  # a stack of two gray + alpha images
            assert result.shape == (2, *gray.shape)
            result = result[1]
        assert result.shape == gray.shape, name
        np.testing.assert_array_equal(result, ref, err_msg=name)
        note = "alpha channel left out" if name[:2] == "la" else "RGB converted to grayscale"
        assert f"{src}: {note}" in capsys.readouterr().err
    # axes given by the user are taken as given: (Z, Y, X) of 3-pixel-wide images
    out = tmp_path / "zyx.tif"
    assert main(["predict", str(tmp_path / "rgb.tif"), "-m", str(model_file), "-o", str(out),
                 "--axes", "ZYX", "-q", "--mode", "labels"]) == 0  # fmt: skip
    assert tifffile.imread(out).shape == rgb.shape


def test_predict_progress_bar_counts_tiles_and_says_the_phases(
    tmp_path, model_file, image, capsys
):
    """The bar ended at '1/1 [..., 74 s/tile]' after 1,024 tiles: the post-processing's
    report (1 of 1) took its total."""
    from napari_unet.core.tile_plan import plan_tiles

    src = tmp_path / "img.npy"
    np.save(src, image)
    n = plan_tiles(image.shape, tiny_model("valid").info.geometry, 60).n_tiles
    assert n > 1
    assert main(["predict", str(src), "-m", str(model_file), "--tile", "60"]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("img.npy")][-1]
    assert f"{n}/{n}" in last and "finding objects" in last, last


def test_train_settings_from_a_model_repeat_its_run_exactly(tmp_path, capsys):
    """A version made with settings the CLI has no option for (augmentation off, frozen
    encoder, stopped early) was not repeatable by the command the README gave."""
    from napari_unet.core import synthetic
    from napari_unet.core.augment import AugmentConfig
    from napari_unet.core.targets import instances_to_classes
    from napari_unet.core.training import TrainConfig, train
    from napari_unet.io import load_model

    image, labels = synthetic.nuclei((64, 64), n=6, seed=3)
    strokes = synthetic.strokes(instances_to_classes(labels), 80, seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "strokes.tif", strokes)
    base = tmp_path / "base.safetensors"
    save_model(tiny_model("same", depth=2), base)
    cfg = TrainConfig.finetune(
        steps=6, max_seconds=None, stop_after=4, seed=7, lr=3e-3, batch_size=2,
        patch_size=48, freeze_encoder=True, device="cpu",
        augment=AugmentConfig(flips=False, rotations=False, intensity=0.0, noise=0.0),
    )  # fmt: skip
    made = train(load_model(base), [image], [strokes], "sparse", cfg)
    version = save_model(made, tmp_path / "v1.safetensors")
    assert made.info.provenance["steps"] == 4
    card = load_model(version).info.card()
    assert "seed 7" in card and "freeze_encoder True" in card and "augment off" in card
    again = tmp_path / "again.safetensors"
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels",
            str(tmp_path / "strokes.tif"), "-m", str(base), "-o", str(again), "-q"]  # fmt: skip
    assert main([*args, "--settings-from", str(version)]) == 0
    a, b = load_model(version).net.state_dict(), load_model(again).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(again).info.provenance["steps"] == 4
    # an option given as well overrides the recorded one
    assert main([*args, "--settings-from", str(version), "--seed", "8"]) == 0
    other = load_model(again).net.state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)
    # a model that records no training settings is refused in one line
    capsys.readouterr()
    assert main([*args, "--settings-from", str(base)]) == 1
    assert "records no training settings" in capsys.readouterr().err
    # the repeat line of a repeated run names the file, which carries every setting
    assert main([*args, "--settings-from", str(version)]) == 0
    err = capsys.readouterr().err
    assert f"to repeat this run exactly: --settings-from {again}" in err
    assert "warning" not in err  # the same base, architecture and files: nothing to say
    # another base model, or another architecture, is said (the weights came out other)
    other_base = save_model(tiny_model("same", depth=2, seed=5), tmp_path / "other.safetensors")
    args[args.index(str(base))] = str(other_base)
    assert main([*args, "--settings-from", str(version)]) == 0
    err = capsys.readouterr().err
    assert "was trained from unet (base.safetensors), given unet (other.safetensors)" in err
    assert "another architecture" not in err
    new_net = '{"depth": 1, "base_width": 4, "padding": "same", "num_classes": 3}'
    args[args.index(str(other_base))] = new_net
    assert main([*args, "--settings-from", str(version)]) == 0
    err = capsys.readouterr().err
    assert "given none (random weights)" in err and "has another architecture" in err
    args[args.index(new_net)] = str(base)
    # other steps given: not where the recorded run was stopped
    assert main([*args, "--settings-from", str(version), "--steps", "5"]) == 0
    assert load_model(again).info.provenance["steps"] == 5


def test_train_settings_from_takes_the_label_kind_and_refuses_hostile_settings(tmp_path, capsys):
    """Class masks repeated as strokes (class 0 read as not annotated); settings a file
    may carry: a switch "no" taken as on, a text learning rate failing deep inside, a
    batch of 1e9 patches filling the memory."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from napari_unet.io import load_model

    image, labels = np.zeros((48, 48), np.float32), np.zeros((48, 48), np.uint8)
    image[10:30, 10:30], labels[10:30, 10:30] = 1.0, 1
    labels[12:28, 12:28] = 2
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "classes.tif", labels)
    base = save_model(tiny_model("same", depth=2), tmp_path / "base.safetensors")
    v1 = tmp_path / "v1.safetensors"
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels",
            str(tmp_path / "classes.tif"), "-m", str(base), "-q"]  # fmt: skip
    small = ["--steps", "2", "--patch-size", "32", "--batch-size", "2"]
    assert main([*args, "-o", str(v1), "--label-kind", "classes", *small]) == 0
    again = tmp_path / "again.safetensors"
    assert main([*args, "-o", str(again), "--settings-from", str(v1)]) == 0
    assert load_model(again).info.provenance["label_kind"] == "classes"
    a, b = load_model(v1).net.state_dict(), load_model(again).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def hostile(**changes):
        with safe_open(str(v1), "np") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        info = json.loads(meta["napari_unet"])
        info["provenance"]["train_config"].update(changes)
        meta["napari_unet"] = json.dumps(info)
        path = tmp_path / "hostile.safetensors"
        save_file(tensors, str(path), metadata=meta)
        capsys.readouterr()
        assert main([*args, "-o", str(again), "--settings-from", str(path)]) == 1
        return capsys.readouterr().err

    assert "freeze_encoder must be bool" in hostile(freeze_encoder="no")
    assert "lr must be float" in hostile(lr="0.001")
    err = hostile(batch_size=10**9)
    assert "batch_size must be at most 1024" in err and "hostile.safetensors" in err
    assert "elastic_grid must be from 2 to 64" in hostile(augment={"elastic_grid": 10**6})
    assert "does not know" in hostile(device="cuda")


def test_train_stopped_before_its_first_step_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM during the setup ended in a traceback, after 'saving'."""
    from napari_unet.core import training
    from napari_unet.core.cancel import Cancelled

    def stopped(*args, **kwargs):
        raise Cancelled(training.STOPPED_EARLY)
        yield

    monkeypatch.setattr(training, "train_iter", stopped)
    out = tmp_path / "m.safetensors"
    assert main(_train_args(tmp_path, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"napari-unet: {training.STOPPED_EARLY}; nothing was saved"]
    assert not out.exists()


def test_train_names_its_files_reads_palette_labels_and_records_what_it_read(tmp_path, capsys):
    from PIL import Image

    from napari_unet.core import synthetic
    from napari_unet.core.targets import instances_to_classes
    from napari_unet.io import load_model

    image, labels = synthetic.nuclei((64, 64), n=6, seed=3)
    tifffile.imwrite(tmp_path / "a.tif", image)
    rgb = np.repeat((image / image.max() * 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "b.png")  # trained as its gray, as predict reads it
    palette = Image.fromarray((instances_to_classes(labels) + 1).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "classes.png")  # the classes, not their colours
    tifffile.imwrite(tmp_path / "u.tif", image)
    base = save_model(tiny_model("same", depth=2), tmp_path / "base.safetensors")
    out = tmp_path / "v.safetensors"
    args = ["train", "--images", str(tmp_path / "a.tif"), str(tmp_path / "b.png"), "--labels",
            str(tmp_path / "classes.png"), str(tmp_path / "classes.png"), "-m", str(base),
            "-o", str(out), "--steps", "2", "--patch-size", "32", "--batch-size", "1",
            "--unlabelled", str(tmp_path / "u.tif"), "-q"]  # fmt: skip
    assert main(args) == 0
    assert "b.png: RGB converted to grayscale" in capsys.readouterr().err
    prov = load_model(out).info.provenance
    assert prov["training_data"] == "a.tif, b.png" and prov["labels"] == "classes.png, classes.png"
    assert prov["unlabelled_data"] == "u.tif" and prov["train_config"]["adapt_norm"]
    # repeated: the file it came from is not overwritten; a file left out is said;
    # --finetune (another recipe) is refused; --unlabelled turns the adaptation on
    again = [*args[: args.index("--unlabelled")], "-q", "--settings-from", str(out)]
    assert main(again) == 1 and "one of the inputs" in capsys.readouterr().err
    again[again.index("-o") + 1] = str(tmp_path / "w.safetensors")
    assert main(again) == 0
    assert "trained with unlabelled data u.tif, given none" in capsys.readouterr().err
    assert main([*again, "--finetune"]) == 1
    assert "--finetune sets a recipe" in capsys.readouterr().err
    # a NaN in the second image names it
    bad = image.astype(np.float32)
    bad[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    args[args.index(str(tmp_path / "b.png"))] = str(tmp_path / "nan.tif")
    assert main(args) == 1
    assert "nan.tif: the image contains NaN" in capsys.readouterr().err
    args[args.index(str(tmp_path / "nan.tif"))] = str(tmp_path / "b.png")
    assert main([*args, "--val-images", str(tmp_path / "nan.tif"), "--val-labels",
                 str(tmp_path / "classes.png")]) == 1  # fmt: skip
    assert "validation data: nan.tif: the image contains NaN" in capsys.readouterr().err
    # channels are not planes to train on: refused, without predict's note
    tifffile.imwrite(tmp_path / "c.ome.tif", np.stack([image, image]), metadata={"axes": "CYX"})
    args[args.index(str(tmp_path / "b.png"))] = str(tmp_path / "c.ome.tif")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "train on 2D planes" in err and "one by one" not in err


def test_the_api_asks_for_a_list_of_images():
    from napari_unet.core.training import train

    with pytest.raises(TypeError, match="images are a list of arrays, one per image"):
        train(tiny_model("same"), np.zeros((2, 32, 32)), np.zeros((2, 32, 32), np.uint8))


def test_each_image_s_warnings_name_it(tmp_path, model_file, capsys):
    """Two blank images in a batch: one warning, naming neither (found by review)."""
    for name in ("b", "c"):
        np.save(tmp_path / f"{name}.npy", np.zeros((24, 24), np.uint16))
    args = ["predict", str(tmp_path / "b.npy"), str(tmp_path / "c.npy"), "-m", str(model_file)]
    assert main([*args, "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    for name in ("b", "c"):
        assert f"napari-unet: warning: {name}.npy: the image has a blank plane" in err


def test_train_model_json_that_is_not_settings_is_said_so(tmp_path, capsys):
    from napari_unet.core import synthetic

    image, labels = synthetic.nuclei((64, 64), n=4, seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    out = tmp_path / "new.safetensors"
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels"]
    args += [str(tmp_path / "lab.tif"), "-o", str(out), "--steps", "1", "-q", "-m"]
    for spec in ("[1, 2]", '["depth", 2]'):  # read as a model's name, it was not found
        assert main([*args, spec]) != 0
        err = capsys.readouterr().err
        assert "--model as JSON is an object of U-Net settings" in err
        assert "no model file" not in err and not out.exists()
    # a network far too large is refused before it is built (it filled the memory)
    assert main([*args, '{"depth": 5, "base_width": 1024}']) != 0
    err = capsys.readouterr().err
    assert "has 31,833 M parameters" in err and "at most 500 M" in err and not out.exists()
