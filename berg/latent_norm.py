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
* The anomaly score is ``||E(x)||_2`` (the paper's score). For diagnosis, evaluate.py also writes
  ``latent-norm-centred`` = ``||E(x) - c||``, c = mean E(G(z)) (:func:`encode_prior`), and the
  histograms ``latent_norms.png`` (``figures.plot_latent_norms``); README says why they differ.

Networks: ``--networks pgan`` (the default) trains their own networks grown progressively with
these losses and steps (``pgan.py``, ``progressive.py``; docs/berg.md). The deviations below are
those of ``--networks piad`` (ours), one per line:

* Networks: ``piad.py``'s G, E and D_X of the dataset's preset (D_Z is built but unused), not pGAN;
  no progressive growing: the resolution is fixed at the preset's image size.
* Only G's input is pixel-normalised; pGAN's pixel-norm after every G layer, equalised learning
  rate and their E (D's trunk ending in a dense layer + leaky ReLU) are not reproduced.
* Optimiser: PIAD's Adam (``piad.preset``: betas, learning rates, weight decay) and batch size,
  not pGAN's β1 = 0, lr 0.001, batch 64-128; the critic's drift term is on real scores only, as theirs.
* No moving average of G (their ``Gs``, β = 0.999): they use it for sample grids and their
  reconstruction-based detector; E is trained against the live G and ‖E(x)‖ does not involve G.
"""
from __future__ import annotations

import torch

import piad

PRIOR_SCALE = 0.1  # loss.py: D, G and E all draw latents = 0.1 * N(0, I)
PIXEL_NORM_EPS = 1e-8  # networks.py pixel_norm's epsilon


def sample_prior(model: piad.PIAD, n: int) -> torch.Tensor:
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


def cycle_loss(model: piad.PIAD, z: torch.Tensor) -> torch.Tensor:
    """``mean |G(z) - G(E(G(z)))|`` (scalar; loss.py ``E_wgangp_acgan``). G(z) is made without a
    graph (it is E's input and the target); the graph of ``G(E(·))`` reaches G's parameters too,
    so callers that want E's gradients only differentiate w.r.t. E's parameters (see
    :meth:`LatentNormTrainer.encoder_step`)."""
    with torch.no_grad():
        x_fake = model.G(z)  # (B, C, S, S)
    return (model.G(model.E(x_fake)) - x_fake).abs().mean()


def code_norms(z: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``||z - centre||_2`` per code, z = E(x) of shape (N, *latent_shape) -> (N,); centre 0 by default.
    The formula of :func:`latent_norm_score`, for callers that already have E(x)."""
    return (z.flatten(1) - (0 if centre is None else centre.to(z.device))).norm(dim=1)


@torch.no_grad()
def latent_norm_score(model: piad.PIAD, x: torch.Tensor, *, centre: torch.Tensor | None = None,
                      batch_size: int = 256) -> torch.Tensor:
    """The anomaly score ``||E(x)||_2`` per image (Berg et al.), (N, C, S, S) -> (N,), higher = more
    anomalous; with ``centre`` (a diagnostic), ``||E(x) - centre||_2``. On ``x``'s device."""
    device = next(model.parameters()).device
    out = [code_norms(model.E(x[i:i + batch_size].to(device)), centre).to(x.device)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.new_zeros(0)


class LatentNormTrainer:
    """One iteration per :meth:`step`: one critic step (D_X), one G step, one E step (train.py)."""

    def __init__(self, model: piad.PIAD):
        self.model = model
        p = model.config
        adam = dict(betas=p.betas, weight_decay=p.weight_decay)
        self.opt_d = torch.optim.Adam(model.DX.parameters(), lr=p.lr_critic, **adam)
        self.opt_g = torch.optim.Adam(model.G.parameters(), lr=p.lr_gen, **adam)
        self.opt_e = torch.optim.Adam(model.E.parameters(), lr=p.lr_gen, **adam)

    def critic_step(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.model, self.model.config
        with torch.no_grad():
            x_fake = m.G(sample_prior(m, x.shape[0]))  # loss.py D_wgangp_acgan: the 0.1 prior
        loss = piad.critic_loss(m.DX, x, x_fake, gp_weight=p.gp_weight, drift=p.drift,
                                drift_fake=False)  # eq. (5); loss.py: drift on real scores only
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.detach()

    def generator_step(self, n: int, *, real: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (6) for G on ``n`` z from the 0.1 prior (loss.py ``G_wgan_acgan``); ``real=None``
        drops E[D(x)] (a constant: same gradients), ``real`` only makes the logged value eq. (6)'s."""
        m = self.model
        for q in m.DX.parameters():  # the critic is frozen: only G gets gradients
            q.requires_grad_(False)
        try:
            fake = m.G(sample_prior(m, n))
            adv = piad.adversarial_loss(m.DX, real, fake)  # eq. (6)
            self.opt_g.zero_grad(set_to_none=True)
            adv.backward()
            self.opt_g.step()
        finally:
            for q in m.DX.parameters():
                q.requires_grad_(True)
        return adv.detach()

    def encoder_step(self, n: int) -> torch.Tensor:
        """Cycle loss on G(z), z from the 0.1 prior (loss.py ``E_wgangp_acgan``); E's gradients only."""
        params = list(self.model.E.parameters())
        loss = cycle_loss(self.model, sample_prior(self.model, n))
        # G's and D_X's .grad are left untouched; a layer the level of detail leaves out (pgan.py,
        # progressive growing) gets no gradient and no Adam step (theirs: a zero one, a no-op at β1 = 0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        self.opt_e.zero_grad(set_to_none=True)
        for q, g in zip(params, grads):
            q.grad = g
        self.opt_e.step()
        return loss.detach()

    def step(self, it: int, sample, *, log: bool = True) -> dict:
        """One iteration in train.py's order: critic, G, E (one minibatch of real images, for the
        critic; ``log=False`` skips eq. (6)'s real-data term, only there for the logged ``adv_g``)."""
        x, _ = sample()
        loss_dx = self.critic_step(x)  # D_repeats = 1
        adv_g = self.generator_step(x.shape[0], real=x if log else None)
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
def encode_prior(model: piad.PIAD, n: int = 1000, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, E(G(z)))`` for ``n`` draws of the prior (fixed seed), both (n, D): where E puts what it
    was trained on. The mean of E(G(z)) is E's image of the prior's centre (0 if E inverts G)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = PRIOR_SCALE * model.sample_latent(n, generator=gen)  # (n, *latent_shape)
    return z.flatten(1), model.E(model.G(z)).flatten(1)


