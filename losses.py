"""Relative-perceptual-L1 loss and the reconstruction losses of its ablation (paper §3.1).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019), §3.1 and supplement §1.1:
features ``f`` are taken at ``relu4_2`` of an ImageNet-pretrained VGG-19, normalised per
channel by precomputed statistics (eq. 3), and compared with an L1 distance that is divided
by the L1 norm of the first image's normalised features (eq. 4). Eq. (2) (the classic
perceptual loss) and the intermediate steps of Table 3 (right) are offered behind one
interface, :class:`ReconstructionLoss`, with ``kind`` one of :data:`KINDS` (``mse-imagenet``: the
authors' pixel L2 of Table 3 right, on ImageNet-normalised pixels). The file follows the section: eq. (2)-(4) on features, then the
losses. The features themselves (the VGG-19 and the statistics μ, σ of eq. 3, and the command
that computes them) are ``features.py``; the contrast curves of Fig. 1 are drawn by ``figures.py``.

This module is usable on its own: copy it, ``features.py``, ``readers.py`` and ``errors.py`` into
another project. It needs torch and torchvision, and optionally the fused op of ``csrc/`` (module
``fused_op``), which it uses when it is built and falls back to pure PyTorch otherwise.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from features import IMAGENET_STD, FeatureStats, VGG19Features, select_stats

try:  # the fused op of csrc/ (optional: without it, or unbuilt, eq. (3)-(4) run in PyTorch)
    import fused_op
except ImportError:
    fused_op = None

log = logging.getLogger("piad.losses")

PIXEL_KINDS = ("mse", "l1", "mse-imagenet")
KINDS = (*PIXEL_KINDS, "perc", "perc-l1", "rel-perc-l1")
REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "ext", "torch")  # fused op when built, the fused op, PyTorch
DEFAULT_EPS = 1e-6

# ---------------------------------------------------------------------------------------------
# Eq. (2)-(4) on features f(x), f(y) of shape (N, C, H, W); one value per sample, shape (N,).


def perceptual(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Eq. (2), the perceptual loss of Johnson et al.: ``||f(x) - f(y)||_2^2 / (C·H·W)``."""
    return (fx - fy).flatten(1).pow(2).mean(1)  # eq. (2)


