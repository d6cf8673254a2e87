"""Packaging, layering and documentation checks."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = [
    "napari_unet.model",
    "napari_unet.model.receptive",
    "napari_unet.core.tiling",
    "napari_unet.core.training",
    "napari_unet.core.postprocess",
    "napari_unet.core.metrics",
    "napari_unet.io",
    "napari_unet.io.images",
    "napari_unet.cli",
]


def test_core_never_imports_qt_or_napari():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "qt = ('qtpy', 'napari', 'magicgui', 'PyQt6', 'PyQt5')\n"
        + "bad = [m for m in qt if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->(.*?)<!-- /setup -->", text, re.S).group(1)
    lines = [line.strip() for line in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("```", "<!--"))]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    install, tests = commands
    assert "pip install" in install and "napari-unet predict" in install
    assert "pytest" in tests and "xvfb-run" in tests
    ci = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
            " | grep -v '^<!--' | grep -v '^```' | sed '/^$/d'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ci == tests


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_lint_and_format_are_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        res = subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_manifest_is_valid_and_sample_data_opens():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "src" / "napari_unet" / "napari.yaml")
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == {"nuclei", "membranes"}
    from napari_unet._sample_data import membranes_sample, nuclei_sample

    (img, meta, kind), (lab, _, lab_kind) = nuclei_sample()
    assert (kind, lab_kind) == ("image", "labels")
    assert img.shape == lab.shape == (512, 512) and lab.max() > 50
    (img, _, _), (lab, _, _) = membranes_sample()
    assert set(np.unique(lab)) == {1, 2}


def test_sample_files_equal_the_generator():
    import tifffile

    from napari_unet.core import synthetic

    image, labels = synthetic.nuclei()
    np.testing.assert_array_equal(tifffile.imread(ROOT / "sample_data" / "nuclei.tif"), image)
    np.testing.assert_array_equal(
        tifffile.imread(ROOT / "sample_data" / "nuclei_labels.tif"), labels
    )
    image, labels = synthetic.membranes()
    np.testing.assert_array_equal(tifffile.imread(ROOT / "sample_data" / "membranes.tif"), image)


def test_plugin_is_discovered_by_napari_through_its_entry_point():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-unet")
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert widgets == {"U-Net model", "U-Net segment", "U-Net feature maps", "U-Net fine-tune"}
    menu = manifest.contributions.menus["napari/layers/segment"]
    assert {m.command for m in menu} == {c.command for c in manifest.contributions.widgets}
