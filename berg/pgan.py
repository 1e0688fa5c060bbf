"""The networks of Berg, Ahlberg and Felsberg's supplement (Appendix A, §1, tables of §1.1
KTH-Cellvideos and §1.2 CIFAR-10): the progressive GAN of Karras et al. (ICLR 2018) as their
code builds it (github.com/amandaberg/GANanomalyDetection ``networks.py``: ``G_paper``,
``D_paper``, ``E_clusterGAN``).

Each network keeps its layers in ``layers`` (an ``nn.ModuleDict``) under the names of the
tables' rows, written as their code's variable scopes: the row ``8x8/Conv0 up`` is
``layers["8x8/Conv0_up"]``, ``ToRGB lod3`` is ``layers["ToRGB_lod3"]`` (a space of the table is
an underscore here). ``pgan.networks(preset)`` gives ``(G, D, E)`` at the table's full width.

* Equalised learning rate: weights are stored N(0, 1) and multiplied at run time by the He
  constant ``gain / sqrt(fan_in)`` (``get_weight``, ``use_wscale=True``); biases start at 0.
* G: the latent is pixel-normalised at the input (``4x4/PixelNorm``), pixel-norm after every
  conv and after ``4x4/Dense``; leaky ReLU 0.2; linear ``ToRGB`` (gain 1).
* D and E: leaky ReLU 0.2 after every layer but ``4x4/Dense1``; minibatch standard deviation
  (group 4, one feature map) before ``4x4/Conv``; E is D without ``4x4/Dense1``: its output Z is
  the leaky-ReLU'd ``4x4/Dense0`` (512).
* Level of detail: each network holds ``lod`` (a buffer, so checkpoints record it, like their
  ``lod`` variable). At ``lod = k + f`` (0 <= f < 1) the networks work at resolution
  ``2**(log2(resolution) - k)``; for f > 0 the ``Grow_lod{k}`` row blends the new block's output
  with the lower resolution's one, weight f on the lower (their ``lerp_clip``).

* :class:`PGAN` holds the three networks as ``G``, ``D`` and ``E`` (their names) and is a
  ``berg.latent_norm.Networks``: ``image_critic`` is D, :meth:`PGAN.encode` is E without the
  minibatch-stddev leak between scored images (each grouped with three fixed training images,
  ``reference``; docs/berg.md measures the leak).

Deviations from their code, one per line:

* Resolution: G returns, and D/E read, images at the working resolution of ``lod``; their
  networks always output/input the full size (G nearest-upscaled by ``2**floor(lod)``, D and E
  average-pool it away again). ``Generator.full`` upscales; D and E average-pool a larger input.
  Same values, less work.
* ``Conv0_up`` / ``Conv1_down`` are nearest-upscale then 3×3 conv / 3×3 conv then 2×2 average
  pool, which their fused transposed/strided convolutions compute in one op (same function).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from berg import latent_norm
import piad

LATENT = 512  # the tables' "latents in (?, 512)"
LRELU = 0.2
SQRT2 = math.sqrt(2.0)
MBSTD_GROUP = 4  # D_paper / E_clusterGAN mbstd_group_size
# preset -> (channels, resolution): supplement §1.2 CIFAR-10 (32×32 RGB), §1.1 KTH-Cellvideos (64×64 grey)
PRESETS = {"cifar10": (3, 32), "kth": (1, 64)}
FMAP_BASE, FMAP_MAX = 8192, 512  # G_paper / D_paper defaults (fmap_decay 1.0)


def nf(stage: int, fmap_base: int = FMAP_BASE, fmap_max: int = FMAP_MAX) -> int:
    """Feature maps of stage ``stage`` (their ``nf``): ``min(fmap_base / 2**stage, fmap_max)``."""
    return min(int(fmap_base / 2.0 ** stage), fmap_max)


class EqualizedConv2d(nn.Module):
    """Conv k×k ('SAME' padding) + bias; weight N(0, 1) scaled by ``gain/sqrt(k·k·in)`` at run time.
    ``up``: ``Conv0_up``; ``down``: ``Conv1_down``. ``tf_weight_shape``: the table's WeightShape
    (their layout: (k, k, in, out), (k, k, out, in) for their transposed ``Conv0_up``)."""

    def __init__(self, in_c: int, out_c: int, kernel: int, *, gain: float = SQRT2, up: bool = False,
                 down: bool = False):
        super().__init__()
        self.up, self.down = up, down  # nearest upscale before / average-pool after (bias commutes)
        self.weight = nn.Parameter(torch.randn(out_c, in_c, kernel, kernel))  # N(0, 1): what Adam sees
        self.bias = nn.Parameter(torch.zeros(out_c))
        self.scale = gain / math.sqrt(in_c * kernel * kernel)  # He constant, get_weight(use_wscale=True)
        self.tf_weight_shape = (kernel, kernel, out_c, in_c) if up else (kernel, kernel, in_c, out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H', W')
        k = self.weight.shape[-1]
        y = F.conv2d(upscale2d(x) if self.up else x, self.weight * self.scale, self.bias, padding=k // 2)
        return downscale2d(y) if self.down else y


class EqualizedDense(nn.Module):
    """Dense layer on the flattened input; ``reshape=(C, h, w)`` reshapes before the per-channel
    bias (G's ``4x4/Dense``: bias of C, not C·h·w, entries). Weight N(0, 1) × ``gain/sqrt(in)``."""

    def __init__(self, in_f: int, out_f: int, *, gain: float = SQRT2, reshape: tuple[int, ...] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f))
        self.bias = nn.Parameter(torch.zeros(reshape[0] if reshape else out_f))
        self.scale, self.reshape = gain / math.sqrt(in_f), reshape
        self.tf_weight_shape = (in_f, out_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.flatten(1), self.weight * self.scale)
        if self.reshape is None:
            return y + self.bias
        return y.reshape(-1, *self.reshape) + self.bias.reshape(1, -1, 1, 1)  # (B, C, h, w)


