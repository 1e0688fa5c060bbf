"""--protocol berg (berg/protocol.py): Berg et al.'s dataset_tool.py splits, on synthetic files in
CIFAR-10's (python pickles) and MNIST's (idx) formats read by the project's real loading code."""
import pickle

import numpy as np
import pytest
import torch

import berg.protocol
import data
from berg.system import PROTOCOLS  # data.py does not import berg/: the split is passed in

VEHICLES = (0, 1, 8, 9)


def _cifar(root, rng, n_train=500, n_test=3000):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    per = n_train // 5
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, per).tolist()}, fh)
    test_labels = rng.integers(0, 10, n_test)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test[:, 0] = test_labels  # the label, readable from the first red pixel
    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": test, "labels": test_labels.tolist()}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)


def _idx(path, arr):
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def _mnist(root, rng, n_train=600, n_test=200):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(1, 256, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return raw


@pytest.mark.parametrize("p", [0.0, 0.02, 0.1])
def test_cifar10_vehicles_normal_1000_plus_1000_test(tmp_path, monkeypatch, p):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # no md5 of synthetic files
    rng = np.random.default_rng(0)
    _cifar(tmp_path, rng)
    d = data.load_dataset("cifar10", "airplane", root=str(tmp_path), protocol="berg", contamination=p, seed=3,
                          protocols=PROTOCOLS)
    train_labels = np.concatenate([pickle.load(open(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}", "rb"))
                                   ["labels"] for i in range(1, 6)])
    n_normal = int(np.isin(train_labels, VEHICLES).sum())
    n_anom = int(p * n_normal / (1 - p))  # their formula (floor)
    assert d.normal == "vehicles" and d.protocol == "berg"
    assert d.info["n_train_normal"] == n_normal and d.info["n_train_anomalous"] == n_anom
    ids = [int(i.split(":")[1]) for i in d.info["train_ids"]]
    assert all(np.isin(train_labels[ids], VEHICLES) == (d.train.labels.numpy() == 0))
    assert len(d.test) == 2000 and int(d.test.labels.sum()) == 1000  # 1,000 + 1,000 from the test batch
    # the label hidden in each test image's first pixel agrees with the protocol's label
    first_pixel = ((d.test.images[:, 0, 0, 0] + 1) * 127.5).round().long().numpy()
    assert np.array_equal(~np.isin(first_pixel, VEHICLES), d.test.labels.numpy().astype(bool))
    # the inverse task: an animal named normal makes the animals normal
    inv = data.load_dataset("cifar10", "cat", root=str(tmp_path), protocol="berg", seed=3,
                            protocols=PROTOCOLS)
    assert inv.normal == "animals" and inv.info["n_train_normal"] == len(train_labels) - n_normal


def test_mnist_one_digit_whole_test_split_padded(tmp_path):
    rng = np.random.default_rng(1)
    raw = _mnist(tmp_path, rng)
    d = data.load_dataset("mnist", "3", root=str(tmp_path), protocol="berg", contamination=0.05, seed=0,
                          download=False, protocols=PROTOCOLS)
    tr_y = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    te_y = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    n = int((tr_y == 3).sum())
    assert d.info["n_train_normal"] == n and d.info["n_train_anomalous"] == int(0.05 * n / 0.95)
    assert len(d.test) == len(te_y) and np.array_equal(d.test.labels.numpy(), (te_y != 3).astype(np.int64))
    # 28×28 zero-padded to 32×32 (their np.pad), not resized: the border is black, the rest unchanged
    te_x = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    x = d.test.images[:, 0]
    assert x.shape[-1] == 32 and torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)
    torch.testing.assert_close(x[:, 2:30, 2:30], torch.from_numpy(te_x).float() / 127.5 - 1)


def test_split_counts_and_errors():
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 10, 1000), rng.integers(0, 10, 300)
    a = berg.protocol.split(tr, te, (4,), seed=1, contamination=0.1)
    b = berg.protocol.split(tr, te, (4,), seed=2, contamination=0.1)
    assert int(a[1].sum()) == int(0.1 * (tr == 4).sum() / 0.9) and not np.array_equal(a[0], b[0])
    assert np.array_equal(a[2], np.arange(300))
    with pytest.raises(ValueError, match="needs"):
        berg.protocol.split(tr, te, tuple(range(9)), seed=0, contamination=0.9)
    assert berg.protocol.n_contaminants(0.02, 20000, floor=True) == 408  # int(408.16...)
