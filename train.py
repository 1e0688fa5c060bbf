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

import csv
import dataclasses
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data as data_mod
import errors
import evaluate
import in_the_wild
import piad
import weights_policy
from checkpoint import CHECKPOINT, CRASHED, DIVERGED
from config import TrainConfig, parse_args
from errors import Diverged, Interrupted, UserError

LOG_FIELDS = ("iteration", "time_s", "loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "cycle", "gamma_g", "gamma_e")


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
    return PIADTrainer(model, rec_loss, cfg) if cfg.method == "piad" else in_the_wild.LatentNormTrainer(model)


def _reseed(cfg: TrainConfig, sampler, it: int) -> None:
    """New random draws from iteration ``it`` on (``--reseed K``): seeds derived from (seed, K, it)."""
    seed = int(np.random.SeedSequence([cfg.seed, cfg.reseed, it]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device
    sampler.gen.manual_seed(seed + 1)


def build_model(cfg: TrainConfig, ds: data_mod.AnomalyData, device) -> piad.PIAD:
    return checkpoint.new_model(cfg.method, piad.preset(ds.preset), ds.channels).to(device)


# --- the run -----------------------------------------------------------------------------------

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
        state = checkpoint.load_checkpoint(ckpt_path, fix="train without --resume into another --out")
        saved = TrainConfig.from_saved(state["config"])
        diff = cfg.resume_conflicts(saved)
        if diff:
            raise UserError(f"--resume with settings that differ from the checkpoint {ckpt_path}: {', '.join(diff)}; "
                            "resume with the run's own settings, or train into another --out")
        if cfg.iterations is not None and state["iteration"] > cfg.iterations:
            raise UserError(f"--iterations {cfg.iterations} is fewer than the {state['iteration']} the checkpoint "
                            f"{ckpt_path} has already done")
    device = checkpoint.resolve_device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with errors.user_errors(ValueError, OSError, ImportError):  # the dataset named on the command line
        ds = data_mod.load_dataset(cfg.dataset, cfg.normal, root=cfg.data_root, seed=cfg.seed,
                                   contamination=cfg.contamination, protocol=cfg.protocol,
                                   download=cfg.download, image_size=cfg.image_size,
                                   preprocess=cfg.preprocess)
    model = build_model(cfg, ds, device)
    iterations = cfg.iterations or data_mod.iterations(cfg.dataset) or model.config.iterations  # supplement §1
    with errors.user_errors(OSError, ValueError, RuntimeError):  # VGG weights / statistics named by the user
        rec_loss, stats = checkpoint.build_reconstruction_loss(
            cfg, data_mod.image_batches(ds.train, device), device, stats_state=state["stats"] if state else None)
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
        features = torch.cat([rec_loss.real_features(x).cpu() for x in data_mod.image_batches(ds.train, device)])
    sampler = Sampler(ds.train, cfg.batch_size, device, seed=cfg.seed, features=features,
                      channels_last=cfg.channels_last)

    start, elapsed = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state["trainer"])
        sampler.gen.set_state(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        start, elapsed = state["iteration"], state["elapsed_s"]
    if cfg.reseed != (saved.reseed if state else 0):  # draws not yet made under this --reseed
        _reseed(cfg, sampler, start)
    run.mkdir(parents=True, exist_ok=True)
    log_path = run / "log.csv"
    _truncate_log(log_path, start)
    stats_state = dataclasses.asdict(stats) if stats is not None else None

    def save(path: Path, it: int, **extra) -> None:
        checkpoint.save_checkpoint(path, {
            "format": checkpoint.CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "iteration": it,
            "iterations": iterations, "elapsed_s": elapsed + time.time() - t0,
            "preset": dataclasses.asdict(model.config), "channels": ds.channels, "image_size": ds.image_size,
            "model": model.state_dict(), "trainer": trainer.state_dict(), "sampler": sampler.gen.get_state(),
            "rng": checkpoint.rng_state(), "stats": stats_state, "vgg_weights": rec_loss.weights_id, **extra})

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
        save(run / DIVERGED, done, status="diverged")
        raise Diverged(what, good, ckpt_path, run / DIVERGED, cfg.reseed + 1, cfg.checkpoint_minutes)

    def save_good(done: int) -> None:
        """checkpoint.pt is only ever written with finite losses and weights."""
        nonlocal good
        at = int(bad_at) if bad_at is not None else -1
        if at >= 0 or not _params_finite(model):
            diverge(done, at if at >= 0 else None)
        save(ckpt_path, done)
        good = done

    t0 = time.time()
    last_ckpt = t0
    bar = _progress(cfg, start, iterations)
    stop = errors.StopOnSignal()
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
                save(run / CRASHED, it, status="crashed")
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
    unless ``--debug``); SIGINT/SIGTERM save the run and exit 130/143 with the ``--resume`` command."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
