"""Progressive growing of Berg, Ahlberg and Felsberg's networks (supplement §2, Training
Configuration), as their ``train.py`` (``TrainingSchedule``, ``process_reals``,
``train_progressive_gan``) and ``config.py`` (``preset-v2-1gpu``) do it, on the losses, priors
and step order of ``berg.latent_norm`` (critic, G, E).

* Level of detail: training starts at 4×4 (``lod = log2(resolution) - 2``); each phase shows
  ``lod_training_kimg`` thousand real images at a fixed lod, then fades the next resolution in
  over ``lod_transition_kimg`` (lod falls linearly to the next integer); 600 + 600 by default.
* Minibatch per resolution ``{4: 128, 8: 128, 16: 128, 32: 64, 64: 32}`` (supplement §2), the
  schedule evaluated every ``minibatch_repeats = 4`` minibatches; Adam β = (0, 0.99), ε 1e-8,
  learning rate 0.001 for D, G and E (their E optimiser runs with G's rate); the Adam state of all
  three is reset whenever floor(lod) or ceil(lod) changes (start and end of each fade-in).
* Real images: average-pooled to the working resolution, and during a fade-in blended with their
  own 2×-coarser version (``process_reals``: ``lerp(x, upscale(avgpool(x)), lod - floor(lod))``).
* ``Gs``: the moving average of G (β 0.999), updated with each critic step from G's weights
  before that minibatch's G step; their code uses it for snapshots and sample grids, and so does
  this module (``ProgressiveTrainer.Gs``, saved with the trainer); D, G and E train on G.

* Evaluation of a run stopped before the final resolution (:class:`AsTrained`): the test images
  are the reals of the level of detail reached (``process_reals``), nearest-upscaled to the final
  size as their networks read and write images (``UpscaleLOD``); every score and figure sees them.

Deviation: their training set stores each level as uint8 (``dataset_tool.py``: the average-pooled
image rounded); here the pooled image stays float.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch

from berg import latent_norm
from berg import pgan

MINIBATCH = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4}  # supplement §2 minibatch_dict
MAX_MINIBATCH = {256: 16, 512: 8, 1024: 4}  # supplement §2 max_minibatch_per_gpu (one GPU)
LRATE_DICT = {1024: 0.0015}  # supplement §2 G_lrate_dict = D_lrate_dict
ADAM = dict(betas=(0.0, 0.99), eps=1e-8)  # supplement §2 β1, β2, ε
SEED = 1000  # supplement §2 random_seed


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Their ``TrainingSchedule`` settings and ``train_progressive_gan`` defaults."""

    lod_initial_resolution: int = 4
    lod_training_kimg: float = 600.0
    lod_transition_kimg: float = 600.0
    minibatch_base: int = 4
    lrate: float = 0.001  # G_lrate_base = D_lrate_base
    minibatch_repeats: int = 4
    g_smoothing: float = 0.999
    reset_opt_for_new_lod: bool = True
    total_kimg: float = 12000.0  # config.py preset-v2-1gpu


@dataclasses.dataclass(frozen=True)
class Phase:
    lod: float
    resolution: int
    minibatch: int
    lrate: float


def new_model(config: pgan.PGANConfig, train_set, *, seed: int) -> pgan.PGAN:
    """A :class:`pgan.PGAN` (global RNG: the initial weights) whose scoring reference
    (:meth:`pgan.PGAN.encode`) is ``MBSTD_GROUP - 1`` images of ``train_set`` drawn with ``seed``."""
    model = pgan.PGAN(config)
    ref = np.random.default_rng(seed).choice(len(train_set), pgan.MBSTD_GROUP - 1, replace=False)
    model.set_reference(torch.stack([train_set[int(i)][0] for i in ref]))
    return model


def phase(sched: Schedule, cur_nimg: int, resolution: int) -> Phase:
    """Their ``TrainingSchedule(cur_nimg, ...)``: lod, working resolution, minibatch, learning rate."""
    r_log2 = int(math.log2(resolution))
    kimg = cur_nimg / 1000.0
    dur = sched.lod_training_kimg + sched.lod_transition_kimg
    idx = math.floor(kimg / dur) if dur > 0 else 0
    phase_kimg = kimg - idx * dur
    lod = r_log2 - math.floor(math.log2(sched.lod_initial_resolution)) - idx
    if sched.lod_transition_kimg > 0:
        lod -= max(phase_kimg - sched.lod_training_kimg, 0.0) / sched.lod_transition_kimg
    lod = max(lod, 0.0)
    res = 2 ** (r_log2 - math.floor(lod))
    mb = MINIBATCH.get(res, sched.minibatch_base)
    mb = min(mb, MAX_MINIBATCH.get(res, mb))
    return Phase(float(lod), res, mb, LRATE_DICT.get(res, sched.lrate))


def minibatches(sched: Schedule, resolution: int, total_nimg: int | None = None) -> int:
    """Minibatches their loop runs to show ``total_nimg`` images (default ``total_kimg``)."""
    total = int(sched.total_kimg * 1000) if total_nimg is None else total_nimg
    n = nimg = 0
    while nimg < total:
        p = phase(sched, nimg, resolution)
        for _ in range(sched.minibatch_repeats):
            nimg += p.minibatch
            n += 1
    return n


