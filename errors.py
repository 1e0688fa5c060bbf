"""User-facing errors, one-line command-line failures and safe ``torch.load`` (no paper section).

Every command-line program of the repository (``train.py``, ``evaluate.py``, ``python -m tools.experiments``,
``python features.py stats``) runs its ``main`` through :func:`run_cli`: a :class:`UserError` (a
mistake in a flag, file, folder or checkpoint) ends with one ``error: ...`` line and exit status 2;
``--debug`` or ``PIAD_DEBUG=1`` shows the traceback. :func:`safe_load` is the only way files are
read back: tensors and plain containers only (``weights_only=True``). The exceptions and the
signal handler of a training run that ends early (:class:`Interrupted`, :class:`Diverged`,
:class:`StopOnSignal`, :func:`command_line`) are here; what a run does then: guard.py's docstring.

This module imports nothing of the project; ``features.py`` imports it (``losses.py``, which
runs copied alone, does not).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
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


def safe_load(path: str | os.PathLike, *, what: str = "file", fix: str = ""):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    A file that holds pickled Python objects (which could run arbitrary code while loading) is
    refused before any of it runs: :class:`BadFile` naming the objects. A missing file raises
    :class:`MissingFile`, a corrupt one :class:`BadFile`; ``fix`` is appended to the message."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.exists():
        raise MissingFile(f"{what} {path} not found{hint}")
    if not path.is_file():
        raise BadFile(f"{what} {path} is not a file{hint}")
    try:
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


# --- how a training run ends early (train.py) ----------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal, the run saved (guard.py's docstring). ``exit_code``: 128 + the
    signal number; ``resume``: how to continue (train.py's ``main`` puts the user's command line there)."""

    def __init__(self, signum: int, done: int, iterations: int, checkpoint: Path):
        super().__init__(signum, done)
        self.signum, self.done, self.iterations, self.checkpoint = signum, done, iterations, checkpoint
        self.exit_code = 128 + signum
        self.resume_flags = ["--resume"]
        self.resume = "train(config, resume=True)"

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.done >= self.iterations:
            return (f"{name}: training had finished ({self.checkpoint}); evaluation skipped. "
                    f"Evaluate with: {self.resume}")
        return (f"{name}: stopped after iteration {self.done} of {self.iterations}; the run is saved in "
                f"{self.checkpoint}. Resume with: {self.resume}")


class Diverged(FloatingPointError):
    """A loss (or a weight) became non-finite (guard.py's docstring); ``resume``: how to continue
    from the last good checkpoint with new random draws."""

    exit_code = 1  # a run that failed, not a mistake on the command line (2)

    def __init__(self, what: str, good: int | None, checkpoint: Path, diverged: Path, reseed: int,
                 checkpoint_minutes: float):
        super().__init__(what)
        self.what, self.good, self.checkpoint, self.diverged = what, good, checkpoint, diverged
        self.checkpoint_minutes = checkpoint_minutes
        self.resume_flags = ["--resume", "--reseed", str(reseed)]
        self.resume = f"train(config, resume=True, reseed={reseed})"

    def __str__(self) -> str:
        if self.good is None:
            return (f"training diverged: {self.what}. No checkpoint had been written yet (every "
                    f"{self.checkpoint_minutes:g} minutes, --checkpoint-minutes); the diverged state is in "
                    f"{self.diverged}. Start again with new random draws: {self.resume}; or use another --seed")
        return (f"training diverged: {self.what}. {self.checkpoint} keeps the last good state (iteration "
                f"{self.good}), {self.diverged} the diverged one. Continue from the good state with new random "
                f"draws: {self.resume}; or start over with another --seed and --out")


class StopOnSignal:
    """While active (main thread only), SIGINT and SIGTERM set :attr:`signum`, which the loop reads
    after each iteration; a second SIGINT raises KeyboardInterrupt at once."""

    active: list["StopOnSignal"] = []  # those in use, for :func:`request_stop`

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        StopOnSignal.active.append(self)
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this iteration and saving a checkpoint "
              "(Ctrl-C again stops at once without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self in StopOnSignal.active:
            StopOnSignal.active.remove(self)
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def request_stop(signum: int) -> int:
    """Asks every running training loop (any thread) to stop after its iteration with a checkpoint,
    as if ``signum`` had arrived (a cluster job's preemption hook); returns how many were asked."""
    for stop in list(StopOnSignal.active):
        if stop.signum is None:
            stop.signum = signum
    return len(StopOnSignal.active)


def _python() -> str:
    """How to call this interpreter in a printed command: ``python`` if that is it, else its path."""
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python"
    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


def command_line(argv, flags: list[str], script: str = "train.py") -> str:
    """``argv`` as a command to paste, with ``flags`` (``--resume``, ``--reseed K``) set; ``script``:
    the program, a file or ``-m package.module``."""
    argv, out = list(argv), []
    drop = {f for f in flags if f.startswith("--")}
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in drop:
            i += 1 if (name == "--resume" or "=" in a) else 2  # flag, or flag and its value
            continue
        out.append(a)
        i += 1
    return shlex.join([_python(), *shlex.split(script), *out, *flags])
