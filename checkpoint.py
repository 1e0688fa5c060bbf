"""A run on disk: the networks and loss its settings name, and its checkpoint (Algorithm 1's state).

``train.py`` writes ``checkpoint.pt`` (atomically) and resumes from it; ``evaluate.py`` rebuilds a
trained model from it alone, as nanoGPT's ``sample.py`` does from ``model_args``: the checkpoint
records the run's settings (``config``), the network preset (``preset``, a ``piad.PIADConfig``),
the image channels and size, the VGG feature statistics (``stats``) and every state dict. Files
are read with ``weights_only=True`` (``errors.safe_load``): tensors and plain containers only.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

import errors
import features
import in_the_wild
import losses
import pgan
import piad
from config import TrainConfig

CHECKPOINT = "checkpoint.pt"
DIVERGED = "diverged.pt"  # the state at a non-finite loss, beside the last good checkpoint.pt
CRASHED = "crashed.pt"  # the state at an exception in the middle of training
CHECKPOINT_FORMAT = "piad-checkpoint-1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise errors.UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def new_model(method: str, config: piad.PIADConfig, channels: int) -> piad.PIAD:
    """The networks of ``method`` (on the CPU): PIAD's; latent-norm's G normalises its latent."""
    model = piad.PIAD(config=config, channels=channels)
    return in_the_wild.use_pixel_norm(model) if method == "latent-norm" else model


def build_reconstruction_loss(cfg: TrainConfig, train_batches, device, *, kind: str | None = None,
                              reduction: str = "mean", stats_state: dict | None = None):
    """The L_rec of eq. (7) (``cfg.loss``) with VGG features and the statistics ``cfg.stats`` names
    (``train_batches``: the training images, for ``--stats train``), or the checkpoint's own
    (``stats_state``). Returns (loss, statistics or None for pixel losses)."""
    kind = kind or cfg.loss
    if kind in losses.PIXEL_KINDS:
        return losses.ReconstructionLoss(kind=kind, reduction=reduction).to(device), None
    vgg = features.VGG19Features("relu4_2", cfg.vgg_weights).to(device)
    if stats_state is not None:  # resume or evaluation: the checkpoint's own statistics
        stats = features.FeatureStats(**stats_state)
    else:
        stats = features.select_stats(cfg.stats, vgg, train_batches)
    loss = losses.ReconstructionLoss(kind=kind, features=vgg, stats=stats, reduction=reduction, impl=cfg.impl)
    return loss.to(device), stats


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, flush it to disk, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, *, fix: str = "") -> dict:
    """A checkpoint of train.py, loaded with ``weights_only=True``: a file carrying pickled objects
    is refused (:class:`errors.BadFile`) before any of it runs. Missing, corrupt or foreign files
    raise :class:`errors.UserError` subclasses (``fix`` is appended to their message)."""
    path = Path(path)
    state = errors.safe_load(path, what="checkpoint", fix=fix, allow_numpy=True)  # numpy: old RNG states
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise errors.BadFile(f"{path} is not a checkpoint written by train.py (no {CHECKPOINT_FORMAT!r} tag)"
                             + (f"; {fix}" if fix else ""))
    return state


def saved_model(state: dict, device) -> piad.PIAD:
    """The trained networks of a checkpoint, on ``device``."""
    method = state["config"].get("method", "piad")
    if method == "latent-norm" and state["config"].get("networks") == "pgan":  # pgan.py; records lod
        model = pgan.PGAN(pgan.PGANConfig(**state["preset"])).to(device)
        model.load_state_dict(state["model"])
        return model
    model = new_model(method, piad.PIADConfig(**state["preset"]), state["channels"]).to(device)
    model.load_state_dict(state["model"])
    return model


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
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # checkpoints of piad <= 0.1: numpy's own tuple
        np.random.set_state(n)
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
