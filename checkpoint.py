"""A run on disk: its checkpoint (Algorithm 1's state), written atomically and read safely.

``train.py`` writes ``checkpoint.pt`` (atomically) and resumes from it; ``evaluate.py`` rebuilds a
trained model from it alone (``evaluate.saved_model``): the checkpoint records the run's settings
(``config``), the network preset (``preset``), the image channels and size, the VGG feature
statistics (``stats``), every state dict and the random generators' states. Files are read with
``weights_only=True`` (``errors.safe_load``): tensors and plain containers only.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import errors

CHECKPOINT = "checkpoint.pt"
DIVERGED = "diverged.pt"  # the state at a non-finite loss, beside the last good checkpoint.pt
CRASHED = "crashed.pt"  # the state at an exception in the middle of training
CHECKPOINT_FORMAT = "piad-checkpoint-1"
KEPT = "kept"  # --keep-every K: RUN/kept/checkpoint-<iteration>.pt, copies of checkpoint.pt as it was


def kept_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / KEPT / f"checkpoint-{iteration:07d}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, flush it to disk, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def keep(path: Path, kept: Path) -> None:
    """Keeps the checkpoint at ``path`` as it is now under ``kept`` (atomically): a hard link, which
    the next atomic save of ``path`` leaves pointing at this state; a copy where links fail."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(kept.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, kept)


def load_checkpoint(path: str | os.PathLike, *, fix: str = "") -> dict:
    """A checkpoint of train.py, loaded with ``weights_only=True``: a file carrying pickled objects
    is refused (:class:`errors.BadFile`) before any of it runs. Missing, corrupt or foreign files
    raise :class:`errors.UserError` subclasses (``fix`` is appended to their message)."""
    path = Path(path)
    state = errors.safe_load(path, what="checkpoint", fix=fix)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise errors.BadFile(f"{path} is not a checkpoint written by train.py (no {CHECKPOINT_FORMAT!r} tag)"
                             + (f"; {fix}" if fix else ""))
    return state


def rng_state() -> dict:
    """Global RNG states as tensors and plain Python values (``weights_only`` loadable)."""
    key, pos, has_gauss, cached = np.random.get_state()[1:]
    version, internal, gauss_next = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached_gaussian": float(cached)},
         "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    """Restores the global RNG states :func:`rng_state` recorded."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
