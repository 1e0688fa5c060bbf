"""The results committed under ``results/`` say what they are: each run's ROC AUC and average
precision are those of its own ``scores.csv``; a PIAD run's ``log.csv`` ends at the last of the
iterations its ``metrics.json`` records, its ``progress.csv`` ends at that evaluation and agrees
with the kept checkpoints' evaluations committed beside it; a k-NN run (``--method knn``) has no
training steps, no log.csv, and its ``table.md`` row is its metrics.json's; no checkpoint is
committed."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import evaluate

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("**/log.csv") if (p.parent / "metrics.json").is_file())
KNN_RUNS = sorted(p.parent for p in RESULTS.glob("**/metrics.json")
                  if json.loads(p.read_text()).get("method") == "knn")


def _columns(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture(params=RUNS + KNN_RUNS, ids=[str(p.relative_to(RESULTS)) for p in RUNS + KNN_RUNS])
def run(request):
    return request.param


@pytest.fixture(params=RUNS, ids=[str(p.relative_to(RESULTS)) for p in RUNS])
def piad_run(request):
    return request.param


@pytest.fixture(params=KNN_RUNS, ids=[str(p.relative_to(RESULTS)) for p in KNN_RUNS])
def knn_run(request):
    return request.param


def test_metrics_are_those_of_the_committed_scores(run):
    metrics = json.loads((run / "metrics.json").read_text())
    scores = _columns(run / "scores.csv")
    labels = np.array(scores["label"], dtype=int)
    assert labels.sum() == metrics["n_test_anomalous"] and len(labels) == metrics["n_test"]
    recomputed = {k: np.array(scores[k], dtype=float) for k in metrics["roc_auc_per_score"]}
    # scores.csv holds 6 significant digits: ties it makes can move an AUC by a few 1e-6
    assert evaluate.roc_aucs(recomputed, labels) == pytest.approx(metrics["roc_auc_per_score"], abs=1e-5)
    assert evaluate.average_precisions(recomputed, labels) == pytest.approx(
        metrics["average_precision_per_score"], abs=1e-5)
    primary = metrics["score"]
    assert (metrics["roc_auc"], metrics["average_precision"]) == (
        metrics["roc_auc_per_score"][primary], metrics["average_precision_per_score"][primary])


def test_log_and_progress_end_at_the_evaluated_iteration(piad_run):
    run = piad_run
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("iterations", "vgg_weights", "precision", "device", "provenance"):
        assert metrics.get(key) not in (None, ""), key
    assert metrics["provenance"]["git_commit"] and not metrics["provenance"]["git_dirty"]
    # log.csv counts steps from 0: its last row is step iterations - 1 (guard.py logs it always)
    assert int(_columns(run / "log.csv")["iteration"][-1]) == metrics["iterations"] - 1
    if (run / "progress.csv").is_file():
        progress = _columns(run / "progress.csv")
        its = [int(i) for i in progress["iteration"]]
        assert its == sorted(its) and its[-1] == metrics["iterations"]
        assert float(progress["roc_auc"][-1]) == pytest.approx(metrics["roc_auc"], abs=1e-6)
        for it, auc, source in zip(its, progress["roc_auc"], progress["source"]):
            # each point's evaluation (kept/<it>/metrics.json of tools.progress) is committed beside
            kept = json.loads((run / source).read_text())
            assert kept["iterations"] == it and float(auc) == pytest.approx(kept["roc_auc"], abs=1e-6)
            assert kept["provenance"]["git_commit"] == metrics["provenance"]["git_commit"]


def test_no_checkpoint_is_committed():
    assert not [p for p in RESULTS.glob("**/*") if p.suffix in (".pt", ".pth", ".ckpt")]


def test_knn_runs_have_no_training_steps_and_say_what_they_are(knn_run):
    metrics = json.loads((knn_run / "metrics.json").read_text())
    for key in ("vgg_weights", "precision", "device", "provenance", "train_time_s", "threads"):
        assert metrics.get(key) not in (None, ""), key
    assert metrics["provenance"]["git_commit"] and not metrics["provenance"]["git_dirty"]
    assert metrics["score"] == "knn" and metrics["iterations"] == 0 and metrics["knn"]["k"] >= 1
    assert metrics["knn"]["bank"][0] == metrics["n_train"]  # every training image, none held out twice
    assert not (knn_run / "log.csv").exists() and not (knn_run / "progress.csv").exists()


def _table_rows(path: Path) -> dict[str, list[str]]:
    """``{first cell: cells}`` of the rows of a markdown table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("|") and not line.startswith("| ---")]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.parametrize("table", sorted({p.parent / "table.md" for p in KNN_RUNS
                                          if (p.parent / "table.md").is_file()}),
                         ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_knn_table_is_its_runs_metrics(table):
    """Each class row's ROC AUC, average precision and bank time are its run's metrics.json's, the
    mean is theirs, and every run is a row."""
    rows, runs = _table_rows(table), sorted(p for p in table.parent.iterdir() if (p / "metrics.json").is_file())
    aucs = []
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        (row,) = [cells for key, cells in rows.items() if key.endswith(f"`{run.name}`")]
        assert row[:3] == [f"{metrics['roc_auc']:.3f}", f"{metrics['average_precision']:.3f}",
                           f"{metrics['train_time_s']:.1f}"], run.name
        aucs.append(metrics["roc_auc"])
    assert len(runs) == 10 and rows["mean"][0] == f"{np.mean(aucs):.3f}"
