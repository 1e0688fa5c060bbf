"""From a score to a decision (issue 27): the calibrated threshold, the metrics, batch independence.

* The threshold is the ⌈(n + 1)(1 − α)⌉-th smallest primary score of n held-out normal training
  images (``evaluate.calibrate``): on new normal images its false-positive rate is
  (n + 1 − k)/(n + 1) ≤ α in expectation, checked by simulation and on a real ``folder`` run.
* Average precision is sklearn's step sum, checked against a hand computation on perfect,
  constant and random detectors (a trapezoid would rate the constant detector above chance).
* No score depends on the other images scored with it: every score of ``evaluate.SCORES``,
  D_X's ``critic`` included, is unchanged per image when the test set is shuffled, regrouped into
  other batch sizes or cut to a subset.
* Done when: on a ``folder`` run with ``--calibration 0.1`` on images made here, ``scores.csv``,
  ``evaluate.py --images`` and the exported scorer give identical decisions.
"""
import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.data import Subset

import calibration
import data
import evaluate
import features
import losses
import piad
import presets
import train
from berg import pgan
from tools import provenance

ROOT = Path(__file__).resolve().parent.parent


# --- the threshold ------------------------------------------------------------------------------

def test_the_rank_is_the_conformal_order_statistic():
    assert calibration.calibration_rank(19, 0.05) == 19   # ⌈20 · 0.95⌉: the smallest set that allows α = 0.05
    assert calibration.calibration_rank(99, 0.05) == 95   # ⌈100 · 0.95⌉ (whole: not pushed up by rounding)
    assert calibration.calibration_rank(100, 0.05) == 96  # ⌈101 · 0.95⌉ = ⌈95.95⌉
    assert calibration.calibration_rank(10, 0.5) == 6
    with pytest.raises(ValueError, match="at least 19"):
        calibration.calibration_rank(18, 0.05)


@given(n=st.integers(1, 400), alpha=st.floats(0.01, 0.6), seed=st.integers(0, 2 ** 32 - 1))
def test_the_threshold_is_a_calibration_score_with_k_at_or_below_it(n, alpha, seed):
    assume(n >= math.ceil((1 - alpha) / alpha - 1e-9))
    s = np.random.default_rng(seed).standard_normal(n)
    t = evaluate.calibrate(s, alpha, "x")
    k = t["rank"]
    assert t["threshold"] in s and int((s <= t["threshold"]).sum()) == k
    assert t["expected_fpr"] == (n + 1 - k) / (n + 1)
    assert alpha - 1 / (n + 1) - 1e-12 < t["expected_fpr"] <= alpha + 1e-9  # 1e-9: rounding of (n + 1)(1 − α)


def _fpr_sd(n: int, k: int, m: int) -> float:
    """Sd of the FPR on m new normals of a threshold from n calibration scores: the FPR given the
    calibration set is p ~ Beta(n + 1 − k, k); the count on m new ones is binomial given p."""
    a, b = n + 1 - k, k
    mu, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    return math.sqrt(var + (mu - var - mu * mu) / m)


def test_the_threshold_fpr_on_new_normals_is_the_conformal_one():
    rng = np.random.default_rng(0)
    n, m, reps, alpha = 100, 200, 2000, 0.05
    k = calibration.calibration_rank(n, alpha)
    fprs = [float((rng.standard_normal(m) > evaluate.calibrate(rng.standard_normal(n), alpha, "s")["threshold"]).mean())
            for _ in range(reps)]
    expected = (n + 1 - k) / (n + 1)
    assert expected <= alpha
    assert abs(np.mean(fprs) - expected) < 4 * _fpr_sd(n, k, m) / math.sqrt(reps)


def test_too_few_or_non_finite_calibration_scores_give_no_threshold():
    with pytest.raises(ValueError, match="too few"):
        evaluate.calibrate(np.arange(5.0), 0.05, "s")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate.calibrate(np.r_[np.arange(30.0), np.nan], 0.05, "s")
    assert evaluate.decide({"s": np.ones(3)}, None) is None


