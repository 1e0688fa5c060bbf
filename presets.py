"""Each dataset's numbers (supplement §1, Tables 1-4), in one table keyed by dataset.

:data:`TABLE` gives, for every dataset, its network preset (:data:`NETWORKS`: one of supplement
Tables 1-4 with its critic steps n_dis and Adam settings; Table 1 serves MNIST, Fashion-MNIST and
COIL-100, which share it but not their schedule), its training iterations, batch size, γ update
period n_weight (supplement §1.2) and the γ_G, γ_E a run starts from (or keeps, with
``--weights-policy fixed``). ``config.TrainConfig``'s fields of the same names override a row and,
left out, default to it (``TrainConfig.resolved``). The authors' config files (configs/*.yaml)
agree with every row (tests/test_parity.py); where the paper's text differs, the row follows the
code and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from piad import PIADConfig

NETWORKS = {
    # Table 1 (MNIST, fMNIST, COIL-100). paper: D_X has a fourth, non-pooling BlockDown at 4×4
    # (dx_channels=(32,) * 5); authors' code: three BlockDowns (default).
    "mnist": PIADConfig(name="mnist", image_size=32, latent_shape=(32, 1, 1),
                        gen_channels=(32,) * 4, enc_channels=(32,) * 4, dx_channels=(32,) * 4,
                        dx_head_channels=32, dz_hidden=128, n_dis=2),
    # Table 2 (its D_Z input: see piad.LatentCritic).
    "cifar10": PIADConfig(name="cifar10", image_size=32, latent_shape=(256, 1, 1),
                          gen_channels=(256, 256, 128, 64), enc_channels=(64, 64, 128, 256),
                          dx_channels=(32, 32, 64, 128), dx_head_channels=128, dz_hidden=1024,
                          n_dis=2),
    # Table 3: a 32×4×4 latent; D_Z input 512 = 32·4·4.
    "lsun": PIADConfig(name="lsun", image_size=64, latent_shape=(32, 4, 4),
                       gen_channels=(64,) * 5, enc_channels=(64,) * 5, dx_channels=(64,) * 5,
                       dx_head_channels=64, dz_hidden=2048, n_dis=3),
    # Table 4 (its D_Z input: see piad.LatentCritic).
    "celeba": PIADConfig(name="celeba", image_size=64, latent_shape=(64, 1, 1),
                         gen_channels=(64,) * 5, enc_channels=(64,) * 5, dx_channels=(64,) * 5,
                         dx_head_channels=64, dz_hidden=256, n_dis=3),
}


def network(name: str) -> PIADConfig:
    """The networks of one supplement table: ``"mnist"``, ``"cifar10"``, ``"lsun"``, ``"celeba"``."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(NETWORKS)}") from None


@dataclass(frozen=True)
class Numbers:
    """One row of :data:`TABLE`."""

    network: str | None     # key of NETWORKS; None: from the images (folder)
    iterations: int | None  # None: those of the first dataset of the paper with the same network
    batch_size: int = 32    # supplement §1
    n_weight: int = 100     # γ update period, supplement §1.2
    gamma_g: float = 1.0    # γ_G, γ_E: the start (gradnorm) or the value (fixed)
    gamma_e: float = 1.0


TABLE: dict[str, Numbers] = {
    "mnist": Numbers("mnist", 50_000),
    "fashion-mnist": Numbers("mnist", 50_000),
    "cifar10": Numbers("cifar10", 100_000),
    "coil100": Numbers("mnist", 20_000),
    # paper (supplement §1): 200k iterations; authors' code (configs/lsun.yaml): 300k (default).
    "lsun": Numbers("lsun", 300_000),
    "celeba": Numbers("celeba", 200_000),
    # Not in the paper: the network (and iterations) of the paper's images of that size and channels.
    "folder": Numbers(None, None),
    "digits": Numbers("mnist", 50_000),  # offline stand-ins for MNIST
    "mnist-5k": Numbers("mnist", 50_000),
}


def iterations(dataset: str, network: str | None = None) -> int:
    """Training iterations of ``dataset`` (its row); for ``folder`` (no schedule of its own) those of
    the first dataset of the paper with its images' ``network`` (mnist: 50k, cifar10: 100k, celeba: 200k)."""
    dataset = str(dataset).lower()
    if dataset not in TABLE:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(TABLE)}")
    own = TABLE[dataset].iterations
    if own is None and network is None:
        raise ValueError(f"dataset {dataset!r} has no schedule of its own: give its network preset")
    return own or next(n.iterations for n in TABLE.values() if n.network == network and n.iterations)
