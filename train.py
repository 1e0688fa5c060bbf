"""Training procedure of PIAD, Algorithm 1 (paper §3.2-3.3, supplement §1).

``python train.py --dataset mnist --normal 8`` trains PIAD on the normal class and writes,
in the run folder: ``checkpoint.pt`` (atomic, every few minutes and at the end),
``log.csv`` (every loss and γ_G, γ_E), and the evaluation outputs of ``evaluate.py``
(``metrics.json``, ``scores.csv``, ``roc.png``, ``reconstructions.png``, ``extremes.png``).
``train(TrainConfig(...))`` does the same from Python. ``--method latent-norm`` trains the
variant of Berg et al. (module ``in_the_wild``) on the same networks instead.

Failures a person can act on: mistakes in the settings (``TrainConfig.validate``), data, weights
or checkpoint end with one ``error: ...`` line and exit status 2 before any work starts;
SIGINT/SIGTERM finish the current iteration, save the checkpoint, print the ``--resume`` command
and exit 130/143; a non-finite loss keeps ``checkpoint.pt`` as the last good state, saves
``diverged.pt`` and prints how to continue (``--resume --reseed K``).

Speed-ups that keep the maths of Algorithm 1: the real images' VGG features carry no autograd
graph and, for in-memory training sets seen many times, are computed once and cached; fake
images/latents in the critic steps are produced under ``no_grad``; the critics' parameters
are frozen during the generator/encoder step; the relative-perceptual-L1 reduction uses the
fused op of ``csrc/`` when built.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import data as data_mod
import errors
import losses
import piad
import weights_policy

CHECKPOINT = "checkpoint.pt"
DIVERGED = "diverged.pt"  # the state at a non-finite loss, beside the last good checkpoint.pt
CRASHED = "crashed.pt"  # the state at an exception in the middle of training
CHECKPOINT_FORMAT = "piad-checkpoint-1"
METHODS = ("piad", "latent-norm")
UserError = errors.UserError


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    normal: str = "8"
    iterations: int | None = None  # None: the supplement's schedule for the dataset
    batch_size: int = 32
    seed: int = 0
    out: str | None = None  # None: runs/<dataset>-<normal>-<method>-<loss>-c<P>-s<seed>
    data_root: str | None = None
    download: bool = True  # torchvision datasets (MNIST, CIFAR-10) are downloaded when missing
    protocol: str | None = None  # None: the paper's protocol for the dataset
    image_size: int | None = None  # only for --dataset folder (32 or 64)
    contamination: float = 0.0
    method: str = "piad"  # "piad" | "latent-norm"
    vgg_weights: str = "auto"
    # "auto": the authors' ImageNet statistics with torchvision's weights (stats/), else "sklearn"
    # (bundled photos); "authors" | "sklearn" | "train" (training images) | PATH
    stats: str = "auto"
    loss: str = "rel-perc-l1"
    impl: str = "auto"  # relative-perceptual-L1 implementation: auto | ext | torch
    weights_policy: str = "gradnorm"  # "gradnorm" (§3.3) | "fixed"
    gamma_g: float = 1.0  # used with weights_policy="fixed"
    gamma_e: float = 1.0
    n_weight: int = 100  # γ update period (supplement §1.2)
    # γ policy (weights_policy.py; the paper gives no smoothing/N; defaults: the authors' code)
    policy_last_n: int = 200
    policy_smoothing: float = 0.95
    policy_history: int = 200
    policy_reduce: str = "pooled-median"  # paper: "mean" over layers; authors' code: pooled median
    # paper (Alg. 1 line 9): γ from iteration 0 (iter % n_weight == 0); authors' code: γ = 1 until
    # iteration n_weight - 1, then every n_weight iterations ((iter + 1) % n_weight == 0, default)
    policy_at_start: bool = False
    device: str = "auto"
    resume: bool = False
    cache_features: str = "auto"  # auto | on | off
    channels_last: bool = True  # NHWC tensors for every conv net (faster oneDNN/cuDNN kernels)
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    progress: bool = True
    evaluate: bool = True
    reseed: int = 0  # new random draws (minibatches, latents) from here on, e.g. after a divergence

    def validate(self) -> "TrainConfig":
        """Raises :class:`UserError` naming every setting that cannot work (before any work starts)."""
        bad = []

        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                bad.append(f"--{field.replace('_', '-')} {what}, got {getattr(self, field)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        choices = {"method": METHODS, "weights_policy": ("gradnorm", "fixed"), "loss": losses.KINDS,
                   "impl": ("auto", "ext", "torch"), "policy_reduce": weights_policy.REDUCES,
                   "device": ("auto", "cpu", "cuda"), "cache_features": ("auto", "on", "off"),
                   "protocol": (None, "split", "gpnd"), "image_size": (None, 32, 64)}
        for field, allowed in choices.items():
            need(getattr(self, field) in allowed, field,
                 "must be one of " + ", ".join(str(a) for a in allowed if a is not None))
        dataset_ok = str(self.dataset).lower() in data_mod.DATASETS
        need(dataset_ok, "dataset", "must be one of " + ", ".join(data_mod.DATASETS))
        if dataset_ok and str(self.dataset).lower() != "folder":
            try:  # the dataset's own class check (names or indices), without loading any data
                data_mod._resolve_class(str(self.dataset).lower(), self.normal,
                                        data_mod.class_names(self.dataset, self.data_root))
            except ValueError as exc:
                bad.append(f"--normal: {exc}")
        need(self.iterations is None or (is_int(self.iterations) and self.iterations >= 1),
             "iterations", "must be a whole number >= 1 (or left out for the paper's schedule)")
        for field in ("batch_size", "n_weight", "policy_last_n", "policy_history", "log_every"):
            need(is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "must be a whole number >= 1")
        need(is_int(self.seed) and 0 <= self.seed < 2 ** 32, "seed", "must be a whole number in 0..2**32-1")
        need(is_int(self.reseed) and 0 <= self.reseed < 2 ** 32, "reseed", "must be a whole number in 0..2**32-1")
        need(is_real(self.policy_smoothing) and 0 <= self.policy_smoothing < 1, "policy_smoothing",
             "must be a number with 0 <= s < 1")
        need(is_real(self.contamination) and 0 <= self.contamination < 1, "contamination",
             "must be a fraction with 0 <= P < 1")
        for field in ("gamma_g", "gamma_e"):
            need(is_real(getattr(self, field)) and getattr(self, field) > 0, field, "must be a number > 0")
        need(is_real(self.checkpoint_minutes) and self.checkpoint_minutes >= 0, "checkpoint_minutes",
             "must be a number >= 0 (0: after every iteration)")
        if self.device == "cuda" and not torch.cuda.is_available():
            bad.append("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
        if self.vgg_weights not in ("auto", "torchvision", "caffe", "random") and not Path(self.vgg_weights).is_file():
            bad.append(f"--vgg-weights {self.vgg_weights!r}: no such file; give auto, torchvision, caffe, "
                       "random or the path of a VGG-19 state-dict file")
        if self.stats not in ("auto", "authors", "sklearn", "train") and not Path(self.stats).is_file():
            bad.append(f"--stats {self.stats!r}: no such file; give auto, authors, sklearn, train or a file "
                       "written by `python losses.py stats`")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            bad.append(f"--out {self.out!r} is a file, not a run folder")
        if bad:
            raise UserError("; ".join(bad))
        return self

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = f"{self.dataset}-{self.normal}-{self.method}-{self.loss}-c{self.contamination:g}-s{self.seed}"
        return Path("runs") / name.replace("/", "_")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def build_reconstruction_loss(cfg: TrainConfig, train_set, device, *, kind: str | None = None,
                              reduction: str = "mean", stats_state: dict | None = None):
    """The L_rec of eq. (7) (``cfg.loss``), with VGG features and their statistics."""
    kind = kind or cfg.loss
    if kind in losses.PIXEL_KINDS:
        return losses.ReconstructionLoss(kind=kind, reduction=reduction).to(device), None
    vgg = losses.VGG19Features("relu4_2", cfg.vgg_weights).to(device)
    if stats_state is not None:  # resume: the checkpoint's own statistics
        stats = losses.FeatureStats(**stats_state)
    elif cfg.stats in ("auto", "authors"):
        stats = losses.authors_stats()  # "auto": only for the weights they were computed with
        if cfg.stats == "auto" and stats.weights != vgg.weights_id:
            stats = losses.default_stats(vgg)
    elif cfg.stats == "sklearn":
        stats = losses.default_stats(vgg)
    elif cfg.stats == "train":
        stats = losses.feature_stats(vgg, image_batches(train_set, device), source="training images")
    else:
        stats = losses.FeatureStats.load(cfg.stats)
    loss = losses.ReconstructionLoss(kind=kind, features=vgg, stats=stats, reduction=reduction, impl=cfg.impl)
    return loss.to(device), stats


def image_batches(ds, device, size: int = 256):
    """The images of ``ds`` in order, ``size`` at a time, streamed (lazy datasets stay on disk)."""
    for i in range(0, len(ds), size):
        if isinstance(ds, data_mod.TensorImages):
            batch = ds.images[i:i + size]
        else:
            batch = torch.stack([ds[j][0] for j in range(i, min(i + size, len(ds)))])
        yield batch.to(device)  # (b, C, H, W)


class Sampler:
    """Uniform minibatches (with replacement) from a seeded generator that is checkpointed."""

    def __init__(self, ds, batch_size: int, device, *, seed: int, features=None, channels_last=False):
        self.ds, self.batch_size, self.device, self.features = ds, batch_size, device, features
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = None if isinstance(ds, data_mod.TensorImages) else ThreadPoolExecutor(4)

    def __call__(self):
        idx = torch.randint(len(self.ds), (self.batch_size,), generator=self.gen)
        if self.pool is None:
            x = self.ds.images[idx]
        else:  # lazy datasets (LSUN, CelebA): decode in threads
            x = torch.stack(list(self.pool.map(lambda i: self.ds[int(i)][0], idx)))
        fx = self.features[idx].to(self.device, non_blocking=True) if self.features is not None else None
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True), fx


class PIADTrainer:
    """One iteration of Algorithm 1 per :meth:`step`.

    ``one_pass=False`` runs lines 16-17 literally (two backward passes, gradients rescaled in
    between); the default computes the same gradients in one pass, saving a backward through E.
    """

    one_pass = True

    def __init__(self, model: piad.PIAD, rec_loss, cfg: TrainConfig):
        self.model, self.rec_loss, self.cfg = model, rec_loss, cfg
        p = model.config
        # One Adam for D_X and D_Z (the authors use one each: Adam is per parameter, same result).
        self.opt_d = torch.optim.Adam(list(model.DX.parameters()) + list(model.DZ.parameters()),
                                      lr=p.lr_critic, betas=p.betas, weight_decay=p.weight_decay)
        self.opt_ge = torch.optim.Adam(list(model.G.parameters()) + list(model.E.parameters()),
                                       lr=p.lr_gen, betas=p.betas, weight_decay=p.weight_decay)
        self.hist_g = weights_policy.GradientHistory(model.G, max_history=cfg.policy_history)
        self.hist_e = weights_policy.GradientHistory(model.E, max_history=cfg.policy_history)
        self.gamma_g, self.gamma_e = cfg.gamma_g, cfg.gamma_e

    def critic_step(self, x, z) -> dict:
        m, p = self.model, self.model.config
        with torch.no_grad():
            x_fake, z_fake = m.G(z), m.E(x)
        kw = dict(gp_weight=p.gp_weight, drift=p.drift, drift_fake=p.drift_fake)
        loss_dx, _ = piad.critic_loss(m.DX, x, x_fake, **kw)  # eq. (5)
        loss_dz, _ = piad.critic_loss(m.DZ, z, z_fake, **kw)  # eq. (5) for D_Z
        self.opt_d.zero_grad(set_to_none=True)
        (loss_dx + loss_dz).backward()  # Alg. 1 line 5
        self.opt_d.step()
        return {"loss_dx": loss_dx.detach(), "loss_dz": loss_dz.detach()}

    def step(self, it: int, sample, *, log: bool = True) -> dict:
        """Algorithm 1, one iteration. ``log=False`` skips the real-data terms of eq. (6), which
        carry no gradient and only make the logged values equal to the paper's losses."""
        m, p = self.model, self.model.config
        for _ in range(p.n_dis):                                   # lines 2-6
            x, _ = sample()                                        # line 3
            out = self.critic_step(x, m.sample_latent(x.shape[0]))  # lines 4-5
        x, fx = sample()                                           # line 7
        z = m.sample_latent(x.shape[0])
        critics = [*m.DX.parameters(), *m.DZ.parameters()]
        for q in critics:  # G and E steps train G and E only
            q.requires_grad_(False)
        z_enc = m.E(x)                                             # line 8: E(x)
        z_rec = self._rec_path(z_enc)
        adv_g = piad.adversarial_loss(m.DX, x if log else None, m.G(z))  # L_adv(G), eq. (6)
        adv_e = piad.adversarial_loss(m.DZ, z if log else None, z_enc)   # L_adv(E), eq. (6)
        rec = self.rec_loss(x, m.G(z_rec), fx=fx)                  # L_rec(G, E), eq. (7)
        if self.cfg.weights_policy == "gradnorm" and self.gamma_due(it):  # lines 9-14
            self._update_gammas(adv_g, adv_e, rec)
        self.opt_ge.zero_grad(set_to_none=True)                    # line 15
        self._backward_lines_16_17(rec, adv_g, adv_e)              # lines 16-17
        self.opt_ge.step()                                         # line 18
        for q in critics:
            q.requires_grad_(True)
        return {**out, "adv_g": adv_g.detach(), "adv_e": adv_e.detach(), "rec": rec.detach(),
                "gamma_g": self.gamma_g, "gamma_e": self.gamma_e}

    def _rec_path(self, z_enc: torch.Tensor) -> torch.Tensor:
        """E(x) as it enters G(E(x)) in L_rec: an identity node whose gradient hook scales what
        L_rec sends back to E by ``self._rec_to_e`` (1 unless :meth:`_backward_lines_16_17` sets it)."""
        self._rec_to_e = 1.0
        z_rec = z_enc.view_as(z_enc)
        z_rec.register_hook(lambda g: g * self._rec_to_e)
        return z_rec

    def _backward_lines_16_17(self, rec, adv_g, adv_e) -> None:
        """Alg. 1 lines 16-17: ∇_G = γ_G·∇_G L_rec + ∇_G L_adv(G), ∇_E = γ_E·∇_E L_rec + ∇_E L_adv(E).

        Literally (``one_pass = False``, also when γ_G = 0): backpropagate L_rec, scale G's and
        E's gradients by γ_G and γ_E, then backpropagate the adversarial losses. In one pass:
        backpropagate ``γ_G·L_rec + L_adv(G) + L_adv(E)``. G's gradient is then exactly line
        16-17's (L_adv(E) does not reach G). E's gradient from L_rec flows only through the node
        of :meth:`_rec_path`, whose hook multiplies it by γ_E/γ_G, so E receives
        γ_G·(γ_E/γ_G)·∇_E L_rec = γ_E·∇_E L_rec, plus ∇_E L_adv(E) (L_adv(G) does not reach E).
        Same gradients, one backward pass through G, E and VGG instead of two.
        """
        if self.one_pass and self.gamma_g > 0:
            self._rec_to_e = self.gamma_e / self.gamma_g
            (self.gamma_g * rec + adv_g + adv_e).backward()
            return
        rec.backward(retain_graph=True)                            # line 16
        for q in self.model.E.parameters():
            q.grad.mul_(self.gamma_e)
        for q in self.model.G.parameters():
            q.grad.mul_(self.gamma_g)
        (adv_g + adv_e).backward()                                 # line 17

    def gamma_due(self, it: int) -> bool:
        """Alg. 1 line 9. paper: ``it % n_weight == 0``; authors' code: ``(it + 1) % n_weight == 0``."""
        return (it + (0 if self.cfg.policy_at_start else 1)) % self.cfg.n_weight == 0

    def _update_gammas(self, adv_g, adv_e, rec) -> None:
        """Alg. 1 lines 10-13 with weights_policy's Algorithms 2-3."""
        params = [*self.model.G.parameters(), *self.model.E.parameters()]
        weights_policy.record_losses([self.hist_g, self.hist_e], {"adv_g": adv_g, "adv_e": adv_e, "rec": rec},
                                     params)  # lines 10-12
        kw = dict(last_n=self.cfg.policy_last_n, smoothing=self.cfg.policy_smoothing,
                  reduce=self.cfg.policy_reduce)
        self.gamma_g = self.hist_g.weight("adv_g", "rec", **kw)  # line 13, Alg. 3, eq. (12)
        self.gamma_e = self.hist_e.weight("adv_e", "rec", **kw)

    def state_dict(self) -> dict:
        return {"opt_d": self.opt_d.state_dict(), "opt_ge": self.opt_ge.state_dict(),
                "hist_g": self.hist_g.state_dict(), "hist_e": self.hist_e.state_dict(),
                "gamma_g": self.gamma_g, "gamma_e": self.gamma_e}

    def load_state_dict(self, s: dict) -> None:
        self.opt_d.load_state_dict(s["opt_d"])
        self.opt_ge.load_state_dict(s["opt_ge"])
        self.hist_g.load_state_dict(s["hist_g"])
        self.hist_e.load_state_dict(s["hist_e"])
        self.gamma_g, self.gamma_e = s["gamma_g"], s["gamma_e"]


