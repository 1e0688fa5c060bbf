"""Live training curves in TensorBoard (an extension; the values of Algorithm 1 that train.py logs).

``python train.py ... --tensorboard`` writes, beside ``log.csv`` (always written), every logged
loss and γ_G, γ_E (the same rows, every ``--log-every`` iterations) and, every
``--tensorboard-images`` iterations, a grid of fixed training images x above their reconstructions
G(E(x)) to ``RUN/tb/``; watch it with ``tensorboard --logdir RUN/tb``. It needs the optional
package ``tensorboard`` (``pip install .[tensorboard]``). Nothing here evaluates on the test set:
the paper's protocols have no validation split, and a curve of test ROC AUC during training would
invite choosing the iteration on the test set.
"""
from __future__ import annotations

from pathlib import Path

import torch

class TensorBoardLog:
    """Writes to ``folder``: ``log(it, row)`` one scalar per value of a log row (``loss/...``,
    ``gamma/...``); ``reconstructions(it, model)`` the first ``n`` images of the training set
    ``train`` (items (image in [-1, 1], label)) above G(E(x)). ``start``: on resume, events after
    this iteration are dropped."""

    def __init__(self, folder, train, *, every: int, start: int = 0, n: int = 8):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: optional

        self.writer = SummaryWriter(str(Path(folder)), purge_step=start or None)
        self.images = torch.stack([train[i][0] for i in range(min(n, len(train)))])  # (n, C, S, S)
        self.every = every

    def log(self, it: int, row: dict) -> None:
        for k, v in row.items():
            self.writer.add_scalar(("gamma/" if k.startswith("gamma") else "loss/") + k, float(v), it)
        self.writer.flush()

    def reconstructions_due(self, it: int, last: int) -> bool:
        return it % self.every == 0 or it == last

    @torch.no_grad()
    def reconstructions(self, it: int, model) -> None:
        """x (top row) above G(E(x)) (bottom row); the model's mode is restored (no RNG is drawn)."""
        import torchvision

        was_training = model.training
        model.eval()
        x = self.images.to(next(model.parameters()).device)
        rec = model.reconstruct(x)  # G(E(x)); pgan: at the final size, as the images
        model.train(was_training)
        grid = torchvision.utils.make_grid(torch.cat([x, rec]).float().cpu().clamp(-1, 1), nrow=len(x),
                                           normalize=True, value_range=(-1, 1))
        self.writer.add_image("reconstructions (x above G(E(x)))", grid, it)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