def normalise(f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ``(f - mean) / std`` per channel; ``mean``, ``std`` of shape (C,)."""
    shape = (1, -1) + (1,) * (f.dim() - 2)
    return (f - mean.to(f.dtype).view(shape)) / std.to(f.dtype).view(shape)  # eq. (3)


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


def relative_perceptual_l1(fx, fy, mean, std, *, reduction: str = "mean", eps: float = DEFAULT_EPS,
                           impl: str = "auto") -> torch.Tensor:
    """Eq. (3)-(4) on features ``fx`` (real image) and ``fy`` (reconstruction), (N, C, H, W).

    ``impl``: ``"auto"`` (fused op when built for this device, else PyTorch), ``"ext"`` or
    ``"torch"``. ``reduction="none"`` gives one score per sample (the anomaly score, eq. 1).
    """
    if fx.shape != fy.shape or fx.dim() < 2:
        raise ValueError(f"feature shapes differ or lack (N, C): {tuple(fx.shape)} vs {tuple(fy.shape)}")
    if mean.shape != (fx.shape[1],) or std.shape != (fx.shape[1],):
        raise ValueError(f"mean/std must have shape ({fx.shape[1]},), got {tuple(mean.shape)}, {tuple(std.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    use_ext = impl == "ext" or (impl == "auto" and _fused_available(fx.device))
    if use_ext and not _fused_available(fx.device):
        raise RuntimeError(f"impl='ext' but the fused op is not built for {fx.device.type}; "
                           "reinstall with `pip install --no-build-isolation -e .`")
    mean, std = mean.to(fx.device), std.to(fx.device)
    wide = torch.promote_types(fx.dtype, torch.float32)  # --precision bf16: PyTorch sums in fp32, as the op does
    values = (fused_op.rel_perc_l1(fx, fy.to(fx.dtype), mean, std, eps) if use_ext  # the fused op of csrc/
              else rel_perc_l1_torch(fx.to(wide), fy.to(wide), mean, std, eps))  # or eq. (3)-(4) above
    _log_choice(fx.device.type, "fused" if use_ext else "pytorch")
    return _reduce(values, reduction)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return values if reduction == "none" else getattr(values, reduction)()  # .mean() or .sum()


@functools.lru_cache(maxsize=None)
def _log_choice(device_type: str, impl: str) -> None:  # logs each (device, impl) once
    log.info("relative-perceptual-L1 on %s uses the %s implementation", device_type, impl)


def _fused_available(device: torch.device) -> bool:
    return fused_op is not None and fused_op.is_built() and fused_op.available(device)


class ReconstructionLoss(nn.Module):
    """Image-pair losses of Table 3 (right): per-sample values or a reduction.

    kind: ``mse`` / ``l1`` (pixels in [-1, 1]), ``mse-imagenet`` (the authors' pixel L2 of the
    Table 3 ablation: ImageNet-normalised pixels, grey repeated to 3 channels), ``perc`` (eq. 2:
    MSE of raw features), ``perc-l1`` (eq. 3 features, L1 mean), ``rel-perc-l1`` (eq. 4). Feature
    kinds need ``features`` (a :class:`VGG19Features`); the normalised ones also need ``stats``,
    computed with the same weights. The first argument is the real image: its features are
    computed without an autograd graph (nothing flows back to it), and they may be passed in
    precomputed (``fx=``) to skip that VGG forward. ``check_range``: the first real batch the loss
    sees must be in [-1, 1] (checking reads values on the host, so later batches are not checked:
    a training step on a GPU never waits for it).
    """

    def __init__(self, *, kind: str = "rel-perc-l1", features: VGG19Features | None = None,
                 stats: FeatureStats | None = None, reduction: str = "mean", impl: str = "auto",
                 eps: float = DEFAULT_EPS, check_range: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; choose one of {KINDS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if kind not in PIXEL_KINDS and features is None:
            raise ValueError(f"loss {kind!r} needs VGG features (features=VGG19Features(...))")
        if kind in ("perc-l1", "rel-perc-l1"):
            if stats is None:
                raise ValueError(f"loss {kind!r} needs feature statistics (stats=...)")
            if stats.weights != features.weights_id or stats.layer != features.layer:
                raise ValueError(f"statistics were computed with {stats.weights}/{stats.layer} but the "
                                 f"features use {features.weights_id}/{features.layer}; never mix them")
        self.kind, self.reduction, self.impl, self.eps, self.check_range = kind, reduction, impl, eps, check_range
        self.features = features
        if stats is not None:
            self.register_buffer("mean", stats.mean.clone())
            self.register_buffer("std", stats.std.clone())
        self.weights_id = features.weights_id if features is not None else None

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
                fy: torch.Tensor | None = None, reduction: str | None = None) -> torch.Tensor:
        """Per-sample losses between real ``x`` and ``y``; ``fx``/``fy`` skip their VGG forward."""
        if x.shape != y.shape and fx is None:
            raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        reduction = reduction or self.reduction
        if self.kind in PIXEL_KINDS:
            d = self._pixel_difference(x, y)                              # (B, C, H, W)
            values = d.flatten(1).pow(2).mean(1) if self.kind != "l1" else d.flatten(1).abs().mean(1)
            return _reduce(values, reduction)
        fx = self.real_features(x) if fx is None else fx
        fy = self.features(y) if fy is None else fy
        if self.kind == "perc":
            values = perceptual(fx, fy)  # eq. (2)
        elif self.kind == "perc-l1":  # eq. (3) features, L1 mean
            nx, ny = normalise(fx, self.mean, self.std), normalise(fy, self.mean, self.std)
            values = (nx - ny).flatten(1).abs().mean(1)
        else:
            values = relative_perceptual_l1(fx, fy, self.mean, self.std, reduction="none",
                                            eps=self.eps, impl=self.impl)  # eq. (3)-(4)
        return _reduce(values, reduction)

    def map(self, x: torch.Tensor, y: torch.Tensor, *, fx: torch.Tensor | None = None,
            fy: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample loss position by position, (N, h, w): pixels for the pixel kinds, feature
        positions (h = H/8 at relu4_2) for the others; its sum over positions is ``forward``'s
        ``reduction="none"`` value. For ``rel-perc-l1`` it is :func:`rel_perc_l1_torch` position by
        position (eq. 4), always in PyTorch: the fused op returns only the sums, and a map is not on
        any training path."""
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


def build_loss(kind: str = "rel-perc-l1", *, weights: str = "auto", stats: str = "auto", impl: str = "auto",
               reduction: str = "mean", device="cpu", train_batches=None, saved_stats: dict | None = None):
    """A :class:`ReconstructionLoss` of ``kind`` on ``device``, with, for the feature kinds, the VGG-19
    of ``weights`` (:data:`features.WEIGHTS` or a file) and the statistics that ``stats`` names
    (:func:`features.select_stats`; ``train_batches``: batches of training images, for ``"train"``)
    or ``saved_stats`` (the fields of a saved :class:`FeatureStats`: a checkpoint's own).
    Returns ``(loss, statistics)``, statistics None for the pixel kinds."""
    if kind in PIXEL_KINDS:
        return ReconstructionLoss(kind=kind, reduction=reduction).to(device), None
    vgg = VGG19Features("relu4_2", weights).to(device)
    chosen = FeatureStats(**saved_stats) if saved_stats is not None else select_stats(stats, vgg, train_batches)
    loss = ReconstructionLoss(kind=kind, features=vgg, stats=chosen, reduction=reduction, impl=impl)
    return loss.to(device), chosen
