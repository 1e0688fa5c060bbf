"""The latent-norm method of Berg et al. (latent_norm.py): one prior, pixel-norm, step order, cycle
loss, trainer, score, exact resume, end to end."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from berg import latent_norm, pgan, progressive, system
import guard
import piad
import presets
import checkpoint
import train

TINY = piad.PIADConfig(name="tiny", image_size=8, latent_shape=(4, 1, 1), gen_channels=(8, 8),
                       enc_channels=(8, 8), dx_channels=(8, 8), dx_head_channels=8, dz_hidden=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads thrash (5-10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(seed=0, method="latent-norm"):
    torch.manual_seed(seed)
    model = piad.PIAD(config=TINY, channels=1)
    return latent_norm.use_pixel_norm(model) if method == "latent-norm" else model


def _trainer(m):
    """The trainer a ``--networks piad`` run builds (``berg.system.trainer``)."""
    return system.trainer(m, progressive.Schedule())


def _sampler(batch=8, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    data = torch.rand(64, 1, size, size, generator=gen) * 2 - 1

    def sample():
        return data[torch.randint(64, (batch,), generator=gen)], None
    return sample


def _params(net):
    return [q.detach().clone() for q in net.parameters()]


def test_encoder_step_updates_e_only():
    m = _tiny()
    t = _trainer(m)
    g0, dx0, e0 = _params(m.G), _params(m.DX), _params(m.E)
    assert m.image_critic is m.DX and torch.equal(m.encode(torch.zeros(2, 1, 8, 8)), m.E(torch.zeros(2, 1, 8, 8)))
    loss = t.encoder_step(8)
    assert torch.isfinite(loss) and loss > 0
    assert all(q.grad is None for q in m.G.parameters()), "the cycle loss must not reach G"
    assert all(q.grad is None for q in m.DX.parameters()) and all(q.grad is None for q in m.DZ.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g0, _params(m.G)))
    assert all(torch.equal(a, b) for a, b in zip(dx0, _params(m.DX)))
    assert any(not torch.equal(a, b) for a, b in zip(e0, _params(m.E)))
    assert all(q.grad is not None for q in m.E.parameters())


def test_cycle_loss_formula_and_gradient_path():
    m = _tiny()
    z = latent_norm.sample_prior(m, 5)
    with torch.no_grad():
        x = m.G(z)
        expected = (x - m.G(m.E(x))).abs().mean()
    loss = latent_norm.cycle_loss(m, z)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the target G(z) carries no graph: gradients reach E through G(E(.)) only
    (gz,) = torch.autograd.grad(loss, [m.G.conv_out.weight])
    assert gz.abs().sum() > 0  # G is on the path, so callers must restrict to E (encoder_step does)


def test_prior_scale():
    m = _tiny()
    torch.manual_seed(0)
    z = latent_norm.sample_prior(m, 20000)
    assert z.shape == (20000, *TINY.latent_shape)
    assert latent_norm.PRIOR_SCALE == 0.1
    assert z.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(z.mean().item()) < 0.003


def _record_g_inputs(m):
    """G's raw inputs (before its pixel-norm), one list entry per call of G."""
    seen = []
    m.G.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


def test_one_prior_for_critic_generator_and_encoder():
    # loss.py: D_wgangp_acgan, G_wgan_acgan and E_wgangp_acgan all draw 0.1 * N(0, I). Each step
    # calls G first on its prior draw (the encoder step then on E(G(z))): that draw's std is 0.1.
    m = _tiny()
    t = _trainer(m)
    x = _sampler(batch=512)()[0]
    for name, run in (("critic", lambda: t.critic_step(x)), ("generator", lambda: t.generator_step(512, real=x)),
                      ("encoder", lambda: t.encoder_step(512))):
        seen = _record_g_inputs(m)
        torch.manual_seed(1)
        run()
        m.G._forward_pre_hooks.clear()
        assert seen[0].shape == (512, *TINY.latent_shape), name
        assert seen[0].std().item() == pytest.approx(latent_norm.PRIOR_SCALE, rel=0.1), name


def test_generator_pixel_normalises_its_latent():
    # networks.py G_paper, normalize_latents=True: G(z) depends on z's direction only
    m = _tiny()
    assert isinstance(m.G, latent_norm.PixelNormGenerator)
    torch.manual_seed(2)
    z = torch.randn(6, *TINY.latent_shape)
    with torch.no_grad():
        out = m.G(z)
        for c in (0.1, 3.0):
            torch.testing.assert_close(m.G(c * z), out, rtol=1e-4, atol=1e-5 * out.abs().max().item())
        torch.testing.assert_close(piad.Generator.forward(m.G, latent_norm.pixel_norm(z)), out)
        assert not torch.allclose(piad.Generator.forward(m.G, z), out)  # the norm does matter without it
    n = latent_norm.pixel_norm(z)
    torch.testing.assert_close(n.square().mean(dim=1), torch.ones(6, 1, 1))


