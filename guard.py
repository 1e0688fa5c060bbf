"""How a training run keeps its promises (no paper section): the guard around Algorithm 1's loop.

``train.py``'s loop runs inside ``with Guard(...) as guard`` and calls, after each step,
:meth:`Guard.log`, :meth:`Guard.checkpoint` and :meth:`Guard.stop_if_signalled`, then
:meth:`Guard.finish`; the guard never calls back into train.py. This is the one account of what
a run keeps; README, train.py and errors.py point here.

* ``log.csv``: every loss and γ_G, γ_E every ``log_every`` iterations (the only place a step's
  values reach the host); with ``--tensorboard`` the same rows go to ``RUN/tb/`` too.
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
import math
import sys
import time
from pathlib import Path

import torch

import checkpoint
import errors
from checkpoint import CHECKPOINT, CRASHED, DIVERGED
from errors import Diverged, Interrupted

FORECAST_AFTER = 10  # timed iterations before the duration is forecast
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


class Guard:
    """The guard of one run in ``folder``, from iteration ``start`` (``elapsed`` seconds already
    trained; ``start`` is what checkpoint.pt holds when resuming). ``saved`` writes the checkpoints;
    ``tb`` (optional) is a ``tools.tblog.TensorBoardLog``."""

    def __init__(self, saved: checkpoint.Saved, folder: Path, *, start: int, elapsed: float, tb=None):
        self.saved, self.cfg, self.dir, self.tb = saved, saved.cfg, Path(folder), tb
        self.iterations, self.start, self.elapsed = saved.iterations, start, elapsed
        self.good = start if start else None  # the iteration checkpoint.pt holds
        self.it = start  # the iteration in progress
        self.bad_at, self.values, self.values_it = None, {}, None
        self.stop, self.bar, self.fh, self.writer = errors.StopOnSignal(), None, None, None
        self.t0 = self.last_save = time.time()

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / CHECKPOINT

    def train_time(self) -> float:
        return self.elapsed + time.time() - self.t0

    def __enter__(self) -> "Guard":
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        checkpoint.truncate_log(self.dir / "log.csv", self.start)
        if cfg.keep_every and self.start and self.start % cfg.keep_every == 0:  # a kill between the save and its copy
            if not checkpoint.kept_path(self.dir, self.start).exists():
                checkpoint.keep(self.checkpoint_path, checkpoint.kept_path(self.dir, self.start))
        self.fh = open(self.dir / "log.csv", "a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if self.start == 0:
            self.writer.writeheader()
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.iterations, initial=self.start, unit="it", dynamic_ncols=True,
                            desc=f"{cfg.method} {cfg.dataset}:{cfg.normal}")
        self.stop.__enter__()  # last: nothing after it can fail before the loop runs
        self.t0 = self.last_save = time.time()
        self.t_first = None  # when the first step of this process ended (the forecast leaves out its warm-up)
        return self

    def log(self, it: int, values: dict) -> None:
        """After the step of iteration ``it``: a row of log.csv every ``log_every`` iterations and at
        the last (the only place a step's losses are brought to the host), checked for divergence."""
        self.values, self.values_it = values, it
        self.bad_at = _first_nonfinite(self.bad_at, values, it)
        if it % self.cfg.log_every == 0 or it == self.iterations - 1:
            row = {k: float(v) for k, v in values.items()}
            if int(self.bad_at) >= 0:
                self.diverge(it + 1, int(self.bad_at))
            self.writer.writerow({"iteration": it, "time_s": round(self.train_time(), 3), **row})
            self.fh.flush()
            if self.bar is not None:
                self.bar.set_postfix({k: f"{row[k]:.3g}" for k in ("rec", "cycle", "gamma_g", "gamma_e") if k in row})
            if self.tb is not None:
                self.tb.log(it, row)
        if self.tb is not None and self.tb.reconstructions_due(it, self.iterations - 1):
            self.tb.reconstructions(it, self.saved.model)
        if self.bar is not None:
            self.bar.update(1)
        self.forecast(it)

    def forecast(self, it: int) -> None:
        """After the first :data:`FORECAST_AFTER` timed iterations, one line: the run's schedule, its
        precision and how long it will take at the speed measured here (no ten-hour surprise)."""
        if it == self.start:
            self.t_first = time.time()
        elif it == self.start + FORECAST_AFTER and it < self.iterations - 1:
            rate = (time.time() - self.t_first) / FORECAST_AFTER
            left = rate * (self.iterations - it - 1)
            what = "--iterations" if self.cfg.iterations else "the supplement's schedule"
            when = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min"
            line = (f"note: {self.iterations:,} iterations ({what}), {self.cfg.precision}: at {rate:.2f} s per "
                    f"iteration here, about {when} to go")
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

    def checkpoint(self, done: int) -> None:
        """After ``done`` iterations: checkpoint.pt when ``checkpoint_minutes`` have passed, a signal
        arrived or ``keep_every`` asks (then also kept as ``kept/checkpoint-<done>.pt``)."""
        self.it = done
        kept = self.cfg.keep_every and done % self.cfg.keep_every == 0
        if kept or self.stop.signum is not None or time.time() - self.last_save > 60 * self.cfg.checkpoint_minutes:
            self.save_good(done)
            self.last_save = time.time()
            if kept:
                checkpoint.keep(self.checkpoint_path, checkpoint.kept_path(self.dir, done))

    def stop_if_signalled(self, done: int) -> None:
        if self.stop.signum is not None:
            raise Interrupted(self.stop.signum, done, self.iterations, self.checkpoint_path)

    def finish(self) -> None:
        """After the last iteration: checkpoint.pt holds the end of the run."""
        self.it = self.iterations
        if self.good != self.iterations:
            self.save_good(self.iterations)
        self.stop_if_signalled(self.iterations)  # arrived while the last checkpoint was written

    def save_good(self, done: int) -> None:
        """checkpoint.pt is only ever written with finite losses and weights."""
        at = int(self.bad_at) if self.bad_at is not None else -1
        if at >= 0 or not _params_finite(self.saved.model):
            self.diverge(done, at if at >= 0 else None)
        self.saved.save(self.checkpoint_path, done, self.train_time())
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
        self.saved.save(self.dir / DIVERGED, done, self.train_time(), status="diverged")
        raise Diverged(what, self.good, self.checkpoint_path, self.dir / DIVERGED, self.cfg.reseed + 1,
                       self.cfg.checkpoint_minutes)

    def save_crashed(self, exc: BaseException) -> None:
        """An exception in the middle of training: checkpoint.pt stays as it was, the state at the
        failure goes to crashed.pt, and the exception says so."""
        it = self.it
        kept = (f"{self.checkpoint_path} keeps the last good state (iteration {self.good})" if self.good is not None
                else "no checkpoint had been written yet")
        saved_note = ""
        if isinstance(exc, Exception):  # not for a second Ctrl-C: stopping at once was asked for
            try:
                self.saved.save(self.dir / CRASHED, it, self.train_time(), status="crashed")
                saved_note = f"; the state at the failure (iteration {it}, possibly half-updated) is in {self.dir / CRASHED}"
            except Exception as save_exc:  # noqa: BLE001 - e.g. the disk is full: keep the first error
                saved_note = f"; saving the state at the failure failed too ({save_exc})"
        exc.add_note(f"piad: training stopped at iteration {it}: {kept}{saved_note}. "
                     "Resume with the same command plus --resume.")

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if exc is not None and not isinstance(exc, (Interrupted, Diverged)):
                self.save_crashed(exc)
        finally:
            self.fh.close()
            self.stop.__exit__(kind, exc, tb)
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
