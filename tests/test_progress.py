"""tools/progress.py: a run's kept checkpoints (--keep-every) evaluated, ROC AUC against iterations."""
import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import checkpoint
import errors
import evaluate
import train
from tools import progress

ROOT = Path(__file__).resolve().parent.parent


def _train(out, **kw):
    cfg = train.TrainConfig(dataset="digits", normal="3", batch_size=8, loss="mse", vgg_weights="random",
                            progress=False, out=str(out), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn
        return train.train(cfg)


def test_progress_evaluates_each_kept_state_as_a_run_of_that_length(tmp_path, monkeypatch):
    run = tmp_path / "run"
    final = _train(run, iterations=4, keep_every=2, checkpoint_minutes=1000.0)
    short = _train(tmp_path / "short", iterations=2)  # the state kept at iteration 2, trained and evaluated
    rows = progress.progress(run)
    assert [r["iteration"] for r in rows] == [2, 4]
    assert [r["source"] for r in rows] == ["kept/2/metrics.json", "metrics.json"]
    at2 = json.loads((run / "kept" / "2" / "metrics.json").read_text())
    assert at2["iterations"] == 2
    assert at2["roc_auc_per_score"] == pytest.approx(short["roc_auc_per_score"], abs=1e-6)
    assert float(rows[1]["roc_auc"]) == pytest.approx(final["roc_auc"], abs=1e-6)
    with open(run / "progress.csv") as fh:
        assert list(csv.DictReader(fh)) == [{k: str(v) for k, v in r.items()} for r in rows]
    assert (run / "progress.png").stat().st_size > 0

    def no_second_evaluation(*a, **k):
        raise AssertionError("an evaluation already written is evaluated again")
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", no_second_evaluation)
    assert progress.progress(run, iterations=[2]) == rows[:1]
    with pytest.raises(errors.UserError, match="iteration 3; there are: 2, 4"):
        progress.progress(run, iterations=[2, 3])
    assert checkpoint.kept_path(run, 2).is_file()


def test_a_run_without_kept_checkpoints_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "empty")], [str(tmp_path / "nowhere")]):
        r = subprocess.run([sys.executable, "-m", "tools.progress", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
