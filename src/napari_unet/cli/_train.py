"""``napari-unet train``: train or fine-tune a U-Net on image / label files."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from napari_unet.cli._inputs import label_images, training_images


def _base_model(spec: str, classes: str | None):
    import json

    from napari_unet.io import load_model
    from napari_unet.model.info import wrap_unet
    from napari_unet.model.unet import UNet, UNetConfig, check_size

    text = spec.strip()
    if text.endswith(".json") and Path(text).exists():
        text = Path(text).read_text()
    if not text.startswith(("{", "[")):  # (a list: JSON, though not settings)
        if classes:
            raise ValueError(
                "--classes names the classes of a new network (-m as JSON); "
                f"{spec} keeps its own: {', '.join(load_model(spec).info.classes)}"
            )
        return load_model(spec)
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model is not valid JSON: {err}") from None
    if not isinstance(arch, dict):
        raise ValueError('--model as JSON is an object of U-Net settings, e.g. {"depth": 4}')
    names = [c.strip() for c in classes.split(",")] if classes else None
    if names and (not all(names) or len(set(names)) != len(names)):
        raise ValueError(f"--classes needs distinct, non-empty names, got {classes!r}")
    if names:
        arch.setdefault("num_classes", len(names))
    config = UNetConfig.from_dict(arch)
    check_size(config)  # (refused before it fills the memory)
    if names and len(names) != config.num_classes:
        raise ValueError(f"{len(names)} class names for {config.num_classes} classes")
    return wrap_unet(
        UNet(config), name=Path(spec).stem if spec.endswith(".json") else "unet", classes=names
    )


def cmd_train(args) -> int:
    import torch

    from napari_unet.core.cancel import Cancelled
    from napari_unet.core.targets import LABEL_KINDS
    from napari_unet.core.training import train_iter
    from napari_unet.io import outputs
    from napari_unet.io.images import check_readable

    if len(args.images) != len(args.labels):
        raise ValueError(f"{len(args.images)} images but {len(args.labels)} label files")
    if Path(args.output).suffix != ".safetensors":  # (".safetensors" alone has none)
        raise ValueError(
            "--output must be a file name ending in .safetensors (a bioimage.io package: "
            "napari-unet export the trained model)"
        )
    inputs = [*args.images, *args.labels, *args.val_images, *args.val_labels, *args.unlabelled]
    for path in inputs:  # by name and kind, before anything is read
        check_readable(path)
    # before training, not after it; the base model, the model whose settings are
    # repeated, images and labels are never replaced
    protected = [args.model, *([args.settings_from] if args.settings_from else []), *inputs]
    outputs.check_writable(Path(args.output), protected)
    # the provenance and architecture of a run to repeat
    recorded, recorded_arch = _recorded(args.settings_from)
    kind = args.label_kind or recorded.get("label_kind")
    args.label_kind = kind if kind in LABEL_KINDS else "sparse"
    config = _config(args, recorded)
    torch.manual_seed(config.seed)  # a new network's initial weights too
    model = _base_model(args.model, _classes(args))
    if args.settings_from:
        _warn_other_files(args, recorded)
        _warn_other_base(args, recorded, recorded_arch, model)
    stop, started = threading.Event(), threading.Event()
    gen = train_iter(
        model,
        training_images(args.images, model),
        label_images(args.labels),
        args.label_kind,
        config,
        val_images=training_images(args.val_images, model),
        val_labels=label_images(args.val_labels),
        data_name=_names(args.images),
        unlabelled=training_images(args.unlabelled, model),
        should_stop=stop.is_set,
        phases=True,
        names=[Path(p).name for p in [*args.images, *args.unlabelled]],
        val_names=[Path(p).name for p in args.val_images],
    )
    # a signal while the model is written stops nothing more: the first is kept for it
    saving = threading.Event()
    with _first_interrupt_stops(stop, saving, started):
        try:
            result = _run_with_bar(gen, args.quiet, started)
        except Cancelled as err:  # stopped before the first step: nothing to save
            print(f"napari-unet: {err}; nothing was saved", file=sys.stderr)
            return 130
        saving.set()
        # named after its file: it is no longer the model it was trained from
        provenance = {**result.info.provenance, **_files(args)}
        model = result.with_info(name=Path(args.output).stem, provenance=provenance)
        rescued = _save_or_rescue(model, Path(args.output))
    _report(result, args, config.seed, stop.is_set(), saved=not rescued)
    if rescued:
        raise OSError(rescued)
    return 0


def _names(paths) -> str:
    return ", ".join(Path(p).name for p in paths)


def _files(args) -> dict:
    """Every file the run reads, by name, as its provenance records them (the images are
    its ``training_data``); an empty list is left out."""
    files = {
        "training_data": _names(args.images),
        "labels": _names(args.labels),
        "unlabelled_data": _names(args.unlabelled),
        "validation_data": _names([*args.val_images, *args.val_labels]),
    }
    return {k: v for k, v in files.items() if v}


def _warn_other_files(args, recorded: dict) -> None:
    """Say where the files of a repeated run differ, by name, from those recorded (by a
    run of this command: the panel records its painted planes, not files)."""
    if "labels" not in recorded:
        return
    given = _files(args)
    for key in ("training_data", "labels", "unlabelled_data"):
        was, names = str(recorded.get(key, "")), given.get(key, "")
        if was != names:
            print(
                f"warning: {args.settings_from} was trained with {key.replace('_', ' ')} "
                f"{was or 'none'}, given {names or 'none'}: the run will differ",
                file=sys.stderr,
            )


def _warn_other_base(args, recorded: dict, arch, model) -> None:
    """Say where a repeated run starts from another model, or another architecture,
    than the one recorded (its weights came out different without a word)."""
    from napari_unet.core.training import base_name

    was, given = recorded.get("base_model"), base_name(model.info)
    if was is not None and str(was) != given:
        print(
            f"warning: {args.settings_from} was trained from {was}, given {given}: "
            "the run will differ",
            file=sys.stderr,
        )
    now = getattr(model.net, "config", None)
    if arch is not None and now is not None and arch != now:
        print(
            f"warning: {args.settings_from} has another architecture ({arch}) than the "
            f"network given ({now}): the run will differ",
            file=sys.stderr,
        )


def _save_or_rescue(model, path: Path) -> str:
    """Save the trained model; where that fails (disk full, folder gone), save it in the
    temporary folder rather than lose the run. Returns ``""``, or what went wrong and
    where the model went instead."""
    import tempfile

    from napari_unet.io.files import save_model

    try:
        save_model(model, path)
        return ""
    except OSError as err:
        failed = err
    rescue = None
    try:  # a name of its own: runs rescued in the same second do not overwrite each other
        fd, rescue = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".safetensors")
        os.close(fd)
        save_model(model, rescue)
    except OSError:
        if rescue is not None:
            Path(rescue).unlink(missing_ok=True)  # (the empty file mkstemp made)
        raise failed from None
    return f"{failed}; the trained model was saved to {rescue} instead"


def _classes(args) -> str | None:
    """``--classes``, or the three classes that instance masks become for a new network
    of three outputs (its instances then come from their watershed; class2 was taken as
    the objects)."""
    new = args.classes is None and args.label_kind == "instances" and not _is_model(args.model)
    if new and _num_classes(args.model.strip()) == 3:
        return "background,interior,boundary"
    return args.classes


def _config(args, recorded: dict | None = None):
    """The :class:`TrainConfig` the options ask for (the fine-tuning recipe's with
    ``--finetune``)."""
    from napari_unet.core.training import TrainConfig

    given = {
        "steps": args.steps,
        "max_seconds": args.seconds,
        "stop_after": args.stop_after,
        "lr": args.lr,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "class_weighting": args.class_weights,
        "contact_w0": args.contact_weight,
        "bf16": args.bf16 or None,
        "workers": args.workers,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.unlabelled:  # they are only used to adapt the batch-norm statistics
        given["adapt_norm"] = True
    if args.settings_from:  # the recorded run, but where options say otherwise
        if args.finetune:
            raise ValueError(
                "--finetune sets a recipe, --settings-from repeats a recorded one: give "
                "one of them (and options that change it)"
            )
        settings = {**recorded_settings(args.settings_from, recorded or {}), **given}
        if args.seed is not None:
            settings["seed"] = args.seed
        if ("steps" in given or "max_seconds" in given) and "stop_after" not in given:
            settings["stop_after"] = None  # (other steps: not where that run ended)
        try:
            return TrainConfig(**settings, device=args.device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{args.settings_from}: its recorded settings: {err}") from None
    if args.finetune and args.steps is not None and args.seconds is None:
        # --steps N repeats a run exactly: the recipe's 60 s budget would time the steps
        # again on this machine, and plan fewer where it is slower
        given["max_seconds"] = None
    make = TrainConfig.finetune if args.finetune else TrainConfig
    return make(**given, device=args.device, seed=0 if args.seed is None else args.seed)


def _recorded(path: str | None) -> tuple[dict, object]:
    """The provenance of the model file ``path`` and its architecture (its network's
    config; None for a network that is not a project U-Net); ``({}, None)`` for None."""
    from napari_unet.io import load_model

    if not path:
        return {}, None
    model = load_model(path)
    return model.info.provenance, getattr(model.net, "config", None)


def recorded_settings(path: str, provenance: dict) -> dict:
    """The :class:`TrainConfig` fields the model file ``path`` records (its
    ``provenance``'s ``train_config``) for a run of the steps it planned, ended where it
    ended (a Stop or a budget overrun), without a time budget: that run again."""
    from dataclasses import fields

    from napari_unet.core.training import TrainConfig

    recorded = provenance.get("train_config")
    if not isinstance(recorded, dict) or not recorded:
        raise ValueError(f"{path}: records no training settings (not trained by napari-unet)")
    known = {f.name for f in fields(TrainConfig)} - {"device", "val_patches"}  # (not kept)
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ValueError(f"{path}: records settings this version does not know: {unknown}")
    if provenance.get("rescaled"):
        print(
            f"warning: {path} was fine-tuned on its images resized by "
            f"{provenance['rescaled']} (to the model's object size), which train does not "
            "do: give images resized by those factors to repeat it",
            file=sys.stderr,
        )
    settings = dict(recorded, max_seconds=None, checkpoint=None)
    made, planned = provenance.get("steps"), settings.get("steps")
    ended = isinstance(made, int) and isinstance(planned, int) and made < planned
    if ended and settings.get("stop_after") is None:
        settings["stop_after"] = made
    return settings


def _run_with_bar(gen, quiet: bool, started: threading.Event | None = None):
    """Run training to its end under a progress bar; the setup stages beside it."""
    from tqdm import tqdm

    from napari_unet.core.tiling import run_to_end
    from napari_unet.core.train_config import STEPPING, Phase

    def show(report) -> None:
        if isinstance(report, Phase):  # (seconds to minutes before the first step)
            bar.set_postfix_str(report.message)
            if report.message == STEPPING and started is not None:
                started.set()  # (a Ctrl-C from now on saves the step under way)
                bar.reset()  # the rate and time left count from the first step, not the setup
            return
        bar.total = report.steps  # as planned (a time budget plans them first)
        bar.update(1)
        bar.set_postfix(loss=f"{report.loss:.4f}", **report.metrics)

    with tqdm(total=None, unit="step", disable=quiet, file=sys.stderr) as bar:
        return run_to_end(gen, show)


def _report(result, args, seed: int, stopped: bool, saved: bool = True) -> None:
    """Where the model went, and how to repeat the run when it was not the one asked."""
    made = result.info.provenance.get("steps")
    planned = (result.info.provenance.get("train_config") or {}).get("steps", made)
    done = f"stopped at step {made}" if stopped and made != planned else ""
    if saved:
        print(f"{done}, saved {args.output}" if done else f"saved {args.output}", file=sys.stderr)
    elif done:
        print(done, file=sys.stderr)
    if args.settings_from and saved:  # (the options of the line below do not carry them)
        print(f"to repeat this run exactly: --settings-from {args.output}", file=sys.stderr)
    elif made != planned or args.seconds is not None or args.finetune:
        print(
            f"{made} of {planned} planned steps; to repeat this run exactly: --seed "
            f"{seed} --steps {planned}"
            + (f" --stop-after {made}" if made != planned else "")
            + (" in place of --seconds" if args.seconds is not None else "")
            + (f" with the other options, or --settings-from {args.output}" if saved else ""),
            file=sys.stderr,
        )


def _is_model(spec: str) -> bool:
    """Whether ``--model`` names a model (bundled or a file), not a new network's JSON."""
    text = spec.strip()
    return not (text.startswith("{") or (text.endswith(".json") and Path(text).exists()))


def _num_classes(text: str):
    import json

    try:
        arch = json.loads(Path(text).read_text() if text.endswith(".json") else text)
    except (OSError, ValueError):
        return None  # said by _base_model
    return arch.get("num_classes", 2) if isinstance(arch, dict) else None  # (UNetConfig's)


@contextlib.contextmanager
def _first_interrupt_stops(
    stop: threading.Event,
    saving: threading.Event | None = None,
    started: threading.Event | None = None,
):
    """Ctrl-C once: training ends after the current step and its result is saved;
    twice: abort without saving. SIGTERM (a cluster job's time limit, ``kill``) stops
    and saves as the first Ctrl-C does (a second one aborts)."""

    # Python runs a handler once for presses that come while one torch operation runs
    # (a step of seconds): the wakeup pipe gets a byte per press, so they are counted
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)

    def handler(signum, frame):
        try:
            presses = os.read(read_end, 64).count(bytes([signum]))
        except BlockingIOError:
            presses = 0
        if stop.is_set() or presses > 1:
            raise KeyboardInterrupt
        stop.set()
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        if saving is not None and saving.is_set():
            doing = "finishing writing the model"
        elif started is not None and not started.is_set():
            doing = "stopping before the first step (nothing to save)"
        else:
            doing = "stopping after this step and saving"
        print(f"\nnapari-unet: {doing} ({again} to abort)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
        previous_term = signal.signal(signal.SIGTERM, handler)
        previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        os.close(read_end)
        os.close(write_end)
        yield
        return
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        os.close(read_end)
        os.close(write_end)
