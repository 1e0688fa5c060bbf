"""Every score of evaluate.py is oriented so that higher = more anomalous (synthetic case).

The model is a PIAD whose networks are replaced by exact, deterministic stand-ins: normal images
lie in a 4-dimensional linear subspace, E projects onto it, G maps the coefficients back, so
G(E(x)) reconstructs normal images (almost) exactly and noise images badly. E also outputs the
residual norm, so ‖E(x)‖ grows away from the normal subspace, and D_X = -residual rates normal
images as the most real. VGG weights are random: orientation only needs f(x) ≈ f(G(E(x))) for
normal images.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import data
import evaluate
import features
from berg import latent_norm
import losses
import piad

K, SIZE = 4, 32
TINY = piad.PIADConfig(name="tiny", image_size=8, latent_shape=(4, 1, 1), gen_channels=(8, 8),
                       enc_channels=(8, 8), dx_channels=(8, 8), dx_head_channels=8, dz_hidden=8)


def _basis(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(SIZE * SIZE, K, generator=gen))
    return q  # (D, K), orthonormal columns


class ProjectEncoder(nn.Module):
    """x -> (0.01 · coefficients, residual norm): (B, 1, S, S) -> (B, K + 1)."""

    def __init__(self, basis):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, x):
        flat = x.flatten(1)
        c = flat @ self.basis
        r = (flat - c @ self.basis.T).norm(dim=1, keepdim=True)
        return torch.cat([0.01 * c, r], dim=1)


class ProjectGenerator(nn.Module):
    def __init__(self, basis):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, z):
        return (100 * z[:, :K] @ self.basis.T).reshape(-1, 1, SIZE, SIZE)


class ResidualCritic(nn.Module):
    """High (real-looking) for images in the normal subspace."""

    def __init__(self, basis):
        super().__init__()
        self.enc = ProjectEncoder(basis)

    def forward(self, x):
        return -self.enc(x)[:, -1]


def _synthetic(n=40, seed=1):
    basis = _basis()
    gen = torch.Generator().manual_seed(seed)
    normal = (torch.randn(n, K, generator=gen) * 8) @ basis.T
    normal = (normal + 0.01 * torch.randn(normal.shape, generator=gen)).reshape(n, 1, SIZE, SIZE)
    anomalous = torch.rand(n, 1, SIZE, SIZE, generator=gen) * 2 - 1
    ds = data.TensorImages(torch.cat([normal, anomalous]), np.r_[np.zeros(n), np.ones(n)])
    model = piad.PIAD(config=TINY, channels=1)
    model.E, model.G, model.DX = ProjectEncoder(basis), ProjectGenerator(basis), ResidualCritic(basis)
    return model, ds


@pytest.fixture(scope="module")
def rec_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: fine for orientation
        vgg = features.VGG19Features("relu4_2", "random")
    stats = features.FeatureStats(torch.zeros(vgg.out_channels), torch.ones(vgg.out_channels),
                                vgg.weights_id, vgg.layer, 1)
    return losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats)


def test_synthetic_model_reconstructs_normal_images_only():
    model, ds = _synthetic()
    x = ds.images
    err = (model.G(model.E(x)) - x).flatten(1).abs().mean(1)
    assert err[:40].max() < 0.02 < 0.3 < err[40:].min()


def test_every_score_is_oriented_higher_is_more_anomalous(rec_loss):
    model, ds = _synthetic()
    scores, labels = evaluate.compute_scores(model, ds, rec_loss, batch_size=32)
    assert set(scores) == set(evaluate.SCORES)
    assert labels.tolist() == [0] * 40 + [1] * 40
    aucs = evaluate.roc_aucs(scores, labels)
    for name, auc in aucs.items():
        assert auc > 0.95, f"{name}: ROC AUC {auc:.3f}, its orientation is wrong"


def test_pixel_scores_without_vgg():
    model, ds = _synthetic()
    mse = losses.ReconstructionLoss(kind="mse")
    scores, labels = evaluate.compute_scores(model, ds, mse, batch_size=16)
    assert set(scores) == {"l1", "mse", "mse-imagenet", "critic", "latent-norm"}  # no feature scores without VGG
    assert all(a > 0.95 for a in evaluate.roc_aucs(scores, labels).values())


def test_latent_norm_is_the_primary_score_of_the_latent_norm_method():
    class Cfg:
        method, loss = "latent-norm", "rel-perc-l1"

    assert evaluate.primary_score(Cfg) == "latent-norm"
    Cfg.method = "piad"
    assert evaluate.primary_score(Cfg) == "rel-perc-l1"


def test_scores_come_back_in_dataset_order_and_batches_are_mixed():
    """Scoring runs in a shuffled order (so D_X's minibatch-stddev never sees a one-label batch)
    but every score is returned at its item's index."""
    model, ds = _synthetic()
    seen = []
    model.DX.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    scores, labels = evaluate.compute_scores(model, ds, losses.ReconstructionLoss(kind="mse"), batch_size=16)
    x = ds.images
    direct = (model.G(model.E(x)) - x).flatten(1).pow(2).mean(1)
    assert torch.allclose(torch.from_numpy(scores["mse"]), direct, rtol=1e-5)
    assert labels.tolist() == [0] * 40 + [1] * 40 and seen == [16] * 5
    order = torch.randperm(80, generator=torch.Generator().manual_seed(0))
    first = ds.labels[order[:16]]
    assert 0 < int(first.sum()) < 16  # the first batch mixes normal and anomalous images


def test_latent_norm_scores_match_the_norms_of_the_codes():
    """compute_scores runs E once per batch for ‖E(x)‖ and ‖E(x) − c‖; both equal the norms of all
    the codes at once (``latent_norm.code_norms`` of ``model.encode``), in dataset order."""
    model, ds = _synthetic()
    c = torch.randn(model.E(ds.images[:1]).flatten(1).shape[1], generator=torch.Generator().manual_seed(1))
    scores, _ = evaluate.compute_scores(model, ds, losses.ReconstructionLoss(kind="mse"), batch_size=16, centre=c)
    with torch.no_grad():
        codes = model.encode(ds.images)
    for name, centre in (("latent-norm", None), ("latent-norm-centred", c)):
        direct = latent_norm.code_norms(codes, centre)
        torch.testing.assert_close(torch.from_numpy(scores[name]), direct, rtol=1e-5, atol=1e-6)
