"""A run's objects, built from its settings: the device, the networks and the loss (paper §3, §4).

``train.py`` builds a new run's objects here from a :class:`config.TrainConfig`; ``evaluate.py``
rebuilds a trained model from what its checkpoint records (:func:`saved_model`, as nanoGPT's
``sample.py`` does from ``model_args``): the run's settings (``config``), the network preset
(``preset``, a ``piad.PIADConfig``), the image channels and the VGG feature statistics
(``stats``). Reading and writing the checkpoint file itself is ``checkpoint.py``.
"""
from __future__ import annotations

import torch

import errors
import features
import in_the_wild
import losses
import pgan
import piad
import progressive
from config import DEVICES, TrainConfig


def resolve_device(name: str) -> torch.device:
    """``--device``: one of :data:`config.DEVICES` (auto: cuda when available, else cpu)."""
    if name not in DEVICES:
        raise errors.UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return torch.device(name)


def new_model(method: str, config: piad.PIADConfig, channels: int) -> piad.PIAD:
    """The networks of ``method`` (on the CPU): PIAD's; latent-norm's G normalises its latent."""
    model = piad.PIAD(config=config, channels=channels)
    return in_the_wild.use_pixel_norm(model) if method == "latent-norm" else model


def new_run_model(cfg: TrainConfig, ds) -> piad.PIAD | pgan.PGAN:
    """The networks of a new run of ``cfg`` on the dataset ``ds`` (``data.AnomalyData``): Berg et
    al.'s pGAN for latent-norm with ``--networks pgan`` (with its scoring reference images), else
    those of :func:`new_model` for the dataset's preset."""
    if cfg.pgan:
        config = pgan.PGANConfig(ds.channels, ds.image_size, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max)
        return progressive.new_model(config, ds.train, seed=cfg.seed)
    return new_model(cfg.method, piad.preset(ds.preset), ds.channels)


def saved_model(state: dict, device) -> piad.PIAD | pgan.PGAN:
    """The trained networks of a checkpoint's ``state`` (``checkpoint.load_checkpoint``), on ``device``."""
    method = state["config"].get("method", "piad")
    if method == "latent-norm" and state["config"].get("networks") == "pgan":  # pgan.py; records lod
        model = pgan.PGAN(pgan.PGANConfig(**state["preset"])).to(device)
    else:
        model = new_model(method, piad.PIADConfig.from_saved(state["preset"]), state["channels"]).to(device)
    model.load_state_dict(state["model"])
    return model


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
