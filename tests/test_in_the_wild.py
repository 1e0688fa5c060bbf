"""The latent-norm method of Berg et al. (in_the_wild.py): cycle loss, trainer, score, end to end."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import in_the_wild
import piad
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


def _tiny(seed=0):
    torch.manual_seed(seed)
    return piad.PIAD(config=TINY, channels=1)


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
    t = in_the_wild.LatentNormTrainer(m, None)
    g0, dx0, e0 = _params(m.G), _params(m.DX), _params(m.E)
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
    z = in_the_wild.sample_narrow_latent(m, 5)
    with torch.no_grad():
        x = m.G(z)
        expected = (x - m.G(m.E(x))).abs().mean()
    loss = in_the_wild.cycle_loss(m, z)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the target G(z) carries no graph: gradients reach E through G(E(.)) only
    (gz,) = torch.autograd.grad(loss, [m.G.conv_out.weight])
    assert gz.abs().sum() > 0  # G is on the path, so callers must restrict to E (encoder_step does)


def test_narrowed_prior_scale():
    m = _tiny()
    torch.manual_seed(0)
    z = in_the_wild.sample_narrow_latent(m, 20000)
    assert z.shape == (20000, *TINY.latent_shape)
    assert in_the_wild.PRIOR_SCALE == 0.1
    assert z.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(z.mean().item()) < 0.003


def test_step_on_mnist_preset_is_finite():
    torch.manual_seed(0)
    m = piad.PIAD(config=piad.preset("mnist"), channels=1)
    t = in_the_wild.LatentNormTrainer(m, train.TrainConfig(method="latent-norm"))
    out = t.step(0, _sampler(batch=4, size=32))
    assert set(out) == {"loss_dx", "adv_g", "cycle"}
    assert set(out) <= set(train.LOG_FIELDS)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert all(q.requires_grad for q in m.DX.parameters())  # the critic is unfrozen again


def test_step_without_logging_gives_the_same_update():
    runs = []
    for log in (True, False):
        m = _tiny()
        t = in_the_wild.LatentNormTrainer(m, None)
        torch.manual_seed(5)
        out = t.step(0, _sampler(), log=log)
        runs.append((out, [q.detach().clone() for q in m.parameters()]))
    (a, pa), (b, pb) = runs
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert float(a["cycle"]) == float(b["cycle"]) and float(a["loss_dx"]) == float(b["loss_dx"])


def test_make_trainer_dispatches():
    m = _tiny()
    t = train.make_trainer(m, None, train.TrainConfig(method="latent-norm"))
    assert isinstance(t, in_the_wild.LatentNormTrainer)


def test_state_dict_round_trip_gives_identical_next_steps():
    m = _tiny()
    t = in_the_wild.LatentNormTrainer(m, None)
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
    t2 = in_the_wild.LatentNormTrainer(m2, None)
    t2.load_state_dict(saved["trainer"])
    torch.set_rng_state(saved["rng"])
    new = [t2.step(it, new_sampler) for it in range(3, 5)]
    for a, b in zip(ref, new):
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    assert all(torch.equal(a, b) for a, b in zip(ref_params, m2.parameters()))


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
    scores = in_the_wild.latent_norm_score(m, torch.cat([normal, anomalous]), batch_size=16)
    assert scores.shape == (100,)
    labels = np.r_[np.zeros(50), np.ones(50)]
    assert roc_auc_score(labels, scores.numpy()) > 0.99


def test_end_to_end_latent_norm_on_digits(tmp_path):
    # loss="mse": the latent-norm method needs no VGG, and a pixel loss keeps this fast
    cfg = train.TrainConfig(dataset="digits", normal="3", iterations=6, batch_size=8, method="latent-norm",
                            loss="mse", out=str(tmp_path / "r"), progress=False)
    metrics = train.train(cfg)
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["score"] == "latent-norm" and metrics["score"] == "latent-norm"
    assert math.isfinite(saved["roc_auc"]) and saved["roc_auc"] == saved["roc_auc_per_score"]["latent-norm"]
    with open(tmp_path / "r" / "log.csv") as fh:
        header = fh.readline().strip().split(",")
        first = dict(zip(header, fh.readline().strip().split(",")))
    assert math.isfinite(float(first["cycle"])) and math.isfinite(float(first["loss_dx"]))


def test_kill_and_resume_through_train_is_exact(tmp_path, kill_at):
    def cfg(name, **kw):
        return train.TrainConfig(dataset="digits", normal="3", iterations=5, batch_size=4, method="latent-norm",
                                 loss="mse", out=str(tmp_path / name), progress=False, evaluate=False, **kw)

    train.train(cfg("full"))
    disarm = kill_at(in_the_wild.LatentNormTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg("part", checkpoint_minutes=0.0))
    disarm()
    train.train(cfg("part", checkpoint_minutes=0.0), resume=True)
    a, b = (train.load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("full", "part"))
    assert a["iteration"] == b["iteration"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["trainer"]["opt_e"]["state"][0]["step"] == b["trainer"]["opt_e"]["state"][0]["step"] == 5
