"""Latent-norm anomaly detection of Berg, Ahlberg and Felsberg, *Unsupervised Adversarial
Learning of Anomaly Detection in the Wild* (ECAI 2020, arXiv 1905.11034), as a second method.

What is implemented (``python train.py --method latent-norm``), following the authors' code
(github.com/amandaberg/GANanomalyDetection, files named below):

* One prior for everything: the critic D_X, the generator G and the encoder E all draw
  z ~ 0.1 · N(0, I) (their ``loss.py``: ``D_wgangp_acgan``, ``G_wgan_acgan``, ``E_wgangp_acgan``).
* G normalises its input latent (pixel-norm, their ``networks.py`` ``G_paper``,
  ``normalize_latents=True``), so G depends on the latent's direction only.
* Per iteration (their ``train.py``, ``D_repeats=1``): one critic step (eq. 5), one G step
  (eq. 6), one E step on the cycle loss ``mean |G(z) - G(E(G(z)))|`` (gradients to E only; E is
  trained against the live G).
* The anomaly score is ``||E(x)||_2`` (the paper's score): :func:`code_norms` of
  ``model.encode(x)``. For diagnosis, evaluate.py also writes ``latent-norm-centred`` =
  ``||E(x) - c||``, c = mean E(G(z)) (:func:`encode_prior`), and the histograms
  ``latent_norms.png`` (:func:`plot_latent_norms`); docs/latent-norm.md says why they differ.

The seam: training and scoring reach the networks only through :class:`Networks` (G, E, the
image critic, the prior's draws, ``encode``, ``reconstruct``), which ``piad.PIAD`` and
``pgan.PGAN`` both are; :class:`LatentNormTrainer` is given its optimiser and loss settings by
whoever builds it (``berg.system.trainer``).

Networks: ``--networks pgan`` (the default) trains their own networks grown progressively with
these losses and steps (``pgan.py``, ``progressive.py``; docs/berg.md). The deviations below are
those of ``--networks piad`` (ours), one per line:

* Networks: ``piad.py``'s G, E and D_X of the dataset's preset (D_Z is built but unused), not pGAN;
  no progressive growing: the resolution is fixed at the preset's image size.
* Only G's input is pixel-normalised; pGAN's pixel-norm after every G layer, equalised learning
  rate and their E (D's trunk ending in a dense layer + leaky ReLU) are not reproduced.
* Optimiser: PIAD's Adam (``presets.network``: betas, learning rates, weight decay) and batch size,
  not pGAN's β1 = 0, lr 0.001, batch 64-128; the critic's drift term is on real scores only, as theirs.
* No moving average of G (their ``Gs``, β = 0.999): they use it for sample grids and their
  reconstruction-based detector; E is trained against the live G and ‖E(x)‖ does not involve G.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

import figures
import piad

PRIOR_SCALE = 0.1  # loss.py: D, G and E all draw latents = 0.1 * N(0, I)
PIXEL_NORM_EPS = 1e-8  # networks.py pixel_norm's epsilon
GP_WEIGHT = 10.0  # loss.py D_wgangp_acgan wgan_lambda (their pGAN runs)
DRIFT = 1e-3  # loss.py wgan_epsilon, on real scores only (their pGAN runs)


class Networks(Protocol):
    """What latent-norm training and scoring use of a model: ``piad.PIAD`` (with a
    :class:`PixelNormGenerator`, ``--networks piad``) and ``pgan.PGAN`` (``--networks pgan``)."""

    G: nn.Module  # latents (B, *latent_shape) -> images
    E: nn.Module  # images -> codes (B, *latent_shape)

    @property
    def image_critic(self) -> nn.Module:
        """D_X of eq. (5): images (B, C, S, S) -> scores, higher = more real."""

    def sample_latent(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of N(0, I), (n, *latent_shape), on the model's device."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code of each image that the score ``||encode(x)||`` reads, (B, *latent_shape)."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(encode(x)), the size of ``x``."""


def sample_prior(model: Networks, n: int) -> torch.Tensor:
    """``n`` draws of z ~ PRIOR_SCALE · N(0, I), shape (n, *latent_shape): the one prior of D, G and E."""
    return PRIOR_SCALE * model.sample_latent(n)