class PixelNorm(nn.Module):
    """``x / sqrt(mean_c x^2 + 1e-8)`` over channels (latent_norm.pixel_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return latent_norm.pixel_norm(x)


class Grow(nn.Module):
    """``Grow_lod{k}``: ``new + (low - new) · f`` (their ``lerp``; f = lod - k in (0, 1))."""

    def forward(self, new: torch.Tensor, low: torch.Tensor, f: float) -> torch.Tensor:
        return torch.lerp(new, low, f)


def upscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upscaling (their ``upscale2d``)."""
    return x if factor == 1 else x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def downscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Box-filter (average-pool) downscaling (their ``downscale2d``)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU)


class _Progressive(nn.Module):
    def __init__(self, channels: int, resolution: int, fmap_base: int, fmap_max: int):
        super().__init__()
        self.R = int(math.log2(resolution))
        if resolution != 2 ** self.R or resolution < 4:
            raise ValueError(f"pGAN resolution must be a power of 2 >= 4, not {resolution}")
        self.channels, self.resolution = channels, resolution
        self.nf = lambda s: nf(s, fmap_base, fmap_max)
        self.register_buffer("lod", torch.tensor(0.0))  # level of detail, recorded in state_dict
        self.layers = nn.ModuleDict()

    def level(self) -> tuple[int, float]:
        """``(res, f)``: working resolution ``2**res`` and the fade weight f of ``lod``."""
        lod = min(max(float(self.lod), 0.0), self.R - 2.0)
        k = math.floor(lod)
        return self.R - k, lod - k