@given(seed=st.integers(0, 2**16))
def test_cycle_loss_is_blind_to_the_encodings_norm(seed):
    # with G's pixel-norm, ∂L/∂E(x) ⊥ E(x): the cycle loss never trains ||E(x)||, which is why the
    # paper's score ||E(x)|| is a by-product of E (see README, latent-norm results)
    m = _tiny(seed=seed % 7)
    torch.manual_seed(seed)
    with torch.no_grad():
        x_fake = m.G(latent_norm.sample_prior(m, 16))
        z = m.E(x_fake).flatten(1)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad((m.G(z) - x_fake).abs().mean(), z)
    radial = (g * z).sum(dim=1) / z.norm(dim=1)  # (16,) component of the gradient along z
    assert radial.abs().max() <= 1e-4 * g.norm(dim=1).max() + 1e-12


def test_pixel_norm_keeps_piad_weights_and_leaves_piad_alone():
    a, b = _tiny(method="piad"), _tiny(method="latent-norm")
    assert type(a.G) is piad.Generator
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) - set(sa) == {"G.latent_norm_eps"}  # a plain PIAD cannot load it unnoticed
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same initial weights
    with pytest.raises(RuntimeError, match="latent_norm_eps"):
        a.load_state_dict(sb)


def test_step_order_one_critic_one_generator_one_encoder_step(monkeypatch):
    # train.py: per iteration D (D_repeats = 1), then G, then E; one minibatch of real images
    calls = []
    for name in ("critic_step", "generator_step", "encoder_step"):
        real = getattr(latent_norm.LatentNormTrainer, name)
        monkeypatch.setattr(latent_norm.LatentNormTrainer, name,
                            lambda self, *a, _r=real, _n=name, **k: (calls.append(_n), _r(self, *a, **k))[1])
    sample = _sampler()
    n_samples = []

    def counting_sample():
        n_samples.append(1)
        return sample()

    m = _tiny()
    t = _trainer(m)
    for it in range(2):
        t.step(it, counting_sample)
    assert calls == ["critic_step", "generator_step", "encoder_step"] * 2
    assert len(n_samples) == 2


def test_step_on_mnist_preset_is_finite():
    torch.manual_seed(0)
    m = latent_norm.use_pixel_norm(piad.PIAD(config=presets.network("mnist"), channels=1))
    t = _trainer(m)
    out = t.step(0, _sampler(batch=4, size=32))
    assert set(out) == {"loss_dx", "adv_g", "cycle"}
    assert set(out) <= set(guard.LOG_FIELDS)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert all(q.requires_grad for q in m.DX.parameters())  # the critic is unfrozen again


def test_make_trainer_dispatches():
    m = _tiny()
    t = train.make_trainer(m, None, train.TrainConfig(method="latent-norm", networks="piad"))
    assert type(t) is latent_norm.LatentNormTrainer
    g = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=8, fmap_base=32, fmap_max=8))
    t = train.make_trainer(g, None, train.TrainConfig(method="latent-norm", networks="pgan"))
    assert type(t) is progressive.ProgressiveTrainer
    assert isinstance(train.make_trainer(_tiny(method="piad"), None, train.TrainConfig()), train.PIADTrainer)


def test_the_builder_passes_each_configuration_its_own_settings():
    """--networks piad: the preset's Adam and eq. (5) weights; pgan: their train.py / loss.py values."""
    m = _tiny()
    p, t = m.config, _trainer(m)
    assert (t.gp_weight, t.drift) == (p.gp_weight, p.drift)
    for opt, lr, params in ((t.opt_d, p.lr_critic, m.DX), (t.opt_g, p.lr_gen, m.G), (t.opt_e, p.lr_gen, m.E)):
        (group,) = opt.param_groups
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (lr, p.betas, 1e-8, p.weight_decay)
        assert [id(q) for q in group["params"]] == [id(q) for q in params.parameters()]
    g = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=8, fmap_base=32, fmap_max=8))
    t = progressive.ProgressiveTrainer(g, progressive.Schedule(lrate=0.002))
    assert (t.gp_weight, t.drift) == (latent_norm.GP_WEIGHT, latent_norm.DRIFT) == (10.0, 1e-3)
    for opt, net in ((t.opt_d, g.D), (t.opt_g, g.G), (t.opt_e, g.E)):
        (group,) = opt.param_groups
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.002, (0.0, 0.99), 1e-8, 0.0)
        assert [id(q) for q in group["params"]] == [id(q) for q in net.parameters()]


def test_state_dict_round_trip_gives_identical_next_steps():
    m = _tiny()
    t = _trainer(m)
    sample = _sampler()
    for it in range(3):
        t.step(it, sample)
    saved = {"model": {k: v.clone() for k, v in m.state_dict().items()},
             "trainer": torch.load(_roundtrip(t.state_dict()), weights_only=False),
             "rng": torch.get_rng_state()}
    ref_sampler, new_sampler = _sampler(seed=7), _sampler(seed=7)  # same batches (own generators)
    ref = [t.step(it, ref_sampler) for it in range(3, 5)]
    ref_params = [q.detach().clone() for q in m.parameters()]

    m2 = _tiny(seed=123)  # different init: everything must come from the state
    m2.load_state_dict(saved["model"])
    t2 = _trainer(m2)
    t2.load_state_dict(saved["trainer"])
    torch.set_rng_state(saved["rng"])
    new = [t2.step(it, new_sampler) for it in range(3, 5)]
    for a, b in zip(ref, new):
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    assert all(torch.equal(a, b) for a, b in zip(ref_params, m2.parameters()))


