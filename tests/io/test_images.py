"""Reading and writing image files: values survive, bad files say which file and why."""

import numpy as np
import pytest
import tifffile

from napari_unet.io.image_metadata import image_axes
from napari_unet.io.images import ZarrOutput, read_image, write_image


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_write_then_read_keeps_values_and_dtype(tmp_path, suffix):
    data = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    path = write_image(tmp_path / f"img{suffix}", data)
    back = np.asarray(read_image(path))
    assert back.dtype == np.uint16 and np.array_equal(back, data)
    assert [p.name for p in tmp_path.iterdir()] == [f"img{suffix}"]  # no temporary left


@pytest.mark.parametrize("compression", ["lzw", "zstd", "packbits", "jpeg"])
def test_tiffs_of_the_common_codecs_are_read(tmp_path, compression):
    # LZW above all (microscope and ImageJ exports); tifffile alone reads zlib and lzma
    data = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)
    tifffile.imwrite(tmp_path / "a.tif", data, tile=(32, 32), compression=compression)
    back = np.asarray(read_image(tmp_path / "a.tif")[:])
    if compression == "jpeg":  # lossy
        assert back.shape == data.shape and np.abs(back - data.astype(float)).mean() < 8
    else:
        np.testing.assert_array_equal(back, data)


def test_a_corrupt_tiff_names_the_file(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(b"garbage, not a tiff")
    with pytest.raises(ValueError, match=r"^scan\.tif: cannot read image"):
        read_image(path)


def test_a_stack_cut_short_is_refused_and_frames_saved_one_by_one_are_said(tmp_path):
    """A truncated ImageJ stack was read as one plane and segmented with exit 0; frames
    appended one by one (a series each) lost all but the first without a word."""
    plane = (np.random.default_rng(0).random((64, 64)) * 1000).astype(np.uint16)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, np.stack([plane] * 40), imagej=True, metadata={"axes": "ZYX"})
    assert read_image(whole).shape == (40, 64, 64)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        ValueError,
        match="cut.tif: a truncated or corrupt TIFF: its ImageJ header declares 40 planes",
    ):
        read_image(cut)
    frames = tmp_path / "frames.tif"
    for _ in range(3):
        tifffile.imwrite(frames, plane, append=True)
    with pytest.warns(
        UserWarning,
        match=r"frames.tif holds 3 image pages in 3 series; only "
        r"the first series \(64 x 64\) is read",
    ):
        assert read_image(frames).shape == (64, 64)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_an_ome_zarr_image_s_axes_are_read(tmp_path, version):
    """Its channel axis was read as time (a T, C, Z, Y, X image labelled S, T, Z, Y, X)."""
    import zarr

    root = tmp_path / "img.ome.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=2 if version == "0.4" else 3)
    group.create_array("0", shape=(1, 2, 3, 16, 16), dtype="uint16")
    scales = [
        {
            "axes": [{"name": n, "type": "space"} for n in "tczyx"],
            "datasets": [{"path": "0"}],
            "version": version,
        }
    ]
    group.attrs.update(
        {"multiscales": scales} if version == "0.4" else {"ome": {"multiscales": scales}}
    )
    assert image_axes(root / "0") == "TCZYX"
    plain = zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(3, 8, 8), dtype="u1")
    assert plain is not None and image_axes(tmp_path / "plain.zarr") is None


@pytest.mark.parametrize(
    "attrs",
    [
        [],
        {"multiscales": ["0"]},
        {"multiscales": [{"datasets": ["0"], "axes": ["y", "x"]}]},
        {"multiscales": [{"datasets": [{"path": "0"}], "axes": 5}]},
        {"multiscales": {"datasets": 3}},
        {"attributes": None},
        "yx",
    ],
)
def test_malformed_ome_zarr_metadata_leaves_the_axes_to_be_guessed(tmp_path, attrs):
    """A list or a string where NGFF has a dict raised AttributeError out of predict."""
    import json

    import zarr

    root = tmp_path / "img.ome.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=2).create_array(
        "0", shape=(16, 16), dtype="uint8"
    )
    (root / ".zattrs").write_text(json.dumps(attrs))
    (root / "zarr.json").write_text(json.dumps({"attributes": attrs}))
    assert image_axes(root / "0") is None


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"^objects\.npy: cannot read image"):
        read_image(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "absent.tif")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported image format"):
        read_image(other)


def test_a_zarr_group_asks_for_the_array(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array(
        "raw", shape=(4, 4), dtype="u1"
    )
    with pytest.raises(ValueError, match="a zarr group, not an array"):
        read_image(tmp_path / "g.zarr")
    assert read_image(tmp_path / "g.zarr" / "raw").shape == (4, 4)


def test_zarr_output_replaces_an_older_result_only_on_commit(tmp_path):
    target = tmp_path / "out.zarr"
    first = ZarrOutput(target, (8, 8), "u2")
    first.array[:] = 1
    first.commit()
    second = ZarrOutput(target, (8, 8), "u2")
    second.array[:] = 2
    assert np.asarray(read_image(target)).max() == 1  # old result intact while writing
    second.discard()
    assert np.asarray(read_image(target)).max() == 1
    third = ZarrOutput(target, (8, 8), "u2")
    third.array[:] = 3
    third.commit()
    assert np.asarray(read_image(target)).min() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_a_tiff_is_read_whole_when_tifffile_and_zarr_cannot_talk(tmp_path, monkeypatch):
    """zarr 2 with a recent tifffile (or zarr 3 with an old one) cannot open tifffile's
    store; the TIFF is then read into memory instead of failing."""
    import zarr

    data = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    write_image(tmp_path / "a.tif", data)

    def cannot(*args, **kwargs):
        raise TypeError("Unsupported type for store_like: 'ZarrTiffStore'")

    monkeypatch.setattr(zarr, "open", cannot)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "a.tif")), data)


