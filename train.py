"""Training procedure of PIAD, Algorithm 1 (paper §3.2-3.3, supplement §1).

``python train.py --dataset mnist --normal 8`` trains PIAD on the normal class and writes,
in the run folder: ``checkpoint.pt`` (atomic, every few minutes and at the end),
``log.csv`` (every loss and γ_G, γ_E), and the evaluation outputs of ``evaluate.py``
(``metrics.json``, ``scores.csv``, ``roc.png``, ``pr.png``, ``reconstructions.png``, ``extremes.png``);
with ``--calibration F`` a seeded fraction F of the normal training images is held out before
training (``data.hold_out_calibration``) and gives the decision threshold (``evaluate.calibrate``).
``train(TrainConfig(...))`` does the same from Python. ``--method latent-norm`` trains the
variant of Berg et al. (module ``berg.latent_norm``) on the same networks instead.

Mistakes in the settings (``TrainConfig.validate``), data, weights or checkpoint end with one
``error: ...`` line and exit status 2 before any work starts; how a run ends early (signals,
divergence, crashes) and what it keeps: loop.py's docstring.

Speed-ups that keep the maths of Algorithm 1: the real images' VGG features carry no autograd
graph and, for in-memory training sets seen many times, are computed once and cached; fake
images/latents in the critic steps are produced under ``no_grad``; the critics' parameters
are frozen during the generator/encoder step; the relative-perceptual-L1 reduction uses the
fused op of ``csrc/`` when built.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import checkpoint
import data as data_mod
import errors
import evaluate
import loop
import piad
import weights_policy
from berg import latent_norm, progressive, system
from checkpoint import CHECKPOINT
from config import TrainConfig, parse_args, resolve_device
from errors import Diverged, Interrupted, UserError
from features import build_loss



class Sampler:
    """Uniform minibatches (with replacement) from a seeded generator that is checkpointed."""

    def __init__(self, ds, batch_size: int, device, *, seed: int, features=None,
                 memory_format=torch.contiguous_format):
        self.ds, self.batch_size, self.device, self.features = ds, batch_size, device, features
        self.memory_format = memory_format
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = None if isinstance(ds, data_mod.TensorImages) else ThreadPoolExecutor(4)

    def __call__(self, n: int | None = None):  # n: a minibatch of another size (progressive growing)
        idx = torch.randint(len(self.ds), (n or self.batch_size,), generator=self.gen)
        if self.pool is None:
            x = self.ds.images[idx]
        else:  # lazy datasets (LSUN, CelebA): decode in threads
            x = torch.stack(list(self.pool.map(lambda i: self.ds[int(i)][0], idx)))
        fx = self.features[idx].to(self.device, non_blocking=True) if self.features is not None else None
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True), fx


def _in_precision(step):
    """``PIADTrainer.step`` in the run's ``--precision`` (``TrainConfig.precision``), decided here.

    bf16: the step runs under ``torch.autocast(device, torch.bfloat16)``, so G, E, D_X, D_Z and the
    VGG-19 compute in bf16 while the weights, their gradients and Adam's state stay fp32 (autocast
    casts each weight on its way into a convolution or dense layer). Stays fp32 inside the region,
    each said where it is computed: the gradient penalty's norm (``piad.gradient_penalty``), the γ
    policy's gradient statistics (``weights_policy.GradientHistory.record``, on the fp32 parameter
    gradients) and eq. (4)'s sums (the fused op accumulates in fp32 and returns fp32); eq. (6)'s
    means of the critics' bf16 outputs are bf16 (their gradient, 1/B each, is exact). Evaluation
    runs outside the step, in fp32. The bf16 copies of the weights that autocast caches in the
    region are dropped after every optimizer step (:func:`_drop_stale_casts`).
    """
    @functools.wraps(step)
    def in_precision(self, *args, **kwargs):
        if self.cfg.precision == "fp32":
            return step(self, *args, **kwargs)
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return step(self, *args, **kwargs)
    return in_precision


def _drop_stale_casts(*optimizers) -> None:
    """Autocast caches the bf16 cast of each trainable weight for the rest of its region, keyed by
    the tensor, not its values: after an optimizer step updates the weights in place, the cache
    would feed the old ones to the next critic step. Each optimizer step clears it."""
    for opt in optimizers:
        opt.register_step_post_hook(lambda *_: torch.clear_autocast_cache())


class PIADTrainer:
    """One iteration of Algorithm 1 per :meth:`step`, written as the paper writes it."""

    def __init__(self, model: piad.PIAD, rec_loss, cfg: TrainConfig):
        self.model, self.rec_loss, self.cfg = model, rec_loss, cfg
        p = model.config
        # One Adam for D_X and D_Z (the authors use one each: Adam is per parameter, same result).
        self.opt_d = torch.optim.Adam(list(model.DX.parameters()) + list(model.DZ.parameters()),
                                      lr=p.lr_critic, betas=p.betas, weight_decay=p.weight_decay)
        self.opt_ge = torch.optim.Adam(list(model.G.parameters()) + list(model.E.parameters()),
                                       lr=p.lr_gen, betas=p.betas, weight_decay=p.weight_decay)
        self.hist_g = weights_policy.GradientHistory(model.G, norm=cfg.policy_norm, max_history=cfg.policy_history)
        self.hist_e = weights_policy.GradientHistory(model.E, norm=cfg.policy_norm, max_history=cfg.policy_history)
        self.gamma_g, self.gamma_e = cfg.gamma_g, cfg.gamma_e
        _drop_stale_casts(self.opt_d, self.opt_ge)

    def critic_step(self, x, z) -> dict:
        m, p = self.model, self.model.config
        with torch.no_grad():
            x_fake, z_fake = m.G(z), m.E(x)
        kw = dict(gp_weight=p.gp_weight, drift=p.drift, drift_fake=p.drift_fake)
        loss_dx, gp_dx = piad.critic_loss(m.DX, x, x_fake, **kw)  # eq. (5)
        loss_dz, gp_dz = piad.critic_loss(m.DZ, z, z_fake, **kw)  # eq. (5) for D_Z
        self.opt_d.zero_grad(set_to_none=True)
        (loss_dx + loss_dz).backward()  # Alg. 1 line 5
        self.opt_d.step()
        return {"loss_dx": loss_dx.detach(), "loss_dz": loss_dz.detach(), "gp_dx": gp_dx, "gp_dz": gp_dz}

    @_in_precision
    def step(self, it: int, sample) -> dict:
        """Algorithm 1, one iteration, the same on every one (logged or not). Lines 16-17 give G ``γ_G·∇L_rec + ∇L_adv(G)`` and E
        ``γ_E·∇L_rec + ∇L_adv(E)``, the gradients of eq. (8)-(9)."""
        m, p = self.model, self.model.config
        for _ in range(p.n_dis):                                   # lines 2-6
            x, _ = sample()                                        # line 3
            out = self.critic_step(x, m.sample_latent(x.shape[0]))  # lines 4-5
        x, fx = sample()                                           # line 7
        z = m.sample_latent(x.shape[0])
        critics = [*m.DX.parameters(), *m.DZ.parameters()]
        for q in critics:  # G and E steps train G and E only
            q.requires_grad_(False)
        z_enc = m.E(x)                                             # line 8
        adv_g = piad.adversarial_loss(m.DX, x, m.G(z))             # L_adv(G), eq. (6)
        adv_e = piad.adversarial_loss(m.DZ, z, z_enc)              # L_adv(E), eq. (6)
        rec = self.rec_loss(x, m.G(z_enc), fx=fx)                  # L_rec(G, E), eq. (7)
        if self.cfg.weights_policy == "gradnorm" and self.gamma_due(it):  # lines 9-14
            self._update_gammas(adv_g, adv_e, rec)
        self.opt_ge.zero_grad(set_to_none=True)                    # line 15
        rec.backward(retain_graph=True)                            # line 16
        for q in m.G.parameters():
            q.grad.mul_(self.gamma_g)
        for q in m.E.parameters():
            q.grad.mul_(self.gamma_e)
        (adv_g + adv_e).backward()                                 # line 17
        self.opt_ge.step()                                         # line 18
        for q in critics:
            q.requires_grad_(True)
        return {**out, "adv_g": adv_g.detach(), "adv_e": adv_e.detach(), "rec": rec.detach(),
                "gamma_g": self.gamma_g, "gamma_e": self.gamma_e}

    def gamma_due(self, it: int) -> bool:
        """Alg. 1 line 9: γ is due every ``n_weight`` iterations, from iteration 0 or from
        ``n_weight - 1`` (``TrainConfig.policy_at_start`` chooses)."""
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


def new_run_model(cfg: TrainConfig, ds) -> piad.PIAD | latent_norm.Networks:
    """The networks of a new run of ``cfg`` on the dataset ``ds`` (``data.AnomalyData``): PIAD's of the
    dataset's preset; for ``--method latent-norm``, those of ``--networks`` (``berg.system``)."""
    if cfg.method == "latent-norm":
        return system.new_model(cfg.networks, preset=ds.preset, channels=ds.channels, image_size=ds.image_size,
                                train_set=ds.train, seed=cfg.seed, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max)
    return piad.PIAD(config=piad.preset(ds.preset), channels=ds.channels)