def test_the_calibration_split_holds_out_seeded_normal_training_images_only():
    ds = data.load_dataset("digits", 3, seed=1, contamination=0.1)
    held = calibration.hold_out_calibration(ds, 0.2, seed=1)
    n_normal = int((ds.train.labels == 0).sum())
    assert len(held.calibration) == round(0.2 * n_normal) == held.info["n_calibration"]
    assert len(held.train) + len(held.calibration) == len(ds.train)
    assert (held.calibration.labels == 0).all()                      # normal images only
    cal, kept = set(held.info["calibration_ids"]), set(held.info["train_ids"])
    assert not cal & kept and cal | kept == set(ds.info["train_ids"]) and not cal & set(ds.test_ids)
    assert held.test is ds.test                                      # the test set is untouched
    again = calibration.hold_out_calibration(data.load_dataset("digits", 3, seed=1, contamination=0.1), 0.2, seed=1)
    assert again.info["calibration_ids"] == held.info["calibration_ids"]   # seeded
    other = calibration.hold_out_calibration(ds, 0.2, seed=2)
    assert other.info["calibration_ids"] != held.info["calibration_ids"]
    assert calibration.hold_out_calibration(ds, 0.0, seed=1) is ds         # default: the protocol's sets


def test_a_calibration_set_too_small_for_the_target_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "digits", "--normal", "3", "--calibration", "0.05", "--target-fpr", "0.01",
                    "--loss", "mse", "--no-progress", "--iterations", "1", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --calibration: ") and "at least 99" in err[-1]
    assert not (tmp_path / "r").exists()


# --- metrics ------------------------------------------------------------------------------------

def _hand_ap(score, labels) -> float:
    """Σ over the distinct thresholds, highest first, of (recall gained) × precision there."""
    score, labels = np.asarray(score, float), np.asarray(labels, int)
    ap, recall = 0.0, 0.0
    for t in np.unique(score)[::-1]:
        flagged = score >= t
        tp = int((flagged & (labels == 1)).sum())
        new_recall = tp / labels.sum()
        ap += (new_recall - recall) * tp / flagged.sum()
        recall = new_recall
    return ap


def test_average_precision_against_a_hand_computation():
    from sklearn.metrics import auc, precision_recall_curve

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(70, int), np.ones(30, int)]
    perfect, constant = labels + 0.1 * rng.random(100), np.full(100, 0.5)
    random = np.round(rng.random(100), 1)  # ties included
    aps = evaluate.average_precisions({"perfect": perfect, "constant": constant, "random": random}, labels)
    assert aps["perfect"] == pytest.approx(1.0) == _hand_ap(perfect, labels)
    assert aps["constant"] == pytest.approx(0.3) == pytest.approx(_hand_ap(constant, labels))  # the prevalence
    assert aps["random"] == pytest.approx(_hand_ap(random, labels), rel=1e-12)
    p, r, _ = precision_recall_curve(labels, constant)
    assert auc(r, p) == pytest.approx(0.65)  # the trapezoid's (1 + prevalence) / 2: the trap it avoids


def test_decision_metrics_and_the_oracle_f1_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    flags = np.array([0, 1, 0, 0, 1, 1, 0, 0, 1, 0])  # tp 3, fp 1, fn 2, tn 4
    m = evaluate.decision_metrics(flags, labels)
    assert m == {"test_fpr": 1 / 5, "test_tpr": 3 / 5, "test_precision": 3 / 4, "test_f1": 6 / 9,
                 "test_flagged": 4}
    assert evaluate.decision_metrics(np.zeros(10), labels)["test_precision"] is None  # nothing flagged
    score = np.random.default_rng(3).random(10)
    brute = max(2 * ((score >= t) & (labels == 1)).sum() / ((score >= t).sum() + labels.sum()) for t in score)
    assert evaluate.f1_max_oracle(score, labels) == pytest.approx(brute)
    assert evaluate.f1_max_oracle(labels + 0.5, labels) == 1.0


# --- no score depends on the other images scored with it ---------------------------------------

