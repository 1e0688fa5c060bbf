"""The loop of Algorithm 1 (lines 1-19) around its step: log.csv, checkpoints, and how a run ends early.

``train.py`` builds a :class:`Run` (the networks, loss, trainer and sampler of one run and the
state its loop changes) and hands it to :func:`loop`, which runs Algorithm 1's iterations
(``trainer.step``) from the run's start and keeps its promises. This is the one account of them;
README, train.py and errors.py point here.

* ``log.csv``: every loss and γ_G, γ_E every ``log_every`` iterations (the only place a step's
  values reach the host).
* ``checkpoint.pt``: written atomically every ``checkpoint_minutes`` and at the end, only with
  finite losses and weights; train.py never overwrites one without ``--resume``, which continues
  the run exactly. With ``keep_every`` K, also after every K-th iteration, and that state is kept
  as ``kept/checkpoint-<iteration>.pt`` (``checkpoint.keep``) for ``python -m tools.progress``.
* SIGINT (Ctrl-C) or SIGTERM (a scheduler's): the iteration in progress finishes, ``checkpoint.pt``
  is saved and :class:`errors.Interrupted` is raised; ``train.py`` prints the ``--resume`` command
  and exits 130 / 143 (128 + the signal). A second Ctrl-C stops at once without saving
  (:class:`errors.StopOnSignal`); ``errors.request_stop`` asks the same from another thread.
* A non-finite loss or weight: ``checkpoint.pt`` stays the last good state, ``diverged.pt`` beside
  it holds the diverged one, and :class:`errors.Diverged` is raised; ``train.py`` prints the
  command that continues from the good state with new random draws (``--resume --reseed K``)
  and exits 1.
* Any other exception: the state at the failure goes to ``crashed.pt`` beside the untouched
  ``checkpoint.pt``, and the exception (with a note saying so) propagates with its traceback.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path

import torch

import checkpoint
import data as data_mod
import errors
import piad
from tools import provenance, tblog
from checkpoint import CHECKPOINT, CRASHED, DIVERGED
from config import TrainConfig
from errors import Diverged, Interrupted

LOG_FIELDS = ("iteration", "time_s", "loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "cycle", "gamma_g", "gamma_e",
              "lod", "kimg", "gp_dx", "gp_dz")  # lod, kimg: progressive growing (--networks pgan); gp: eq. (5)'s penalties


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


@dataclasses.dataclass
class Run:
    """One training run: what it was built from, and the state its loop changes and its
    checkpoints save (``good``: the iteration ``checkpoint.pt`` holds, None before the first)."""

    cfg: TrainConfig
    dir: Path
    ds: data_mod.AnomalyData
    device: torch.device
    model: piad.PIAD
    rec_loss: object
    trainer: object
    sampler: object  # train.Sampler
    iterations: int
    stats_state: dict | None
    start: int = 0
    elapsed: float = 0.0  # seconds trained before this process
    good: int | None = None
    t0: float = dataclasses.field(default_factory=time.time)
    bad_at: torch.Tensor | None = None  # device-side first non-finite iteration (_first_nonfinite)
    values: dict = dataclasses.field(default_factory=dict)  # the last step's losses, and its iteration
    values_it: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # recorded in metrics.json

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    def train_time(self) -> float:
        return self.elapsed + time.time() - self.t0

    def save(self, path: Path, it: int, **extra) -> None:
        cfg, model = self.cfg, self.model
        checkpoint.save_checkpoint(path, {
            "format": checkpoint.CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "iteration": it,
            "iterations": self.iterations, "elapsed_s": self.train_time(),
            "preset": dataclasses.asdict(model.config), "channels": self.ds.channels,
            "image_size": self.ds.image_size, "model": model.state_dict(), "trainer": self.trainer.state_dict(),
            "sampler": self.sampler.gen.get_state(), "rng": checkpoint.rng_state(), "stats": self.stats_state,
            "vgg_weights": self.rec_loss.weights_id, "provenance": provenance.record(self.device), **extra})

    def save_good(self, done: int) -> None:
        """checkpoint.pt is only ever written with finite losses and weights."""
        at = int(self.bad_at) if self.bad_at is not None else -1
        if at >= 0 or not _params_finite(self.model):
            self.diverge(done, at if at >= 0 else None)
        self.save(self.checkpoint, done)
        self.good = done

    def diverge(self, done: int, at: int | None) -> None:
        """Saves the diverged state beside checkpoint.pt (kept as the last good one) and raises."""
        if at is None:
            what = f"a weight became non-finite by iteration {done}"
        else:
            what = f"a loss became non-finite at iteration {at}"
            if self.values_it == at:
                row = {k: float(v) for k, v in self.values.items()}
                what += " (" + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if not math.isfinite(v)) + ")"
        self.save(self.dir / DIVERGED, done, status="diverged")
        raise Diverged(what, self.good, self.checkpoint, self.dir / DIVERGED, self.cfg.reseed + 1,
                       self.cfg.checkpoint_minutes)

    def save_crashed(self, exc: BaseException, it: int) -> None:
        """An exception in the middle of training: checkpoint.pt stays as it was, the state at the
        failure goes to crashed.pt, and the exception says so."""
        kept = (f"{self.checkpoint} keeps the last good state (iteration {self.good})" if self.good is not None
                else "no checkpoint had been written yet")
        saved_note = ""
        if isinstance(exc, Exception):  # not for a second Ctrl-C: stopping at once was asked for
            try:
                self.save(self.dir / CRASHED, it, status="crashed")
                saved_note = f"; the state at the failure (iteration {it}, possibly half-updated) is in {self.dir / CRASHED}"
            except Exception as save_exc:  # noqa: BLE001 - e.g. the disk is full: keep the first error
                saved_note = f"; saving the state at the failure failed too ({save_exc})"
        exc.add_note(f"piad: training stopped at iteration {it}: {kept}{saved_note}. "
                     "Resume with the same command plus --resume.")


def loop(run: Run) -> None:
    """Algorithm 1's iterations from ``run.start``, with log.csv, checkpoints and the stop rules."""
    cfg, it = run.cfg, run.start
    bar = progress(cfg, run.start, run.iterations)
    tb = (tblog.TensorBoardLog(run.dir / "tb", run.ds.train, every=cfg.tensorboard_images, start=run.start)
          if cfg.tensorboard else None)  # RUN/tb/: an optional extra; log.csv is always written
    stop = errors.StopOnSignal()
    if cfg.keep_every and run.start and run.start % cfg.keep_every == 0:  # a kill between the save and its copy
        if not checkpoint.kept_path(run.dir, run.start).exists():
            checkpoint.keep(run.checkpoint, checkpoint.kept_path(run.dir, run.start))
    run.t0 = last_ckpt = time.time()
    try:
        with stop, open(run.dir / "log.csv", "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if run.start == 0:
                writer.writeheader()
            run.model.train()
            for it in range(run.start, run.iterations):
                log = it % cfg.log_every == 0 or it == run.iterations - 1
                run.values, run.values_it = run.trainer.step(it, run.sampler), it
                run.bad_at = _first_nonfinite(run.bad_at, run.values, it)
                if log:
                    row = _log_row(run, it, writer, fh, bar)
                    if tb is not None:
                        tb.log(it, row)
                if tb is not None and tb.reconstructions_due(it, run.iterations - 1):
                    tb.reconstructions(it, run.model)
                if bar is not None:
                    bar.update(1)
                kept = cfg.keep_every and (it + 1) % cfg.keep_every == 0
                if kept or stop.signum is not None or time.time() - last_ckpt > 60 * cfg.checkpoint_minutes:
                    run.save_good(it + 1)
                    last_ckpt = time.time()
                    if kept:
                        checkpoint.keep(run.checkpoint, checkpoint.kept_path(run.dir, it + 1))
                if stop.signum is not None:
                    raise Interrupted(stop.signum, it + 1, run.iterations, run.checkpoint)
            it = run.iterations
            if run.good != run.iterations:
                run.save_good(run.iterations)
        if stop.signum is not None:  # arrived while the last checkpoint was written
            raise Interrupted(stop.signum, run.iterations, run.iterations, run.checkpoint)
    except (Interrupted, Diverged):
        raise
    except BaseException as exc:
        run.save_crashed(exc, it)
        raise
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()


def _log_row(run: Run, it: int, writer, fh, bar) -> dict:
    """A row of log.csv (the only place a step's losses are brought to the host)."""
    row = {k: float(v) for k, v in run.values.items()}
    if int(run.bad_at) >= 0:
        run.diverge(it + 1, int(run.bad_at))
    writer.writerow({"iteration": it, "time_s": round(run.train_time(), 3), **row})
    fh.flush()
    if bar is not None:
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("rec", "cycle", "gamma_g", "gamma_e") if k in row})
    return row


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
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(keep)


def progress(cfg: TrainConfig, start: int, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, desc=f"{cfg.method} {cfg.dataset}:{cfg.normal}")