def make_trainer(model, rec_loss, cfg: TrainConfig):
    """Algorithm 1's :class:`PIADTrainer`; for ``--method latent-norm``, Berg et al.'s (``berg.system``)."""
    if cfg.method == "latent-norm":
        return system.trainer(model, pgan_schedule(cfg))
    return PIADTrainer(model, rec_loss, cfg)


def _reseed(cfg: TrainConfig, sampler, it: int) -> None:
    """New random draws from iteration ``it`` on (``--reseed K``): seeds derived from (seed, K, it)."""
    seed = int(np.random.SeedSequence([cfg.seed, cfg.reseed, it]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    sampler.gen.manual_seed(seed + 1)


def pgan_schedule(cfg: TrainConfig) -> progressive.Schedule:
    return progressive.Schedule(lod_training_kimg=cfg.lod_kimg, lod_transition_kimg=cfg.lod_kimg,
                                total_kimg=cfg.total_kimg)


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Algorithm 1 end to end; returns the metrics written to ``metrics.json``.

    Mistakes in the settings, data, weights or checkpoint raise :class:`UserError` before any
    work starts; a run that ends early raises :class:`Interrupted` or :class:`Diverged` (loop.py's
    docstring)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate().resolved()
    if cfg.threads:  # before any work: a run's floats depend on its thread count
        torch.set_num_threads(cfg.threads)
    cfg, ds, extra = _load_data(cfg)
    state = _resume_state(cfg)
    run = build_run(cfg, ds, state)
    run.extra.update(extra)
    loop.loop(run)
    if not cfg.evaluate:
        return {"iterations": run.iterations, "train_time_s": run.train_time()}
    return evaluate.evaluate_run(run.dir, model=run.model, data=ds, rec_loss=run.rec_loss, config=cfg,
                                 checkpoint_path=run.checkpoint,
                                 extra={"iterations": run.iterations, "train_time_s": round(run.train_time(), 1),
                                        "device": str(run.device), "contamination": ds.contamination,
                                        "threads": torch.get_num_threads(), "precision": cfg.precision,
                                        **run.extra})


def _load(cfg: TrainConfig) -> data_mod.AnomalyData:
    """The dataset the settings name, with every random generator seeded first."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ds = cfg.load_data(download=cfg.download)
    if ds.calibration is not None:  # held out before training, checked here
        with errors.user_errors(ValueError, prefix="--calibration: "):
            evaluate.calibration_rank(len(ds.calibration), cfg.target_fpr)
    return ds


def _load_data(cfg: TrainConfig) -> tuple[TrainConfig, data_mod.AnomalyData, dict]:
    """:func:`_load`; when the dataset cannot be had here (not on disk, no download) and
    ``--fallback`` names another, that one instead, said in one line and recorded in metrics.json."""
    try:
        return cfg, _load(cfg), {}
    except UserError as exc:
        if not cfg.fallback or not isinstance(exc.__cause__, data_mod.DatasetUnavailable):
            raise
        print(f"note: {cfg.dataset} cannot be had here; training on {cfg.fallback} instead (--fallback)",
              file=sys.stderr, flush=True)
        alt = dataclasses.replace(cfg, dataset=cfg.fallback, fallback=None, protocol=None).validate().resolved()
        return alt, _load(alt), {"fallback_from": cfg.dataset}


def _resume_state(cfg: TrainConfig) -> dict | None:
    """The checkpoint to continue (``--resume``), after checking it fits the settings; None for a new run."""
    path = cfg.run_dir() / CHECKPOINT
    if not path.exists():
        return None
    if not cfg.resume:
        raise UserError(f"{path} exists; pass --resume to continue it, or choose another --out "
                        "(a run's checkpoint is never overwritten)")
    state = checkpoint.load_checkpoint(path, fix="train without --resume into another --out")
    diff = cfg.resume_conflicts(TrainConfig.from_saved(state["config"]))
    if diff:
        raise UserError(f"--resume with settings that differ from the checkpoint {path}: {', '.join(diff)}; "
                        "resume with the run's own settings, or train into another --out")
    if cfg.iterations is not None and state["iteration"] > cfg.iterations:
        raise UserError(f"--iterations {cfg.iterations} is fewer than the {state['iteration']} the checkpoint "
                        f"{path} has already done")
    return state


def build_run(cfg: TrainConfig, ds: data_mod.AnomalyData, state: dict | None) -> loop.Run:
    """The networks, loss, trainer and sampler of a run, restored from ``state`` when resuming."""
    device = resolve_device(cfg.device)
    model = new_run_model(cfg, ds).to(device)
    if cfg.pgan:  # minibatches their loop runs for total_kimg
        iterations = cfg.iterations or progressive.minibatches(pgan_schedule(cfg), ds.image_size)
        if device.type == "cpu":
            print(progressive.cpu_note(cfg.fmap_max, cfg.fmap_base), file=sys.stderr)
    else:
        iterations = cfg.iterations or data_mod.iterations(cfg.dataset, ds.preset)  # supplement §1
    with errors.user_errors(OSError, ValueError, RuntimeError):  # VGG weights / statistics named by the user
        rec_loss, stats = build_loss(cfg.loss, weights=cfg.vgg_weights, stats=cfg.stats, impl=cfg.impl,
                                     device=device, train_batches=data_mod.image_batches(ds.train, device),
                                     saved_stats=state["stats"] if state else None)
    model.to(memory_format=cfg.memory_format)  # NHWC with --channels-last: same maths, faster kernels
    rec_loss.to(memory_format=cfg.memory_format)
    trainer = make_trainer(model, rec_loss, cfg)
    features = None
    wants_cache = (cfg.method == "piad" and rec_loss.features is not None
                   and isinstance(ds.train, data_mod.TensorImages)
                   and (cfg.cache_features == "on" or (cfg.cache_features == "auto"
                        and iterations * cfg.batch_size > 2 * len(ds.train))))
    if wants_cache:  # the real images' VGG features: computed once, no graph (VGG is frozen)
        features = torch.cat([rec_loss.real_features(x).cpu() for x in data_mod.image_batches(ds.train, device)])
    sampler = Sampler(ds.train, cfg.batch_size, device, seed=cfg.seed, features=features,
                      memory_format=cfg.memory_format)
    run = loop.Run(cfg, cfg.run_dir(), ds, device, model, rec_loss, trainer, sampler, iterations,
                   dataclasses.asdict(stats) if stats is not None else None)
    if state:
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        sampler.gen.set_state(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        run.start = run.good = state["iteration"]
        run.elapsed = state["elapsed_s"]
    if cfg.reseed != (state["config"].get("reseed", 0) if state else 0):  # draws not yet made under this --reseed
        _reseed(cfg, sampler, run.start)
    run.dir.mkdir(parents=True, exist_ok=True)
    loop.truncate_log(run.dir / "log.csv", run.start)
    return run


def _main(argv) -> None:
    try:
        metrics = train(parse_args(argv))
    except (Interrupted, Diverged) as exc:
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
        exc.resume = errors.command_line(argv, exc.resume_flags, script)
        raise
    print(json.dumps(metrics, indent=2))


def main(argv=None) -> None:
    """``python train.py ...``: mistakes end with ``error: ...`` and exit status 2 (no traceback
    unless ``--debug``); a run that ends early prints how to continue (loop.py's docstring)."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