def make_trainer(model, rec_loss, cfg: TrainConfig):
    if cfg.method == "piad":
        return PIADTrainer(model, rec_loss, cfg)
    import in_the_wild

    return in_the_wild.LatentNormTrainer(model, cfg)


# --- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, flush it to disk, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, *, fix: str = "") -> dict:
    """A checkpoint of train.py, loaded with ``weights_only=True``: tensors and plain containers
    only, so a file carrying pickled objects is refused (:class:`errors.BadFile`) before any of
    it runs. Missing, corrupt or foreign files raise :class:`UserError` subclasses (``fix`` is
    appended to their message)."""
    path = Path(path)
    state = errors.safe_load(path, what="checkpoint", fix=fix, allow_numpy=True)  # numpy: old RNG states
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise errors.BadFile(f"{path} is not a checkpoint written by train.py (no {CHECKPOINT_FORMAT!r} tag)"
                             + (f"; {fix}" if fix else ""))
    return state


def _rng_state() -> dict:
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


def _set_rng_state(s: dict) -> None:
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


def new_model(method: str, config: piad.PIADConfig, channels: int) -> piad.PIAD:
    """The networks of ``method`` (on the CPU): PIAD's; latent-norm's G normalises its latent."""
    model = piad.PIAD(config=config, channels=channels)
    if method == "latent-norm":
        import in_the_wild

        in_the_wild.use_pixel_norm(model)
    return model


