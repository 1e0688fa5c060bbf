"""An exported scorer: the anomaly score of eq. (1) and its map as one ``torch.export`` program (§3.1, §4).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019) scores an image by
``A(x) = L(x, G(E(x)))`` (eq. 1) with the relative-perceptual-L1 distance L of eq. (3)-(4). The
program written by :func:`export_scorer` (``python evaluate.py --checkpoint RUN/checkpoint.pt
--export scorer.pt2``) holds all of it: the preprocessing of ``readers.prepare`` ([0, 1] -> [-1, 1]),
E, G, the VGG-19 up to relu4_2 with its input normalisation, the statistics μ, σ of eq. (3) and
eq. (4). Its module takes a float batch (N, C, S, S) in [0, 1] at the run's image size S and
returns ``(scores (N,), maps (N, S/8, S/8))``: each map is eq. (4) position by position and sums
to its score (:func:`losses.rel_perc_l1_torch`, ``per_position=True``). A run with a calibrated threshold
(``evaluate.calibrate``, ``--calibration``) also returns ``anomalous`` (N,) bool: the run's primary score (the map's
distance, another distance of eq. (1) or ‖E(x)‖) above the threshold. Loading it needs torch only::

    scorer = torch.export.load("scorer.pt2").module()
    scores, maps = scorer(images)  # images: (N, C, S, S) float32 in [0, 1]
    scores, maps, anomalous = scorer(images)  # a run with a threshold

The distance is computed with the PyTorch formula, not the fused op of ``csrc/``: the op has a
fake kernel and would trace, but the saved program would then call ``torch.ops.piad.*``, which
only exists where piad's compiled extension is loaded. The settings of the run (image size,
channels, distance, VGG weights, the threshold and the preprocessing that makes the input from an
image file: ``readers.prepare``'s shorter side resized to S and centre crop, with the run's
``--preprocess``) are stored beside the program as ``extra_files["piad.json"]``.
ONNX is not written: the exporter needs the ``onnx``/``onnxscript`` packages, which piad does
not depend on.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

import losses
import piad
import rundir

META = "piad.json"  # the name of the settings file inside the .pt2 archive


class Scorer(nn.Module):
    """Images (N, C, S, S) in [0, 1] -> ``(A(x) (N,), maps (N, h, w))`` with the distance of ``loss``
    (a ``losses.ReconstructionLoss``, e.g. ``evaluate.map_loss``) between x and G(E(x)); with a
    ``threshold`` (``evaluate.calibrate``) also ``anomalous`` (N,): the threshold's score above it,
    computed by ``decide_by`` (a distance) or, for ``latent-norm``, as ‖E(x)‖₂."""

    def __init__(self, model: piad.PIAD, loss: losses.ReconstructionLoss, threshold: dict | None = None,
                 decide_by: losses.ReconstructionLoss | None = None):
        super().__init__()
        self.E, self.G, self.loss = model.E, model.G, loss  # loss.map is PyTorch (module docstring)
        self.decides = threshold is not None
        self.by_norm = self.decides and threshold["score"] == "latent-norm"
        if self.decides and not self.by_norm and decide_by is None and threshold["score"] != loss.kind:
            raise ValueError(f"the threshold is on {threshold['score']}: give its distance as decide_by")
        self.decide_by = decide_by
        self.register_buffer("threshold", torch.tensor(threshold["threshold"] if self.decides else float("nan")))

    def forward(self, images: torch.Tensor):
        x = images * 2 - 1                       # readers.prepare: [0, 1] -> [-1, 1]
        z = self.E(x)
        xr = self.G(z)
        maps = self.loss.map(x, xr)              # eq. (4) per position, (N, h, w)
        scores = maps.flatten(1).sum(1)          # eq. (1): A(x), the sum of its map
        if not self.decides:
            return scores, maps
        if self.by_norm:
            primary = z.flatten(1).norm(dim=1)   # ‖E(x)‖₂, as latent_norm.code_norms
        else:
            primary = scores if self.decide_by is None else self.decide_by(x, xr)
        return scores, maps, primary > self.threshold


def export_scorer(model: piad.PIAD, loss: losses.ReconstructionLoss, path, *, image_size: int, channels: int,
                  threshold: dict | None = None, decide_by: losses.ReconstructionLoss | None = None,
                  extra: dict | None = None, overwrite: bool = False) -> dict:
    """Writes the :class:`Scorer` of ``model``, ``loss`` (and ``threshold``, ``decide_by``) to
    ``path`` (``torch.export.save``, atomically; an existing file only with ``overwrite``), with a
    dynamic batch size; returns the settings stored beside it."""
    device = next(model.parameters()).device
    scorer = copy.deepcopy(Scorer(model, loss, threshold, decide_by)).to(device).eval()
    scorer.requires_grad_(False)  # outputs carry no graph
    example = torch.rand(2, channels, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(scorer, (example,), dynamic_shapes=({0: batch},))
    outputs = ["scores (N,)", "maps (N, h, w), each summing to its score"]
    meta = {"image_size": image_size, "channels": channels, "distance": loss.kind,
            "vgg_weights": loss.weights_id, "input": "float (N, C, S, S) in [0, 1]",
            "preprocessing": "image file: shorter side resized to S, centre crop S×S, channels (readers.prepare), "
                             "then [0, 1]; the program maps it to [-1, 1]",
            "threshold": threshold,
            "outputs": outputs + ([f"anomalous (N,) bool: {threshold['score']} > {threshold['threshold']!r}"]
                                  if threshold else []), **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(path, lambda fh: torch.export.save(program, fh, extra_files={META: json.dumps(meta)}),
                        overwrite=overwrite)
    return meta
