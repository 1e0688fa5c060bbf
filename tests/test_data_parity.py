"""Data parity: our preprocessing of the same raw files equals the authors' (ninatu/piad).

For every dataset of the paper, synthetic raw files in the dataset's own format are read by
``data.load_dataset`` (default ``preprocess="authors"``) and by the authors' own dataset classes
or transforms (``piad/datasets.py``, imported as in test_parity.py); the images must be equal
bit for bit (float32). MNIST, CIFAR-10 and CelebA go through their dataset classes (CelebA: also
the choice of normal and anomalous faces), COIL-100 through their ``coil_100_preprocessing``
(scikit-image rescale, uint8 flooring), Fashion-MNIST and LSUN (lmdb readers) through their
transforms of the same decoded images. ``preprocess="float"`` must differ (the switch works).
"""
from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
import readers
from test_parity import FOUND, authors, pytestmark  # noqa: F401 (fixture and skip mark)


def _idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _images(rng, n, *shape) -> np.ndarray:
    """Smooth random images (resampling differences show on gradients and edges alike)."""
    x = rng.integers(0, 256, (n, *shape)).astype(np.float64)
    x[:, 1:] = 0.5 * x[:, 1:] + 0.5 * x[:, :-1]
    return x.astype(np.uint8)


def _mnist_files(root, rng, folder: str, gz: bool = False) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n, prefix in (("train", 30, "train"), ("test", 20, "t10k")):
        x, y = _images(rng, n, 28, 28), np.arange(n) % 10
        _idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        if gz:
            for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
                (raw / (name + ".gz")).write_bytes(gzip.compress((raw / name).read_bytes()))
        out[split] = (x, y)
    return out


