"""A run's settings: every knob of Algorithm 1's runs, declared once (paper §4, supplement §1).

:class:`TrainConfig` is the single declaration of what a run can change. Each field carries its
help text, its choices and its group of ``--help`` (:data:`GROUPS`: data, training, PIAD's,
Berg et al.'s, the run's) as metadata; ``train.py``'s command line is generated from the fields
(``--batch-size`` for ``batch_size``, ``--no-progress`` for a boolean that defaults to true).
:meth:`TrainConfig.validate` checks the settings (the same choices) and changes nothing;
:meth:`TrainConfig.resolved` fills in the defaults that depend on other settings. The
architecture and optimiser settings of the supplement's tables are not here: they belong to the
dataset's network preset (``presets.NETWORKS``); the other numbers of the dataset's row of
``presets.TABLE`` (batch size, γ_G, γ_E, their period n_weight) are fields here that default to it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import random
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import calibration
import data as data_mod
import errors
import features
import losses
import presets
from weights_policy import DEFAULT_HISTORY, DEFAULT_LAST_N, DEFAULT_SMOOTHING, NORMS, POLICIES, REDUCES

METHODS = ("piad", "latent-norm", "knn")
NETWORKS = ("pgan", "piad")  # of --method latent-norm: theirs (default, berg.system's pgan), PIAD's (ours)
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when available
ROW = ("batch_size", "n_weight", "gamma_g", "gamma_e")  # fields that default to the dataset's row (presets.py)
PRECISIONS = ("fp32", "bf16", "auto")  # of the training step (precision.py); auto: TrainConfig.run_precision
# The protocols a user can choose between: those of the datasets that allow more than one.
PROTOCOLS = tuple(dict.fromkeys(p for d in data_mod.DATASETS.values() if len(d.protocols) > 1 for p in d.protocols))


def resolve_device(name: str) -> torch.device:
    """``--device``: one of :data:`DEVICES` (auto: cuda when available, else cpu)."""
    if name not in DEVICES:
        raise errors.UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return torch.device(name)


# Upper bounds of sizes (docs/safety.md), checked before any work; and a batch is never larger
# than the training set (:func:`check_sizes`, once the data is loaded, before training).
UPPER_BOUNDS = {"batch_size": 65536, "iterations": 10 ** 9, "threads": 1024, "n_weight": 10 ** 9,
                "policy_last_n": 10 ** 6, "policy_history": 10 ** 6, "log_every": 10 ** 9,
                "tensorboard_images": 10 ** 9, "keep_every": 10 ** 9}


def check_sizes(cfg: "TrainConfig", ds: data_mod.AnomalyData) -> None:
    """The bounds that depend on the data: a minibatch no larger than the training set (pGAN runs
    take their minibatch sizes from their schedule, not from ``--batch-size``; k-NN draws none)."""
    if not cfg.pgan and cfg.method != "knn" and cfg.batch_size > len(ds.train):
        raise errors.UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(ds.train)} "
                               f"images of {cfg.dataset}); use --batch-size {len(ds.train)} or less")


# The groups of ``train.py --help``, in its order: each field of TrainConfig names its own.
GROUPS = {"data": "data (§4)",
          "training": "training (both methods)",
          "piad": "PIAD (§3, Algorithm 1)",
          "berg": "Berg et al. (--method latent-norm)",
          "knn": "k-NN baseline (--method knn)",
          "run": "run (files, devices, speed, output)"}


def bf16_unsupported(device: torch.device) -> str | None:
    """Why ``--precision bf16`` cannot run at speed on ``device`` (None: it can): a CPU needs
    AVX-512 BF16 or AMX (else oneDNN emulates bf16, slower than fp32), a GPU native bf16 (sm80+)."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported(including_emulation=False) else \
            f"{torch.cuda.get_device_name(device)} has no native bf16 (sm80+ has)"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return "this CPU has neither AVX-512 BF16 nor AMX (bf16 would be emulated, slower than fp32)"


