"""Relative-perceptual-L1 (paper §3.1): the features f, their statistics μ, σ, eq. (2)-(4).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019), §3.1 and supplement §1.1: features
``f`` of ``relu4_2`` of an ImageNet VGG-19, normalised per channel by statistics μ, σ (eq. 3),
compared by an L1 distance over the L1 norm of the real image's normalised features (eq. 4). Eq. (2)
and the other losses of Table 3 (right) share one interface, :class:`ReconstructionLoss`. The file
follows the section: f, then μ and σ, then eq. (2)-(4), then the loss.

Usable alone, with torch and torchvision only: eq. (3)-(4) run in PyTorch (``rel_perc_l1_torch``,
the reference), or in the fused op of ``csrc/`` when ``fused_op.py`` and the built extension
(``piad_C``) are beside this file. Use the loss::

    import torch
    from losses import FeatureStats, ReconstructionLoss, VGG19Features, feature_stats

    vgg = VGG19Features("relu4_2", weights="torchvision")  # or weights="vgg19.pth" (a state-dict file)
    stats = feature_stats(vgg, batches)  # μ, σ over your images (batches of (B, 1|3, H, W) in [-1, 1])
    stats.save("stats.pt")               # later: stats = FeatureStats.load("stats.pt")
    loss = ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats, reduction="none")
    scores = loss(x, x_rec)              # eq. (4), one value per image; x, x_rec in [-1, 1]

``features`` may be any frozen module mapping images to (B, C, h, w). piad's ``features.py`` adds
the Caffe VGG-19 (offline), the authors' statistics and the ``stats`` command; it imports this file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

try:  # the fused op of csrc/ (optional: without it, eq. (3)-(4) run in PyTorch)
    import fused_op
except ImportError:
    fused_op = None

log = logging.getLogger("piad.losses")

PIXEL_KINDS = ("mse", "l1", "mse-imagenet")
KINDS = (*PIXEL_KINDS, "perc", "perc-l1", "rel-perc-l1")
REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "ext", "torch")  # fused op when built for the device, the fused op, PyTorch
DEFAULT_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's input normalisation (also mse-imagenet's)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- The features f (supplement §1.1: relu4_2 of a VGG-19 trained on ImageNet) -----------------

def vgg19_layer_names() -> list[str]:
    """Names of ``torchvision.models.vgg19().features`` modules: conv1_1, relu1_1, ..., pool5."""
    names = []
    for block, convs in enumerate((2, 2, 4, 4, 4), start=1):  # VGG-19 ("E"): 3×3 convs per block
        for c in range(1, convs + 1):
            names += [f"conv{block}_{c}", f"relu{block}_{c}"]
        names.append(f"pool{block}")  # 2×2 max-pool
    return names


class VGG19Features(nn.Module):
    """Frozen VGG-19 up to ``layer``: images in [-1, 1], (B, 1|3, H, W), to its activations.

    ``weights``: ``"torchvision"`` (IMAGENET1K_V1, from torch hub's cache; downloaded when online),
    the path of a state-dict file or a state dict (the keys of torchvision's ``vgg19()`` or
    ``vgg19().features``), or None (torchvision's random initialisation). ``weights_id`` names them:
    statistics carry it, and a loss refuses statistics of other weights.
    """

    def __init__(self, layer: str = "relu4_2", weights: str | os.PathLike | dict | None = "torchvision"):
        super().__init__()
        names = vgg19_layer_names()
        if layer not in names:
            raise ValueError(f"unknown VGG-19 layer {layer!r}; choose one of {', '.join(names)}")
        self.layer = layer
        self.body = torchvision.models.vgg19(weights=None).features[: names.index(layer) + 1]
        if weights == "torchvision":
            try:
                weights = torchvision.models.VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            except Exception as exc:  # no network, broken cache, ...
                raise RuntimeError(f"could not load torchvision's VGG-19 IMAGENET1K_V1 ({exc}). Offline, copy "
                                   f"vgg19-dcbb9e9d.pth into {torch.hub.get_dir()}/checkpoints, or pass the "
                                   "path of a state-dict file") from exc
            self.weights_id = "torchvision:IMAGENET1K_V1"
        elif weights is None or isinstance(weights, dict):
            self.weights_id = "random-init" if weights is None else "state-dict"
        else:
            self.weights_id, weights = f"file:{Path(weights).name}", torch.load(weights, "cpu", weights_only=True)
        if weights is not None:  # torchvision's keys (features.N.weight), or vgg19().features' (N.weight)
            sd, own = {k.removeprefix("features."): v for k, v in weights.items()}, self.body.state_dict()
            if any(k not in sd for k in own):
                raise ValueError(f"VGG state dict lacks conv weights {[k for k in own if k not in sd][:3]}...; "
                                 "expected the keys of torchvision's vgg19() or of vgg19().features")
            self.body.load_state_dict({k: sd[k] for k in own})  # a wrong shape fails here, named
        # torchvision's input normalisation, (x - mean) / std on [0, 1], as a fixed 1×1 conv (float64:
        # exact in float64 runs; cast to the input's dtype in forward)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        self.register_buffer("in_weight", torch.diag(1 / std).view(3, 3, 1, 1))
        self.register_buffer("in_bias", -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / std)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19Features":  # always frozen, always eval
        return super().train(False)

    @property
    def out_channels(self) -> int:
        return [m for m in self.body if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1|3, H, W), got {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1)  # grey images are repeated to 3 channels (supplement §1.1)
        x = F.conv2d((x + 1) * 0.5, self.in_weight.to(x.dtype), self.in_bias.to(x.dtype))  # [-1,1]->[0,1]->VGG input
        return self.body(x)  # (B, 512, H/8, W/8) at relu4_2


# --- μ, σ of eq. (3): per-channel mean and std of the features ---------------------------------

@dataclass
class FeatureStats:
    """Per-channel mean/std of one feature layer, tied to the weights that produced them."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    weights: str | None
    layer: str | None
    count: int  # number of (image, position) samples per channel
    source: str = ""

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(dict(vars(self)), tmp)  # mean, std, weights, layer, count, source
        os.replace(tmp, path)

    def check(self, channels: int | None = None) -> "FeatureStats":
        """Raises ValueError unless μ and σ are finite, σ > 0, one value per channel of the layer
        (``channels``; default: VGG-19's at ``layer``, e.g. 512 at relu4_2). Returns ``self``."""
        if channels is None and self.layer in vgg19_layer_names() and self.layer[:4] in ("conv", "relu"):
            channels = (64, 128, 256, 512, 512)[int(self.layer[4]) - 1]
        mean, std = torch.as_tensor(self.mean), torch.as_tensor(self.std)
        if mean.ndim != 1 or std.shape != mean.shape or (channels is not None and len(mean) != channels):
            raise ValueError(f"feature statistics of {self.layer} need one mean and one std per channel "
                             f"({channels or 'C'}), got shapes {tuple(mean.shape)} and {tuple(std.shape)}")
        if not (mean.isfinite().all() and std.isfinite().all() and (std > 0).all()):
            raise ValueError(f"feature statistics need finite means and finite stds > 0; found "
                             f"{int((~mean.isfinite()).sum())} non-finite means, {int((~std.isfinite()).sum())} "
                             f"non-finite and {int((std <= 0).sum())} non-positive stds")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Reads a file of :meth:`save` (tensors and plain values only: ``weights_only``)."""
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


@torch.no_grad()
def feature_stats(model: nn.Module, batches, *, source: str = "") -> FeatureStats:
    """Per-channel mean/std of ``model``'s output over an iterable of image batches in [-1, 1]: one
    pass, float64, batches merged by Chan et al.'s parallel update of (count, mean, M2)."""
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
    return FeatureStats(mean.float(), std.float(), getattr(model, "weights_id", None),
                        getattr(model, "layer", None), n, source)


# --- Eq. (2)-(4) on features f(x), f(y) of shape (N, C, H, W); one value per sample, (N,) ------

def perceptual(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Eq. (2), the perceptual loss of Johnson et al.: ``||f(x) - f(y)||_2^2 / (C·H·W)``."""
    return (fx - fy).flatten(1).pow(2).mean(1)  # eq. (2)


def normalise(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``(f - mean) / std`` per channel; ``mean``, ``std`` of shape (C,). In f's dtype, and in
    fp32 for bf16 and half features, as the fused op computes (so eq. (4)'s sums are never below fp32)."""
    shape, wide = (1, -1) + (1,) * (f.dim() - 2), torch.promote_types(f.dtype, torch.float32)
    return (f.to(wide) - mean.to(wide).view(shape)) / std.to(wide).view(shape)  # eq. (3)


def rel_perc_l1_torch(fx, fy, mean, std, eps=DEFAULT_EPS, *, per_position: bool = False):
    """Eq. (3)-(4) in PyTorch, the reference of the fused op: one value per sample, shape (N,).

    ``per_position=True`` keeps the numerator's channel sums apart, shape (N, *spatial): the
    anomaly map, whose sum over the positions is the per-sample value (the score A(x), eq. 1).
    """
    nx, ny = normalise(fx, mean, std), normalise(fy, mean, std)  # eq. (3)
    # eq. (4)'s denominator, sum |n(f(x))|: the first (real) image's, a constant in the backward
    # pass as in the authors' code
    den = nx.detach().abs().flatten(1).sum(1) + eps
    terms = (nx - ny).abs().sum(1)  # eq. (4)'s numerator, channels summed: (N, *spatial)
    if per_position:
        return terms / den.view((-1,) + (1,) * (terms.dim() - 1))  # eq. (4), position by position
    return terms.reshape(terms.shape[0], -1).sum(1) / den  # eq. (4)


def _fused_available(device: torch.device) -> bool:
    return fused_op is not None and fused_op.available(device)


# --- The reconstruction loss: L_rec of eq. (7), the score A(x) of eq. (1) ------------------------

class ReconstructionLoss(nn.Module):
    """Image-pair losses of Table 3 (right): per-sample values (``reduction="none"``) or their mean/sum.

    kind: ``mse`` / ``l1`` (pixels in [-1, 1]), ``mse-imagenet`` (the authors' pixel L2 of Table 3:
    ImageNet-normalised pixels), ``perc`` (eq. 2), ``perc-l1`` (eq. 3 features, L1 mean),
    ``rel-perc-l1`` (eq. 4). Feature kinds need ``features`` (a :class:`VGG19Features` or any frozen
    extractor), the normalised ones ``stats`` of the same weights. The first argument is the real
    image: its features are computed without a graph, or passed precomputed (``fx=``).

    Decided here, once: the arguments are checked and ``impl`` is resolved (``"auto"``: the fused op
    when built for the statistics' device, else PyTorch; ``"ext"``; ``"torch"``) and logged, again
    only when ``.to()`` moves the loss. ``check_range``: the first real batch must be in [-1, 1]
    (later ones are not checked: a step on a GPU never waits for the host).
    """

    def __init__(self, *, kind: str = "rel-perc-l1", features: nn.Module | None = None,
                 stats: FeatureStats | None = None, reduction: str = "mean", impl: str = "auto",
                 eps: float = DEFAULT_EPS, check_range: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if kind not in PIXEL_KINDS and features is None:
            raise ValueError(f"loss {kind!r} needs VGG features (features=VGG19Features(...))")
        self.weights_id = getattr(features, "weights_id", None)
        if kind in ("perc-l1", "rel-perc-l1"):
            if stats is None:
                raise ValueError(f"loss {kind!r} needs feature statistics (stats=...)")
            if (stats.weights, stats.layer) != (self.weights_id, getattr(features, "layer", None)):
                raise ValueError(f"statistics were computed with {stats.weights}/{stats.layer} but the features "
                                 f"use {self.weights_id}/{getattr(features, 'layer', None)}; never mix them")
            stats.check(getattr(features, "out_channels", None))  # finite μ, σ > 0, one per channel
        self.kind, self.reduction, self.impl, self.eps = kind, reduction, impl, float(eps)
        self.features, self.check_range = features, check_range
        if stats is not None:
            self.register_buffer("mean", stats.mean.clone())
            self.register_buffer("std", stats.std.clone())
        self.fused, self._decided = False, None
        self._choose_impl()

    def _choose_impl(self) -> None:
        """Eq. (3)-(4) by the fused op or in PyTorch, on the statistics' device; logged when it changes."""
        if self.kind != "rel-perc-l1":
            return
        device = self.mean.device
        self.fused = _fused_available(device) if self.impl == "auto" else self.impl == "ext"
        if self.fused and not _fused_available(device):
            raise RuntimeError(f"impl='ext' but the fused op is not built for {device.type}; "
                               "reinstall with `pip install --no-build-isolation -e .`")
        if self._decided != (device.type, self.fused):
            log.info("relative-perceptual-L1 on %s uses the %s implementation", device.type,
                     "fused" if self.fused else "pytorch")
            self._decided = (device.type, self.fused)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double(): the choice follows the device
        super()._apply(fn, recurse)
        self._choose_impl()
        return self

    @torch.no_grad()
    def real_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of real images (no graph); cacheable and passed back as ``fx=``."""
        self._check(x)
        return self.features(x)

    def _check(self, x: torch.Tensor) -> None:
        if not self.check_range or not x.numel():
            return
        lo, hi = torch.aminmax(x.detach())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"images must be scaled to [-1, 1]; got values in [{lo.item():.3g}, {hi.item():.3g}]")
        self.check_range = False  # the first batch shows how the caller scales its images

    def _pixel_difference(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check(x)
        d = x - y
        if self.kind == "mse-imagenet":  # the authors' pixel L2: [-1, 1] -> ImageNet-normalised
            std = torch.tensor(IMAGENET_STD, dtype=d.dtype, device=d.device).view(1, 3, 1, 1)
            d = d.expand(-1, 3, -1, -1) * (0.5 / std)  # a difference of [0, 1] pixels is d / 2
        return d

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, fx: torch.Tensor | None = None,
                fy: torch.Tensor | None = None) -> torch.Tensor:
        """Losses between real ``x`` and ``y``, reduced by ``reduction``; ``fx``/``fy`` skip their VGG forward."""
        if self.kind in PIXEL_KINDS:
            d = self._pixel_difference(x, y)                              # (B, C, H, W)
            values = (d.abs() if self.kind == "l1" else d.pow(2)).flatten(1).mean(1)
        else:
            fx = self.real_features(x) if fx is None else fx
            fy = self.features(y) if fy is None else fy
            if self.kind == "perc":
                values = perceptual(fx, fy)  # eq. (2)
            elif self.kind == "perc-l1":  # eq. (3) features, L1 mean
                nx, ny = normalise(fx, self.mean, self.std), normalise(fy, self.mean, self.std)
                values = (nx - ny).flatten(1).abs().mean(1)
            elif self.fused:  # eq. (3)-(4), the op of csrc/ (one dtype in; it sums in fp32 at least)
                values = torch.ops.piad.rel_perc_l1(fx, fy.to(fx.dtype), self.mean, self.std, self.eps)
            else:
                values = rel_perc_l1_torch(fx, fy, self.mean, self.std, self.eps)  # eq. (3)-(4)
        return values if self.reduction == "none" else getattr(values, self.reduction)()  # .mean() or .sum()

    def map(self, x: torch.Tensor, y: torch.Tensor, *, fx: torch.Tensor | None = None,
            fy: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample loss position by position, (N, h, w), pixels or feature positions (H/8 at
        relu4_2), summing to ``forward``'s ``reduction="none"`` value. For ``rel-perc-l1``, eq. (4)
        position by position, in PyTorch (the op returns only the sums; no map is on a training path)."""
        if self.kind in PIXEL_KINDS:
            d = self._pixel_difference(x, y)
            terms = d.abs() if self.kind == "l1" else d.pow(2)
            return terms.sum(1) / d[0].numel()  # the mean over (C, H, W), kept per position
        fx = self.real_features(x) if fx is None else fx
        fy = self.features(y) if fy is None else fy
        if self.kind == "perc":
            return (fx - fy).pow(2).sum(1) / fx[0].numel()  # eq. (2) per position
        if self.kind == "perc-l1":
            nx, ny = normalise(fx, self.mean, self.std), normalise(fy, self.mean, self.std)
            return (nx - ny).abs().sum(1) / fx[0].numel()
        return rel_perc_l1_torch(fx, fy, self.mean, self.std, self.eps, per_position=True)  # eq. (3)-(4)
