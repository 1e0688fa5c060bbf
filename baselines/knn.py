"""k nearest neighbours on PIAD's features: the simple baseline beside PIAD (not in the paper).

DN2 (Bergman, Cohen & Hoshen 2020, "Deep Nearest Neighbor Anomaly Detection") scores an image by
its mean Euclidean distance to its k nearest normal training images in ImageNet-pretrained
features, with no training at all. Here the features are PIAD's own f of §3.1 (the VGG-19 of
``--vgg-weights`` up to relu4_2, ``features.VGG19Features``), on the same images as a PIAD run
(``data.py``'s protocol, preprocessing, contamination and calibration hold-out), so that the two
can be set side by side. ``python train.py ... --method knn [--knn-k K]`` chooses it.

* The space: an image's relu4_2 map flattened, (C·h·w,) (512·4·4 at 32×32), no μ/σ of eq. (3),
  no pooling.
* The bank: the features of every training image (contaminants included, as PIAD trains on
  them; never the held-out calibration images), stored in ``checkpoint.pt`` with the settings,
  so ``evaluate.py --checkpoint`` and ``--images`` score without the dataset.
* The score ``knn``: mean over the k nearest bank rows of ‖f(x) − f(n)‖₂ (a training image
  scores 0 at k = 1). The search runs ``torch.cdist`` over the bank in chunks of
  :data:`CHUNK` rows, keeping the k best (memory: a batch × CHUNK distances beside the bank,
  N·D·4 bytes); the k distances are then recomputed directly (no ‖a‖² + ‖b‖² − 2ab cancellation).
* Its map: position p of an image gets mean_j ‖f_p(x) − f_p(n_j)‖² / ‖f(x) − f(n_j)‖, which sums to
  the score over the positions (the neighbour's share of the distance, where it lies).

There is no step, no log.csv and no reconstruction: ``reconstructions.png`` and ``curves.png``
are not written (one ``note:`` line says so), nor can ``--export`` write a k-NN scorer.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import checkpoint
import data as data_mod
import errors
from features import VGG19Features
from tools import provenance

SCORE = "knn"  # the score's name in metrics.json and scores.csv
LAYER = "relu4_2"  # PIAD's f (supplement §1.1)
CHUNK = 4096  # bank rows per torch.cdist call: memory bounded by batch × CHUNK distances
NOT_WRITTEN = ("note: --method knn has no networks and no training steps: reconstructions.png and curves.png "
               "are not written")


class KNN(nn.Module):
    """The frozen VGG-19 f and the bank of the normal training images' flattened f(x), (N, C·h·w)."""

    def __init__(self, vgg: VGG19Features, bank: torch.Tensor, shape: tuple[int, int, int], k: int):
        super().__init__()
        self.features, self.shape, self.k = vgg, tuple(shape), k
        self.register_buffer("bank", bank)

    @property
    def weights_id(self) -> str:
        return self.features.weights_id

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) flattened, (B, C·h·w), float32."""
        return self.features(x.to(self.bank.device)).flatten(1).float()

    @torch.no_grad()
    def neighbours(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest bank rows of each row of ``q`` (B, D): (distances (B, k), indices (B, k)),
        nearest first."""
        best_d = q.new_empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for start in range(0, len(self.bank), CHUNK):
            chunk = self.bank[start:start + CHUNK]
            rows = torch.arange(start, start + len(chunk), device=q.device).expand(len(q), -1)
            d = torch.cat([best_d, torch.cdist(q, chunk)], 1)  # (B, k + chunk): the search only
            best_d, j = d.topk(min(self.k, d.shape[1]), dim=1, largest=False)
            best_i = torch.cat([best_i, rows], 1).gather(1, j)
        exact = torch.stack([(q - self.bank[i]).norm(dim=1) for i in best_i.T], 1)  # (B, k), no cancellation
        exact, order = exact.sort(dim=1)
        return exact, best_i.gather(1, order)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The score of images ``x`` (B, C, S, S) in [-1, 1]: mean distance to the k nearest, (B,)."""
        return self.neighbours(self.embed(x))[0].mean(1)

    def map(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's score position by position, (B, h, w), summing to :meth:`score`."""
        q = self.embed(x)
        dist, idx = self.neighbours(q)
        shares = [(q - self.bank[i]).view(len(q), *self.shape).pow(2).sum(1) / d.clamp_min(1e-12)[:, None, None]
                  for d, i in zip(dist.T, idx.T)]  # each neighbour's ‖f_p(x) − f_p(n)‖² / ‖f(x) − f(n)‖
        return torch.stack(shares).mean(0)

    def scores(self, ds, *, batch_size: int = 256, maps: bool = False) -> tuple[dict, np.ndarray]:
        """``{"knn": (N,)}`` (and with ``maps`` ``"map"``: (N, h, w)) and the labels of every item
        of ``ds`` (items (image, label)), in dataset order: ``evaluate.compute_scores``'s form."""
        out, labels = {SCORE: [], **({"map": []} if maps else {})}, []
        for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
            out[SCORE].append(self.score(x).cpu())
            if maps:
                out["map"].append(self.map(x).cpu())
            labels.append(torch.as_tensor(y))
        return {k: torch.cat(v).numpy() for k, v in out.items()}, torch.cat(labels).numpy()

    def state(self) -> dict:
        """What ``checkpoint.pt`` holds of the method (:meth:`from_state` rebuilds it)."""
        return {"bank": self.bank.cpu(), "shape": list(self.shape), "k": self.k, "layer": LAYER,
                "vgg_weights": self.weights_id}

    @classmethod
    def from_state(cls, state: dict, weights: str, device) -> "KNN":
        """The method of a k-NN checkpoint's ``state``, its VGG-19 loaded from ``weights`` (the
        run's ``--vgg-weights``), which must be the ones its bank was computed with."""
        s = state["knn"]
        with errors.user_errors(OSError, ValueError, RuntimeError, prefix="the run's VGG weights: "):
            vgg = VGG19Features(s["layer"], weights)
        if vgg.weights_id != s["vgg_weights"]:
            raise errors.UserError(f"the run's VGG weights {weights!r} load as {vgg.weights_id}, but its feature "
                                   f"bank was computed with {s['vgg_weights']}")
        return cls(vgg, s["bank"], tuple(s["shape"]), s["k"]).to(device)


