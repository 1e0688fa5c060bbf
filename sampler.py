"""Minibatches of Algorithm 1 (lines 3 and 7: "sample a minibatch of real images"), and the cache of
their VGG features (no paper section: a speed-up that keeps the maths).

:class:`Sampler` draws uniform minibatches with replacement from a seeded generator that the
checkpoint saves; lazy datasets (LSUN, CelebA: files decoded on demand) are decoded in threads.
With :func:`cached_features` the real images' VGG features of eq. (3) are computed once, without
an autograd graph (VGG-19 is frozen), and handed out with their images.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from readers import TensorImages, image_batches


class Sampler:
    """Uniform minibatches (with replacement) from a seeded generator that is checkpointed:
    ``sampler()`` -> (images (B, C, S, S) on ``device``, their cached features or None)."""

    def __init__(self, ds, batch_size: int, device, *, seed: int, features=None,
                 memory_format=torch.contiguous_format):
        self.ds, self.batch_size, self.device, self.features = ds, batch_size, device, features
        self.memory_format = memory_format
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = None if isinstance(ds, TensorImages) else ThreadPoolExecutor(4)

    def __call__(self, n: int | None = None):  # n: a minibatch of another size (progressive growing)
        idx = torch.randint(len(self.ds), (n or self.batch_size,), generator=self.gen)
        if self.pool is None:
            x = self.ds.images[idx]
        else:  # lazy datasets (LSUN, CelebA): decode in threads
            x = torch.stack(list(self.pool.map(lambda i: self.ds[int(i)][0], idx)))
        fx = self.features[idx].to(self.device, non_blocking=True) if self.features is not None else None
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True), fx


def cached_features(rec_loss, train, device, *, when: str, draws: int) -> torch.Tensor | None:
    """The VGG features of every training image (on the CPU), or None: ``when`` is ``--cache-features``
    (on, off, or auto: when the run draws more than twice as many images, ``draws``, as there are)."""
    if rec_loss.features is None or not isinstance(train, TensorImages):
        return None
    if when == "off" or (when == "auto" and draws <= 2 * len(train)):
        return None
    return torch.cat([rec_loss.real_features(x).cpu() for x in image_batches(train, device)])
