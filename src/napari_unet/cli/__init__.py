"""Command line: ``napari-unet predict | train | models | info | export``.

Errors print one line (``napari-unet: error: ...``) and exit with status 1.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import warnings

from napari_unet.cli._models import cmd_export, cmd_info, cmd_models, model_failure
from napari_unet.cli._parser import build_parser
from napari_unet.cli._predict import cmd_predict
from napari_unet.cli._train import cmd_train

__all__ = ["COMMANDS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-unet`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with _terminate_interrupts(), warnings.catch_warnings():
            warnings.showwarning = functools.partial(
                _one_line_warning, warnings.showwarning, set()
            )
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("napari-unet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `napari-unet models | head -1`: the reader has enough
        _quiet_stdout()
        return 141  # as a tool killed by SIGPIPE, and without a message
    except (ValueError, OSError, MemoryError, RuntimeError) as err:
        print(f"napari-unet: error: {err}", file=sys.stderr)
        _quiet_abandoned_reads()
        return 1
    except Exception as err:
        failure = model_failure(err)
        if failure is None:
            raise
        print(f"napari-unet: error: {failure}", file=sys.stderr)
        return 1


def _quiet_abandoned_reads() -> None:
    """A file read lazily that failed (a corrupt TIFF tile) leaves the zarr reader's
    other reads pending; at exit asyncio reported each of them (about 25 lines of
    "Task was destroyed but it is pending!") under the one-line message."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def _one_line_warning(
    show, seen: set, message, category, filename, lineno, file=None, line=None
) -> None:
    """A warning of napari-unet's as a line for the terminal's user (not Python's source
    path and line), once (an input read twice warned twice); others (a library's
    deprecation) as ``show`` shows them."""
    if "napari_unet" in str(filename):
        if str(message) not in seen:
            seen.add(str(message))
            print(f"napari-unet: warning: {message}", file=sys.stderr)
    else:
        show(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def _terminate_interrupts():
    """SIGTERM (a cluster job's time limit, ``kill``) stops as Ctrl-C does: partial
    outputs are removed (hidden .zarr folders were left behind)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (tests)
        pass


COMMANDS = {
    "predict": cmd_predict,
    "models": cmd_models,
    "info": cmd_info,
    "train": cmd_train,
    "export": cmd_export,
}
