"""TorchScript files whose code would read or write files are refused before it runs
(found by review: `napari-unet info` of such a file overwrote the start of another file)."""

import zipfile

import pytest
import torch

from napari_unet.io import ModelFileError, load_model
from napari_unet.io.scripted import check_operators, load_script


class _Writes(torch.nn.Module):
    """forward writes through a file-backed tensor into ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x):
        t = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        return x + t[0].float() * 0.0


class _WritesOnLoad(torch.nn.Module):
    """``__setstate__``, which torch.jit.load runs, writes into ``victim`` (next to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.k = 1

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.k, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.training = state[1]
        t = torch.from_file("victim", shared=True, size=4, dtype=torch.uint8)
        t.fill_(66)
        self.k = state[0] + int(t[0])

    def forward(self, x):
        return x


class _Saves(torch.nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x):
        torch.save(x, self.path)
        return x


class _Collective(torch.nn.Module):
    """An operator of a namespace that is no computation (distributed collectives)."""

    def forward(self, x):
        return torch.ops._c10d_functional.wait_tensor(x)


class _Labelled(torch.nn.Module):
    """A network's own words: the profiler's labels and a message naming a save."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("give a batch; see model.save(path) in the docs")
        with torch.autograd.profiler.record_function("conv"):
            return self.conv(x)


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"user data")
    return victim


def test_a_torchscript_writing_a_file_in_forward_is_refused_and_the_file_kept(tmp_path):
    victim = _victim(tmp_path)
    torch.jit.script(_Writes(str(victim))).save(str(tmp_path / "w.pt"))
    with pytest.raises(ModelFileError, match=r"w\.pt: refused: .*torch\.from_file"):
        load_model(tmp_path / "w.pt")
    assert victim.read_bytes() == b"user data"


def test_a_torchscript_writing_a_file_while_it_loads_is_refused_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = _victim(tmp_path)
    torch.jit.script(_WritesOnLoad()).save("s.pt")
    victim.write_bytes(b"user data")
    with pytest.raises(ModelFileError, match=r"s\.pt: refused: .*torch\.from_file"):
        load_model(tmp_path / "s.pt")
    assert victim.read_bytes() == b"user data"


def test_a_torchscript_saving_a_file_is_refused(tmp_path):
    torch.jit.script(_Saves(str(tmp_path / "saved"))).save(str(tmp_path / "sv.pt"))
    with pytest.raises(ModelFileError, match=r"torch\.save"):
        load_model(tmp_path / "sv.pt")
    assert not (tmp_path / "saved").exists()


def test_operators_outside_the_computation_are_refused_from_the_graph(tmp_path):
    torch.jit.script(_Collective()).save(str(tmp_path / "p.pt"))
    with pytest.raises(ModelFileError, match=r"p\.pt: refused: .*'_c10d_functional'.*not comp"):
        load_script(tmp_path / "p.pt", "p.pt")
    # the graphs say it too, without the archive's text (what will run)
    with pytest.raises(ModelFileError, match=r"_c10d_functional::wait_tensor"):
        check_operators(torch.jit.script(_Collective()), "net")
    with pytest.raises(ModelFileError, match=r"aten::from_file, which reads or writes"):
        check_operators(torch.jit.script(_Writes(str(tmp_path / "x"))), "net")


def test_code_renamed_in_the_archive_is_read_too(tmp_path, monkeypatch):
    """torch finds its code under 'CODE/' too: the check skipped it and the file's
    __setstate__ wrote the victim while loading (found by review)."""
    monkeypatch.chdir(tmp_path)
    victim = _victim(tmp_path)
    torch.jit.script(_WritesOnLoad()).save("s.pt")
    victim.write_bytes(b"user data")
    with zipfile.ZipFile("s.pt") as src, zipfile.ZipFile("evil.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename.replace("/code/", "/CODE/"), src.read(info))
    with pytest.raises(ModelFileError, match=r"evil\.pt: refused: .*torch\.from_file"):
        load_model(tmp_path / "evil.pt")
    assert victim.read_bytes() == b"user data"


def test_a_network_s_own_words_and_profiler_labels_are_not_refused(tmp_path):
    torch.jit.script(_Labelled()).save(str(tmp_path / "l.pt"))
    net = load_script(tmp_path / "l.pt", "l.pt")
    assert net(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_a_network_s_torchscript_loads(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    check_operators(load_script(tmp_path / "net.pt", "net.pt"), "net.pt")
    loaded = load_script((tmp_path / "net.pt").read_bytes(), "net.pt")
    assert loaded(torch.zeros(1, 1, 8, 8)).shape == (1, 4, 8, 8)


class _Loops(torch.nn.Module):
    """forward never ends (for practical purposes), inside TorchScript's interpreter."""

    def forward(self, x):
        n = 0
        for _ in range(1000000000000):
            n += 1
        return x + n


def test_a_network_that_never_answers_is_refused_after_the_load_time_limit(tmp_path):
    """It hung `napari-unet info` and the model panel for good: Ctrl-C and SIGTERM are
    not heard inside TorchScript's interpreter. (Loaded in a process of its own: the
    thread that runs the network goes on until its program ends.)"""
    import subprocess
    import sys
    import time

    path = tmp_path / "loops.pt"
    torch.jit.save(torch.jit.script(_Loops()), str(path))
    code = (
        "from napari_unet.io import files\n"
        "files.LOAD_SECONDS = 1.0\n"
        "try:\n"
        f"    files.load_model({str(path)!r})\n"
        "except files.ModelFileError as err:\n"
        "    print(err)\n"
    )
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "loops.pt: its network did not answer small test inputs within 1 s" in done.stdout
    assert time.perf_counter() - began < 60  # (the program ended, the loop with it)
    # an ordinary model loads as before, its errors raised as they were
    assert load_model("nuclei").info.name == "nuclei"
    with pytest.raises(ModelFileError, match="no model file or bundled model"):
        load_model(tmp_path / "absent.safetensors")