def knob(default, help: str, choices: tuple | None = None, *, group: str):
    """A :class:`TrainConfig` field: its default, its ``--help`` text, its allowed values and its
    group of ``--help`` (a key of :data:`GROUPS`)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class TrainConfig:
    dataset: str = knob("mnist", "dataset of the paper or an offline stand-in", tuple(data_mod.DATASETS), group="data")
    fallback: str | None = knob(None, "dataset to train on instead when --dataset cannot be had here (not on "
                                      "disk, no download), e.g. mnist-5k offline", tuple(data_mod.DATASETS),
                                      group="data")
    normal: str = knob("8", "normal class: index or name (attribute for celeba)", group="data")
    iterations: int | None = knob(None, "training iterations (default: the supplement's schedule)", group="training")
    batch_size: int | None = knob(None, "minibatch size (default: the dataset's, presets.py)", group="training")
    seed: int | None = knob(None, "random seed (data split, initialisation, minibatches); default 0, "
                                  "Berg et al.'s (berg/progressive.py) for latent-norm with pgan networks",
                            group="training")
    out: str | None = knob(None, "run folder (default runs/<dataset>-<normal>-<method>-<loss>-c<P>-s<seed>)",
                           group="run")
    data_root: str | None = knob(None, "folder with the dataset files", group="data")
    download: bool = knob(True, "download MNIST/CIFAR-10 when missing (--no-download: files must be "
                                "under --data-root)", group="data")
    protocol: str | None = knob(None, "evaluation protocol (default: the paper's for the dataset)", PROTOCOLS,
                                group="data")
    image_size: int | None = knob(None, "image size, --dataset folder only", data_mod.DATASETS["folder"].image_sizes,
                                  group="data")
    preprocess: str = knob(data_mod.readers.PREPROCESS[0], "image resampling: the authors' code's (PIL / "
                           "scikit-image on 8-bit images, uint8 rounding) or antialiased bilinear on floats",
                           data_mod.readers.PREPROCESS, group="data")
    contamination: float = knob(0.0, "fraction of anomalies in the training set (an extension)", group="data")
    calibration: float = knob(0.0, "fraction of the normal training images held out (never trained on) to calibrate "
                                   "a decision threshold; 0: none, no threshold (folder runs: 0.1 advised)", group="data")
    target_fpr: float = knob(0.05, "false-positive rate on normal images the calibrated threshold aims at",
                             group="run")
    method: str = knob("piad", "PIAD, the latent-norm method of Berg et al. (berg/latent_norm.py), or the k-NN "
                               "baseline on PIAD's VGG-19 features (baselines/knn.py)", METHODS,
                       group="training")
    vgg_weights: str = knob("auto", "VGG-19 weights: " + "|".join(features.WEIGHTS) + "|PATH", group="piad")
    stats: str = knob("auto", "VGG feature statistics of eq. (3): " + "|".join(features.STATS_CHOICES) + "|PATH "
                              "(auto: the authors' ImageNet ones with torchvision's weights, else sklearn)",
                              group="piad")
    loss: str = knob("rel-perc-l1", "L_rec of eq. (7)", losses.KINDS, group="piad")
    impl: str = knob("auto", "relative-perceptual-L1 implementation: fused op or PyTorch", losses.IMPLS, group="piad")
    weights_policy: str = knob("gradnorm", "γ_G, γ_E: gradient-normalizing policy (§3.3) or fixed", POLICIES,
                               group="piad")
    gamma_g: float | None = knob(None, "γ_G: held fixed with --weights-policy fixed; the starting value with "
                                       "gradnorm (default: the dataset's, presets.py)", group="piad")
    gamma_e: float | None = knob(None, "γ_E: held fixed with --weights-policy fixed; the starting value with "
                                       "gradnorm (default: the dataset's, presets.py)", group="piad")
    n_weight: int | None = knob(None, "γ update period (supplement §1.2; default: the dataset's, presets.py)",
                                group="piad")
    policy_last_n: int = knob(DEFAULT_LAST_N, "γ policy: ratios of the last N records", group="piad")
    policy_smoothing: float = knob(DEFAULT_SMOOTHING, "γ policy: EWMA factor of the records", group="piad")
    policy_history: int = knob(DEFAULT_HISTORY, "γ policy: records kept", group="piad")
    policy_reduce: str = knob(REDUCES[0], "γ policy: reduction of the ratios (Algorithm 3)", REDUCES, group="piad")
    policy_norm: str = knob(NORMS[0], "γ policy: gradient norm of Algorithm 2 (std: the authors' code; "
                                      "l2: the paper's Algorithm 2)", NORMS, group="piad")
    policy_at_start: bool = knob(False, "γ from iteration 0 (paper, Alg. 1 line 9) instead of γ = 1 until "
                                        "iteration n_weight - 1 (authors' code, default)", group="piad")
    device: str = knob("auto", "where to train", DEVICES, group="run")
    threads: int | None = knob(None, "CPU threads of the run (default: torch's); a run's floats depend on it",
                               group="run")
    resume: bool = knob(False, "continue the run in --out from its checkpoint", group="run")
    cache_features: str = knob("auto", "compute the training images' VGG features once (auto: when each "
                                       "is seen more than twice)", ("auto", "on", "off"), group="piad")
    channels_last: bool = knob(True, "NHWC tensors for every conv net (same maths, faster kernels)", group="run")
    precision: str = knob("fp32", "training step arithmetic: fp32, or bf16 autocast of G, E, D_X, D_Z, VGG-19 (fp32 "
                                  "weights, Adam, penalty norm, γ statistics, eq. (4) sums; --method piad only), "
                                  "or auto: bf16 where the device has bf16 units, else fp32",
                          PRECISIONS, group="run")
    checkpoint_minutes: float = knob(5.0, "minutes between checkpoints (0: every iteration)", group="run")
    keep_every: int = knob(0, "also keep the checkpoint of every K-th iteration, as "
                              "RUN/kept/checkpoint-<iteration>.pt (0: none); evaluate them with "
                              "python -m tools.progress RUN", group="run")
    log_every: int = knob(10, "iterations between rows of log.csv", group="run")
    tensorboard: bool = knob(False, "also write the logged losses and γ, and reconstruction grids, to RUN/tb/ "
                                    "(needs: pip install .[tensorboard])", group="run")
    tensorboard_images: int = knob(500, "iterations between reconstruction grids with --tensorboard", group="run")
    progress: bool = knob(True, "show a progress bar", group="run")
    evaluate: bool = knob(True, "evaluate after training (--no-evaluate: later, with evaluate.py)", group="run")
    reseed: int = knob(0, "with --resume: new random draws from the checkpoint on (e.g. after a divergence)",
                       group="training")
    # --method latent-norm only (docs/berg.md): Berg et al.'s pGAN networks grown progressively
    # (berg/pgan.py, berg/progressive.py; default), or PIAD's networks at a fixed resolution (ours).
    # Left out (None), the pGAN settings are theirs: :meth:`resolved` is given them (berg.system.THEIRS).
    networks: str | None = knob(None, "latent-norm networks: pgan (Berg et al.'s, default) or piad (PIAD's, ours)",
                                NETWORKS, group="berg")
    fmap_max: int | None = knob(None, "pgan: most feature maps of any layer (default: theirs, 512, the "
                                      "supplement's tables)", group="berg")
    fmap_base: int | None = knob(None, "pgan: feature maps of stage s are min(fmap_base / 2**s, fmap_max) "
                                       "(default: theirs, berg/pgan.py)", group="berg")
    lod_kimg: float | None = knob(None, "pgan: thousands of real images to stabilise each resolution, and again "
                                        "to fade the next one in (default: theirs, berg/progressive.py)",
                                  group="berg")
    total_kimg: float | None = knob(None, "pgan: training length in thousands of real images (default: theirs, "
                                          "berg/progressive.py)", group="berg")
    knn_k: int = knob(1, "k-NN: the score is the mean distance to the k nearest training images' features",
                      group="knn")

    def validate(self) -> "TrainConfig":
        """Raises :class:`errors.UserError` naming every setting that cannot work (before any work
        starts); changes nothing (:meth:`resolved` fills in the defaults) and returns ``self``."""
        bad = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                bad.append(f"{flag(name)} {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            value = getattr(self, f.name)
            value = str(value).lower() if f.name == "dataset" else value  # names are case-blind
            if allowed and not (value in allowed or (value is None and f.default is None)):
                need(False, f.name, "must be one of " + ", ".join(str(a) for a in allowed))
        for name in dict.fromkeys([str(self.dataset).lower(), self.fallback]):
            if name in data_mod.DATASETS and name != "folder":
                try:  # the dataset's own class check (names or indices), without loading any data
                    data_mod.resolve_class(name, self.normal, data_mod.class_names(name, self.data_root))
                except ValueError as exc:
                    bad.append(f"--normal: {exc}")
        need(self.iterations is None or (is_int(self.iterations) and self.iterations >= 1),
             "iterations", "must be a whole number >= 1 (or left out for the paper's schedule)")
        for name, most in UPPER_BOUNDS.items():  # sizes that would exhaust memory or overflow mid-run
            need(not is_int(getattr(self, name)) or getattr(self, name) <= most, name, f"must be at most {most}")
        need(is_int(self.keep_every) and self.keep_every >= 0, "keep_every", "must be a whole number >= 0 (0: none)")
        for name in ("batch_size", "n_weight", "policy_last_n", "policy_history", "log_every", "tensorboard_images",
                     "knn_k"):
            value = getattr(self, name)
            need((name in ROW and value is None) or (is_int(value) and value >= 1), name, "must be a whole number >= 1")
        need(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads",
             "must be a whole number >= 1 (or left out for torch's default)")
        for name in ("seed", "reseed"):
            value = getattr(self, name)
            need((name == "seed" and value is None) or (is_int(value) and 0 <= value < 2 ** 32), name,
                 "must be a whole number in 0..2**32-1")
        need(is_real(self.policy_smoothing) and 0 <= self.policy_smoothing < 1, "policy_smoothing",
             "must be a number with 0 <= s < 1")
        need(is_real(self.contamination) and 0 <= self.contamination < 1, "contamination",
             "must be a fraction with 0 <= P < 1")
        need(is_real(self.calibration) and 0 <= self.calibration < 1, "calibration",
             "must be a fraction with 0 <= F < 1")
        need(is_real(self.target_fpr) and 0 < self.target_fpr < 1, "target_fpr", "must be a fraction with 0 < α < 1")
        for name in ("gamma_g", "gamma_e"):
            need(getattr(self, name) is None or (is_real(getattr(self, name)) and getattr(self, name) > 0), name,
                 "must be a number > 0")
        need(is_real(self.checkpoint_minutes) and self.checkpoint_minutes >= 0, "checkpoint_minutes",
             "must be a number >= 0 (0: after every iteration)")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            bad.append("--tensorboard needs the package tensorboard: pip install .[tensorboard]")
        if self.device in DEVICES:
            try:
                resolve_device(self.device)
            except errors.UserError as exc:
                bad.append(str(exc))
        if self.precision == "bf16" and self.method != "piad":
            bad.append(f"--precision bf16 trains --method piad only (--method {self.method} trains in fp32); "
                       "use --precision fp32")
        elif self.precision == "bf16" and self.device in DEVICES:
            with contextlib.suppress(errors.UserError):  # a missing device is reported above
                why = bf16_unsupported(resolve_device(self.device))
                if why:
                    bad.append(f"--precision bf16: {why}; use --precision fp32")
        if self.vgg_weights not in features.WEIGHTS and not Path(self.vgg_weights).is_file():
            bad.append(f"--vgg-weights {self.vgg_weights!r}: no such file; give {', '.join(features.WEIGHTS)} "
                       "or the path of a VGG-19 state-dict file")
        if self.stats not in features.STATS_CHOICES and not Path(self.stats).is_file():
            bad.append(f"--stats {self.stats!r}: no such file; give {', '.join(features.STATS_CHOICES)} or a "
                       "file written by `python features.py stats`")
        elif self.stats not in features.STATS_CHOICES:  # a file: checked now, not after the data loads
            try:
                features.FeatureStats.load(self.stats)
            except errors.UserError as exc:
                bad.append(f"--stats: {exc}")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            bad.append(f"--out {self.out!r} is a file, not a run folder")
        if self.method == "piad" and self.networks not in (None, "piad"):
            bad.append(f"--networks {self.networks}: only --method latent-norm trains pGAN networks")
        if self.pgan:
            for name in ("fmap_max", "fmap_base"):
                need(getattr(self, name) is None or (is_int(getattr(self, name)) and getattr(self, name) >= 1), name,
                     "must be a whole number >= 1")
            for name in ("lod_kimg", "total_kimg"):
                need(getattr(self, name) is None or (is_real(getattr(self, name)) and getattr(self, name) > 0), name,
                     "must be a number > 0")
        if bad:
            raise errors.UserError("; ".join(bad))
        return self

    def resolved(self, theirs: Mapping[str, object] = {}) -> "TrainConfig":
        """A copy with the defaults that depend on other settings filled in: the dataset's numbers
        left out (:data:`ROW`: its row of ``presets.TABLE``), ``networks`` (the method's own,
        :attr:`run_networks`), ``seed`` (0, or for pGAN networks theirs) and the pGAN settings left
        out. ``theirs``: Berg et al.'s values, ``berg.system.THEIRS`` (this module imports nothing of
        berg/; train.py gives them). A run is built from this copy, and its checkpoint records it."""
        row = presets.TABLE[str(self.dataset).lower()]
        filled = {k: getattr(row, k) for k in ROW if getattr(self, k) is None}
        filled |= {k: theirs[k] for k in ("fmap_max", "fmap_base", "lod_kimg", "total_kimg")
                   if getattr(self, k) is None and k in theirs}
        if self.pgan and self.seed is None and "seed" not in theirs:
            raise ValueError("resolving a pGAN run's settings needs Berg et al.'s (berg.system.THEIRS)")
        seed = self.seed if self.seed is not None else theirs["seed"] if self.pgan else 0
        return dataclasses.replace(self, networks=self.run_networks, seed=seed, precision=self.run_precision,
                                   **filled)

    @property
    def run_precision(self) -> str:
        """``precision``, with ``auto`` decided here, the one place: bf16 for ``--method piad`` on a
        device with bf16 units (:func:`bf16_unsupported`: AVX-512 BF16 or AMX, a GPU of sm80+), else
        fp32. The checkpoint and metrics.json record the precision decided."""
        if self.precision != "auto":
            return self.precision
        with contextlib.suppress(errors.UserError):  # no such device: validate() says so
            if self.method == "piad" and bf16_unsupported(resolve_device(self.device)) is None:
                return "bf16"
        return "fp32"

    @property
    def run_networks(self) -> str:
        """``networks``, or when left out the method's own: pgan for latent-norm, else piad."""
        return self.networks or ("pgan" if self.method == "latent-norm" else "piad")

    @property
    def pgan(self) -> bool:
        """Berg et al.'s pGAN networks, grown progressively (``--method latent-norm --networks pgan``)."""
        return self.method == "latent-norm" and self.run_networks == "pgan"

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of every conv net's tensors (``--channels-last``), in training and in evaluation."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def load_data(self, *, download: bool = False, protocols: dict | None = None) -> data_mod.AnomalyData:
        """The dataset these settings name (``data.load_dataset``; ``protocols``: other papers' splits,
        ``berg.system.PROTOCOLS``), with the ``calibration`` images held out and checked to be
        enough (``calibration.py``): train.py trains on it, evaluate.py re-evaluates a run on it.
        Failures caused by the settings raise :class:`errors.UserError`."""
        with errors.user_errors(ValueError, OSError, ImportError):  # the dataset named on the command line
            ds = data_mod.load_dataset(self.dataset, self.normal, root=self.data_root, seed=self.seed,
                                       contamination=self.contamination, protocol=self.protocol, download=download,
                                       image_size=self.image_size, preprocess=self.preprocess,
                                       protocols=protocols or {})
        with errors.user_errors(ValueError, prefix="--calibration: "):
            ds = calibration.hold_out_calibration(ds, self.calibration, seed=self.seed)
            if ds.calibration is not None:  # held out before training, checked here
                calibration.calibration_rank(len(ds.calibration), self.target_fpr)
        return ds

    def load_run_data(self, *, protocols: dict, theirs: Mapping) -> tuple["TrainConfig", data_mod.AnomalyData, dict]:
        """``(settings, dataset, notes for metrics.json)`` of a run: :meth:`load_data`, every random
        generator seeded first; when the dataset cannot be had here (not on disk, no download) and
        ``--fallback`` names another, that one instead (resolved with ``theirs``), said in one line."""
        try:
            return self, self._seeded().load_data(download=self.download, protocols=protocols), {}
        except errors.UserError as exc:
            if not self.fallback or not isinstance(exc.__cause__, data_mod.DatasetUnavailable):
                raise
        print(f"note: {self.dataset} cannot be had here; training on {self.fallback} instead (--fallback)",
              file=sys.stderr, flush=True)
        alt = dataclasses.replace(self, dataset=self.fallback, fallback=None, protocol=None).validate().resolved(theirs)
        return alt, alt._seeded().load_data(download=alt.download, protocols=protocols), {"fallback_from": self.dataset}

    def _seeded(self) -> "TrainConfig":
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        return self

    def run_dir(self) -> Path:
        """``--out``, or ``runs/<dataset>-<normal>-<method>-<loss>-c<P>-s<seed>`` (seed: after :meth:`resolved`)."""
        if self.out:
            return Path(self.out)
        seed = self.seed if self.seed is not None or self.pgan else 0
        name = f"{self.dataset}-{self.normal}-{self.method}-{self.loss}-c{self.contamination:g}-s{seed}"
        return Path("runs") / name.replace("/", "_")

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainConfig":
        """The (resolved) config a checkpoint of this version recorded."""
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise errors.BadFile(f"the checkpoint's settings {', '.join(unknown)} are not settings of this "
                                 "version of piad; use the version that wrote it")
        return cls(**saved)

    # Settings a resumed run may change: they change speed, where files are, or (reseed) the
    # random draws from the checkpoint on; the checkpoint's own statistics are used on resume.
    RESUMABLE = frozenset({"resume", "fallback", "progress", "device", "checkpoint_minutes", "evaluate", "iterations",
                           "data_root", "impl", "cache_features", "channels_last", "reseed", "out", "stats",
                           "tensorboard", "tensorboard_images", "threads", "keep_every"})

    def resume_conflicts(self, saved: "TrainConfig") -> list[str]:
        """The settings that differ from the checkpoint's and would change the maths of the run."""
        return [f"{flag(f.name)} {getattr(self, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
                for f in dataclasses.fields(self)
                if f.name not in self.RESUMABLE and getattr(saved, f.name) != getattr(self, f.name)]


def flag(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per field of ``cls``: type from the annotation, help, choices and ``--help`` group
    (:data:`GROUPS`) from the metadata, ``--x/--no-x`` (``BooleanOptionalAction``) for booleans."""
    hints = typing.get_type_hints(cls)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(cls):
        kind = next(t for t in (bool, int, float, str) if t in (hints[f.name], *typing.get_args(hints[f.name])))
        kw = dict(default=f.default, help=f.metadata["help"], dest=f.name)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=kind, choices=f.metadata["choices"])
            if f.default is not None:
                kw["help"] += f" (default: {f.default})"
        groups[f.metadata["group"]].add_argument(flag(f.name), **kw)


def parse_args(argv=None, *, prog: str = "train.py",
               description: str = "Train PIAD (Algorithm 1) on one normal class and evaluate it.") -> TrainConfig:
    """A :class:`TrainConfig` from command-line flags (``--debug`` is accepted and ignored here)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p)
    errors.add_debug_flag(p)
    args = vars(p.parse_args(argv))
    args.pop("debug")
    return TrainConfig(**args)
