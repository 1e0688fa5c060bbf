"""The evaluation protocol of Berg, Ahlberg and Felsberg (ECAI 2020) as their ``dataset_tool.py``
builds it (``create_cifar10_anomaly_detection``, ``create_mnist_anomaly_detection``):
``--protocol berg`` of ``data.DATASETS`` (MNIST, Fashion-MNIST, CIFAR-10); ``data.load_dataset`` applies
it when given :func:`apply` (``berg.system.PROTOCOLS``), and this module counts contaminants with
``data.n_contaminants``.

* CIFAR-10: the normal set is a group of classes, the vehicles {airplane, automobile, ship,
  truck} = {0, 1, 8, 9}; the animals {2, ..., 7} are the anomalies (their code; its comments say
  the reverse). Here the group of the ``--normal`` class is normal, so ``--normal airplane`` is
  theirs and ``--normal cat`` the inverse task. Test: 1,000 normal + 1,000 anomalous images drawn
  at random from the official test batch.
* MNIST (and Fashion-MNIST, by the same code path): one class normal, the whole test split tests;
  the 28×28 images are zero-padded to 32×32 (their ``np.pad(..., 2)``), not resized.
* Contamination P: ``int(P · n_normal / (1 − P))`` images (floor, their formula) drawn at random
  from the anomalous classes of the training split are added to the training set. Their
  ``config.py`` names datasets made with P = 0.0 (``mnist_2_0.0``) and 0.02 (``cifar10_ab1_0.02``).

Deviation: their draws use Python's unseeded ``random.shuffle``; here one seeded NumPy generator.
"""
from __future__ import annotations

import numpy as np

from data import n_contaminants

CIFAR10_GROUPS = {"vehicles": (0, 1, 8, 9), "animals": (2, 3, 4, 5, 6, 7)}  # dataset_tool.py
CIFAR10_TEST_PER_SIDE = 1000  # their I_normal[0:1000], I_anomaly[0:1000]
MNIST_PAD = 2  # 28×28 -> 32×32, zeros


def normal_classes(dataset: str, k: int) -> tuple[str, tuple[int, ...]]:
    """(name, classes) of the normal set whose class ``k`` the user named."""
    if dataset == "cifar10":
        return next((g, c) for g, c in CIFAR10_GROUPS.items() if k in c)
    return str(k), (k,)


def split(train_labels, test_labels, normal: tuple[int, ...], *, seed: int, contamination: float,
          test_per_side: int | None = None):
    """Indices ``(train, train_is_anomalous, test, test_is_anomalous)``, each sorted by index.

    Training: every normal image of the training split plus the contaminants; test: the whole
    test split, or ``test_per_side`` random normal and as many random anomalous images (CIFAR-10)."""
    rng = np.random.default_rng(seed)
    tr_normal = np.isin(np.asarray(train_labels), normal)
    te_normal = np.isin(np.asarray(test_labels), normal)
    n_anom = n_contaminants(contamination, int(tr_normal.sum()), floor=True)
    pool = rng.permutation(np.flatnonzero(~tr_normal))
    if n_anom > len(pool):
        raise ValueError(f"contamination={contamination} needs {n_anom} anomalous images but only "
                         f"{len(pool)} are available")
    train = np.concatenate([np.flatnonzero(tr_normal), pool[:n_anom]])
    test_n, test_a = np.flatnonzero(te_normal), np.flatnonzero(~te_normal)
    if test_per_side is not None:
        if min(len(test_n), len(test_a)) < test_per_side:
            raise ValueError(f"the test split needs {test_per_side} normal and {test_per_side} anomalous images")
        test_n, test_a = rng.permutation(test_n)[:test_per_side], rng.permutation(test_a)[:test_per_side]
    test = np.concatenate([test_n, test_a])
    out = []
    for idx, n_norm in ((train, int(tr_normal.sum())), (test, len(test_n))):
        labels = np.r_[np.zeros(n_norm, np.int64), np.ones(len(idx) - n_norm, np.int64)]
        order = np.argsort(idx, kind="stable")
        out += [idx[order].astype(np.int64), labels[order]]
    return tuple(out)


def pad_mnist(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 32, 32), zero border of 2 (their ``np.pad``)."""
    return np.pad(images, [(0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)])


def apply(dataset: str, k: int, pools: dict, *, seed: int, contamination: float):
    """The protocol on the official pools ``{"train": (images, labels), "test": ...}`` of
    ``dataset`` with class ``k`` named normal: ``(normal set's name, split(...)'s indices,
    train images, test images)``, MNIST-sized images padded to 32×32."""
    name, normal = normal_classes(dataset, k)
    (trx, try_), (tex, tey) = pools["train"], pools["test"]
    per_side = CIFAR10_TEST_PER_SIDE if dataset == "cifar10" else None
    idx = split(try_, tey, normal, seed=seed, contamination=contamination, test_per_side=per_side)
    if trx.ndim == 3 and trx.shape[-1] == 28:
        trx, tex = pad_mnist(trx), pad_mnist(tex)
    return name, idx, trx, tex
