"""Algorithm 1 of PIAD (paper §3.2-3.3, supplement §1): ``python train.py --dataset mnist --normal 8``.

:class:`PIADTrainer` is one iteration of Algorithm 1; :func:`train` is its loop: for each
iteration the step, the row of log.csv, the periodic checkpoint and the stop rules, then the
evaluation of ``evaluate.py``. The guard around the loop (log.csv, atomic checkpoints, signals,
divergence, crashes): guard.py; resume: checkpoint.py; ``--precision``: precision.py;
minibatches: sampler.py. ``--method latent-norm`` trains Berg et al.'s variant (``berg.system``);
``--method knn`` fits the k-NN baseline instead of the loop (``baselines.knn``: no step).
Mistakes in the settings, data, weights or checkpoint end with one ``error: ...`` line and exit
status 2 before any work starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import sys
from typing import Protocol

import torch

import checkpoint
import data as data_mod
import errors
import evaluate
import guard
import piad
import presets
import precision
import rundir
import sampler as sampler_mod
import weights_policy
from baselines import knn
from berg import system
from config import TrainConfig, check_sizes, parse_args, resolve_device
from errors import Diverged, Interrupted, UserError
from features import build_loss
from tools import provenance, tblog


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


class Trainer(Protocol):
    """What the loop calls of a trainer: :class:`PIADTrainer`, or Berg et al.'s (``berg.system.trainer``:
    ``latent_norm.LatentNormTrainer``, ``progressive.ProgressiveTrainer``)."""

    def step(self, it: int, sample) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, s: dict) -> None: ...


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Algorithm 1 end to end; returns the metrics written to ``metrics.json``.

    Mistakes in the settings, data, weights or checkpoint raise :class:`UserError` before any
    work starts; a run that ends early raises :class:`Interrupted` or :class:`Diverged` (guard.py)."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate().resolved(system.THEIRS)
    with contextlib.ExitStack() as held:  # one process per run folder, claimed before any work (rundir.py)
        held.enter_context(rundir.claim(cfg.run_dir()))
        checkpoint.check_run_folder(cfg.run_dir(), cfg.resume)  # before the data loads
        if cfg.threads:  # before any work: a run's floats depend on its thread count
            torch.set_num_threads(cfg.threads)
        cfg, ds, extra = cfg.load_run_data(protocols=system.PROTOCOLS, theirs=system.THEIRS)  # --fallback
        held.enter_context(rundir.claim(cfg.run_dir()))  # --fallback without --out: its folder (else re-entrant)
        check_sizes(cfg, ds)
        state = checkpoint.resume_state(cfg)
        checkpoint.check_fits(state, ds)
        device = resolve_device(cfg.device)
        if cfg.method == "knn":  # baselines/knn.py: no step, so no Algorithm 1; the training images' features
            model, info = knn.fit(cfg, ds, state, device)
            return info if not cfg.evaluate else evaluate.evaluate_run(
                cfg.run_dir(), model=model, data=ds, rec_loss=model, config=cfg,
                checkpoint_path=cfg.run_dir() / checkpoint.CHECKPOINT, extra={**info, **extra})
        if cfg.method == "latent-norm":  # Berg et al.'s networks (berg.system)
            model = system.new_model(cfg, ds)
        else:  # the dataset's preset, supplement Tables 1-4
            model = piad.PIAD(config=presets.network(ds.preset), channels=ds.channels)
        model.to(device, memory_format=cfg.memory_format)  # NHWC with --channels-last: same maths, faster
        with errors.user_errors(OSError, ValueError, RuntimeError):  # VGG weights / statistics named by the user
            rec_loss, stats = build_loss(cfg.loss, weights=cfg.vgg_weights, stats=cfg.stats, impl=cfg.impl,
                                         device=device, train_batches=data_mod.image_batches(ds.train, device),
                                         saved_stats=state["stats"] if state else None)
        rec_loss.to(memory_format=cfg.memory_format)
        if cfg.pgan:  # their schedule, in minibatches
            iterations = system.iterations(cfg, ds.image_size, device)
        else:  # supplement §1
            iterations = cfg.iterations or presets.iterations(cfg.dataset, ds.preset)
        trainer: Trainer = make_trainer(model, rec_loss, cfg)
        features = sampler_mod.cached_features(rec_loss, ds.train, device, when=cfg.cache_features,
                                               draws=iterations * cfg.batch_size) if cfg.method == "piad" else None
        sample = sampler_mod.Sampler(ds.train, cfg.batch_size, device, seed=cfg.seed, features=features,
                                     memory_format=cfg.memory_format)
        saved = checkpoint.Saved(cfg, model, trainer, sample, iterations, ds.channels, ds.image_size,
                                 dataclasses.asdict(stats) if stats is not None else None, rec_loss.weights_id,
                                 functools.partial(provenance.record, device))
        start = state["iteration"] if state else 0
        if start == iterations:  # e.g. a second `make run`
            print(f"note: {cfg.run_dir()} has finished its {iterations:,} iterations; evaluating it again",
                  file=sys.stderr, flush=True)
        if state:
            saved.restore(state)
        checkpoint.reseed(cfg, sample, start, state)  # --reseed K: new draws from the checkpoint on
        tb = (tblog.TensorBoardLog(cfg.run_dir() / "tb", ds.train, every=cfg.tensorboard_images, start=start)
              if cfg.tensorboard else None)  # RUN/tb/: an optional extra; log.csv is always written
        model.train()
        with guard.Guard(saved, cfg.run_dir(), start=start, elapsed=state["elapsed_s"] if state else 0.0, tb=tb) as g:
            for it in range(start, iterations):                    # Algorithm 1, lines 1-19
                with precision.autocast(cfg.precision, device):
                    values = trainer.step(it, sample)              # lines 2-18
                g.log(it, values)                                  # log.csv every --log-every
                g.checkpoint(it + 1)                               # every --checkpoint-minutes, --keep-every
                g.stop_if_signalled(it + 1)                        # SIGINT, SIGTERM: saved, then stop
            g.finish()                                             # checkpoint.pt at the end
        if not cfg.evaluate:
            return {"iterations": iterations, "train_time_s": g.train_time()}
        return evaluate.evaluate_run(cfg.run_dir(), model=model, data=ds, rec_loss=rec_loss, config=cfg,
                                     checkpoint_path=g.checkpoint_path,
                                     extra={"iterations": iterations, "train_time_s": round(g.train_time(), 1),
                                            "device": str(device), "contamination": ds.contamination,
                                            "threads": torch.get_num_threads(), "precision": cfg.precision, **extra})


def make_trainer(model, rec_loss, cfg: TrainConfig) -> Trainer:
    """Algorithm 1's :class:`PIADTrainer`; for ``--method latent-norm``, Berg et al.'s (``berg.system``)."""
    if cfg.method == "latent-norm":
        return system.trainer(model, system.schedule(cfg))
    return PIADTrainer(model, rec_loss, cfg)


def _main(argv) -> None:
    cfg = parse_args(argv)
    try:
        metrics = train(cfg)
    except (Interrupted, Diverged) as exc:
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
        exc.resume = errors.command_line(argv, exc.resume_flags, script)
        raise
    print(json.dumps(metrics, indent=2))
    if "roc_auc" in metrics:
        print(summary(cfg, metrics, sys.argv[1:] if argv is None else list(argv)))


def summary(cfg: TrainConfig, metrics: dict, args: list[str]) -> str:
    """The last lines of ``python train.py`` (``make run``'s): the result, where the run folder and its
    figures are, and, for a run shorter than the paper's schedule, the command for that schedule
    with its duration at this run's speed."""
    folder = dataclasses.replace(cfg, dataset=metrics["dataset"], seed=metrics["seed"]).run_dir()
    figures = ", ".join(sorted(p.name for p in folder.glob("*.png")))
    lines = [f"ROC AUC {metrics['roc_auc']:.3f}, average precision {metrics['average_precision']:.3f} "
             f"({metrics['score']}, {metrics['n_test']} test images of which {metrics['n_test_anomalous']} anomalous)",
             f"run folder: {folder} (metrics.json, scores.csv, log.csv, checkpoint.pt; figures: {figures})"]
    with contextlib.suppress(ValueError):  # a folder dataset has no schedule of its own
        schedule = presets.iterations(metrics["dataset"])
        if metrics["iterations"] and metrics["iterations"] < schedule:
            hours = metrics["train_time_s"] / metrics["iterations"] * schedule / 3600
            flags = [a for a in args if a != "--resume"]
            drop = {"--iterations", "--out", "--keep-every"}  # each with its value
            flags = [a for i, a in enumerate(flags) if a not in drop and (i == 0 or flags[i - 1] not in drop)]
            lines.append(f"the paper's schedule, {schedule:,} iterations (about {hours:.1f} h at this run's speed, "
                         f"{metrics['precision']}): python train.py {shlex.join(flags)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python train.py ...``: mistakes end with ``error: ...`` and exit status 2 (no traceback
    unless ``--debug``); a run that ends early prints how to continue (guard.py's docstring)."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