class Generator(_Progressive):
    """G of the tables: (B, 512) latent -> (B, channels, s, s), s the working resolution of ``lod``."""

    def __init__(self, channels: int, resolution: int, *, fmap_base: int = FMAP_BASE, fmap_max: int = FMAP_MAX):
        super().__init__(channels, resolution, fmap_base, fmap_max)
        L, n, R = self.layers, self.nf, self.R
        self.latent_size = n(0)
        L["4x4/PixelNorm"] = PixelNorm()
        L["4x4/Dense"] = EqualizedDense(n(0), n(1) * 16, gain=SQRT2 / 4, reshape=(n(1), 4, 4))  # Theano gain
        L["4x4/Conv"] = EqualizedConv2d(n(1), n(1), 3)
        L[f"ToRGB_lod{R - 2}"] = EqualizedConv2d(n(1), channels, 1, gain=1.0)
        for res in range(3, R + 1):
            s = 2 ** res
            L[f"{s}x{s}/Conv0_up"] = EqualizedConv2d(n(res - 2), n(res - 1), 3, up=True)
            L[f"{s}x{s}/Conv1"] = EqualizedConv2d(n(res - 1), n(res - 1), 3)
            L[f"ToRGB_lod{R - res}"] = EqualizedConv2d(n(res - 1), channels, 1, gain=1.0)
            L[f"Grow_lod{R - res}"] = Grow()

    def block(self, x: torch.Tensor, res: int) -> torch.Tensor:
        L, s = self.layers, 2 ** res
        pn = latent_norm.pixel_norm
        if res == 2:
            x = pn(_act(L["4x4/Dense"](L["4x4/PixelNorm"](x))))
            return pn(_act(L["4x4/Conv"](x)))
        x = pn(_act(L[f"{s}x{s}/Conv0_up"](x)))
        return pn(_act(L[f"{s}x{s}/Conv1"](x)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        top, f = self.level()
        x = z.reshape(z.shape[0], -1)
        prev = None
        for res in range(2, top + 1):
            prev, x = x, self.block(x, res)
        img = self.layers[f"ToRGB_lod{self.R - top}"](x)
        if f > 0 and top > 2:  # fade-in of the top block
            low = upscale2d(self.layers[f"ToRGB_lod{self.R - top + 1}"](prev))
            img = self.layers[f"Grow_lod{self.R - top}"](img, low, f)
        return img

    def full(self, z: torch.Tensor) -> torch.Tensor:
        """Their output: G(z) nearest-upscaled to the final resolution."""
        img = self(z)
        return upscale2d(img, self.resolution // img.shape[-1])


class Discriminator(_Progressive):
    """D of the tables, (B, channels, s, s) -> (B, 1); ``encoder=True``: E, -> Z (B, 512)."""

    def __init__(self, channels: int, resolution: int, *, fmap_base: int = FMAP_BASE, fmap_max: int = FMAP_MAX,
                 encoder: bool = False):
        super().__init__(channels, resolution, fmap_base, fmap_max)
        L, n, R = self.layers, self.nf, self.R
        self.encoder = encoder
        for res in range(R, 2, -1):
            s = 2 ** res
            L[f"FromRGB_lod{R - res}"] = EqualizedConv2d(channels, n(res - 1), 1)
            L[f"{s}x{s}/Conv0"] = EqualizedConv2d(n(res - 1), n(res - 1), 3)
            L[f"{s}x{s}/Conv1_down"] = EqualizedConv2d(n(res - 1), n(res - 2), 3, down=True)
            if res < R:
                L[f"Grow_lod{R - res - 1}"] = Grow()
        L[f"FromRGB_lod{R - 2}"] = EqualizedConv2d(channels, n(1), 1)
        if R > 2:
            L[f"Grow_lod{R - 3}"] = Grow()
        L["4x4/MinibatchStddev"] = piad.MinibatchStdDev(MBSTD_GROUP)
        L["4x4/Conv"] = EqualizedConv2d(n(1) + 1, n(1), 3)
        L["4x4/Dense0"] = EqualizedDense(n(1) * 16, n(0))
        if not encoder:
            L["4x4/Dense1"] = EqualizedDense(n(0), 1, gain=1.0)

    def from_rgb(self, x: torch.Tensor, res: int) -> torch.Tensor:
        return _act(self.layers[f"FromRGB_lod{self.R - res}"](x))

    def block(self, x: torch.Tensor, res: int) -> torch.Tensor:
        L, s = self.layers, 2 ** res
        if res > 2:
            x = _act(L[f"{s}x{s}/Conv0"](x))
            return _act(L[f"{s}x{s}/Conv1_down"](x))
        x = _act(L["4x4/Conv"](L["4x4/MinibatchStddev"](x)))
        x = _act(L["4x4/Dense0"](x))
        return x if self.encoder else L["4x4/Dense1"](x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        top, f = self.level()
        img = downscale2d(img, img.shape[-1] // 2 ** top)  # a full-size input, as theirs, reads the same
        x = self.block(self.from_rgb(img, top), top)
        if f > 0 and top > 2:  # fade-in of the top block
            x = self.layers[f"Grow_lod{self.R - top}"](x, self.from_rgb(downscale2d(img), top - 1), f)
        for res in range(top - 1, 1, -1):
            x = self.block(x, res)
        return x


def Encoder(channels: int, resolution: int, **widths) -> Discriminator:
    """E of the tables: D's trunk, output Z = leaky ReLU(``4x4/Dense0``) (their ``E_clusterGAN``)."""
    return Discriminator(channels, resolution, encoder=True, **widths)


def networks(preset: str, *, fmap_base: int = FMAP_BASE, fmap_max: int = FMAP_MAX,
             channels: int | None = None, resolution: int | None = None):
    """``(G, D, E)`` of ``preset`` ("cifar10" or "kth"), full width and final resolution unless told."""
    c, r = PRESETS[preset]
    c, r = channels or c, resolution or r
    w = dict(fmap_base=fmap_base, fmap_max=fmap_max)
    return Generator(c, r, **w), Discriminator(c, r, **w), Encoder(c, r, **w)


@dataclasses.dataclass
class PGANConfig:
    """What rebuilds a :class:`PGAN` (a checkpoint's ``preset``): image shape and widths."""

    channels: int
    resolution: int
    fmap_base: int = FMAP_BASE
    fmap_max: int = FMAP_MAX

    @classmethod
    def from_saved(cls, saved: dict) -> "PGANConfig":
        """The config a checkpoint recorded; keys this version dropped (``gp_weight``, ``drift``:
        the trainer's settings now, ``berg.latent_norm.GP_WEIGHT``, ``DRIFT``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


# state_dict prefixes of earlier checkpoints -> this version's (D was stored as ``DX``)
RENAMED = {"DX.": "D."}


class PGAN(nn.Module):
    """G, D and E of their code, sharing one level of detail (:meth:`set_lod`, their
    ``lod_assign_ops``); a ``berg.latent_norm.Networks``."""

    def __init__(self, config: PGANConfig):
        super().__init__()
        self.config, self.channels = config, config.channels
        w = dict(fmap_base=config.fmap_base, fmap_max=config.fmap_max)
        self.G = Generator(config.channels, config.resolution, **w)
        self.D = Discriminator(config.channels, config.resolution, **w)
        self.E = Encoder(config.channels, config.resolution, **w)
        self.latent_shape = (self.G.latent_size,)
        # scoring without the minibatch-stddev leak (:meth:`encode`): fixed training images
        self.register_buffer("reference", torch.zeros(MBSTD_GROUP - 1, config.channels, config.resolution,
                                                      config.resolution))
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    @property
    def image_critic(self) -> Discriminator:
        """D, the critic of images of eq. (5)."""
        return self.D

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def lod(self) -> float:
        return float(self.G.lod)

    def set_lod(self, lod: float) -> None:
        for net in (self.G, self.D, self.E):
            net.lod.fill_(lod)

    def sample_latent(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of z ~ N(0, I), (n, 512), on the model's device (their ``random_latents``)."""
        dev = generator.device if generator is not None else self.device
        return torch.randn((n, *self.latent_shape), generator=generator, device=dev).to(self.device)

    def set_reference(self, images: torch.Tensor) -> None:
        """The ``MBSTD_GROUP - 1`` training images (C, S, S) that share each scored image's group."""
        self.reference.copy_(images.reshape(self.reference.shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) of each image in a minibatch-stddev group with the fixed :attr:`reference` images
        only, (B, C, S, S) -> (B, 512): a score that does not depend on the other test images (their
        label-pure batches of 64 let the batch statistics carry the label). Costs 4 E passes."""
        b = x.shape[0]
        ref = self.reference.to(x.dtype).repeat_interleave(b, dim=0)  # (3B, ...): group m = {x_m, ref_0..2}
        return self.E(torch.cat([x, ref]))[:b]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)) (E as :meth:`encode`), upscaled to the input's size as their G's output is."""
        return self.G.full(self.encode(x))


def _rename_old_keys(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: a checkpoint's keys under :data:`RENAMED`'s old prefixes, renamed in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in RENAMED.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
