"""Building blocks of PIAD's networks (supplement Fig. 1 and §1.3).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019), supplement Fig. 1: (a) the
pre-activation residual block, (b) BlockUp and (c) BlockDown, residual blocks without
normalisation and with leaky ReLU (slope 0.2, §1.3); Table 3's residual stem; the minibatch
standard deviation layer of D_X (ProGAN, Karras et al. 2018); a per-sample reshape. piad.py
assembles them into the networks of supplement Tables 1-4.
"""
from __future__ import annotations

import torch
from torch import nn

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
