"""The seam between PIAD's run code (``train.py``, ``evaluate.py``) and Berg, Ahlberg and
Felsberg's system (ECAI 2020): what a ``--method latent-norm`` run builds, for each of its
``--networks`` (``config.NETWORKS``), and how it is evaluated.

* ``pgan`` (theirs, supplement Appendix A): ``pgan.PGAN`` grown by ``progressive.ProgressiveTrainer``;
* ``piad`` (ours): PIAD's networks of the dataset's preset with a pixel-norm G
  (``latent_norm.use_pixel_norm``), trained by ``latent_norm.LatentNormTrainer`` with the preset's
  optimiser and loss settings.

Both models are ``latent_norm.Networks``; nothing else of them is used outside ``berg/``. The data
side of the seam: :data:`PROTOCOLS`, the splits ``data.load_dataset`` is given by name; and
:data:`THEIRS`, the settings a run leaves out, which ``config.TrainConfig.resolved`` is given.
"""
from __future__ import annotations

import sys

import piad
import presets
from berg import latent_norm, pgan, progressive, protocol

# The settings of a --method latent-norm run left out: theirs (``config.TrainConfig.resolved`` is given them).
THEIRS = {"seed": progressive.SEED, "fmap_max": pgan.FMAP_MAX, "fmap_base": pgan.FMAP_BASE,
          "lod_kimg": progressive.Schedule.lod_training_kimg, "total_kimg": progressive.Schedule.total_kimg}
PROTOCOLS = {"berg": protocol.apply}  # --protocol berg: their dataset_tool.py splits, for data.load_dataset


def new_model(cfg, ds) -> pgan.PGAN | piad.PIAD:
    """The networks of a new run of the settings ``cfg`` (``config.TrainConfig``, resolved) on the
    dataset ``ds`` (``data.AnomalyData``): ``pgan`` at ``cfg.fmap_base``/``cfg.fmap_max`` (its scoring
    reference drawn with ``cfg.seed``), or ``piad``: PIAD's of the data's preset, G pixel-normalised."""
    if cfg.networks == "pgan":
        config = pgan.PGANConfig(ds.channels, ds.image_size, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max)
        return progressive.new_model(config, ds.train, seed=cfg.seed)
    return latent_norm.use_pixel_norm(piad.PIAD(config=presets.network(ds.preset), channels=ds.channels))


def schedule(cfg) -> progressive.Schedule:
    """Their progressive-growing schedule with the run's ``--lod-kimg`` and ``--total-kimg``."""
    return progressive.Schedule(lod_training_kimg=cfg.lod_kimg, lod_transition_kimg=cfg.lod_kimg,
                                total_kimg=cfg.total_kimg)


def iterations(cfg, image_size: int, device) -> int:
    """``--iterations`` of a pGAN run, by default the minibatches their loop runs for ``total_kimg``;
    on a CPU, first the line of :func:`progressive.cpu_note`."""
    if device.type == "cpu":
        print(progressive.cpu_note(cfg.fmap_max, cfg.fmap_base), file=sys.stderr)
    return cfg.iterations or progressive.minibatches(schedule(cfg), image_size)


def saved_model(networks: str, preset: dict, channels: int) -> pgan.PGAN | piad.PIAD:
    """The networks a checkpoint's ``preset`` (``dataclasses.asdict`` of the model's config) rebuilds,
    untrained: load the checkpoint's ``model`` into them (old pGAN keys are mapped, ``pgan.RENAMED``)."""
    if networks == "pgan":
        return pgan.PGAN(pgan.PGANConfig.from_saved(preset))
    return latent_norm.use_pixel_norm(piad.PIAD(config=piad.PIADConfig(**preset), channels=channels))


def trainer(model: pgan.PGAN | piad.PIAD, schedule: progressive.Schedule) -> latent_norm.LatentNormTrainer:
    """pGAN networks: progressive growing on ``schedule``; PIAD's: the preset's Adam (betas, rates:
    D_X's for the critic, G's for G and E; weight decay; ε torch's default, as ``train.PIADTrainer``'s)
    and the preset's eq. (5) weights."""
    if isinstance(model, pgan.PGAN):
        return progressive.ProgressiveTrainer(model, schedule)
    p = model.config
    return latent_norm.LatentNormTrainer(model, lr_d=p.lr_critic, lr_g=p.lr_gen, betas=p.betas, eps=1e-8,
                                         weight_decay=p.weight_decay, gp_weight=p.gp_weight, drift=p.drift)


def as_trained(model: latent_norm.Networks, ds):
    """``(ds as the networks see it, what metrics.json records of it)``: for pGAN networks, their
    ``resolution`` (the one reached), ``final_resolution`` and ``lod``, and below the final
    resolution ``progressive.AsTrained`` images; ``(ds, {})`` for PIAD's networks."""
    if not isinstance(model, pgan.PGAN):
        return ds, {}
    final = model.config.resolution
    if model.lod == 0:
        return ds, {"resolution": final, "final_resolution": final, "lod": 0.0}
    seen = progressive.AsTrained(ds, model.lod)
    return seen, {"resolution": seen.resolution, "final_resolution": final, "lod": model.lod}


def resolution_note(seen: dict) -> str | None:
    """The line evaluate.py prints when :func:`as_trained` evaluates below the final resolution."""
    if not seen or seen["resolution"] == seen["final_resolution"]:
        return None
    r, final = seen["resolution"], seen["final_resolution"]
    return (f"note: the pGAN reached {r}×{r} of {final}×{final} (lod {seen['lod']:g}); evaluated at {r}×{r}: "
            "test images average-pooled as training sees them")