def process_reals(x: torch.Tensor, lod: float) -> torch.Tensor:
    """Real images (B, C, S, S) in [-1, 1] -> (B, C, s, s) at the working resolution of ``lod``,
    faded with their 2×-coarser version as their ``process_reals`` (``FadeLOD``)."""
    k = math.floor(lod)
    x = pgan.downscale2d(x, 2 ** k)
    f = lod - k
    if f > 0:
        x = torch.lerp(x, pgan.upscale2d(pgan.downscale2d(x)), f)
    return x


class AsTrained(torch.utils.data.Dataset):
    """The items ``(image, label)`` of ``ds`` as networks at level of detail ``lod`` see real images:
    :func:`process_reals`, then nearest-upscaled back to the final size (their ``UpscaleLOD``), so
    that ``G.full``'s images and these compare pixel for pixel. ``resolution``: the detail kept."""

    def __init__(self, ds, lod: float):
        self.ds, self.lod = ds, lod
        first = ds[0][0]  # (C, S, S)
        self.final_resolution, self.resolution = first.shape[-1], process_reals(first[None], lod).shape[-1]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        low = process_reals(x[None], self.lod)  # (1, C, s, s)
        return pgan.upscale2d(low, self.final_resolution // self.resolution)[0], y


class ProgressiveTrainer(latent_norm.LatentNormTrainer):
    """One minibatch per :meth:`step`: critic + ``Gs`` update, G, E (their training loop), the lod,
    minibatch and learning rate from :func:`phase`, re-evaluated every ``minibatch_repeats``;
    Adam :data:`ADAM` without weight decay, the loss weights of their ``loss.py``."""

    model: pgan.PGAN

    def __init__(self, model: pgan.PGAN, sched: Schedule = Schedule()):
        super().__init__(model, lr_d=sched.lrate, lr_g=sched.lrate, **ADAM, weight_decay=0.0,
                         gp_weight=latent_norm.GP_WEIGHT, drift=latent_norm.DRIFT)
        self.sched = sched
        self.Gs = copy.deepcopy(model.G).requires_grad_(False)
        self.cur_nimg, self.prev_lod, self.repeat = 0, -1.0, 0
        self.phase: Phase | None = None

    def _new_phase(self) -> None:
        p = phase(self.sched, self.cur_nimg, self.model.config.resolution)
        self.model.set_lod(p.lod)
        self.Gs.lod.fill_(p.lod)
        if self.sched.reset_opt_for_new_lod and (math.floor(p.lod) != math.floor(self.prev_lod)
                                                 or math.ceil(p.lod) != math.ceil(self.prev_lod)):
            for opt in (self.opt_d, self.opt_g, self.opt_e):
                opt.state.clear()  # their reset_optimizer_state: moments and step count
        self.prev_lod = p.lod
        for opt in (self.opt_d, self.opt_g, self.opt_e):  # their E runs with G's rate
            for group in opt.param_groups:
                group["lr"] = p.lrate
        self.phase = p

    @torch.no_grad()
    def update_gs(self) -> None:
        """``Gs = lerp(G, Gs, β)`` for the weights (their ``setup_as_moving_average_of``)."""
        for avg, cur in zip(self.Gs.parameters(), self.model.G.parameters()):
            avg.lerp_(cur, 1.0 - self.sched.g_smoothing)

    def step(self, it: int, sample) -> dict:
        """``sample(n)`` -> (real images (n, C, S, S), _); returns the losses and the schedule."""
        if self.repeat == 0:
            self._new_phase()
        p = self.phase
        x, _ = sample(p.minibatch)
        x = process_reals(x, p.lod)
        n = x.shape[0]  # p.minibatch, as sample gives
        loss_dx = self.critic_step(x)
        self.update_gs()
        self.cur_nimg += n
        adv_g = self.generator_step(n, real=x)
        cycle = self.encoder_step(n)
        self.repeat = (self.repeat + 1) % self.sched.minibatch_repeats
        return {"loss_dx": loss_dx, "adv_g": adv_g, "cycle": cycle, "lod": p.lod, "kimg": self.cur_nimg / 1000}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "Gs": self.Gs.state_dict(), "cur_nimg": self.cur_nimg,
                "prev_lod": self.prev_lod, "repeat": self.repeat,
                "phase": dataclasses.asdict(self.phase) if self.phase else None}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self.Gs.load_state_dict(s["Gs"])
        self.cur_nimg, self.prev_lod, self.repeat = s["cur_nimg"], s["prev_lod"], s["repeat"]
        self.phase = Phase(**s["phase"]) if s["phase"] else None


# Images/s of one full-width step (critic + Gs, G, E) at each working resolution, CIFAR-10 preset,
# measured by tools/bench/bench_pgan.py (batch 8, 1 thread, the project's 2-core CPU; docs/berg.md).
CPU_IMAGES_PER_S = {4: 10.4, 8: 2.79, 16: 0.56, 32: 0.036}


def cpu_note(fmap_max: int, fmap_base: int) -> str:
    """The line train.py prints once when a pgan run starts on a CPU."""
    rates = ", ".join(f"{r}×{r}: {v:g}" for r, v in CPU_IMAGES_PER_S.items())
    width = ("full width" if (fmap_max, fmap_base) == (pgan.FMAP_MAX, pgan.FMAP_BASE)
             else f"this run is narrower (fmap_max {fmap_max}, fmap_base {fmap_base}) and faster")
    return (f"note: pGAN on a CPU. Full-width training steps measured {rates} images/s (1 thread; "
            f"their schedule shows 12M images; docs/berg.md); {width}.")
