"""Held-out normal images and the decision threshold's rank (not in the paper: an extension, ``--calibration``).

With ``--calibration F`` a seeded fraction F of the normal training images is held out before
training (:func:`hold_out_calibration`): never trained on, and not the test set. After training,
``evaluate.calibrate`` takes the :func:`calibration_rank`-th smallest of their scores as the
threshold above which an image is called anomalous, so that a new normal image is called anomalous
with probability at most ``--target-fpr`` (the conformal quantile). Without it, no threshold is made
and the protocols' training sets stay the authors'.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from torch.utils.data import Dataset

from data import AnomalyData
from readers import ImageFiles, TensorImages

CALIBRATION_STREAM = 27  # the calibration draw: default_rng([seed, 27]), apart from the protocols' draws


def _subset(ds: Dataset, idx: np.ndarray) -> Dataset:
    if isinstance(ds, TensorImages):
        return TensorImages(ds.images[idx], ds.labels[idx])
    if isinstance(ds, ImageFiles):
        return ImageFiles([ds.paths[i] for i in idx], ds.labels[idx], image_size=ds.image_size,
                          channels=ds.channels, crop=ds.crop, preprocess=ds.preprocess)
    raise TypeError(f"cannot take a subset of {type(ds).__name__}")


def hold_out_calibration(ds: AnomalyData, fraction: float, *, seed: int) -> AnomalyData:
    """``ds`` with a seeded ``fraction`` of its normal training images (label 0) moved out of
    ``train`` into ``calibration``: never trained on, and not the test set (which is untouched).
    Not in the paper (an extension, ``--calibration``); ``fraction`` 0 returns ``ds`` itself, so
    the protocols' training sets stay the authors' by default."""
    if not fraction:
        return ds
    labels = np.asarray(ds.train.labels)
    normal = np.flatnonzero(labels == 0)
    n = round(fraction * len(normal))
    if not 1 <= n < len(normal):
        raise ValueError(f"calibration={fraction} of {len(normal)} normal training images holds out {n}: "
                         "it must leave at least one image on each side")
    held = np.sort(np.random.default_rng([seed, CALIBRATION_STREAM]).choice(normal, n, replace=False))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    ids = ds.info.get("train_ids") or [f"train:{i}" for i in range(len(labels))]
    info = {**ds.info, "train_ids": [ids[i] for i in keep], "calibration_ids": [ids[i] for i in held],
            "n_calibration": n, "n_train_normal": len(normal) - n, "calibration_seed": [seed, CALIBRATION_STREAM]}
    return dataclasses.replace(ds, train=_subset(ds.train, keep), calibration=_subset(ds.train, held), info=info,
                               contamination=float(labels[keep].sum()) / len(keep))


def calibration_rank(n: int, target_fpr: float) -> int:
    """k = ⌈(n + 1)(1 − α)⌉, α = ``target_fpr``: the threshold is the k-th smallest of n calibration
    scores (the conformal quantile). A new normal image, exchangeable with the calibration images,
    then scores above it with probability (n + 1 − k) / (n + 1) ≤ α. Raises ValueError when
    k > n (fewer than (1 − α) / α calibration images)."""
    k = math.ceil((n + 1) * (1 - target_fpr) - 1e-9)  # 1e-9: (n + 1)(1 − α) whole up to rounding
    if k > n:
        need = math.ceil((1 - target_fpr) / target_fpr - 1e-9)
        raise ValueError(f"{n} calibration images are too few for --target-fpr {target_fpr:g} (at least "
                         f"{need}): raise --calibration or --target-fpr")
    return max(k, 1)
