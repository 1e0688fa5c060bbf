"""A run on disk: its checkpoint (Algorithm 1's state), written atomically, read safely, resumed.

``train.py`` writes ``checkpoint.pt`` (atomically, through :class:`Saved`) and resumes from it
(:func:`resume_state`, :meth:`Saved.restore`, :func:`reseed`); ``evaluate.py`` rebuilds a trained
model from it alone (``evaluate.saved_model``): the checkpoint records the run's settings
(``config``), the network preset (``preset``), the image channels and size, the VGG feature
statistics (``stats``), every state dict and the random generators' states. Resuming continues
the run exactly (the same floats as a run that never stopped). Files are read with
``weights_only=True`` (``errors.safe_load``): tensors and plain containers only.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import errors
import rundir
from config import TrainConfig

CHECKPOINT = "checkpoint.pt"
DIVERGED = "diverged.pt"  # the state at a non-finite loss, beside the last good checkpoint.pt
CRASHED = "crashed.pt"  # the state at an exception in the middle of training
CHECKPOINT_FORMAT = "piad-checkpoint-1"
REQUIRED = ("config", "iteration", "iterations", "elapsed_s", "channels", "image_size")  # every checkpoint of train.py
TRAINED = ("preset", "model", "trainer", "sampler", "rng", "stats")  # and those of a trained method (not --method knn)
KEPT = "kept"  # --keep-every K: RUN/kept/checkpoint-<iteration>.pt, copies of checkpoint.pt as it was


def kept_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / KEPT / f"checkpoint-{iteration:07d}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, flush it to disk, then rename over the old one (``rundir``)."""
    rundir.atomic_write(path, lambda fh: torch.save(state, fh))


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
    method = state["config"].get("method") if isinstance(state.get("config"), dict) else None
    missing = [k for k in REQUIRED + (("knn",) if method == "knn" else TRAINED) if k not in state]
    if missing:
        raise errors.BadFile(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged or was not written by "
                             "train.py" + (f"; {fix}" if fix else ""))
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


@dataclasses.dataclass
class Saved:
    """What a checkpoint of a run holds besides its iteration and time: the settings, the networks,
    the trainer (optimisers, γ history), the sampler's generator, the image size, the VGG feature
    statistics and weights, and the run's provenance, recorded at each save (``provenance``:
    train.py gives ``tools.provenance.record`` for the run's device)."""

    cfg: TrainConfig
    model: torch.nn.Module
    trainer: object  # train.Trainer: state_dict(), load_state_dict()
    sampler: object  # sampler.Sampler: its generator ``gen``
    iterations: int
    channels: int
    image_size: int
    stats: dict | None
    vgg_weights: str | None
    provenance: Callable[[], dict]

    def save(self, path: Path, it: int, elapsed: float, **extra) -> None:
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.cfg), "iteration": it,
            "iterations": self.iterations, "elapsed_s": elapsed,
            "preset": dataclasses.asdict(self.model.config), "channels": self.channels,
            "image_size": self.image_size, "model": self.model.state_dict(), "trainer": self.trainer.state_dict(),
            "sampler": self.sampler.gen.get_state(), "rng": rng_state(), "stats": self.stats,
            "vgg_weights": self.vgg_weights, "provenance": self.provenance(), **extra})

    def restore(self, state: dict) -> None:
        """The networks, trainer, sampler and random generators as ``state`` saved them (``--resume``)."""
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.sampler.gen.set_state(state["sampler"])
        set_rng_state(state["rng"])


def resume_state(cfg: TrainConfig) -> dict | None:
    """The checkpoint to continue (``--resume``), after checking it fits the settings; None for a new run."""
    path = cfg.run_dir() / CHECKPOINT
    if not path.exists():
        return None
    if not cfg.resume:
        raise errors.UserError(f"{path} exists; pass --resume to continue it, or choose another --out "
                               "(a run's checkpoint is never overwritten)")
    state = load_checkpoint(path, fix="train without --resume into another --out")
    diff = cfg.resume_conflicts(TrainConfig.from_saved(state["config"]))
    if diff:
        raise errors.UserError(f"--resume with settings that differ from the checkpoint {path}: {', '.join(diff)}; "
                               "resume with the run's own settings, or train into another --out")
    if cfg.iterations is not None and state["iteration"] > cfg.iterations:
        raise errors.UserError(f"--iterations {cfg.iterations} is fewer than the {state['iteration']} the "
                               f"checkpoint {path} has already done")
    return state


def reseed(cfg: TrainConfig, sampler, it: int, state: dict | None) -> None:
    """New random draws from iteration ``it`` on (``--reseed K``): seeds derived from (seed, K, it);
    nothing when the checkpoint's draws were already made under this K."""
    if cfg.reseed == (state["config"].get("reseed", 0) if state else 0):
        return
    seed = int(np.random.SeedSequence([cfg.seed, cfg.reseed, it]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    sampler.gen.manual_seed(seed + 1)


def truncate_log(path: Path, start: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    if start == 0:
        path.unlink()
        return
    with open(path) as fh:
        rows = list(csv.reader(fh))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < start]
    text = io.StringIO()
    csv.writer(text).writerows(keep)
    rundir.write_text(path, text.getvalue())  # atomic: a failure leaves the log as it was


# --- what train.py may do with a run folder (docs/safety.md) -------------------------------------

FINISHED = (CHECKPOINT, KEPT, "metrics.json", "scores.csv")  # a run's results: never overwritten
LEFTOVERS = ("log.csv", CRASHED, DIVERGED)  # of a run that never wrote checkpoint.pt


def resumable(run_dir: Path) -> bool:
    """A folder train.py continues with ``--resume``: it has a checkpoint, or leftovers of a run
    that saved none (then started again there); grids resume such cells."""
    return any((Path(run_dir) / n).exists() for n in (CHECKPOINT, *LEFTOVERS))


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Before the data loads: a new run only goes into a folder without another run's results.
    A folder with ``checkpoint.pt`` is train.py's ``--resume`` decision; one with results but no
    checkpoint is refused; leftovers of a run that saved no checkpoint are replaced only with
    ``--resume`` (which then starts from scratch, said in one ``note:`` line)."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).exists():
        return
    found = [n for n in FINISHED if (run_dir / n).exists()]
    if found:
        raise errors.UserError(f"{run_dir} holds results of a run ({', '.join(found)}) but no {CHECKPOINT} to "
                               "resume; they are never overwritten: choose another --out")
    left = [n for n in LEFTOVERS if (run_dir / n).exists()]
    if left and not resume:
        raise errors.UserError(f"{run_dir} holds files of a run that saved no checkpoint ({', '.join(left)}); pass "
                               "--resume to start that run again there (replacing them), or choose another --out")
    if resume:
        print(f"note: --resume: {run_dir} has no {CHECKPOINT}; starting a new run there", file=sys.stderr, flush=True)


def check_fits(state: dict | None, ds) -> None:
    """``--resume``: the checkpoint's networks take the data's images (channels and size)."""
    if state is None:
        return
    saved, now = (state.get("channels"), state.get("image_size")), (ds.channels, ds.image_size)
    if saved != now:
        raise errors.UserError(f"--resume: the checkpoint was trained on {saved[0]}-channel {saved[1]}x{saved[1]} "
                               f"images, the data now gives {now[0]}-channel {now[1]}x{now[1]} ones; resume with "
                               "the run's own data, or train into another --out")