def pixel_norm(z: torch.Tensor, eps: float | torch.Tensor = PIXEL_NORM_EPS) -> torch.Tensor:
    """``z / sqrt(mean_c z_c^2 + eps)`` over the channel dim: (B, C, h, w) -> (B, C, h, w)."""
    return z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + eps)


class PixelNormGenerator(piad.Generator):
    """``piad.Generator`` that pixel-normalises its latent first (networks.py ``G_paper``,
    ``normalize_latents=True``): (B, *latent_shape) or (B, D) -> (B, channels, S, S)."""

    def __init__(self, *, config: piad.PIADConfig, channels: int):
        super().__init__(config=config, channels=channels)
        # a persistent buffer: this G's state_dict has a key a plain PIAD generator lacks, so a
        # latent-norm checkpoint cannot be loaded into a model without the pixel-norm unnoticed
        self.register_buffer("latent_norm_eps", torch.tensor(PIXEL_NORM_EPS))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(z.shape[0], *self.latent_shape)  # (B, Cz, h, w)
        return super().forward(pixel_norm(z, self.latent_norm_eps))


def use_pixel_norm(model: piad.PIAD) -> piad.PIAD:
    """Gives ``model`` a :class:`PixelNormGenerator` with the same weights, in place; the global
    RNG is left as it was, so a seed gives the same initial weights as a PIAD model."""
    old = model.G
    with torch.random.fork_rng(devices=[]):
        new = PixelNormGenerator(config=model.config, channels=model.channels)
    new.load_state_dict({**old.state_dict(), "latent_norm_eps": new.latent_norm_eps})
    model.G = new.to(next(old.parameters()).device)
    return model


def cycle_loss(model: Networks, z: torch.Tensor) -> torch.Tensor:
    """``mean |G(z) - G(E(G(z)))|`` (scalar; loss.py ``E_wgangp_acgan``). G(z) is made without a
    graph (it is E's input and the target); the graph of ``G(E(·))`` reaches G's parameters too,
    so callers that want E's gradients only differentiate w.r.t. E's parameters (see
    :meth:`LatentNormTrainer.encoder_step`)."""
    with torch.no_grad():
        x_fake = model.G(z)  # (B, C, S, S)
    return (model.G(model.E(x_fake)) - x_fake).abs().mean()