def test_objects_of_a_time_series_keep_its_sizes_and_interval_in_an_ome_tiff(tmp_path):
    # uint32 objects cannot be an ImageJ hyperstack: their Z step and interval were lost
    from napari_unet.io.image_metadata import image_calibration

    labels = np.arange(2 * 3 * 8 * 9, dtype=np.uint32).reshape(2, 3, 8, 9) * 70_000
    cal = {"x": 250.0, "y": 250.0, "z": 2000.0, "t": 1.5, "unit": "nm"}
    out = write_image(tmp_path / "objects.tif", labels, "TZYX", cal)
    np.testing.assert_array_equal(tifffile.imread(out), labels)
    assert image_axes(out) == "TZYX"
    got = image_calibration(out)
    assert got.pop("unit") == "micron"
    assert got == pytest.approx({"x": 0.25, "y": 0.25, "z": 2.0, "t": 1.5})


def test_a_palette_png_is_its_indices_and_odd_types_are_still_written(tmp_path):
    # an 8-bit image saved with a LUT (Fiji's HiLo): its colours came back as RGB, and a
    # one-channel model read their gray, no longer monotonic in the data
    from PIL import Image

    data = np.arange(256, dtype=np.uint8).reshape(16, 16)
    im = Image.fromarray(data, mode="P")
    im.putpalette([0, 0, 255] + [v for i in range(1, 255) for v in (i, i, i)] + [255, 0, 0])
    im.save(tmp_path / "hilo.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "hilo.png")), data)
    # types an OME-TIFF cannot hold keep the tifffile description (they failed to write)
    for dtype in (np.int64, np.uint64, np.float16):
        out = write_image(
            tmp_path / f"{np.dtype(dtype).name}.tif", np.ones((2, 4, 5), dtype), "ZYX"
        )
        np.testing.assert_array_equal(tifffile.imread(out), np.ones((2, 4, 5), dtype))
        assert image_axes(out) is None


@pytest.mark.parametrize(
    ("axes", "shape", "dtype"),
    [
        ("CYX", (3, 40, 1), np.float32),  # probabilities of an image one pixel wide
        ("ZYX", (3, 40, 1), np.uint8),  # class labels of such a stack
        ("CYX", (3, 1, 1), np.float32),  # probabilities of a 1 x 1 image
        ("ZCYX", (2, 3, 1, 1), np.float32),
    ],
)
def test_results_of_one_pixel_wide_images_read_back(tmp_path, axes, shape, dtype):
    """tifffile's ImageJ hyperstack dropped their X axis: the files could not be read
    back, by napari-unet, tifffile or napari (found by review)."""
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    out = write_image(tmp_path / "r.tif", data, axes, {"x": 0.5, "y": 0.5, "unit": "micron"})
    np.testing.assert_array_equal(np.asarray(read_image(out)), data)
    np.testing.assert_array_equal(tifffile.imread(out), data)
    assert image_axes(out) == axes


@pytest.mark.parametrize(
    ("dtype", "axes", "kind"),
    [
        (np.uint8, "ZYX", "imagej"),  # class labels: an ImageJ hyperstack
        (np.uint32, "ZYX", "ome"),  # objects: an OME-TIFF
        (np.uint64, "ZYX", "shaped"),  # neither: tifffile's own description
        (np.float32, None, "shaped"),
    ],
)
def test_what_made_a_result_is_written_into_its_tiff(tmp_path, dtype, axes, kind):
    from napari_unet import __version__
    from napari_unet.io.image_metadata import image_about, image_calibration

    data = np.arange(2 * 6 * 7).reshape(2, 6, 7).astype(dtype)
    about = '{"model": "nuclei", "note": "<a & b>"}'  # JSON, and characters XML escapes
    out = write_image(
        tmp_path / "r.tif", data, axes, {"x": 0.5, "y": 0.5, "unit": "micron"}, about
    )
    with tifffile.TiffFile(out) as tf:
        assert {"imagej": tf.is_imagej, "ome": tf.is_ome, "shaped": tf.is_shaped}[kind]
        assert tf.pages[0].software == f"napari-unet {__version__}"
    np.testing.assert_array_equal(tifffile.imread(out), data)
    assert image_about(out) == about
    if kind != "shaped":  # the axes and pixel size are not lost to the record
        assert image_axes(out) == axes
        assert image_calibration(out)["x"] == pytest.approx(0.5)
    assert image_about(write_image(tmp_path / "plain.tif", data, axes)) is None
    assert image_about(tmp_path / "missing.tif") is None


def test_what_other_software_wrote_is_not_taken_for_a_run_record(tmp_path):
    from napari_unet.io.image_metadata import image_about

    data = np.zeros((2, 6, 7), np.uint8)
    fiji = tmp_path / "fiji.tif"  # an acquisition's Info, as Fiji keeps it
    tifffile.imwrite(fiji, data, imagej=True, metadata={"axes": "ZYX", "Info": "Objective 40x"})
    ome = tmp_path / "scope.ome.tif"
    tifffile.imwrite(ome, data.astype(np.uint32), ome=True, metadata={"Description": "scope 3"})
    assert image_about(fiji) is None and image_about(ome) is None


def test_a_result_written_without_its_calibration_keeps_its_record(tmp_path):
    from napari_unet.io.image_metadata import image_about

    data = np.zeros((2, 6, 7), np.uint8)
    about = '{"model": "nuclei"}'
    with pytest.warns(UserWarning, match="without the image's calibration"):
        out = write_image(tmp_path / "r.tif", data, "ZYX", {"x": 1e-30, "y": 1e-30}, about)
    np.testing.assert_array_equal(tifffile.imread(out), data)
    assert image_about(out) == about