def test_latent_norms_from_a_centre():
    m = _tiny()
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    c = torch.randn(TINY.latent_dim)
    with torch.no_grad():
        z = m.E(x).flatten(1)
        codes = m.encode(x)  # (10, *latent_shape): the score's input
    assert codes.shape == (10, *TINY.latent_shape)
    torch.testing.assert_close(latent_norm.code_norms(codes), z.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(latent_norm.code_norms(codes, c), (z - c).norm(dim=1), rtol=1e-6, atol=0)
    assert torch.equal(latent_norm.code_norms(z), z.norm(dim=1))
    assert torch.equal(latent_norm.code_norms(z.view(10, -1, 1, 1), c), (z - c).norm(dim=1))
    z, gen = latent_norm.encode_prior(m, 50)
    assert z.shape == gen.shape == (50, TINY.latent_dim) and torch.equal(gen, latent_norm.encode_prior(m, 50)[1])
    assert z.std().item() == pytest.approx(latent_norm.PRIOR_SCALE, rel=0.25)
    with torch.no_grad():
        torch.testing.assert_close(gen, m.E(m.G(z)).flatten(1))


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


class _DistanceEncoder(nn.Module):
    """E(x) = (x - template) flattened: its norm grows with the distance from the normal image."""

    def __init__(self, template):
        super().__init__()
        self.register_buffer("template", template)

    def forward(self, x):
        return (x - self.template).flatten(1)


def test_latent_norm_score_orientation():
    from sklearn.metrics import roc_auc_score

    m = _tiny()
    gen = torch.Generator().manual_seed(0)
    template = torch.rand(1, 1, 8, 8, generator=gen) * 2 - 1
    m.E = _DistanceEncoder(template)
    normal = template + 0.05 * torch.randn(50, 1, 8, 8, generator=gen)
    anomalous = torch.rand(50, 1, 8, 8, generator=gen) * 2 - 1
    with torch.no_grad():
        scores = latent_norm.code_norms(m.encode(torch.cat([normal, anomalous])))  # the score of evaluate.py
    assert scores.shape == (100,)
    labels = np.r_[np.zeros(50), np.ones(50)]
    assert roc_auc_score(labels, scores.numpy()) > 0.99


def test_end_to_end_latent_norm_on_digits(tmp_path):
    # loss="mse": the latent-norm method needs no VGG, and a pixel loss keeps this fast
    cfg = train.TrainConfig(dataset="digits", normal="3", iterations=6, batch_size=8, method="latent-norm",
                            networks="piad", loss="mse", out=str(tmp_path / "r"), progress=False)
    metrics = train.train(cfg)
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["score"] == "latent-norm" and metrics["score"] == "latent-norm"
    assert math.isfinite(saved["roc_auc"]) and saved["roc_auc"] == saved["roc_auc_per_score"]["latent-norm"]
    assert math.isfinite(saved["roc_auc_per_score"]["latent-norm-centred"])
    assert (tmp_path / "r" / "latent_norms.png").stat().st_size > 0
    with open(tmp_path / "r" / "log.csv") as fh:
        header = fh.readline().strip().split(",")
        first = dict(zip(header, fh.readline().strip().split(",")))
    assert math.isfinite(float(first["cycle"])) and math.isfinite(float(first["loss_dx"]))


def test_kill_and_resume_through_train_is_exact(tmp_path, kill_at):
    def cfg(name, **kw):
        return train.TrainConfig(dataset="digits", normal="3", iterations=5, batch_size=4, method="latent-norm",
                                 networks="piad", loss="mse", out=str(tmp_path / name), progress=False, evaluate=False, **kw)

    train.train(cfg("full"))
    disarm = kill_at(latent_norm.LatentNormTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg("part", checkpoint_minutes=0.0))
    disarm()
    train.train(cfg("part", checkpoint_minutes=0.0), resume=True)
    a, b = (checkpoint.load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("full", "part"))
    assert a["iteration"] == b["iteration"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["trainer"]["opt_e"]["state"][0]["step"] == b["trainer"]["opt_e"]["state"][0]["step"] == 5
    for opt in ("opt_d", "opt_g", "opt_e"):  # Adam's moments too, bitwise
        sa, sb = a["trainer"][opt]["state"], b["trainer"][opt]["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["sampler"], b["sampler"])
    # the saved run is re-evaluated with the pixel-norm G it was trained with
    import evaluate

    _, _, model, _ = evaluate.load_run(tmp_path / "part" / "checkpoint.pt", device="cpu")
    assert isinstance(model.G, latent_norm.PixelNormGenerator)