def fit(cfg, ds: data_mod.AnomalyData, state: dict | None, device) -> tuple[KNN, dict]:
    """The k-NN of ``cfg`` (``--knn-k``, ``--vgg-weights``) on ``ds``'s training images, saved as the
    run's ``checkpoint.pt`` (``state``: that of the run being resumed, whose bank is reused);
    returns it and what metrics.json records of it."""
    if cfg.knn_k > len(ds.train):
        raise errors.UserError(f"--knn-k {cfg.knn_k} is more than the {len(ds.train)} training images; "
                               f"choose 1..{len(ds.train)}")
    t0 = time.time()
    if state is not None:
        model = KNN.from_state(state, cfg.vgg_weights, device)
    else:
        with errors.user_errors(OSError, ValueError, RuntimeError):  # the VGG weights named by the user
            vgg = VGG19Features(LAYER, cfg.vgg_weights).to(device)
        with torch.no_grad():
            feats = [vgg(x) for x in data_mod.image_batches(ds.train, device)]
        print(f"k-NN: {len(ds.train)} training images -> bank of {sum(map(len, feats))} × "
              f"{feats[0][0].numel()} features ({LAYER})", file=sys.stderr, flush=True)
        model = KNN(vgg, torch.cat([f.flatten(1).float() for f in feats]), tuple(feats[0].shape[1:]), cfg.knn_k)
        run = cfg.run_dir()
        run.mkdir(parents=True, exist_ok=True)
        checkpoint.save_checkpoint(run / checkpoint.CHECKPOINT, {
            "format": checkpoint.CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "iteration": 0,
            "iterations": 0, "elapsed_s": time.time() - t0, "channels": ds.channels, "image_size": ds.image_size,
            "knn": model.state(), "vgg_weights": model.weights_id, "provenance": provenance.record(device)})
    info = {"iterations": 0, "train_time_s": round(time.time() - t0, 1), "device": str(device),
            "threads": torch.get_num_threads(), "precision": "fp32", "contamination": ds.contamination,
            "knn": {"k": model.k, "space": f"{LAYER} flattened", "bank": list(model.bank.shape)},
            "loss": None, "weights_policy": None}  # PIAD's settings: not used by a k-NN
    return model, info
