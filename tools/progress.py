"""Quality along the training schedule (Algorithm 1's iterations, §4's evaluation): a run's kept
checkpoints, each evaluated as ``evaluate.py`` evaluates a run, and their ROC AUC against iterations.

A run trained with ``--keep-every K`` keeps the checkpoint of every K-th iteration in
``RUN/kept/`` (``checkpoint.kept_path``). This evaluates each (or those of ``--iterations``) into
``RUN/kept/<iteration>/`` (metrics.json, scores.csv and the figures of ``evaluate.evaluate_run``),
reuses an evaluation already there, and writes ``RUN/progress.csv``: one row per iteration with the
primary score's ROC AUC and average precision (drawn in ``RUN/progress.png``); the finished run's
last iteration comes from its own metrics.json.

    python -m tools.progress RUN [--iterations 2000 10000 25000] [--device auto]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

import checkpoint
import errors
import evaluate
import figures
import rundir
from config import DEVICES

FIELDS = ("iteration", "roc_auc", "average_precision", "score", "source")


def kept_checkpoints(run: Path) -> dict[int, Path]:
    """{iteration: path} of the run's kept checkpoints."""
    found = {}
    for path in (run / checkpoint.KEPT).glob("checkpoint-*.pt"):
        m = re.fullmatch(r"checkpoint-(\d+)\.pt", path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def _metrics(path: Path) -> dict | None:
    """A metrics.json of evaluate.py; None when missing or damaged (not JSON, or without the
    ``iterations``, ``roc_auc``, ``average_precision`` and ``score`` that progress.csv takes)."""
    try:
        m = json.loads(path.read_text())
        if isinstance(m, dict) and isinstance(m["iterations"], int):
            float(m["roc_auc"]), float(m["average_precision"])  # noqa: B018 - numbers (NaN allowed)
            str(m["score"])
            return m
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def progress(run, *, iterations=None, device: str = "auto", data_root=None) -> list[dict]:
    """Evaluates the kept checkpoints of ``run`` (all, or those at ``iterations``), writes
    ``run/progress.csv`` and returns its rows. The finished run's final iteration is read from its
    own ``metrics.json`` (the evaluation train.py made of that same state)."""
    run = Path(run)
    available: dict[int, Path | dict] = dict(kept_checkpoints(run))
    if (run / "metrics.json").is_file():
        final = _metrics(run / "metrics.json")
        if final is None:
            raise errors.UserError(f"{run / 'metrics.json'} is damaged (not the JSON evaluate.py writes, with "
                                   "iterations and roc_auc); evaluate the run again: python evaluate.py "
                                   f"--checkpoint {run / checkpoint.CHECKPOINT}")
        available[final["iterations"]] = final
    wanted = sorted(available) if iterations is None else sorted(set(iterations))
    missing = [i for i in wanted if i not in available]
    if missing or not wanted:
        have = ", ".join(map(str, sorted(available))) or "none (train with --keep-every K)"
        raise errors.UserError(f"{run}: no kept checkpoint or final evaluation of iteration "
                               f"{', '.join(map(str, missing)) or 'any'}; there are: {have}")
    rows = []
    for it in wanted:
        source = available[it]
        if isinstance(source, dict):  # the finished run's metrics.json
            metrics, where = source, "metrics.json"
        else:
            out = run / checkpoint.KEPT / str(it)
            done = out / "metrics.json"
            where = str(done.relative_to(run))
            metrics = _metrics(done)  # None: not evaluated yet, or damaged: evaluated (again) below
            if metrics is None or metrics.get("iterations") != it:
                print(f"evaluating {source} ...", file=sys.stderr, flush=True)
                metrics = evaluate.evaluate_checkpoint(source, out, device=device, data_root=data_root)
        rows.append({"iteration": it, "roc_auc": f"{metrics['roc_auc']:.6f}",
                     "average_precision": f"{metrics['average_precision']:.6f}", "score": metrics["score"],
                     "source": where})
        print(f"iteration {it}: {metrics['score']} ROC AUC {metrics['roc_auc']:.4f}", flush=True)
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
    rundir.write_text(run / "progress.csv", table.getvalue())
    figures.plot_progress(run / "progress.png", rows, title=f"{run.name}: quality along the schedule")
    return rows


def _main(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.progress", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder of train.py --keep-every K")
    p.add_argument("--iterations", type=int, nargs="+", default=None,
                   help="the kept checkpoints to evaluate (default: all)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--data-root", default=None)
    errors.add_debug_flag(p)
    a = p.parse_args(argv)
    if not Path(a.run).is_dir():
        raise errors.UserError(f"{a.run}: no such run folder")
    with rundir.claim(a.run, what="run folder"):  # it writes kept/<it>/ and progress.csv: one process at a time
        progress(a.run, iterations=a.iterations, device=a.device, data_root=a.data_root)
    print(f"wrote {Path(a.run) / 'progress.csv'}")


def main(argv=None) -> None:
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
