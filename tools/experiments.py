"""Experiment runner: regenerates the paper's tables as grids of ``train.py`` runs.

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019):

* ``table2-mnist``, ``table2-cifar10``: Table 2, PIAD (rel-perc-l1) per normal class, 3 seeds,
  the ``split`` protocol.
* ``table3-fmnist``, ``table3-coil100``: Table 3 (left), the ``gpnd`` protocol; for COIL-100, the
  authors' 30 normal classes (:data:`COIL100_CLASSES`).
* ``table3-ablation``: Table 3 (right), CIFAR-10: ``baseline`` (pixel L2 with the human-chosen
  weights, which the paper does not give; the authors' code: γ_G = 100, γ_E = 10 and the L2 of
  ImageNet-normalised pixels, ``mse-imagenet``), ``mse`` (the same L2 with gradient-normalizing
  weights, "+ gr-norm w"), ``perc``, ``perc-l1`` and ``rel-perc-l1``.
* ``contamination``: an extension, not in the paper: Fashion-MNIST with a fraction P of
  anomalies in the training set, PIAD vs. the latent-norm method of Berg et al. (``berg.latent_norm``).
* ``knn-fmnist``: not in the paper: Table 3's Fashion-MNIST cells, PIAD beside the k-NN baseline on
  its VGG-19 features (``baselines.knn``), the same classes, seeds, split and ``--vgg-weights``.
* ``custom``: any grid from the command line.

Table 2 runs 3 seeds as the paper does; the other presets run seed 0 only (``--seeds`` to
change). Each cell (normal class × seed × method/loss × P) trains in its own folder,
``ROOT/<dataset>/<method>-<loss>[-fixed]-c<P>/normal<K>-s<seed>/``; cells with a
``metrics.json`` are skipped, cells with only a checkpoint are resumed, and a failing cell is
written to ``ROOT/failures.txt`` without stopping the grid. Outputs in ROOT: ``table.md`` and
``table.csv`` (rows = normal classes + ``avg``, columns = methods/losses/P; mean ± sample std
over seeds of the ROC AUC; ``avg`` = mean over classes of the per-class means, ± the std over
seeds of the class-averaged AUROC), ``cells.csv`` (one row per finished cell with every
per-score AUROC) and, for several P, ``auroc_vs_contamination.png``.

    python -m tools.experiments table2-mnist [--iterations N] [--seeds 0 1] [--classes 3 8] [--table-only]
    python -m tools.experiments custom --dataset fashion-mnist --classes 0 8 --seeds 0 1 \\
        --methods piad latent-norm --losses rel-perc-l1 --contaminations 0 0.05 --iterations 200

``--iterations N`` (a short schedule) puts the grid in ``runs/experiments/<name>-it<N>`` by
default, so short and full runs never mix. ``--jobs N`` runs N cells at once in their own
processes, ``--launcher slurm`` submits the cells as a Slurm job array, ``--status`` prints one
line per cell (module ``launch``; docs/grids.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import checkpoint
import config
import data
import errors
import figures
from tools import launch
import losses
import rundir
import train as train_mod
import weights_policy

DIGITS = tuple(str(k) for k in range(10))
CONTAMINATIONS = (0.0, 0.01, 0.02, 0.05, 0.1)


@dataclass(frozen=True)
class Variant:
    """One column family: a method, a training loss and a weights policy, with a label."""

    label: str
    method: str = "piad"
    loss: str = "rel-perc-l1"
    weights_policy: str = "gradnorm"
    gamma_g: float | None = None  # with weights_policy "fixed"; None: the dataset's (presets.TABLE)
    gamma_e: float | None = None
    networks: str = "piad"  # latent-norm: the studies of README ran on PIAD's networks (docs/berg.md: pgan)


@dataclass(frozen=True)
class Cell:
    dataset: str
    normal: str
    seed: int
    variant: Variant
    contamination: float

    def folder(self, root: Path) -> Path:
        v = self.variant
        name = f"{v.method}-{v.loss}{'-fixed' if v.weights_policy == 'fixed' else ''}-c{self.contamination:g}"
        return Path(root) / self.dataset / name / f"normal{self.normal}-s{self.seed}".replace("/", "_")


@dataclass(frozen=True)
class Grid:
    name: str
    dataset: str
    classes: tuple[str, ...]
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    contaminations: tuple[float, ...] = (0.0,)
    protocol: str | None = None  # None: the dataset's paper protocol

    def cells(self) -> list[Cell]:
        return [Cell(self.dataset, str(k), s, v, float(p)) for k in self.classes for v in self.variants
                for p in self.contaminations for s in self.seeds]

    def column(self, cell: Cell) -> str:
        if len(self.contaminations) == 1:
            return cell.variant.label
        if len(self.variants) == 1:
            return f"P={cell.contamination:g}"
        return f"{cell.variant.label} P={cell.contamination:g}"

    def columns(self) -> list[str]:
        return list(dict.fromkeys(self.column(c) for c in self.cells()))


# The authors' 30 COIL-100 objects (their run_all.py; paper: "30 random classes").
COIL100_CLASSES = tuple(str(k) for k in (79, 48, 65, 98, 73, 13, 14, 39, 57, 28, 42, 75, 44, 24, 82,
                                         56, 7, 47, 68, 30, 33, 90, 70, 87, 12, 91, 4, 22, 71, 55))


_PIAD = (Variant("PIAD"),)
CUSTOM_DATASET = "fashion-mnist"  # of a custom grid without --dataset
PRESETS = {
    "table2-mnist": Grid("table2-mnist", "mnist", DIGITS, (0, 1, 2), _PIAD, protocol="split"),
    "table2-cifar10": Grid("table2-cifar10", "cifar10", DIGITS, (0, 1, 2), _PIAD, protocol="split"),
    "table3-fmnist": Grid("table3-fmnist", "fashion-mnist", DIGITS, (0,), _PIAD, protocol="gpnd"),
    "table3-coil100": Grid("table3-coil100", "coil100", COIL100_CLASSES, (0,), _PIAD, protocol="gpnd"),
    "table3-ablation": Grid("table3-ablation", "cifar10", DIGITS, (0,), (
        Variant("baseline", loss="mse-imagenet", weights_policy="fixed", gamma_g=100.0, gamma_e=10.0),
        Variant("mse", loss="mse-imagenet"),
        Variant("perc", loss="perc"), Variant("perc-l1", loss="perc-l1"), Variant("rel-perc-l1"))),
    "contamination": Grid("contamination", "fashion-mnist", DIGITS, (0,),
                          (Variant("piad"), Variant("latent-norm", method="latent-norm")), CONTAMINATIONS),
    "knn-fmnist": Grid("knn-fmnist", "fashion-mnist", DIGITS, (0,), (Variant("PIAD"), Variant("k-NN", method="knn")),
                       protocol="gpnd"),
}


# --- running -----------------------------------------------------------------------------------

def cell_config(grid: Grid, cell: Cell, root, **overrides) -> config.TrainConfig:
    """The TrainConfig of one cell (``overrides``: TrainConfig fields for every cell)."""
    out = cell.folder(root)
    v = cell.variant
    return config.TrainConfig(
        dataset=cell.dataset, normal=cell.normal, seed=cell.seed, method=v.method, loss=v.loss,
        weights_policy=v.weights_policy, gamma_g=v.gamma_g, gamma_e=v.gamma_e, networks=v.networks,
        contamination=cell.contamination, protocol=grid.protocol,
        out=str(out), resume=checkpoint.resumable(out), **overrides)


def check_grid(grid: Grid, root, **overrides) -> None:
    """Raises :class:`errors.UserError` if any cell's settings cannot work, or two cells are one
    (the same folder: one run trained twice), before any cell runs."""
    folders = [cell.folder(root) for cell in grid.cells()]
    twice = sorted({str(f.relative_to(root)) for f in folders if folders.count(f) > 1})
    if twice:
        raise errors.UserError(f"the grid names the same cell more than once ({', '.join(twice)}): give each class, "
                               "seed, method, loss and contamination once")
    problems = {}
    for cell in grid.cells():
        try:
            cell_config(grid, cell, root, **overrides).validate()
        except errors.UserError as exc:
            problems.setdefault(str(exc), cell)
    if problems:
        raise errors.UserError("; ".join(f"{msg} (cell {cell.folder(root).relative_to(root)})"
                                            for msg, cell in problems.items()))


def unfinished(grid: Grid, root, log=print, **overrides) -> list[tuple[str, Cell, config.TrainConfig]]:
    """``(tag, cell, config)`` of every cell without ``metrics.json``, in grid order."""
    cells, todo = grid.cells(), []
    for i, cell in enumerate(cells, 1):
        out = cell.folder(root)
        tag = f"[{i}/{len(cells)}] {out.relative_to(root)}"
        if (out / "metrics.json").is_file():
            log(f"{tag}: done, skipped")
        else:
            todo.append((tag, cell, cell_config(grid, cell, root, **overrides)))
    return todo


def grid_status(grid: Grid, root, **overrides) -> list[str]:
    """One line per cell: done (AUROC), running / stopped (iteration, ETA), failed or pending."""
    cells = grid.cells()
    return launch.status_lines([(f"[{i}/{len(cells)}] {cell.folder(root).relative_to(root)}",
                                 cell_config(grid, cell, root, **overrides)) for i, cell in enumerate(cells, 1)],
                               Path(root) / "failures.txt")


def run_grid(grid: Grid, root, *, train_fn=None, log=print, jobs: int = 1, threads: int | None = None,
             per_gpu: int | None = None, gpus: list[str] | None = None, launcher: str = "processes",
             cluster: dict | None = None, **overrides) -> list[tuple[Cell, str]]:
    """Trains every unfinished cell; returns the failures ``[(cell, error)]`` (also in failures.txt).

    ``overrides`` are TrainConfig fields for every cell (iterations, data_root, vgg_weights, ...).
    ``jobs`` > 1 trains that many cells at once, each in a spawned process with ``threads`` CPU
    threads, spread over ``gpus`` (``launch.run_processes``); ``jobs`` = 1 trains them here, one
    after another (``threads``: this process's thread count). ``launcher`` ``slurm`` / ``local``
    submits one submitit task per cell (``launch.run_submitit``, ``cluster``: its settings; slurm
    returns once submitted). A SIGINT/SIGTERM stops the grid after
    saving the running cells (``errors.Interrupted``); running the same grid again skips finished
    cells and resumes those.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fail_path = root / "failures.txt"
    fail_path.unlink(missing_ok=True)
    if threads is not None:
        overrides["threads"] = threads
    failures, todo = [], unfinished(grid, root, log, **overrides)
    by_tag, items = {tag: cell for tag, cell, _ in todo}, [(tag, cfg) for tag, _, cfg in todo]
    if launcher != "processes":
        failed = launch.run_submitit(items, launcher=launcher, folder=root / "submitit", threads=threads or 1,
                                     fail_path=fail_path, log=log, **(cluster or {}))
        return [(by_tag[tag], error) for tag, error in failed]
    if jobs > 1:
        failed = launch.run_processes(items, jobs=jobs, threads=threads, per_gpu=per_gpu, train_fn=train_fn, log=log,
                                      gpus=launch.visible_gpus() if gpus is None else gpus, fail_path=fail_path)
        return [(by_tag[tag], error) for tag, error in failed]
    train_fn = train_fn or train_mod.train
    for tag, cell, cfg in todo:
        log(f"{tag}: {'resuming' if cfg.resume else 'training'}")
        try:
            metrics = train_fn(cfg)
            log(f"{tag}: ROC AUC {metrics.get('roc_auc', float('nan')):.3f}")
        except Exception as exc:  # noqa: BLE001 - one bad cell must not stop the grid
            failures.append((cell, f"{type(exc).__name__}: {exc}"))
            log(f"{tag}: FAILED {type(exc).__name__}: {exc}")
            with open(fail_path, "a") as fh:
                fh.write(f"{cfg.out}\n{traceback.format_exc()}\n")
    return failures


# --- tables ------------------------------------------------------------------------------------

def collect(grid: Grid, root) -> list[dict]:
    """One record per finished cell: its settings, ``roc_auc`` and ``auc_<score>`` per score."""
    records = []
    for cell in grid.cells():
        path = cell.folder(root) / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        v = cell.variant
        rec = {"dataset": cell.dataset, "normal": cell.normal, "column": grid.column(cell), "variant": v.label,
               "method": v.method,
               "loss": v.loss, "weights_policy": v.weights_policy, "contamination": cell.contamination,
               "contamination_used": m.get("contamination", ""), "seed": cell.seed, "roc_auc": m["roc_auc"],
               "score": m.get("score", "")}
        rec.update({f"auc_{k}": a for k, a in m.get("roc_auc_per_score", {}).items()})
        records.append(rec)
    return records


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def summarize(grid: Grid, records: list[dict]) -> dict:
    """``{row: {column: (mean, std, n)}}``; rows are the classes then ``avg``."""
    cols = grid.columns()
    by = {}
    for r in records:
        by.setdefault((r["normal"], r["column"]), {})[r["seed"]] = r["roc_auc"]
    table = {}
    for k in grid.classes:
        table[str(k)] = {c: (float(np.mean(list(v.values()))), _std(list(v.values())), len(v))
                         for c in cols if (v := by.get((str(k), c)))}
    table["avg"] = {}
    for c in cols:
        means = [table[str(k)][c][0] for k in grid.classes if c in table[str(k)]]
        if not means:
            continue
        seeds = set.intersection(*[set(by[(str(k), c)]) for k in grid.classes if c in table[str(k)]])
        per_seed = [np.mean([by[(str(k), c)][s] for k in grid.classes if c in table[str(k)]]) for s in seeds]
        table["avg"][c] = (float(np.mean(means)), _std(per_seed), len(means))
    return table


def _fmt(entry) -> str:
    if entry is None:
        return "–"
    mean, std, _ = entry
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _row_label(grid: Grid, k: str) -> str:
    if k == "avg" or grid.dataset not in ("fashion-mnist", "cifar10") or not k.isdigit():
        return k
    return f"{k} ({data.class_names(grid.dataset)[int(k)]})"


def write_tables(grid: Grid, root, records: list[dict] | None = None) -> dict:
    """Writes table.md, table.csv, cells.csv (and the contamination plot); returns the summary."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = collect(grid, root) if records is None else records
    table, cols = summarize(grid, records), grid.columns()
    lines = [f"ROC AUC, {grid.dataset} ({grid.name}): mean ± std over seeds {list(grid.seeds)}; "
             f"{len(records)}/{len(grid.cells())} cells finished.", "",
             "| normal | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, row in table.items():
        lines.append(f"| {_row_label(grid, k)} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    (root / "table.md").write_text("\n".join(lines) + "\n")
    with open(root / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["normal"] + [f"{c} {s}" for c in cols for s in ("mean", "std", "n")])
        for k, row in table.items():
            w.writerow([k] + [x for c in cols for x in (row[c] if c in row else ("", "", 0))])
    fields = ["dataset", "normal", "column", "variant", "method", "loss", "weights_policy", "contamination",
              "contamination_used", "seed", "roc_auc", "score"]
    fields += sorted({k for r in records for k in r} - set(fields))
    with open(root / "cells.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(records)
    if len(grid.contaminations) > 1 and records:
        many = len(grid.classes) * len(grid.seeds) > 1
        title = (f"{grid.dataset}, normal {', '.join(map(str, grid.classes))}, seed {', '.join(map(str, grid.seeds))}"
                 + ("\nmean ± std over classes and seeds" if many else ""))
        figures.plot_contamination(root / "auroc_vs_contamination.png", records, title)
    return table


# --- command line ------------------------------------------------------------------------------

def build_grid(a) -> Grid:
    if a.preset == "custom":
        methods, kinds = a.methods or ["piad"], a.losses or ["rel-perc-l1"]

        def label(m, l):
            return l if len(methods) == 1 else m if len(kinds) == 1 else f"{m}/{l}"
        policy = a.weights_policy or weights_policy.POLICIES[0]
        variants = tuple(Variant(label(m, l), m, l, policy) for m in methods for l in kinds)
        grid = Grid("custom", a.dataset or CUSTOM_DATASET, tuple(a.classes or DIGITS), tuple(a.seeds or (0,)), variants,
                    tuple(a.contaminations or (0.0,)), a.protocol)
    else:
        grid = PRESETS[a.preset]
        ignored = [flag for flag, given in (("--methods", a.methods), ("--losses", a.losses),
                                            ("--contaminations", a.contaminations),
                                            ("--weights-policy", a.weights_policy), ("--dataset", a.dataset),
                                            ("--protocol", a.protocol))
                   if given]
        if ignored:
            print(f"note: preset {a.preset} ignores {', '.join(ignored)} (custom grids only); its own settings are "
                  "used", file=sys.stderr, flush=True)
    return replace(grid, classes=tuple(a.classes or grid.classes), seeds=tuple(a.seeds or grid.seeds))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.experiments",
                                description="Run a grid of train.py runs and write the paper's tables.")
    p.add_argument("preset", choices=[*PRESETS, "custom"])
    p.add_argument("--root", default=None, help="grid folder (default runs/experiments/<name>[-it<N>])")
    p.add_argument("--classes", nargs="+", default=None, help="normal classes (override the preset's)")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="short schedule (default: the paper's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--vgg-weights", default="auto")
    p.add_argument("--device", default="auto", choices=config.DEVICES)
    p.add_argument("--table-only", action="store_true", help="only rebuild the tables from metrics.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--status", action="store_true", help="one line per cell (iteration, ETA, AUROC), then exit")
    errors.add_debug_flag(p)
    launch.add_arguments(p)
    g = p.add_argument_group("custom grids")
    g.add_argument("--dataset", default=None, help=f"(default: {CUSTOM_DATASET})")
    g.add_argument("--methods", nargs="+", default=None, choices=config.METHODS)
    g.add_argument("--losses", nargs="+", default=None, choices=losses.KINDS)
    g.add_argument("--contaminations", nargs="+", type=float, default=None)
    g.add_argument("--weights-policy", default=None, choices=weights_policy.POLICIES,
                   help=f"(default: {weights_policy.POLICIES[0]})")
    g.add_argument("--protocol", default=None, choices=config.PROTOCOLS)
    return p.parse_args(argv)


def _main(argv) -> None:
    a = parse_args(argv)
    grid = build_grid(a)
    root = Path(a.root) if a.root else Path("runs/experiments") / (
        grid.name + (f"-it{a.iterations}" if a.iterations else ""))
    if root.exists() and not root.is_dir():
        raise errors.UserError(f"--root {root} is a file, not a folder")
    overrides = dict(iterations=a.iterations, data_root=a.data_root, vgg_weights=a.vgg_weights,
                     device=a.device, progress=not a.no_progress)
    if a.status:
        print("\n".join(grid_status(grid, root, **overrides)))
        return
    with rundir.claim(root, what="--root"):  # one grid per folder (each cell's folder is claimed by its run)
        _grid_main(a, argv, grid, root, overrides)


def _grid_main(a, argv, grid: Grid, root: Path, overrides: dict) -> None:
    failures = []
    jobs, threads, gpus = launch.plan(a)
    if not a.table_only:
        if jobs > 1 or a.launcher != "processes":
            overrides["progress"] = False  # N bars on one terminal: use --status
        check_grid(grid, root, **overrides)  # every cell's settings, before the first one trains
        try:
            failures = run_grid(grid, root, jobs=jobs, threads=threads, per_gpu=a.jobs_per_gpu, gpus=gpus,
                                launcher=a.launcher, cluster=dict(partition=a.partition, time_min=a.time,
                                gpus_per_task=a.gpus_per_task, parallel=a.jobs), **overrides)
            if a.launcher == "slurm":
                print(f"submitted; watch: {errors.command_line(argv, ['--status'], '-m tools.experiments')}; when the "
                      f"tasks are done: ... --table-only (submitit's logs: {root / 'submitit'})")
                return
        except errors.Interrupted as exc:
            exc.resume = errors.command_line(argv, [], "-m tools.experiments") + " (finished cells are skipped, " + \
                ("stopped ones resume)" if isinstance(exc, launch.GridInterrupted) else "this one resumes)")
            raise
    write_tables(grid, root)
    print((root / "table.md").read_text())
    print(f"tables in {root}")
    if failures:
        raise CellsFailed(f"{len(failures)} of {len(grid.cells())} cells failed ("
                          f"{', '.join(str(c.folder(root).relative_to(root)) for c, _ in failures)}); see "
                          f"{root / 'failures.txt'}; running the same command again retries them")


class CellsFailed(RuntimeError):
    """Some cells of the grid failed: one ``error:`` line, exit status 1 (errors.run_cli)."""

    exit_code = 1


def main(argv=None) -> None:
    """``python -m tools.experiments ...``: mistakes end with ``error: ...`` and exit status 2."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
