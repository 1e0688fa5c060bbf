"""An exported scorer: the anomaly score of eq. (1) and its map as one ``torch.export`` program (§3.1, §4).

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019) scores an image by
``A(x) = L(x, G(E(x)))`` (eq. 1) with the relative-perceptual-L1 distance L of eq. (3)-(4). The
program written by :func:`export_scorer` (``python evaluate.py --checkpoint RUN/checkpoint.pt
--export scorer.pt2``) holds all of it: the preprocessing of ``readers.prepare`` ([0, 1] -> [-1, 1]),
E, G, the VGG-19 up to relu4_2 with its input normalisation, the statistics μ, σ of eq. (3) and
eq. (4). Its module takes a float batch (N, C, S, S) in [0, 1] at the run's image size S and
returns ``(scores (N,), maps (N, S/8, S/8))``: each map is eq. (4) position by position and sums
to its score (:func:`losses.rel_perc_l1_torch`, ``per_position=True``). Loading it needs torch only::

    scorer = torch.export.load("scorer.pt2").module()
    scores, maps = scorer(images)  # images: (N, C, S, S) float32 in [0, 1]

The distance is computed with the PyTorch formula, not the fused op of ``csrc/``: the op has a
fake kernel and would trace, but the saved program would then call ``torch.ops.piad.*``, which
only exists where piad's compiled extension is loaded. The settings of the run (image size,
channels, distance, VGG weights) are stored beside the program as ``extra_files["piad.json"]``.
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

META = "piad.json"  # the name of the settings file inside the .pt2 archive


class Scorer(nn.Module):
    """Images (N, C, S, S) in [0, 1] -> ``(A(x) (N,), maps (N, h, w))`` with the distance of ``loss``
    (a ``losses.ReconstructionLoss``, e.g. ``evaluate.map_loss``) between x and G(E(x))."""

    def __init__(self, model: piad.PIAD, loss: losses.ReconstructionLoss):
        super().__init__()
        self.E, self.G, self.loss = model.E, model.G, loss  # loss.map is PyTorch (module docstring)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images * 2 - 1                       # readers.prepare: [0, 1] -> [-1, 1]
        maps = self.loss.map(x, self.G(self.E(x)))  # eq. (4) per position, (N, h, w)
        return maps.flatten(1).sum(1), maps      # eq. (1): A(x), the sum of its map


def export_scorer(model: piad.PIAD, loss: losses.ReconstructionLoss, path, *, image_size: int, channels: int,
                  extra: dict | None = None) -> dict:
    """Writes the :class:`Scorer` of ``model`` and ``loss`` to ``path`` (``torch.export.save``), with a
    dynamic batch size; returns the settings stored beside it."""
    scorer = copy.deepcopy(Scorer(model, loss)).eval().requires_grad_(False)  # outputs carry no graph
    device = next(model.parameters()).device
    example = torch.rand(2, channels, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(scorer, (example,), dynamic_shapes=({0: batch},))
    meta = {"image_size": image_size, "channels": channels, "distance": loss.kind,
            "vgg_weights": loss.weights_id, "input": "float (N, C, S, S) in [0, 1]",
            "outputs": ["scores (N,)", "maps (N, h, w), each summing to its score"], **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={META: json.dumps(meta)})
    return meta
