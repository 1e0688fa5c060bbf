"""User-facing errors, one-line command-line failures and safe ``torch.load`` (no paper section).

Every command-line program of the repository (``train.py``, ``evaluate.py``, ``experiments.py``,
``python losses.py stats``) runs its ``main`` through :func:`run_cli`: a :class:`UserError` (a
mistake in a flag, file, folder or checkpoint) ends with one ``error: ...`` line and exit status 2;
``--debug`` or ``PIAD_DEBUG=1`` shows the traceback. :func:`safe_load` is the only way files are
read back: tensors and plain containers only (``weights_only=True``).

This module imports nothing of the project; ``losses.py`` needs it, so copy both to reuse the loss.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch



class UserError(ValueError):
    """A mistake in what the user asked for: a flag, a file, a folder, a checkpoint.

    :func:`run_cli` reports it as one line, ``error: <what is wrong and how to fix it>``, with exit
    status 2 (as argparse does); other exceptions are bugs and keep their traceback."""

    exit_code = 2


class MissingFile(UserError, FileNotFoundError):
    """A file the user named does not exist (still a ``FileNotFoundError`` for callers)."""


class BadFile(UserError, RuntimeError):
    """A file the user named cannot be used: corrupt, truncated, of the wrong kind, or unsafe."""


@contextlib.contextmanager
def user_errors(*types: type[BaseException], prefix: str = ""):
    """Re-raises exceptions of ``types`` from the block as :class:`UserError` (same message).

    For calls whose failures are caused by what the user asked for (loading a named dataset,
    folder or weights file); everything else keeps its type and its traceback."""
    try:
        yield
    except UserError:
        raise
    except types as exc:
        raise UserError(f"{prefix}{exc}") from exc


def debug_requested(argv) -> bool:
    """``--debug`` on the command line or ``PIAD_DEBUG`` set (not ``0``): show full tracebacks."""
    return "--debug" in argv or os.environ.get("PIAD_DEBUG", "").strip() not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also PIAD_DEBUG=1)")


def run_cli(main, argv=None) -> None:
    """Runs a command-line ``main(argv)`` and turns expected failures into one line on stderr.

    An exception with an ``exit_code`` attribute is an expected outcome, not a bug, and exits
    with that status: a :class:`UserError` (2) or a failed run (train.py's ``Diverged``, 1)
    prints ``error: <message>``; a stopped run (``KeyboardInterrupt``, 130, or train.py's
    ``Interrupted``, 128 + the signal) prints its message. Anything else is a bug and propagates
    with its traceback; with ``--debug`` or ``PIAD_DEBUG=1`` everything does."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as exc:
        code = getattr(exc, "exit_code", None)
        if code is None and isinstance(exc, KeyboardInterrupt):
            code = 130
        if code is None or debug:
            raise
        message = " ".join([str(exc) or "interrupted", *getattr(exc, "__notes__", ())]).split()
        message = " ".join(message)
        if not isinstance(exc, KeyboardInterrupt):
            message = f"error: {message}"
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def _numpy_globals() -> list:
    """The numpy types inside numpy RNG states, which checkpoints of piad <= 0.1 stored."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: str | os.PathLike, *, what: str = "file", fix: str = "", allow_numpy: bool = False):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    A file that holds pickled Python objects (which could run arbitrary code while loading) is
    refused before any of it runs: :class:`BadFile` naming the objects. A missing file raises
    :class:`MissingFile`, a corrupt one :class:`BadFile`; ``fix`` is appended to the message.
    ``allow_numpy`` also admits numpy arrays (old checkpoints' RNG states)."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.exists():
        raise MissingFile(f"{what} {path} not found{hint}")
    if not path.is_file():
        raise BadFile(f"{what} {path} is not a file{hint}")
    try:
        with torch.serialization.safe_globals(_numpy_globals() if allow_numpy else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # refused by the restricted unpickler
            found = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
            try:
                found = found or torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # noqa: BLE001 - only for the message
                pass
            if found:
                raise BadFile(f"refusing to load {what} {path}: it holds pickled Python objects "
                              f"({', '.join(dict.fromkeys(found))}), which files written by piad never contain, "
                              f"and loading them could run arbitrary code; use a file written by piad "
                              f"itself{hint}") from exc
        raise BadFile(f"could not read {what} {path}: the file is corrupt or truncated, or not written "
                      f"by torch.save ({_first_line(exc)}){hint}") from exc
    except Exception as exc:  # noqa: BLE001 - zip/pickle/IO errors of a bad file
        raise BadFile(f"could not read {what} {path}: the file is corrupt or truncated, or not written "
                      f"by torch.save ({_first_line(exc)}){hint}") from exc


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
