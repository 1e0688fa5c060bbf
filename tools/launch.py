"""Running a grid's cells in parallel: processes on one machine, or a Slurm job array (no paper section).

Tables 2-3 of the paper are grids of independent ``train.py`` runs (``experiments.py``), each cell
a :class:`config.TrainConfig` whose ``out`` folder is its only output. The sequential grid's
promises hold: finished cells skipped, half-finished ones resumed, a failing one reported without
stopping the others, a stop leaving every running cell with a checkpoint.

* :func:`run_processes`: N cells at once, each in a spawned process with ``threads`` CPU threads
  (a run's floats depend on it: ``TrainConfig.threads``, recorded with the cell), spread over the
  visible GPUs, at most ``per_gpu`` on one. The parent alone receives Ctrl-C and forwards one
  SIGINT to each worker, which finishes its iteration and saves; a second one stops them at once.
* :func:`run_submitit`: one ``submitit`` task per cell: a Slurm job array, or the same path run
  locally (its local executor: tests, CI). On preemption or a time limit, :meth:`CellTask.checkpoint`
  stops the training after its iteration with train.py's atomic save and requeues the task.
* :func:`cell_status`: one line per cell (iteration, ETA, AUROC when done) from its folder alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from pathlib import Path

import torch

import checkpoint
import errors
import presets
import train as train_mod
from config import TrainConfig

RUNNING_S = 120  # a log.csv written within this many seconds belongs to a running cell


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """The GPUs a worker may be given, as values of ``CUDA_VISIBLE_DEVICES``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(k) for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def prepare(cfg: TrainConfig) -> TrainConfig | None:
    """The cell as it stands now: None when finished, else its config with ``resume`` set when
    it has a checkpoint (decided when the cell starts, not when it was queued)."""
    out = Path(cfg.out)
    if (out / "metrics.json").is_file():
        return None
    return dataclasses.replace(cfg, resume=checkpoint.resumable(out))


def _finished_metrics(cfg: TrainConfig) -> dict:
    return json.loads((Path(cfg.out) / "metrics.json").read_text())


class GridInterrupted(errors.Interrupted):
    """The grid was stopped by a signal; every cell that was running was stopped (after its
    iteration, with a checkpoint; at once on a second Ctrl-C)."""

    def __init__(self, signum: int, stopped: list[str]):
        super().__init__(signum, 0, 1, Path("."))
        self.stopped = stopped
        self.resume = "the same command"

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        cells = f"{len(self.stopped)} running cell(s) stopped ({', '.join(self.stopped)})" \
            if self.stopped else "no cell was running"
        return f"{name}: grid stopped; {cells}; finished cells are kept. Resume with: {self.resume}"


def add_arguments(p) -> None:
    """experiments.py's flags for running cells in parallel."""
    r = p.add_argument_group("running cells in parallel (docs/grids.md)")
    r.add_argument("--jobs", type=int, default=None, help="cells at once, each in its own process (default 1, "
                   "or --jobs-per-gpu × the visible GPUs)")
    r.add_argument("--threads-per-cell", type=int, default=None, help="CPU threads of each cell (default: "
                   "the cores divided among the jobs; 4 on Slurm); recorded with the cell, its floats depend on it")
    r.add_argument("--jobs-per-gpu", type=int, default=None, help="at most K cells on one GPU")
    r.add_argument("--launcher", default="processes", choices=["processes", "slurm", "local"],
                   help="processes on this machine; a Slurm job array via submitit; submitit's local executor")
    r.add_argument("--partition", default=None, help="Slurm partition")
    r.add_argument("--time", type=int, default=24 * 60, help="Slurm time limit per task, minutes (a task "
                   "that reaches it is requeued and resumes from its checkpoint)")
    r.add_argument("--gpus-per-task", type=int, default=1, help="Slurm GPUs per task")


