"""Latent-norm anomaly detection of Berg, Ahlberg and Felsberg, *Unsupervised Adversarial
Learning of Anomaly Detection in the Wild* (ECAI 2020, arXiv 1905.11034), as a second method.

What is implemented (``python train.py --method latent-norm``):

* A WGAN-GP (G, D_X) is trained on the training images; the encoder E is trained jointly with
  it, on generated images only, with the cycle loss ``|G(z) - G(E(G(z)))|_1`` where z is drawn
  from a narrowed prior ``0.1 · N(0, I)`` (as in the authors' code). Only E is updated by this
  loss: G receives no gradient from it.
* The anomaly score is ``||E(x)||_2``: E maps images the GAN can generate near the prior's
  centre, and anomalies (which it cannot generate) further out.

Deviations from the original, one per line:

* Networks: ``piad.py``'s G, E and D_X of the dataset's preset (D_Z is built but unused), not pGAN.
* Optimiser: PIAD's Adam, betas (0.5, 0.99), lr 5e-4 D_X / 2e-4 G and E, not pGAN's β1 = 0, lr 0.0015.
* Critic: PIAD's WGAN-GP, n_dis steps of eq. 5 with GP weight 10 and drift 0.001, per G/E step.
* Resolution: fixed at the preset's image size; the original grows it progressively.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import piad

if TYPE_CHECKING:
    import train

PRIOR_SCALE = 0.1  # the encoder's training latents: z ~ 0.1 · N(0, I)


def sample_narrow_latent(model: piad.PIAD, n: int) -> torch.Tensor:
    """``n`` draws of z ~ PRIOR_SCALE · N(0, I), shape (n, *latent_shape)."""
    return PRIOR_SCALE * model.sample_latent(n)


def cycle_loss(model: piad.PIAD, z: torch.Tensor) -> torch.Tensor:
    """``mean |G(z) - G(E(G(z)))|_1`` (scalar). G(z) is made without a graph (it is E's input
    and the target); the graph of ``G(E(·))`` reaches G's parameters too, so callers that want
    E's gradients only differentiate w.r.t. E's parameters (see :meth:`LatentNormTrainer.encoder_step`)."""
    with torch.no_grad():
        x_fake = model.G(z)  # (B, C, S, S)
    return (model.G(model.E(x_fake)) - x_fake).abs().mean()


@torch.no_grad()
def latent_norm_score(model: piad.PIAD, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Anomaly score ``||E(x)||_2`` per image, (N, C, S, S) -> (N,), higher = more anomalous."""
    device = next(model.parameters()).device
    out = [model.E(x[i:i + batch_size].to(device)).flatten(1).norm(dim=1).to(x.device)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0)


class LatentNormTrainer:
    """One iteration per :meth:`step`: n_dis critic steps (D_X), one G step, one E step."""

    def __init__(self, model: piad.PIAD, cfg: train.TrainConfig | None = None):
        self.model, self.cfg = model, cfg
        p = model.config
        self.opt_d = torch.optim.Adam(model.DX.parameters(), lr=p.lr_critic, betas=p.betas)
        self.opt_g = torch.optim.Adam(model.G.parameters(), lr=p.lr_gen, betas=p.betas)
        self.opt_e = torch.optim.Adam(model.E.parameters(), lr=p.lr_gen, betas=p.betas)

    def critic_step(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.model, self.model.config
        with torch.no_grad():
            x_fake = m.G(m.sample_latent(x.shape[0]))
        loss, _ = piad.critic_loss(m.DX, x, x_fake, gp_weight=p.gp_weight, drift=p.drift)  # eq. (5)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.detach()

    def generator_step(self, x: torch.Tensor, *, real_term: bool = True) -> torch.Tensor:
        """Eq. (6) for G; ``real_term=False`` drops E[D(x)] (a constant: same gradients)."""
        m = self.model
        for q in m.DX.parameters():  # the critic is frozen: only G gets gradients
            q.requires_grad_(False)
        try:
            fake = m.G(m.sample_latent(x.shape[0]))
            adv = piad.adversarial_loss(m.DX, x if real_term else None, fake)  # eq. (6)
            self.opt_g.zero_grad(set_to_none=True)
            adv.backward()
            self.opt_g.step()
        finally:
            for q in m.DX.parameters():
                q.requires_grad_(True)
        return adv.detach()

    def encoder_step(self, n: int) -> torch.Tensor:
        """Cycle loss on G(z), z ~ 0.1·N(0, I); gradients w.r.t. E's parameters only."""
        params = list(self.model.E.parameters())
        loss = cycle_loss(self.model, sample_narrow_latent(self.model, n))
        grads = torch.autograd.grad(loss, params)  # G's and D_X's .grad are left untouched
        self.opt_e.zero_grad(set_to_none=True)
        for q, g in zip(params, grads):
            q.grad = g
        self.opt_e.step()
        return loss.detach()

    def step(self, it: int, sample, *, log: bool = True) -> dict:
        """One iteration; ``log=False`` skips the real-data term of eq. (6), which only makes
        the logged ``adv_g`` equal to the paper's loss."""
        for _ in range(self.model.config.n_dis):  # critic steps, as Alg. 1 lines 2-6 (D_X only)
            x, _ = sample()
            loss_dx = self.critic_step(x)
        x, _ = sample()
        adv_g = self.generator_step(x, real_term=log)
        cycle = self.encoder_step(x.shape[0])
        return {"loss_dx": loss_dx, "adv_g": adv_g, "cycle": cycle}

    def state_dict(self) -> dict:
        return {"opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_e": self.opt_e.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.opt_d.load_state_dict(s["opt_d"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_e.load_state_dict(s["opt_e"])
