"""The results committed under ``results/`` say what they are: each run's ROC AUC and average
precision are those of its own ``scores.csv``, its ``log.csv`` ends at the last of the iterations
its ``metrics.json`` records, its ``progress.csv`` ends at that evaluation and agrees with the kept
checkpoints' evaluations committed beside it, and no checkpoint is committed."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import evaluate

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("**/log.csv") if (p.parent / "metrics.json").is_file())


def _columns(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture(params=RUNS, ids=[str(p.relative_to(RESULTS)) for p in RUNS])
def run(request):
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


def test_log_and_progress_end_at_the_evaluated_iteration(run):
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