def _equal(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype == torch.float32, what
    assert torch.equal(ours, theirs), f"{what}: max |diff| {(ours - theirs).abs().max().item():.3g}"


def test_mnist(authors, tmp_path):
    _mnist_files(tmp_path, np.random.default_rng(0), "MNIST")
    ds = data.load_dataset("mnist", 3, root=str(tmp_path), download=False)
    d = authors["datasets"]
    theirs = d.MNIST(str(tmp_path), "train", 3, normal=True, transform=d.create_transform("mnist"))
    assert len(ds.train) == len(theirs.active_indexes) == 3
    for i in range(len(ds.train)):
        _equal(ds.train[i][0], theirs[i], f"MNIST train {i}")
    flt = data.load_dataset("mnist", 3, root=str(tmp_path), download=False, preprocess="float")
    assert not torch.equal(flt.train.images, ds.train.images)


def test_fashion_mnist(authors, tmp_path):
    raw = _mnist_files(tmp_path, np.random.default_rng(1), "FashionMNIST", gz=True)
    ds = data.load_dataset("fashion-mnist", 2, root=str(tmp_path))
    transform = authors["datasets"].create_transform("fashion_mnist")
    for i, ident in enumerate(ds.info["train_ids"] + ds.test_ids):
        split, k = ident.split(":")
        image = (ds.train if i < len(ds.train) else ds.test)[i if i < len(ds.train) else i - len(ds.train)][0]
        _equal(image, transform(Image.fromarray(raw[split][0][int(k)], mode="L")), f"Fashion-MNIST {ident}")


def test_cifar10(authors, tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # no md5s
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(2)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 10)]:
        x = _images(rng, n, 3, 32, 32).reshape(n, -1)
        with open(base / name, "wb") as f:
            pickle.dump({"data": x, "labels": list(rng.integers(0, 10, n))}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    k = int(np.bincount(np.concatenate([pickle.load(open(base / f"data_batch_{i}", "rb"))["labels"]
                                        for i in range(1, 6)])).argmax())
    ds = data.load_dataset("cifar10", k, root=str(tmp_path), download=False)
    d = authors["datasets"]
    theirs = d.CIFAR10(str(tmp_path), "train", k, normal=True, transform=d.create_transform("cifar10"))
    assert len(ds.train) == len(theirs.active_indexes) >= 2
    for i in range(len(ds.train)):
        _equal(ds.train[i][0], theirs[i], f"CIFAR-10 train {i}")


def test_coil100(authors, tmp_path):
    src = tmp_path / "coil-100"
    src.mkdir()
    rng = np.random.default_rng(3)
    for obj in (1, 2, 100):
        for angle in range(0, 360, 45):
            Image.fromarray(_images(rng, 1, 128, 128, 3)[0]).save(src / f"obj{obj}__{angle}.png")
    authors["datasets"].coil_100_preprocessing(str(tmp_path), str(tmp_path / "ad_protocol"))
    parts = [torch.load(tmp_path / "ad_protocol" / "processed" / f, weights_only=True)
             for f in ("training.pt", "test.pt")]
    theirs_x, theirs_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    labels, paths = readers.coil100_files(src)
    ours = readers.load_coil100(paths, 32)                      # (N, 3, 32, 32) in [-1, 1]
    ours_u8 = ((ours * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(readers.normalise_uint8(ours_u8.permute(0, 3, 1, 2)), ours)
    for obj in (1, 2, 100):  # their split is an unseeded shuffle: compare each object's images as a set
        mine = sorted(x.numpy().tobytes() for x in ours_u8[torch.as_tensor(labels) == obj])
        their = sorted(x.numpy().tobytes() for x in theirs_x[theirs_y == obj % 100])
        assert mine == their, f"COIL-100 object {obj}"
    ds = data.load_dataset("coil100", "1", root=str(src))
    assert len(ds.train) == 6 and len(ds.test) == 4  # int(0.8 * 8) = 6 train, 2 + 2 test
    assert not torch.equal(readers.load_coil100(paths[:2], 32, preprocess="float"), ours[:2])


def test_lsun(authors, tmp_path):
    rng = np.random.default_rng(4)
    for split, cls, shapes in (("train", "bedroom", [(256, 300), (340, 256), (256, 256)]),
                               ("val", "bedroom", [(256, 330)]), ("val", "conference_room", [(300, 256)])):
        (tmp_path / split / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            Image.fromarray(_images(rng, 1, h, w, 3)[0]).save(tmp_path / split / cls / f"{i}.webp", lossless=True)
    ds = data.load_dataset("lsun", "bedroom", root=str(tmp_path))
    transform = authors["datasets"].create_transform("lsun")
    for i, path in enumerate(ds.info["train_ids"]):
        with Image.open(path) as im:  # as torchvision's LSUN reader decodes the lmdb's webp bytes
            expected = transform(im.convert("RGB"))
        _equal(ds.train[i][0], expected, f"LSUN {path}")
    flt = data.load_dataset("lsun", "bedroom", root=str(tmp_path), preprocess="float")
    assert not torch.equal(flt.train[0][0], ds.train[0][0])


def _celeba_files(root, rng, n: int = 30, extra: str = "Smiling") -> list[str]:
    d = root / "celeba"
    (d / "img_align_celeba").mkdir(parents=True)
    names = list(data._CELEBA)
    files = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    attrs = -np.ones((n, len(names)), np.int64)
    for i in range(n):  # a few faces with one, two or none of the paper's attributes
        for a in (("Bald",), ("Bangs",), ("Bald", "Mustache"), (), (extra,))[i % 5]:
            attrs[i, names.index(a)] = 1
    for f in files:
        Image.fromarray(_images(rng, 1, 218, 178, 3)[0]).save(d / "img_align_celeba" / f, quality=95)
    part = [f"{f} {(0, 0, 2)[i % 3]}" for i, f in enumerate(files)]
    (d / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    (d / "identity_CelebA.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(files)))
    (d / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" +
                                            "".join(f"{f} 1 2 3 4\n" for f in files))
    (d / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n" + " ".join(f"p{i}" for i in range(10)) + "\n" + "".join(f"{f} " + " ".join(["1"] * 10) + "\n"
                                                                        for f in files))
    (d / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(names) + "\n" + "".join(
        f"{f} " + " ".join(str(v) for v in row) + "\n" for f, row in zip(files, attrs)))
    return files


def test_celeba(authors, tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    _celeba_files(tmp_path, np.random.default_rng(5))
    d = authors["datasets"]
    transform = d.create_transform("celeba")
    normal = d.CelebA(str(tmp_path), "train", 0, normal=True, transform=transform)
    for attribute in ("Bald", "Bangs"):
        ds = data.load_dataset("celeba", attribute, root=str(tmp_path))
        assert len(ds.train) == len(normal.active_indexes) > 0
        for i in range(len(ds.train)):
            _equal(ds.train[i][0], normal[i], f"CelebA train {i}")
        test_normal = d.CelebA(str(tmp_path), "test", 0, normal=True, transform=transform)
        test_anomal = d.CelebA(str(tmp_path), "test", 0, normal=False, abnormal_class=attribute, transform=transform)
        labels = ds.test.labels.numpy()
        assert (labels == 0).sum() == len(test_normal.active_indexes) and \
            (labels == 1).sum() == len(test_anomal.active_indexes) > 0
        for theirs, label in ((test_normal, 0), (test_anomal, 1)):
            for j, i in enumerate(np.flatnonzero(labels == label)):
                _equal(ds.test[int(i)][0], theirs[j], f"CelebA {attribute} test {i}")


def test_celeba_extended(authors, tmp_path, monkeypatch):
    """Their celeba_extended config: nine attributes left out of the normal faces."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    _celeba_files(tmp_path, np.random.default_rng(6), extra="Goatee")
    d = authors["datasets"]
    ds = data.load_dataset("celeba", "Bald", root=str(tmp_path), protocol="attribute-extended")
    normal = d.CelebA(str(tmp_path), "train", 0, normal=True, extended_attribute_list=True)
    anomal = d.CelebA(str(tmp_path), "test", 0, normal=False, abnormal_class="Bald", extended_attribute_list=True)
    assert [p.rsplit("/", 1)[1] for p in ds.info["train_ids"]] == \
        [normal.data.filename[i] for i in normal.active_indexes]
    assert [p.rsplit("/", 1)[1] for p, y in zip(ds.test_ids, ds.test.labels) if y == 1] == \
        [anomal.data.filename[i] for i in anomal.active_indexes] != []
    assert len(data.load_dataset("celeba", "Bald", root=str(tmp_path)).train) > len(ds.train)