def code_norms(z: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``||z - centre||_2`` per code, z = ``model.encode(x)`` of shape (N, *latent_shape) -> (N,):
    the anomaly score (Berg et al.), higher = more anomalous; centre 0 by default (the paper's)."""
    return (z.flatten(1) - (0 if centre is None else centre.to(z.device))).norm(dim=1)


class LatentNormTrainer:
    """One iteration per :meth:`step`: one critic step (D_X), one G step, one E step (train.py).
    One Adam each for the critic (rate ``lr_d``), G and E (``lr_g``: their E runs with G's rate);
    ``gp_weight`` and ``drift`` weigh eq. (5)'s gradient penalty and drift term."""

    def __init__(self, model: Networks, *, lr_d: float, lr_g: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, gp_weight: float, drift: float):
        self.model, self.gp_weight, self.drift = model, gp_weight, drift
        adam = dict(betas=betas, eps=eps, weight_decay=weight_decay)
        self.opt_d = torch.optim.Adam(model.image_critic.parameters(), lr=lr_d, **adam)
        self.opt_g = torch.optim.Adam(model.G.parameters(), lr=lr_g, **adam)
        self.opt_e = torch.optim.Adam(model.E.parameters(), lr=lr_g, **adam)

    def critic_step(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        with torch.no_grad():
            x_fake = m.G(sample_prior(m, x.shape[0]))  # loss.py D_wgangp_acgan: the 0.1 prior
        loss, _ = piad.critic_loss(m.image_critic, x, x_fake, gp_weight=self.gp_weight, drift=self.drift,
                                   drift_fake=False)  # eq. (5); loss.py: drift on real scores only
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.detach()

    def generator_step(self, n: int, *, real: torch.Tensor) -> torch.Tensor:
        """Eq. (6) for G on ``n`` z from the 0.1 prior (loss.py ``G_wgan_acgan``); its E[D(real)] is a
        constant for G (no graph): it makes the logged value eq. (6)'s."""
        m = self.model
        for q in m.image_critic.parameters():  # the critic is frozen: only G gets gradients
            q.requires_grad_(False)
        try:
            fake = m.G(sample_prior(m, n))
            adv = piad.adversarial_loss(m.image_critic, real, fake)  # eq. (6)
            self.opt_g.zero_grad(set_to_none=True)
            adv.backward()
            self.opt_g.step()
        finally:
            for q in m.image_critic.parameters():
                q.requires_grad_(True)
        return adv.detach()

    def encoder_step(self, n: int) -> torch.Tensor:
        """Cycle loss on G(z), z from the 0.1 prior (loss.py ``E_wgangp_acgan``); E's gradients only."""
        params = list(self.model.E.parameters())
        loss = cycle_loss(self.model, sample_prior(self.model, n))
        # G's and the critic's .grad are left untouched; a layer the level of detail leaves out (pgan.py,
        # progressive growing) gets no gradient and no Adam step (theirs: a zero one, a no-op at β1 = 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.opt_e.zero_grad(set_to_none=True)
        for q, g in zip(params, grads):
            q.grad = g
        self.opt_e.step()
        return loss.detach()

    def step(self, it: int, sample) -> dict:
        """One iteration in train.py's order: critic, G, E (one minibatch of real images)."""
        x, _ = sample()
        loss_dx = self.critic_step(x)  # D_repeats = 1
        adv_g = self.generator_step(x.shape[0], real=x)
        cycle = self.encoder_step(x.shape[0])
        return {"loss_dx": loss_dx, "adv_g": adv_g, "cycle": cycle}

    def state_dict(self) -> dict:
        return {"opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_e": self.opt_e.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.opt_d.load_state_dict(s["opt_d"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_e.load_state_dict(s["opt_e"])


@torch.no_grad()
def encode_prior(model: Networks, n: int = 1000, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, E(G(z)))`` for ``n`` draws of the prior (fixed seed), both (n, D): where E puts what it
    was trained on. The mean of E(G(z)) is E's image of the prior's centre (0 if E inverts G)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = PRIOR_SCALE * model.sample_latent(n, generator=gen)  # (n, *latent_shape)
    return z.flatten(1), model.E(model.G(z)).flatten(1)


def plot_latent_norms(path, scores: dict, labels: np.ndarray, prior: tuple[torch.Tensor, torch.Tensor], *,
                      title: str = "") -> None:
    """Histograms of ``||E(x)||`` (the paper's score, left) and ``||E(x) - c||`` with c = mean
    E(G(z)) (right) for normal (label 0) and anomalous (1) test images and for E(G(z)) (``prior``
    = :func:`encode_prior`), each panel titled with the score's ROC AUC and that of its
    negation; the figure's title says how far E is from inverting G (offset of E(G(z)),
    cos(E(G(z)), z)). ``latent_norms.png`` of evaluate.py."""
    from sklearn.metrics import roc_auc_score

    z, gen = (t.cpu() for t in prior)
    panels = (("latent-norm", "||E(x)||₂", gen.norm(dim=1)),
              ("latent-norm-centred", "||E(x) - mean E(G(z))||₂", (gen - gen.mean(0)).norm(dim=1)))
    fig, axes = figures.pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, (key, xlabel, gen_values) in zip(axes, panels):
        values, auc = scores[key], roc_auc_score(labels, scores[key])
        groups = ((values[labels == 0], "normal test"), (values[labels == 1], "anomalous test"),
                  (gen_values.numpy(), "generated, E(G(z))"))
        bins = np.histogram_bin_edges(np.concatenate([g for g, _ in groups]), bins=40)
        for v, name in groups:
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{name} (n={len(v)}, median {np.median(v):.3g})")
        ax.set(xlabel=xlabel, ylabel="density", title=f"ROC AUC {auc:.3f} (negated: {1 - auc:.3f})")
        ax.legend(fontsize=8)
    cos = torch.nn.functional.cosine_similarity(gen, z).mean()
    fig.suptitle(f"{title}; ||mean E(G(z))|| = {gen.mean(0).norm():.3g}, mean ||E(G(z))|| = "
                 f"{gen.norm(dim=1).mean():.3g}, mean cos(E(G(z)), z) = {cos:.3g}", fontsize=10)
    figures.save(fig, path)