def _reseed(cfg: TrainConfig, sampler, it: int) -> None:
    """New random draws from iteration ``it`` on (``--reseed K``): seeds derived from (seed, K, it)."""
    seed = int(np.random.SeedSequence([cfg.seed, cfg.reseed, it]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    sampler.gen.manual_seed(seed + 1)


def build_model(cfg: TrainConfig, ds: data_mod.AnomalyData, device) -> piad.PIAD:
    return new_model(cfg.method, piad.preset(ds.preset), ds.channels).to(device)


# --- the run -----------------------------------------------------------------------------------

LOG_FIELDS = ("iteration", "time_s", "loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "cycle", "gamma_g", "gamma_e")


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM: the iteration in progress was finished and saved.

    ``exit_code`` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM); ``resume`` says
    how to continue (train.py's ``main`` puts the user's command line there)."""

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
    """A loss (or a weight) became non-finite. ``checkpoint.pt`` keeps the last good state,
    ``diverged.pt`` beside it the diverged one; ``resume`` says how to continue with new random
    draws (``--resume --reseed K``)."""

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


class _StopOnSignal:
    """While active (main thread only): SIGINT and SIGTERM ask the loop to stop after the
    current iteration; a second SIGINT aborts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
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
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def _first_nonfinite(bad_at, values: dict, it: int):
    """Device-side record of the first iteration whose losses were not all finite (-1: none yet);
    no host sync, so it costs nothing on a GPU until it is read."""
    flags = [torch.isfinite(v.detach()).all() for v in values.values() if torch.is_tensor(v)]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    if not all(math.isfinite(v) for v in values.values() if isinstance(v, float)):
        ok = ok & False
    if bad_at is None:
        bad_at = torch.full((), -1, dtype=torch.long, device=ok.device)
    return torch.where((bad_at < 0) & ~ok, it, bad_at)


def _params_finite(model) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _saved_config(state: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in state["config"].items() if k in names})


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Algorithm 1 end to end; returns the metrics written to ``metrics.json``.

    Mistakes in the settings, data, weights or checkpoint raise :class:`UserError` before any
    work starts. SIGINT/SIGTERM stop the run after the current iteration with a checkpoint
    (:class:`Interrupted`); a non-finite loss keeps ``checkpoint.pt`` as the last good state,
    saves ``diverged.pt`` and raises :class:`Diverged`; any other exception in the loop leaves
    ``checkpoint.pt`` as it was and saves the state at the failure as ``crashed.pt``."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    run = cfg.run_dir()
    ckpt_path = run / CHECKPOINT
    state = None
    if ckpt_path.exists():
        if not cfg.resume:
            raise UserError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out "
                            "(a run's checkpoint is never overwritten)")
        state = load_checkpoint(ckpt_path, fix="train without --resume into another --out")
        saved = _saved_config(state)
        keep = {"resume", "progress", "device", "checkpoint_minutes", "evaluate", "iterations", "data_root",
                "impl", "cache_features", "channels_last",  # these change speed, not the maths
                "reseed", "out",  # new draws from here on; a run folder may be moved
                "stats"}  # the checkpoint's own statistics are used on resume
        diff = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
                for f in dataclasses.fields(cfg) if f.name not in keep and getattr(saved, f.name) != getattr(cfg, f.name)]
        if diff:
            raise UserError(f"--resume with settings that differ from the checkpoint {ckpt_path}: {', '.join(diff)}; "
                            "resume with the run's own settings, or train into another --out")
        if cfg.iterations is not None and state["iteration"] > cfg.iterations:
            raise UserError(f"--iterations {cfg.iterations} is fewer than the {state['iteration']} the checkpoint "
                            f"{ckpt_path} has already done")
    device = resolve_device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with errors.user_errors(ValueError, OSError, ImportError):  # the dataset named on the command line
        ds = data_mod.load_dataset(cfg.dataset, cfg.normal, root=cfg.data_root, seed=cfg.seed,
                                   contamination=cfg.contamination, protocol=cfg.protocol,
                                   download=cfg.download, image_size=cfg.image_size)
    model = build_model(cfg, ds, device)
    iterations = cfg.iterations or data_mod.iterations(cfg.dataset) or model.config.iterations  # supplement §1
    with errors.user_errors(OSError, ValueError, RuntimeError):  # VGG weights / statistics named by the user
        rec_loss, stats = build_reconstruction_loss(
            cfg, ds.train, device, stats_state=state["stats"] if state else None)
    if cfg.channels_last:  # same maths, NHWC layout
        model.to(memory_format=torch.channels_last)
        rec_loss.to(memory_format=torch.channels_last)
    trainer = make_trainer(model, rec_loss, cfg)

    features = None
    wants_cache = (cfg.method == "piad" and rec_loss.features is not None
                   and isinstance(ds.train, data_mod.TensorImages)
                   and (cfg.cache_features == "on" or (cfg.cache_features == "auto"
                        and iterations * cfg.batch_size > 2 * len(ds.train))))
    if wants_cache:  # the real images' VGG features: computed once, no graph (VGG is frozen)
        features = torch.cat([rec_loss.real_features(x).cpu() for x in image_batches(ds.train, device)])
    sampler = Sampler(ds.train, cfg.batch_size, device, seed=cfg.seed, features=features,
                      channels_last=cfg.channels_last)

    start, elapsed = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        sampler.gen.set_state(state["sampler"])
        _set_rng_state(state["rng"])
        start, elapsed = state["iteration"], state["elapsed_s"]
    if cfg.reseed != (saved.reseed if state else 0):  # draws not yet made under this --reseed
        _reseed(cfg, sampler, start)
    run.mkdir(parents=True, exist_ok=True)
    log_path = run / "log.csv"
    _truncate_log(log_path, start)
    stats_state = dataclasses.asdict(stats) if stats is not None else None

    def checkpoint(path: Path, it: int, **extra) -> None:
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "config": asdict(cfg), "iteration": it,
            "iterations": iterations, "elapsed_s": elapsed + time.time() - t0,
            "preset": asdict(model.config), "channels": ds.channels, "image_size": ds.image_size,
            "model": model.state_dict(), "trainer": trainer.state_dict(), "sampler": sampler.gen.get_state(),
            "rng": _rng_state(), "stats": stats_state, "vgg_weights": rec_loss.weights_id, **extra})

    good = start if state else None  # the iteration checkpoint.pt holds (None: not written yet)
    bad_at, values, values_it = None, {}, None

    def diverge(done: int, at: int | None) -> None:
        """Saves the diverged state beside checkpoint.pt (kept as the last good one) and raises."""
        if at is None:
            what = f"a weight became non-finite by iteration {done}"
        else:
            what = f"a loss became non-finite at iteration {at}"
            if values_it == at:
                row = {k: float(v) for k, v in values.items()}
                what += " (" + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not math.isfinite(v)) + ")"
        checkpoint(run / DIVERGED, done, status="diverged")
        raise Diverged(what, good, ckpt_path, run / DIVERGED, cfg.reseed + 1, cfg.checkpoint_minutes)

    def save_good(done: int) -> None:
        """checkpoint.pt is only ever written with finite losses and weights."""
        nonlocal good
        at = int(bad_at) if bad_at is not None else -1
        if at >= 0 or not _params_finite(model):
            diverge(done, at if at >= 0 else None)
        checkpoint(ckpt_path, done)
        good = done

    t0 = time.time()
    last_ckpt = t0
    bar = _progress(cfg, start, iterations)
    stop = _StopOnSignal()
    it = start
    try:
        with stop, open(log_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if start == 0:
                writer.writeheader()
            model.train()
            for it in range(start, iterations):
                log = it % cfg.log_every == 0 or it == iterations - 1
                values, values_it = trainer.step(it, sampler, log=log), it
                bad_at = _first_nonfinite(bad_at, values, it)
                if log:
                    row = {k: float(v) for k, v in values.items()}
                    if int(bad_at) >= 0:
                        diverge(it + 1, int(bad_at))
                    writer.writerow({"iteration": it, "time_s": round(elapsed + time.time() - t0, 3), **row})
                    fh.flush()
                    if bar is not None:
                        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("rec", "cycle", "gamma_g", "gamma_e")
                                         if k in row})
                if bar is not None:
                    bar.update(1)
                if stop.signum is not None or time.time() - last_ckpt > 60 * cfg.checkpoint_minutes:
                    save_good(it + 1)
                    last_ckpt = time.time()
                if stop.signum is not None:
                    raise Interrupted(stop.signum, it + 1, iterations, ckpt_path)
            it = iterations
            if good != iterations:
                save_good(iterations)
        if stop.signum is not None:  # arrived while the last checkpoint was written
            raise Interrupted(stop.signum, iterations, iterations, ckpt_path)
    except (Interrupted, Diverged):
        raise
    except BaseException as exc:  # an exception in the middle of training: checkpoint.pt stays as it was
        kept = (f"{ckpt_path} keeps the last good state (iteration {good})" if good is not None
                else "no checkpoint had been written yet")
        saved_note = ""
        if isinstance(exc, Exception):  # not for a second Ctrl-C: stopping at once was asked for
            try:
                checkpoint(run / CRASHED, it, status="crashed")
                saved_note = f"; the state at the failure (iteration {it}, possibly half-updated) is in {run / CRASHED}"
            except Exception as save_exc:  # noqa: BLE001 - e.g. the disk is full: keep the first error
                saved_note = f"; saving the state at the failure failed too ({save_exc})"
        exc.add_note(f"piad: training stopped at iteration {it}: {kept}{saved_note}. "
                     "Resume with the same command plus --resume.")
        raise
    finally:
        if bar is not None:
            bar.close()
    train_time = elapsed + time.time() - t0
    if not cfg.evaluate:
        return {"iterations": iterations, "train_time_s": train_time}
    import evaluate

    return evaluate.evaluate_run(run, model=model, data=ds, rec_loss=rec_loss, config=cfg,
                                 extra={"iterations": iterations, "train_time_s": round(train_time, 1),
                                        "device": str(device), "contamination": ds.contamination})


