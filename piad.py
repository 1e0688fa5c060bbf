"""PIAD networks and WGAN-GP losses (paper §3.2, supplement §1 and §1.3; Tables 1-4's presets: presets.py).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019). A generator ``G: z -> x``, an
encoder ``E: x -> z`` and two Wasserstein critics, ``D_X`` on images and ``D_Z`` on latents,
built from the residual blocks of supplement Fig. 1 (below) exactly as listed in supplement
Tables 1-4. Each network is an ``nn.Sequential`` whose named children are the rows of its table,
so ``for name, row in net.named_children()`` walks the table.

Losses: the critic objective, eq. (5), with the gradient penalty of Gulrajani et al. and the
drift term ``0.001 * E[D(x)^2]`` of supplement §1; the adversarial loss of G and E, eq. (6);
and the anomaly score, eq. (1), for any per-sample image distance.

Where the paper's text and the authors' code (ninatu/piad) disagree, the default follows the
code, which produced the paper's numbers, and the paper's variant stays one setting away: each
such default is stated once, at the :class:`PIADConfig` field or preset that decides it, and
docs/deviations.md lists them all.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


INITS = ("authors", "pytorch")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class PIADConfig:
    """The networks and optimisers of one supplement table (Tables 1-4): the four rows are
    ``presets.NETWORKS``, and each dataset's other numbers (iterations, batch size, γ) are its row
    of ``presets.TABLE``."""

    name: str
    image_size: int
    latent_shape: tuple[int, int, int]  # (C, h, w); h = w = 1 (dense-like stem) or 4 (LSUN)
    gen_channels: tuple[int, ...]       # G: stem output, then one entry per BlockUp
    enc_channels: tuple[int, ...]       # E: first 3×3 conv, then one entry per BlockDown
    dx_channels: tuple[int, ...]        # D_X: first 3×3 conv, then BlockDowns (none pool past 4×4)
    dx_head_channels: int               # D_X: filters of the 4×4 convolution
    dz_hidden: int                      # D_Z: units of the two hidden dense layers
    n_dis: int = 2                      # critic steps per G/E step (3 for LSUN and CelebA)
    lr_critic: float = 5e-4
    lr_gen: float = 1e-4                # G and E. paper: 2e-4; authors' code: 1e-4 (default)
    betas: tuple[float, float] = (0.5, 0.99)
    weight_decay: float = 1e-8          # all Adams. paper: none; authors' code: 1e-8 (default)
    gp_weight: float = 10.0             # λ of eq. (5)
    drift: float = 1e-3                 # weight of the drift term, supplement §1
    drift_fake: bool = True             # paper: E[D(x)^2] on real only; authors' code: real + fake (default)
    mbstd_group: int = 0                # paper/ProGAN: groups of 4; authors' code: 0 = whole batch (default)
    init: str = "authors"               # paper: not stated, "pytorch" keeps PyTorch's; authors' code:
                                        # "authors" (default, see init_authors_)

    def __post_init__(self):
        for f in ("latent_shape", "gen_channels", "enc_channels", "dx_channels", "betas"):
            object.__setattr__(self, f, tuple(getattr(self, f)))  # lists from JSON round trips
        n_up = self.n_resample
        if n_up < 1 or 4 * 2 ** n_up != self.image_size:
            raise ValueError(f"image_size must be 4·2^k (k >= 1), got {self.image_size}")
        if len(self.latent_shape) != 3 or self.latent_shape[1:] not in ((1, 1), (4, 4)):
            raise ValueError(f"latent_shape must be (C, 1, 1) or (C, 4, 4), got {self.latent_shape}")
        if len(self.gen_channels) != n_up + 1 or len(self.enc_channels) != n_up + 1:
            raise ValueError(f"gen_channels and enc_channels need {n_up + 1} entries for "
                             f"{self.image_size}×{self.image_size} images")
        if len(self.dx_channels) < n_up + 1:
            raise ValueError(f"dx_channels needs at least {n_up + 1} entries")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def n_resample(self) -> int:
        """Number of BlockUp (G) / pooling BlockDown (E, D_X) blocks between 4×4 and full size:
        k for ``image_size`` 4·2^k (``__post_init__`` refuses other sizes)."""
        return max(self.image_size // 4, 1).bit_length() - 1


# --------------------------------------------------------------------------- blocks (supplement Fig. 1)
# (a) the pre-activation residual block, (b) BlockUp, (c) BlockDown: residual blocks without
# normalisation, leaky ReLU 0.2 (§1.3); Table 3's residual stem; D_X's minibatch standard deviation
# (ProGAN, Karras et al. 2018); a per-sample reshape.
LRELU_SLOPE = 0.2  # supplement §1.3: Leaky ReLU with negative slope 0.2


def lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LRELU_SLOPE)  # never in-place: the skip paths need the input


def conv3x3(in_c: int, out_c: int) -> nn.Conv2d:
    return nn.Conv2d(in_c, out_c, 3, padding=1)


def _skip(in_c: int, out_c: int) -> nn.Module:
    return nn.Conv2d(in_c, out_c, 1) if in_c != out_c else nn.Identity()  # 1×1 only if the channels change


class PreActBlock(nn.Module):
    """Supplement Fig. 1a: ``x + conv(lrelu(conv(lrelu(x))))``, 3×3 convs, no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.act1, self.conv1 = lrelu(), conv3x3(channels, channels)
        self.act2, self.conv2 = lrelu(), conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class ResidualBlock(nn.Module):
    """Table 3's generator stem: ``skip(x) + conv(lrelu(conv(x)))`` (conv-act-conv, no pre-act)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1, self.act = conv3x3(in_channels, out_channels), lrelu()
        self.conv2, self.skip = conv3x3(out_channels, out_channels), _skip(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        return self.skip(x) + self.conv2(self.act(self.conv1(x)))


class BlockUp(nn.Module):
    """Supplement Fig. 1b. Main: lrelu -> nearest ×2 -> conv3×3 -> lrelu -> conv3×3.

    Skip: nearest ×2, then a 1×1 conv only if the channel count changes (a 1×1 conv commutes
    exactly with nearest upsampling, so its position on the skip path is immaterial).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.act1, self.up = lrelu(), nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1, self.act2 = conv3x3(in_channels, out_channels), lrelu()
        self.conv2, self.skip = conv3x3(out_channels, out_channels), _skip(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, 2H, 2W)
        h = self.conv2(self.act2(self.conv1(self.up(self.act1(x)))))
        return self.skip(self.up(x)) + h


