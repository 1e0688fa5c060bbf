"""Provenance of a run's numbers (not in the paper): the code, libraries and machine that made them.

:func:`record` is what metrics.json's ``provenance`` block and every checkpoint (``provenance``)
hold: the git commit of this clone and whether its tracked files differed from it (None where
there is no git or the files are not a clone of piad), the versions of Python, torch, torchvision,
numpy and scikit-learn, the device and its name (the GPU's, else the CPU model), and torch's
thread count. :func:`warn_other_commit` is ``evaluate.py``'s one line when it re-scores a run made
by another commit. Imports nothing of the project.
"""
from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _git() -> tuple[str | None, bool | None]:
    """(commit, tracked files changed) of the clone this file is in; (None, None) without git."""
    here = Path(__file__).resolve().parent.parent  # the clone's root

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != here:  # not a clone of piad (an installed copy)
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD"), None if status is None else bool(status)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def record(device=None) -> dict:
    """What produced a run's numbers: the git commit (and whether tracked files differed from it),
    Python and library versions, the device's name, the CPU and torch's thread count."""
    import sklearn
    import torchvision

    commit, dirty = _git()
    dev = torch.device(device if device is not None else "cpu")
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "numpy": str(np.__version__),
            "scikit_learn": str(sklearn.__version__), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "cpu": _cpu_name(), "threads": torch.get_num_threads()}


def warn_other_commit(state: dict, path) -> None:
    """One line on stderr when the checkpoint was written by another commit than this code's."""
    made, now = (state.get("provenance") or {}).get("git_commit"), _git()[0]
    if made and now and made != now:
        print(f"warning: {path} was written by commit {made[:12]}, this is {now[:12]}: its scores may differ "
              "from the run's own", file=sys.stderr)
