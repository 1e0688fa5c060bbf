"""The seam between PIAD's run code (``train.py``, ``evaluate.py``) and Berg, Ahlberg and
Felsberg's system (ECAI 2020): what a ``--method latent-norm`` run builds, for each of its
:data:`NETWORKS`, and how it is evaluated.

* ``pgan`` (theirs, supplement Appendix A): ``pgan.PGAN`` grown by ``progressive.ProgressiveTrainer``;
* ``piad`` (ours): PIAD's networks of the dataset's preset with a pixel-norm G
  (``latent_norm.use_pixel_norm``), trained by ``latent_norm.LatentNormTrainer`` with the preset's
  optimiser and loss settings.

Both models are ``latent_norm.Networks``; nothing else of them is used outside ``berg/``.
"""
from __future__ import annotations

import piad
from berg import latent_norm, pgan, progressive

NETWORKS = ("pgan", "piad")  # of --method latent-norm: theirs (default), PIAD's (ours)


def new_model(networks: str, *, preset: str, channels: int, image_size: int, train_set, seed: int,
              fmap_base: int, fmap_max: int) -> pgan.PGAN | piad.PIAD:
    """The networks of a new run on ``train_set``: ``pgan`` at ``fmap_base``/``fmap_max`` (its scoring
    reference drawn with ``seed``), or ``piad``: PIAD's of the data's ``preset``, G pixel-normalised."""
    if networks == "pgan":
        config = pgan.PGANConfig(channels, image_size, fmap_base=fmap_base, fmap_max=fmap_max)
        return progressive.new_model(config, train_set, seed=seed)
    return latent_norm.use_pixel_norm(piad.PIAD(config=piad.preset(preset), channels=channels))


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