class BlockDown(nn.Module):
    """Supplement Fig. 1c. Main: lrelu -> conv3×3 -> lrelu -> conv3×3 -> 2×2 average pool.

    Skip: 2×2 average pool, then a 1×1 conv only if the channel count changes (pooling and a
    1×1 conv commute exactly; pooling first is cheaper). ``downsample=False`` drops both
    poolings (Table 1's fourth D_X "BlockDown", whose output stays 4×4).
    """

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool = True):
        super().__init__()
        self.act1, self.conv1 = lrelu(), conv3x3(in_channels, out_channels)
        self.act2, self.conv2 = lrelu(), conv3x3(out_channels, out_channels)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.skip = _skip(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/2, W/2)
        h = self.pool(self.conv2(self.act2(self.conv1(self.act1(x)))))
        return self.skip(self.pool(x)) + h


class MinibatchStdDev(nn.Module):
    """Minibatch standard deviation: appends one channel, (B, C, H, W) -> (B, C+1, H, W).

    ``group_size=0``: the std over the whole batch of every feature, averaged to one scalar.
    ``group_size=g`` (ProGAN's, g = 4): samples split into groups
    of ``min(g, B)`` (sample ``i`` in group ``i mod B/g``), one scalar per group; if ``B`` is not
    divisible by the group size the whole batch is one group. Population std, eps inside sqrt.
    """

    def __init__(self, group_size: int = 0, eps: float = 1e-8):
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = min(self.group_size, b) if self.group_size > 0 else b
        if b % g:
            g = b
        y = x.reshape(g, b // g, c, h, w)                                  # (G, M, C, H, W)
        y = y - y.mean(dim=0, keepdim=True)
        std = (y.square().mean(dim=0) + self.eps).sqrt().mean(dim=(1, 2, 3))  # (M,)
        std = std.reshape(1, b // g, 1, 1, 1).expand(g, b // g, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, std.to(x.dtype)], dim=1)                     # (B, C+1, H, W)


class Reshape(nn.Module):
    """Per-sample reshape: (B, ...) -> (B, *shape); ``Reshape()`` gives (B,)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


# --------------------------------------------------------------------------- networks
class Generator(nn.Sequential):
    """G of Tables 1-4: (B, *latent_shape) -> (B, channels, S, S).

    Ends with lrelu and a 1×1 conv, without tanh, as in the tables (outputs are unbounded,
    whereas images are scaled to [-1, 1]).
    """

    def __init__(self, *, config: PIADConfig, channels: int):
        zc, zs, _ = config.latent_shape
        ch = config.gen_channels
        rows = OrderedDict()
        if zs == 1:  # (B, Cz, 1, 1) -> (B, c0, 4, 4)
            rows["conv_in"] = nn.Conv2d(zc, ch[0], 4, padding=3)
        else:        # Table 3: (B, Cz, 4, 4) -> (B, c0, 4, 4)
            rows["res_in"] = ResidualBlock(zc, ch[0])
        for i, (a, b) in enumerate(zip(ch[:-1], ch[1:]), 1):
            rows[f"up{i}"] = BlockUp(a, b)                     # (B, b, 4·2^i, 4·2^i)
        rows["block"] = PreActBlock(ch[-1])
        rows["act"] = lrelu()
        rows["conv_out"] = nn.Conv2d(ch[-1], channels, 1)      # (B, channels, S, S)
        super().__init__(rows)
        self.latent_shape = tuple(config.latent_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # accepts (B, *latent_shape) or (B, D)
        return super().forward(z.reshape(z.shape[0], *self.latent_shape))


class Encoder(nn.Sequential):
    """E of Tables 1-4: (B, channels, S, S) -> (B, *latent_shape)."""

    def __init__(self, *, config: PIADConfig, channels: int):
        zc, zs, _ = config.latent_shape
        ch = config.enc_channels
        rows = OrderedDict(conv_in=conv3x3(channels, ch[0]))    # (B, e0, S, S)
        for i, (a, b) in enumerate(zip(ch[:-1], ch[1:]), 1):
            rows[f"down{i}"] = BlockDown(a, b)                 # (B, b, S/2^i, S/2^i)
        if zs == 1:   # (B, ek, 4, 4) -> (B, Cz, 1, 1)
            rows["act1"] = lrelu()
            rows["conv_head"] = nn.Conv2d(ch[-1], zc, 4)
            rows["act2"] = lrelu()
            rows["conv_out"] = nn.Conv2d(zc, zc, 1)
        else:         # Table 3: (B, ek, 4, 4) -> (B, Cz, 4, 4)
            rows["block"] = PreActBlock(ch[-1])
            rows["act"] = lrelu()
            rows["conv_out"] = nn.Conv2d(ch[-1], zc, 1)
        super().__init__(rows)


class ImageCritic(nn.Sequential):
    """D_X of Tables 1-4: (B, channels, S, S) -> (B,)."""

    def __init__(self, *, config: PIADConfig, channels: int):
        ch = config.dx_channels
        rows = OrderedDict(conv_in=conv3x3(channels, ch[0]))    # (B, d0, S, S)
        for i, (a, b) in enumerate(zip(ch[:-1], ch[1:]), 1):
            # Table 1 lists a 4th BlockDown that stays at 4×4: blocks past n_resample don't pool.
            rows[f"down{i}"] = BlockDown(a, b, downsample=i <= config.n_resample)
        rows["mbstd"] = MinibatchStdDev(config.mbstd_group)   # (B, dk + 1, 4, 4)
        rows["act1"] = lrelu()
        rows["conv_head"] = nn.Conv2d(ch[-1] + 1, config.dx_head_channels, 4)  # (B, h, 1, 1)
        rows["act2"] = lrelu()
        rows["conv_out"] = nn.Conv2d(config.dx_head_channels, 1, 1)            # (B, 1, 1, 1)
        rows["reshape"] = Reshape()                                             # (B,)
        super().__init__(rows)


class LatentCritic(nn.Sequential):
    """D_Z of Tables 1-4: three dense layers, (B, *latent_shape) or (B, D) -> (B,)."""

    def __init__(self, *, config: PIADConfig):
        d, h = config.latent_dim, config.dz_hidden  # D from G's latent, not the 32 of Tables 2/4
        super().__init__(OrderedDict(
            reshape=Reshape(d),                                  # (B, D)
            fc1=nn.Linear(d, h), act1=lrelu(),                    # (B, H)
            fc2=nn.Linear(h, h), act2=lrelu(),                    # (B, H)
            fc3=nn.Linear(h, 1),                                 # (B, 1)
            squeeze=Reshape(),                                   # (B,)  (not a table row)
        ))


class PIAD(nn.Module):
    """The four networks of PIAD (paper Fig. 2): ``G``, ``E``, ``DX``, ``DZ``."""

    def __init__(self, *, config: PIADConfig, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.config, self.channels = config, channels
        self.G = Generator(config=config, channels=channels)
        self.E = Encoder(config=config, channels=channels)
        self.DX = ImageCritic(config=config, channels=channels)
        self.DZ = LatentCritic(config=config)
        if config.init == "authors":
            init_authors_(self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample_latent(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of z ~ N(0, I) of shape (n, *latent_shape) on the model's device."""
        dev = generator.device if generator is not None else self.device
        z = torch.randn((n, *self.config.latent_shape), generator=generator, device=dev)
        return z.to(self.device)

    @property
    def image_critic(self) -> nn.Module:
        """D_X, the critic of images of eq. (5)."""
        return self.DX

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E(x): (B, C, S, S) -> (B, *latent_shape)."""
        return self.E(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)): (B, C, S, S) -> (B, C, S, S)."""
        return self.G(self.E(x))


@torch.no_grad()
def init_authors_(model: PIAD) -> None:
    """The authors' initialisation (``init="authors"``). Every convolution of G, E and D_X:
    Kaiming-normal weights (fan_out, leaky-ReLU gain, a = 0.2); D_Z's dense layers:
    Xavier-uniform weights with the gain of the activation that follows (leaky-ReLU 0.2, then
    linear for the output). Biases keep PyTorch's default (uniform ±1/sqrt(fan_in))."""
    convs = [m for net in (model.G, model.E, model.DX) for m in net.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        nn.init.kaiming_normal_(m.weight, a=LRELU_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
    dense = [m for m in model.DZ.modules() if isinstance(m, nn.Linear)]
    for i, m in enumerate(dense):
        gain = 1.0 if i == len(dense) - 1 else nn.init.calculate_gain("leaky_relu", LRELU_SLOPE)
        nn.init.xavier_uniform_(m.weight, gain=gain)


# --------------------------------------------------------------------------- losses
def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: E[(||∇ D(x̂)||_2 - 1)^2] at x̂ = α·real + (1-α)·fake, α ~ U[0, 1] per sample.

    Works on any (B, ...) input: images (B, C, H, W), latents (B, C, 1, 1) or (B, D). The graph
    is kept (``create_graph=True``) so the penalty trains the critic. With minibatch-stddev in
    the critic, ∇ of ΣD(x̂) w.r.t. x̂_i also carries the cross-sample terms (as in ProGAN).
    """
    real, fake = real.detach(), fake.detach()
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    dev = generator.device if generator is not None else real.device
    alpha = torch.rand(shape, generator=generator, device=dev, dtype=real.dtype).to(real.device)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)  # (B, ...)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    # The norm in fp32 at least, also under bf16 autocast (--precision): a no-op for fp32/fp64.
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return (grad.flatten(1).norm(2, dim=1) - 1).square().mean()


def critic_loss(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                fake: torch.Tensor, *, gp_weight: float = 10.0, drift: float = 1e-3,
                drift_fake: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5) plus the drift term of supplement §1, and its gradient penalty (detached, for log.csv).

    ``E[D(fake)] - E[D(real)] + λ·GP + drift·(E[D(real)^2] + E[D(fake)^2])``, the last term on
    real samples only with ``drift_fake=False`` (:attr:`PIADConfig.drift_fake` chooses).
    Both inputs are detached, so only the critic receives gradients. For D_Z, ``real`` is
    z ~ p_Z and ``fake`` is E(x).
    """
    real, fake = real.detach(), fake.detach()
    d_real, d_fake = critic(real), critic(fake)                    # (B,), (B,)
    gp = gradient_penalty(critic, real, fake, generator=generator)
    drift_term = d_real.square().mean() + (d_fake.square().mean() if drift_fake else 0.0)
    return d_fake.mean() - d_real.mean() + gp_weight * gp + drift * drift_term, gp.detach()  # eq. (5)


def adversarial_loss(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor | None,
                     fake: torch.Tensor) -> torch.Tensor:
    """Eq. (6): ``E[D(real)] - E[D(fake)]``, minimised by G (fake = G(z)) or E (fake = E(x)).

    The real term is a constant for G and E: it is computed under ``no_grad`` (same value,
    no graph); ``real=None`` omits it (same gradients). Gradients reach the critic's
    parameters too, through D(fake): freeze or zero them before the critic's own step.
    """
    loss = -critic(fake).mean()
    if real is not None:
        with torch.no_grad():
            d_real = critic(real).mean()
        loss = d_real + loss                                       # eq. (6)
    return loss


def anomaly_score(model: PIAD, x: torch.Tensor, score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | dict],
                  *, batch_size: int = 256) -> torch.Tensor | dict[str, torch.Tensor]:
    """Eq. (1): ``A(x) = score_fn(x, G(E(x)))``, one score per sample, (N, C, S, S) -> (N,).

    ``score_fn`` gives per-sample values (e.g. ``losses.ReconstructionLoss(..., reduction="none")``)
    or a dict of them (several distances of one reconstruction; a dict is returned); an entry of
    the dict may also be a map, one (h, w) array per sample (see :func:`anomaly_map`). Runs in
    batches of ``batch_size`` under ``no_grad`` with every submodule of ``model`` in eval mode,
    restoring each one's mode afterwards. Batches are moved to the model's device; the scores are
    returned on ``x``'s device. An empty ``x`` gives an empty tensor (``score_fn`` is never called,
    so a dict's keys are unknown).
    """
    return _per_sample(model, x, score_fn, batch_size, lambda name, v: v.dim() == 1 or (name and v.dim() == 3),
                       "one value per sample: use a per-sample reduction")


def anomaly_map(model: PIAD, x: torch.Tensor, map_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                *, batch_size: int = 256) -> torch.Tensor:
    """Eq. (1) position by position: ``map_fn(x, G(E(x)))``, (N, C, S, S) -> (N, h, w), in batches as
    :func:`anomaly_score`. With ``map_fn = ReconstructionLoss(kind=k).map`` the map of an image
    sums to its A(x) with the distance ``k``; for ``rel-perc-l1`` it is the per-position term of
    eq. (4), ``sum_c |n(f(x)) - n(f(G(E(x))))|`` over the image's denominator, at the feature
    resolution (S/8 at relu4_2; upsample it to see it over the image)."""
    return _per_sample(model, x, map_fn, batch_size, lambda name, v: v.dim() == 3, "one (h, w) map per sample")


def _per_sample(model: PIAD, x: torch.Tensor, fn, batch_size: int, ok: Callable, what: str):
    """``fn(xb, G(E(xb)))`` over batches ``xb`` of ``x``, concatenated: a tensor or a dict of them,
    each with ``ok(key or None, value)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    scores: dict = {}
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device)     # (b, C, S, S)
                s = fn(xb, model.reconstruct(xb))               # eq. (1)
                for name, v in (s.items() if isinstance(s, dict) else [(None, s)]):
                    if v.shape[:1] != xb.shape[:1] or not ok(name, v):
                        raise ValueError(f"{getattr(fn, '__name__', 'the function')} must return {what} "
                                         f"({xb.shape[0]} samples), got shape {tuple(v.shape)}")
                    scores.setdefault(name, []).append(v.to(x.device))
    finally:
        for m, mode in modes:
            m.training = mode
    scores = {k: torch.cat(v) for k, v in scores.items()}
    return scores.get(None, x.new_zeros(0)) if not scores or None in scores else scores