@pytest.fixture(scope="module")
def vgg_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: batch independence holds for any weights
        vgg = features.VGG19Features("relu4_2", "random", seed=0)
    g = torch.Generator().manual_seed(0)
    stats = features.FeatureStats(torch.randn(vgg.out_channels, generator=g) * 0.1,
                                  torch.rand(vgg.out_channels, generator=g) + 0.5, vgg.weights_id, vgg.layer, 1)
    return losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats, impl="torch")


def _images(n, seed, channels=1):
    g = torch.Generator().manual_seed(seed)
    return data.TensorImages(torch.rand(n, channels, 32, 32, generator=g) * 2 - 1, np.r_[np.zeros(n // 2),
                                                                                        np.ones(n - n // 2)])


def _regrouped(model, ds, loss, reference):
    """The scores of ``ds`` in one batch, in batches of 5 of a shuffled copy, and of its first 7 alone."""
    whole, _ = evaluate.compute_scores(model, ds, loss, batch_size=len(ds), reference=reference)
    perm = np.random.default_rng(1).permutation(len(ds))
    shuffled, _ = evaluate.compute_scores(model, Subset(ds, perm.tolist()), loss, batch_size=5, reference=reference)
    part, _ = evaluate.compute_scores(model, Subset(ds, list(range(7))), loss, batch_size=3, reference=reference)
    return whole, perm, shuffled, part


@pytest.mark.parametrize("mbstd_group", [0, 4])  # the authors' whole batch; the paper's groups of 4
def test_every_score_is_unchanged_when_the_test_set_is_shuffled_regrouped_or_cut(vgg_loss, mbstd_group):
    torch.manual_seed(0)
    cfg = dataclasses.replace(presets.network("mnist"), mbstd_group=mbstd_group)
    model = piad.PIAD(config=cfg, channels=1).eval()
    ds, train_set = _images(24, 1), _images(40, 2)
    ref = evaluate.critic_reference(model, train_set, batch_size=8, seed=0)
    assert ref.shape == ((7 if mbstd_group == 0 else 3), 1, 32, 32)  # D_X's group in training, less one
    whole, perm, shuffled, part = _regrouped(model, ds, vgg_loss, ref)
    assert set(evaluate.SCORES) <= set(whole)
    for k in evaluate.SCORES:
        np.testing.assert_allclose(shuffled[k], whole[k][perm], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(part[k], whole[k][:7], rtol=1e-5, atol=1e-6, err_msg=k)
    # the critic is D_X of the image in one minibatch with the reference images, exactly
    x = ds.images[:3]
    direct = torch.stack([-model.DX(torch.cat([x[i:i + 1], ref]))[0] for i in range(3)]) if mbstd_group == 0 \
        else -model.DX(torch.cat([x, ref.repeat_interleave(3, 0)]))[:3]
    np.testing.assert_allclose(whole["critic"][:3], direct.detach().numpy(), rtol=1e-5, atol=1e-6)
    # without the reference images the critic does depend on its batch (what the grouping removes)
    alone, _, shuffled_alone, _ = _regrouped(model, ds, losses.ReconstructionLoss(kind="mse"), None)
    assert not np.allclose(shuffled_alone["critic"], alone["critic"][perm], rtol=1e-3)


def test_pgan_scores_are_unchanged_when_regrouped():
    torch.manual_seed(0)
    model = pgan.PGAN(pgan.PGANConfig(1, 32, fmap_base=64, fmap_max=8)).eval()
    model.set_reference(_images(3, 5).images)
    ds = _images(12, 3)
    whole, perm, shuffled, part = _regrouped(model, ds, losses.ReconstructionLoss(kind="mse"), None)
    for k in ("critic", "latent-norm", "mse"):
        np.testing.assert_allclose(shuffled[k], whole[k][perm], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(part[k], whole[k][:7], rtol=1e-5, atol=1e-6, err_msg=k)


def test_no_min_max_normalisation_of_scores_anywhere():
    """No module rescales by a set's minimum and maximum (which would make scores depend on the
    test set and move with it); the behaviour is checked by the regrouping tests above."""
    pattern = re.compile(r"-\s*[\w.\[\]]+\.min\(\)|MinMaxScaler|minmax_scale|min_max")
    files = [*ROOT.glob("*.py"), *ROOT.glob("berg/*.py"), *ROOT.glob("tools/*.py")]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found
    assert pattern.search("(s - s.min()) / (s.max() - s.min())")  # the idiom it looks for


@pytest.mark.parametrize("kind", ["l1", "mse", "latent-norm"])
def test_the_scorer_decides_with_the_thresholds_score(kind):
    """The exported module's decision is the threshold's score above it: the map's distance, another
    distance (``decide_by``) or ‖E(x)‖, as evaluate.decide on compute_scores' scores."""
    from tools import export

    torch.manual_seed(0)
    model = piad.PIAD(config=presets.network("mnist"), channels=1).eval()
    ds = _images(10, 4)
    scores, _ = evaluate.compute_scores(model, ds, losses.ReconstructionLoss(kind="mse"))
    threshold = {"score": kind, "threshold": float(np.median(scores[kind]))}
    l1 = losses.ReconstructionLoss(kind="l1", reduction="none", check_range=False)
    decide_by = losses.ReconstructionLoss(kind="mse", reduction="none", check_range=False) if kind == "mse" else None
    with torch.no_grad():
        got, maps, anomalous = export.Scorer(model, l1, threshold, decide_by)((ds.images + 1) / 2)
    np.testing.assert_allclose(got.numpy(), scores["l1"], rtol=1e-5)
    np.testing.assert_array_equal(anomalous.numpy().astype(int), evaluate.decide(scores, threshold))
    assert anomalous.sum() == 5
    if kind == "mse":
        with pytest.raises(ValueError, match="decide_by"):
            export.Scorer(model, l1, threshold)


# --- done when: a folder run's decisions, three ways ---------------------------------------------

def _blob(rng, size=40):
    """A normal image: a bright Gaussian blob at a random place on a dark background, with noise."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(12, size - 12, 2)
    img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(4, 7) ** 2))
    img = img + rng.normal(20, 5, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("decisions")
    rng = np.random.default_rng(0)
    counts = {"normal": 1000, "test/normal": 120, "test/anomalous": 20}
    for sub, n in counts.items():
        (root / sub).mkdir(parents=True)
        for i in range(n):
            img = _blob(rng) if "anomalous" not in sub else rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(img).save(root / sub / f"{i:04d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train.train(train.parse_args([
            "--dataset", "folder", "--data-root", str(root), "--normal", "blobs", "--image-size", "32",
            "--calibration", "0.1", "--batch-size", "8", "--iterations", "2", "--vgg-weights", "random",
            "--no-progress", "--out", str(root / "run")]))
    return root, metrics


def _rows(path) -> dict:
    with open(path) as fh:
        return {Path(r["id"]).relative_to(Path(r["id"]).parents[1]).as_posix(): r for r in csv.DictReader(fh)}


def test_a_folder_run_holds_out_calibrates_and_reports(folder_run):
    root, metrics = folder_run
    saved = json.loads((root / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    t = saved["threshold"]
    assert saved["n_calibration"] == t["n_calibration"] == 100 and saved["n_train"] == 900
    assert t["score"] == saved["score"] == "rel-perc-l1" and t["target_fpr"] == 0.05
    for key in ("threshold", "test_fpr", "test_tpr", "test_precision", "test_f1", "expected_fpr", "calibration_scores"):
        assert key in t, key
    assert 0 <= saved["average_precision"] <= 1 and 0 <= saved["f1_max_oracle"] <= 1
    prov = saved["provenance"]
    for key in ("git_commit", "git_dirty", "python", "torch", "torchvision", "numpy", "scikit_learn", "device",
                "device_name", "threads"):
        assert key in prov, key
    assert saved["seeds"]["seed"] == 0 and saved["seeds"]["calibration"] == [0, calibration.CALIBRATION_STREAM]
    # the FPR on held-out normals (the test folder's) is the target's, within its binomial error
    m = 120
    assert abs(t["test_fpr"] - 0.05) <= 3 * _fpr_sd(100, t["rank"], m), t["test_fpr"]
    assert (root / "run" / "pr.png").stat().st_size > 0 and (root / "run" / "roc.png").stat().st_size > 0


LOAD_AND_DECIDE = r"""
import sys, json, importlib.abc
import torch

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in set(sys.argv[3].split(",")):
            raise ImportError(f"{name} is not allowed here")
sys.meta_path.insert(0, NoProject())
extra = {"piad.json": ""}
scores, maps, anomalous = torch.export.load(sys.argv[1], extra_files=extra).module()(torch.load(sys.argv[2]))
torch.save({"scores": scores, "anomalous": anomalous, "meta": json.loads(extra["piad.json"])}, sys.argv[2] + ".out")
"""


def test_scores_csv_images_and_the_exported_scorer_give_identical_decisions(folder_run, tmp_path):
    from test_imports import CHAIN

    root, metrics = folder_run
    ckpt = root / "run" / "checkpoint.pt"
    run_rows = _rows(root / "run" / "scores.csv")
    evaluate.main(["--checkpoint", str(ckpt), "--images", str(root / "test"), "--out", str(tmp_path)])
    image_rows = _rows(tmp_path / "scores_test.csv")
    assert set(run_rows) == set(image_rows) and len(run_rows) == 140
    flagged = {k: int(r["anomalous"]) for k, r in run_rows.items()}
    assert flagged == {k: int(r["anomalous"]) for k, r in image_rows.items()}
    assert 0 < sum(flagged.values()) < 140
    for k, r in run_rows.items():  # every score of an image, scored with other images and in another
        for name in evaluate.SCORES:  # process (in the run's memory format, as evaluate.load_run sets): the same
            assert float(image_rows[k][name]) == pytest.approx(float(r[name]), rel=2e-6, abs=1e-6), (k, name)
    # the exported scorer, loaded with torch only, decides the same
    evaluate.main(["--checkpoint", str(ckpt), "--export", str(tmp_path / "scorer.pt2")])
    ds, paths = data.load_image_folder(str(root / "test"), image_size=32, channels=1)
    torch.save((ds.images + 1) / 2, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_AND_DECIDE, str(tmp_path / "scorer.pt2"), str(tmp_path / "x.pt"),
                    ",".join(CHAIN + ("piad_C",))], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    got = torch.load(tmp_path / "x.pt.out")
    exported = {Path(p).relative_to(Path(p).parents[1]).as_posix(): int(a) for p, a in zip(paths, got["anomalous"])}
    assert exported == flagged
    assert got["meta"]["threshold"]["threshold"] == metrics["threshold"]["threshold"]
    assert "preprocessing" in got["meta"] and got["meta"]["preprocess"] == "authors"
    # re-evaluating the checkpoint reuses the stored threshold and decides the same
    evaluate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["threshold"] == metrics["threshold"]
    assert {k: int(r["anomalous"]) for k, r in _rows(tmp_path / "again" / "scores.csv").items()} == flagged


def test_the_checkpoint_records_its_commit_and_another_commit_is_said(folder_run, capsys):
    import checkpoint

    root, metrics = folder_run
    state = checkpoint.load_checkpoint(root / "run" / "checkpoint.pt")
    assert state["provenance"]["git_commit"] == metrics["provenance"]["git_commit"]
    assert state["scoring"]["threshold"] == {k: v for k, v in metrics["threshold"].items() if not k.startswith("test_")}
    provenance.warn_other_commit(state, "ckpt")
    assert capsys.readouterr().err == ""
    if metrics["provenance"]["git_commit"]:  # a clone: another commit is said in one line
        provenance.warn_other_commit({"provenance": {"git_commit": "0" * 40}}, "ckpt")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("warning: ckpt was written by commit 000000000000")


def test_without_calibration_no_threshold_is_invented(tmp_path):
    metrics = train.train(train.TrainConfig(dataset="digits", normal="3", iterations=1, batch_size=8, loss="mse",
                                            vgg_weights="random", progress=False, out=str(tmp_path / "r")))
    assert metrics["threshold"] is None and "no threshold" in metrics["threshold_note"]
    assert metrics["n_calibration"] == 0
    with open(tmp_path / "r" / "scores.csv") as fh:
        assert "anomalous" not in next(csv.reader(fh))