def _truncate_log(path: Path, start: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    if start == 0:
        path.unlink()
        return
    with open(path) as fh:
        rows = list(csv.reader(fh))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < start]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(keep)


def _progress(cfg: TrainConfig, start: int, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, desc=f"{cfg.method} {cfg.dataset}:{cfg.normal}")


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="train.py",
                                description="Train PIAD (Algorithm 1) on one normal class and evaluate it.")
    p.add_argument("--dataset", default="mnist", choices=data_mod.DATASETS)
    p.add_argument("--normal", default="8", help="normal class: index or name (attribute for celeba)")
    p.add_argument("--iterations", type=int, default=None, help="default: the supplement's schedule")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<normal>-...)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--no-download", action="store_true",
                   help="never download MNIST/CIFAR-10 (files must be under --data-root)")
    p.add_argument("--protocol", default=None, choices=["split", "gpnd"], help="evaluation protocol")
    p.add_argument("--image-size", type=int, default=None, choices=[32, 64], help="--dataset folder only")
    p.add_argument("--contamination", type=float, default=0.0, help="fraction of anomalies in training")
    p.add_argument("--method", default="piad", choices=METHODS)
    p.add_argument("--vgg-weights", default="auto", help="auto|torchvision|caffe|random|PATH")
    p.add_argument("--stats", default="auto", help="VGG feature statistics: auto|authors|sklearn|train|PATH")
    p.add_argument("--loss", default="rel-perc-l1", choices=losses.KINDS)
    p.add_argument("--impl", default="auto", choices=["auto", "ext", "torch"])
    p.add_argument("--weights-policy", default="gradnorm", choices=["gradnorm", "fixed"])
    p.add_argument("--gamma-g", type=float, default=1.0, help="γ_G with --weights-policy fixed")
    p.add_argument("--gamma-e", type=float, default=1.0, help="γ_E with --weights-policy fixed")
    p.add_argument("--policy-reduce", default="pooled-median", choices=list(weights_policy.REDUCES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--cache-features", default="auto", choices=["auto", "on", "off"],
                   help="compute the training images' VGG features once (auto: when seen > twice)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW tensors")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--reseed", type=int, default=0,
                   help="with --resume: new random draws from the checkpoint on (e.g. after a divergence)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-evaluate", action="store_true", help="train only (evaluate later with evaluate.py)")
    errors.add_debug_flag(p)
    a = p.parse_args(argv)
    return TrainConfig(
        dataset=a.dataset, normal=a.normal, iterations=a.iterations, batch_size=a.batch_size, seed=a.seed,
        out=a.out, data_root=a.data_root, download=not a.no_download, protocol=a.protocol, image_size=a.image_size,
        contamination=a.contamination, method=a.method, vgg_weights=a.vgg_weights, stats=a.stats,
        loss=a.loss, impl=a.impl, weights_policy=a.weights_policy, gamma_g=a.gamma_g, gamma_e=a.gamma_e,
        policy_reduce=a.policy_reduce, device=a.device, resume=a.resume, cache_features=a.cache_features,
        channels_last=not a.no_channels_last, checkpoint_minutes=a.checkpoint_minutes,
        progress=not a.no_progress, evaluate=not a.no_evaluate, reseed=a.reseed)


def _python() -> str:
    """How to call this interpreter in a printed command: ``python`` if that is it, else its path."""
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
        return "python"
    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


def command_line(argv, flags: list[str], script: str = "train.py") -> str:
    """``argv`` as a command to paste, with ``flags`` (``--resume``, ``--reseed K``) set."""
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
    return shlex.join([_python(), script, *out, *flags])


def _main(argv) -> None:
    try:
        metrics = train(parse_args(argv))
    except (Interrupted, Diverged) as exc:
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
        exc.resume = command_line(argv, exc.resume_flags, script)
        raise
    print(json.dumps(metrics, indent=2))


def main(argv=None) -> None:
    """``python train.py ...``: mistakes end with ``error: ...`` and exit status 2 (no traceback
    unless ``--debug``); SIGINT/SIGTERM save the run and exit 130/143 with the ``--resume`` command."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