def plan(a) -> tuple[int, int, list[str]]:
    """(jobs, threads per cell, GPUs) from the flags of :func:`add_arguments` (and ``--device``)."""
    for name in ("jobs", "threads_per_cell", "jobs_per_gpu", "time", "gpus_per_task"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise errors.UserError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(a, name)}")
    gpus = visible_gpus() if a.device != "cpu" else []
    jobs = a.jobs or (a.jobs_per_gpu * len(gpus) if a.jobs_per_gpu and gpus else 1)
    if a.launcher == "slurm":  # a cluster node's cores are not this machine's
        return jobs, a.threads_per_cell or 4, gpus
    return jobs, a.threads_per_cell or max(1, cores() // jobs), gpus


# --- one machine: spawned worker processes -----------------------------------------------------

def _worker(cfg: TrainConfig, conn, train_fn) -> None:
    """A cell in its own process: sends ("done", auroc), ("stopped", msg) or ("failed", line, traceback)."""
    os.setpgrp()  # out of the terminal's process group: Ctrl-C reaches the parent only, which forwards it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        metrics = (train_fn or train_mod.train)(cfg)
        conn.send(("done", metrics.get("roc_auc", float("nan"))))
    except KeyboardInterrupt as exc:  # errors.Interrupted: saved; a bare one: a second Ctrl-C, or before training
        conn.send(("stopped", str(exc) or "stopped at once; its last periodic checkpoint, if any, is kept"))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, the grid goes on
        conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


def run_processes(cells: list[tuple[str, TrainConfig]], *, jobs: int, threads: int | None = None,
                  gpus: list[str] | None = None, per_gpu: int | None = None, train_fn=None,
                  fail_path: Path | None = None, log=print) -> list[tuple[str, str]]:
    """Trains ``cells`` (``(tag, config)``, in order) with at most ``jobs`` worker processes.

    ``threads`` (default ``cores() // jobs``) is set on every cell; ``gpus`` (default: the
    visible ones when a cell's device is not ``cpu``) are given out to the least-loaded first,
    in round-robin order on ties, at most ``per_gpu`` cells each. Failures are returned and
    appended to ``fail_path``. SIGINT/SIGTERM to this process stop every worker with a
    checkpoint and raise :class:`GridInterrupted` once they have all exited. ``train_fn`` must be
    importable by name (spawned processes import it).
    """
    pool = _Workers(threads or max(1, cores() // jobs), gpus, per_gpu, train_fn, fail_path, log)
    handlers = {s: signal.signal(s, pool.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        queue = list(cells)
        while queue or pool.running:
            while queue and not pool.signals and len(pool.running) < jobs:
                if not pool.start(*queue[0]):
                    break
                queue.pop(0)
            if not pool.running:
                break
            ready = multiprocessing.connection.wait([r[0].sentinel for r in pool.running.values()], timeout=1.0)
            for pid in [pid for pid, r in pool.running.items() if r[0].sentinel in ready]:
                pool.finish(pid)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if pool.signals:
        raise GridInterrupted(pool.signals[0], pool.stopped)
    return pool.failures


class _Workers:
    """The worker processes of :func:`run_processes` and what they have reported."""

    def __init__(self, threads: int, gpus, per_gpu, train_fn, fail_path, log):
        self.threads, self.gpus, self.per_gpu, self.train_fn = threads, gpus, per_gpu, train_fn
        self.fail_path, self.log = fail_path, log
        self.ctx = multiprocessing.get_context("spawn")
        self.running: dict[int, tuple] = {}  # pid -> (process, conn, tag, cfg, gpu)
        self.failures: list[tuple[str, str]] = []
        self.stopped: list[str] = []
        self.signals: list[int] = []
        self.order = 0  # the GPU after the last one given out (round-robin on ties)

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        first = len(self.signals) == 1
        self.log(f"{signal.Signals(signum).name}: " + ("stopping every running cell after its iteration, with a "
                 "checkpoint (Ctrl-C again stops them at once, without saving)" if first else "stopping now"))
        for proc, *_ in self.running.values():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass

    def _gpu(self, cfg):
        """(ok, GPU): the least-loaded with room, round-robin on ties; no GPU for a CPU cell; not ok: all full."""
        if not self.gpus or cfg.device == "cpu":
            return True, None
        load = {g: sum(r[4] == g for r in self.running.values()) for g in self.gpus}
        free = [g for g in self.gpus if self.per_gpu is None or load[g] < self.per_gpu]
        if not free:
            return False, None
        gpu = min(free, key=lambda g: (load[g], (self.gpus.index(g) - self.order) % len(self.gpus)))
        self.order = self.gpus.index(gpu) + 1
        return True, gpu

    def start(self, tag, cfg) -> bool:
        ok, gpu = self._gpu(cfg)
        if not ok:
            return False
        cfg = dataclasses.replace(cfg, threads=self.threads)
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(cfg, child_conn, self.train_fn), name=f"piad-cell {tag}")
        saved_env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
        # The worker starts with SIGINT blocked until it has left our process group (see _worker).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            if gpu is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            proc.start()
            self.running[proc.pid] = (proc, parent_conn, tag, cfg, gpu)  # before a pending signal is handled
        finally:  # this process's environment as it was
            os.environ.update({k: v for k, v in saved_env.items() if v is not None})
            for k in [k for k, v in saved_env.items() if v is None]:
                os.environ.pop(k, None)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_conn.close()
        self.log(f"{tag}: {'resuming' if cfg.resume else 'training'} (process {proc.pid}, {self.threads} thread(s)"
                 + (f", GPU {gpu})" if gpu is not None else ")"))
        return True

    def finish(self, pid) -> None:
        proc, conn, tag, cfg, _ = self.running.pop(pid)
        msg = None
        try:
            if conn.poll():
                msg = conn.recv()
        except (EOFError, OSError):
            pass
        proc.join()
        conn.close()
        if msg is None:
            msg = ("failed", f"worker process died (exit status {proc.exitcode})",
                   f"the worker process exited with status {proc.exitcode} before reporting\n")
        if msg[0] == "done":
            self.log(f"{tag}: ROC AUC {msg[1]:.3f}")
        elif msg[0] == "stopped":
            self.stopped.append(tag)
            self.log(f"{tag}: stopped: {msg[1]}")
        else:
            self.failures.append((tag, msg[1]))
            self.log(f"{tag}: FAILED {msg[1]}")
            if self.fail_path is not None:
                with open(self.fail_path, "a") as fh:
                    fh.write(f"{cfg.out}\n{msg[2]}\n")


# --- clusters: submitit ------------------------------------------------------------------------

class CellTask:
    """One cell as a submitit task, trained in a thread so that :meth:`checkpoint` (submitit's signal
    handler) can stop it at an iteration boundary (``errors.request_stop``), after its atomic save."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self) -> dict:
        cfg = prepare(self.cfg)
        if cfg is None:
            return _finished_metrics(self.cfg)
        self._result = self._error = None
        self._thread = threading.Thread(target=self._train, args=(cfg,), name="piad-train")
        self._thread.start()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)  # wakes up for signal handlers
        except KeyboardInterrupt:  # SIGINT (e.g. cancelling a local job): save, then stop
            self._stop(signal.SIGINT)
            raise
        if self._error is not None:
            raise self._error
        return self._result

    def _train(self, cfg: TrainConfig) -> None:
        try:
            self._result = train_mod.train(cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._error = exc

    def _stop(self, signum: int) -> None:
        thread = getattr(self, "_thread", None)
        while thread is not None and thread.is_alive():
            errors.request_stop(signum)  # the loop may not have started yet: ask until it ends
            thread.join(0.5)

    def checkpoint(self):
        """submitit's preemption / time-limit hook: the cell saves, the task is requeued."""
        from submitit.helpers import DelayedSubmission

        self._stop(signal.SIGUSR2)
        return DelayedSubmission(CellTask(self.cfg))


def run_submitit(cells: list[tuple[str, TrainConfig]], *, launcher: str, folder: Path, threads: int,
                 partition: str | None = None, time_min: int = 24 * 60, gpus_per_task: int = 1,
                 parallel: int | None = None, fail_path: Path | None = None, log=print) -> list[tuple[str, str]]:
    """One :class:`CellTask` per cell through ``submitit``: ``slurm``, a job array (``parallel``
    tasks at once, each ``threads`` CPUs and ``gpus_per_task`` GPUs, ``time_min`` minutes before
    it is requeued), returning once submitted; ``local``, the same submission run as processes
    here, waited for: returns the failures (also appended to ``fail_path``)."""
    if not cells:
        return []
    try:
        import submitit
    except ImportError as exc:
        raise errors.UserError(f"--launcher {launcher} needs submitit: pip install submitit "
                               "(or pip install -e '.[slurm]')") from exc
    # The tasks unpickle CellTask: they must find this module even when piad is not installed.
    here = str(Path(__file__).resolve().parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + paths)
    with errors.user_errors(RuntimeError, prefix=f"--launcher {launcher}: "):  # e.g. no srun: not a cluster
        executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
    params = dict(timeout_min=time_min, cpus_per_task=threads, tasks_per_node=1, name="piad-grid")
    if launcher == "slurm":
        params.update(gpus_per_node=gpus_per_task, slurm_array_parallelism=parallel or len(cells))
        if partition:
            params["slurm_partition"] = partition
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(CellTask(dataclasses.replace(cfg, threads=threads, progress=False)))
                for _, cfg in cells]
    for (tag, _), job in zip(cells, jobs):
        log(f"{tag}: submitted as {launcher} job {job.job_id}")
    if launcher == "slurm":
        return []
    failures = []
    for (tag, cfg), job in zip(cells, jobs):
        try:
            log(f"{tag}: ROC AUC {job.result().get('roc_auc', float('nan')):.3f}")
        except Exception as exc:  # noqa: BLE001 - one bad cell must not stop the grid
            lines = str(exc).strip().splitlines()
            failures.append((tag, lines[-1] if lines else type(exc).__name__))
            log(f"{tag}: FAILED {failures[-1][1]} (log: {job.paths.stderr})")
            if fail_path is not None:
                with open(fail_path, "a") as fh:
                    fh.write(f"{cfg.out}\n{exc}\n")
    return failures


# --- progress ----------------------------------------------------------------------------------

def status_lines(cells: list[tuple[str, TrainConfig]], fail_path: Path | None = None) -> list[str]:
    """``tag: status`` per cell (:func:`cell_status`); a cell named in ``fail_path`` is failed."""
    failed = set(fail_path.read_text().splitlines()) if fail_path is not None and fail_path.is_file() else set()
    return [f"{tag}: {cell_status(cfg, failed=str(cfg.out) in failed)}" for tag, cfg in cells]


def _total_iterations(cfg: TrainConfig) -> int:
    if cfg.iterations:
        return cfg.iterations
    return presets.iterations(cfg.dataset)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cell_status(cfg: TrainConfig, *, failed: bool = False, now: float | None = None) -> str:
    """One line about a cell, from its folder: done with its AUROC, failed, running or stopped at
    iteration i/N with an ETA (from log.csv's elapsed time), or pending."""
    out, now = Path(cfg.out), time.time() if now is None else now
    metrics = out / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        extra = f", {m['iterations']} it" if "iterations" in m else ""
        extra += f" in {_duration(m['train_time_s'])}" if "train_time_s" in m else ""
        extra += f", {m['threads']} thread(s)" if "threads" in m else ""
        return f"done     ROC AUC {m.get('roc_auc', float('nan')):.3f}{extra}"
    total = _total_iterations(cfg)
    last = None
    log_path = out / "log.csv"
    if log_path.is_file():
        rows = [r for r in log_path.read_text().splitlines()[1:] if r.strip()]
        if rows:
            fields = rows[-1].split(",")
            last = (int(fields[0]) + 1, float(fields[1]))
    if failed:
        state = "failed  "
    elif last is None:
        return "pending" if not (out / checkpoint.CHECKPOINT).is_file() else "stopped  (checkpoint, resumable)"
    else:
        state = "running " if now - log_path.stat().st_mtime < RUNNING_S else "stopped "
    if last is None:
        return state.strip()
    done, elapsed = last
    eta = elapsed / done * (total - done) if done else math.nan
    line = f"{state} iteration {done}/{total} ({100 * done / total:.0f}%)"
    if state.strip() == "running":
        line += f", ETA {_duration(eta)}" if math.isfinite(eta) else ""
    elif state.strip() == "stopped" and (out / checkpoint.CHECKPOINT).is_file():
        line += ", resumable"
    return line
