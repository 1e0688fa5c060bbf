"""Networks of supplement Tables 1-4 and the losses of paper §3.2 (eq. 1, 5, 6)."""
import dataclasses
import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import piad
import presets

# Supplement Tables 1-4, one row per line: table label (Convolution rows with kernel/padding)
# and output shape; "C" is the image channel count, "-" a per-sample scalar.
TABLES = {
    "mnist": {
        "G": "Conv4p3 32x4x4|BlockUp 32x8x8|BlockUp 32x16x16|BlockUp 32x32x32|PreAct 32x32x32|"
             "LReLU 32x32x32|Conv1p0 Cx32x32",
        # the authors' code (default): three BlockDowns; Table 1's fourth one: TABLE1_DX below
        "DX": "Conv3p1 32x32x32|BlockDown 32x16x16|BlockDown 32x8x8|BlockDown 32x4x4|"
              "MBStd 33x4x4|LReLU 33x4x4|Conv4p0 32x1x1|LReLU 32x1x1|"
              "Conv1p0 1x1x1|Reshape -",
        "E": "Conv3p1 32x32x32|BlockDown 32x16x16|BlockDown 32x8x8|BlockDown 32x4x4|"
             "LReLU 32x4x4|Conv4p0 32x1x1|LReLU 32x1x1|Conv1p0 32x1x1",
        "DZ": "Reshape 32|Dense 128|LReLU 128|Dense 128|LReLU 128|Dense 1",
    },
    "cifar10": {
        "G": "Conv4p3 256x4x4|BlockUp 256x8x8|BlockUp 128x16x16|BlockUp 64x32x32|"
             "PreAct 64x32x32|LReLU 64x32x32|Conv1p0 Cx32x32",
        "DX": "Conv3p1 32x32x32|BlockDown 32x16x16|BlockDown 64x8x8|BlockDown 128x4x4|"
              "MBStd 129x4x4|LReLU 129x4x4|Conv4p0 128x1x1|LReLU 128x1x1|Conv1p0 1x1x1|Reshape -",
        "E": "Conv3p1 64x32x32|BlockDown 64x16x16|BlockDown 128x8x8|BlockDown 256x4x4|"
             "LReLU 256x4x4|Conv4p0 256x1x1|LReLU 256x1x1|Conv1p0 256x1x1",
        # the table's D_Z header says 32; we follow G's 256-dimensional latent
        "DZ": "Reshape 256|Dense 1024|LReLU 1024|Dense 1024|LReLU 1024|Dense 1",
    },
    "lsun": {
        "G": "ResBlock 64x4x4|BlockUp 64x8x8|BlockUp 64x16x16|BlockUp 64x32x32|BlockUp 64x64x64|"
             "PreAct 64x64x64|LReLU 64x64x64|Conv1p0 Cx64x64",
        "DX": "Conv3p1 64x64x64|BlockDown 64x32x32|BlockDown 64x16x16|BlockDown 64x8x8|"
              "BlockDown 64x4x4|MBStd 65x4x4|LReLU 65x4x4|Conv4p0 64x1x1|LReLU 64x1x1|"
              "Conv1p0 1x1x1|Reshape -",
        "E": "Conv3p1 64x64x64|BlockDown 64x32x32|BlockDown 64x16x16|BlockDown 64x8x8|"
             "BlockDown 64x4x4|PreAct 64x4x4|LReLU 64x4x4|Conv1p0 32x4x4",
        "DZ": "Reshape 512|Dense 2048|LReLU 2048|Dense 2048|LReLU 2048|Dense 1",
    },
    "celeba": {
        "G": "Conv4p3 64x4x4|BlockUp 64x8x8|BlockUp 64x16x16|BlockUp 64x32x32|BlockUp 64x64x64|"
             "PreAct 64x64x64|LReLU 64x64x64|Conv1p0 Cx64x64",
        "DX": "Conv3p1 64x64x64|BlockDown 64x32x32|BlockDown 64x16x16|BlockDown 64x8x8|"
              "BlockDown 64x4x4|MBStd 65x4x4|LReLU 65x4x4|Conv4p0 64x1x1|LReLU 64x1x1|"
              "Conv1p0 1x1x1|Reshape -",
        "E": "Conv3p1 64x64x64|BlockDown 64x32x32|BlockDown 64x16x16|BlockDown 64x8x8|"
             "BlockDown 64x4x4|LReLU 64x4x4|Conv4p0 64x1x1|LReLU 64x1x1|Conv1p0 64x1x1",
        # the table's D_Z header says 32; we follow G's 64-dimensional latent
        "DZ": "Reshape 64|Dense 256|LReLU 256|Dense 256|LReLU 256|Dense 1",
    },
}

# Supplement Table 1 as printed: a fourth BlockDown that stays at 4×4 (dx_channels=(32,) * 5).
TABLE1_DX = ("Conv3p1 32x32x32|BlockDown 32x16x16|BlockDown 32x8x8|BlockDown 32x4x4|"
             "BlockDown 32x4x4|MBStd 33x4x4|LReLU 33x4x4|Conv4p0 32x1x1|LReLU 32x1x1|"
             "Conv1p0 1x1x1|Reshape -")


def _label(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        return f"Conv{m.kernel_size[0]}p{m.padding[0]}"
    return {piad.BlockUp: "BlockUp", piad.BlockDown: "BlockDown", piad.PreActBlock: "PreAct",
            piad.ResidualBlock: "ResBlock", piad.MinibatchStdDev: "MBStd", nn.LeakyReLU: "LReLU",
            piad.Reshape: "Reshape", nn.Linear: "Dense"}[type(m)]


def _parse(table: str, channels: int):
    rows = []
    for row in table.split("|"):
        label, shape = row.split()
        dims = () if shape == "-" else tuple(channels if d == "C" else int(d) for d in shape.split("x"))
        rows.append((label, dims))
    return rows


def _walk(net: nn.Sequential, x: torch.Tensor):
    rows = []
    for layer in net.children():
        x = layer(x)
        rows.append((_label(layer), tuple(x.shape[1:])))
    return rows, x


@pytest.fixture(scope="module", params=[(n, c) for n in TABLES for c in (1, 3)],
                ids=lambda p: f"{p[0]}-{p[1]}ch")
def model(request):
    name, channels = request.param
    torch.manual_seed(0)
    return piad.PIAD(config=presets.network(name), channels=channels)


def test_networks_match_supplement_tables(model):
    cfg, ch, table = model.config, model.channels, TABLES[model.config.name]
    x = torch.randn(2, ch, cfg.image_size, cfg.image_size)          # (B, C, S, S)
    with torch.no_grad():
        rows, z = _walk(model.E, x)
        assert rows == _parse(table["E"], ch)
        assert z.shape == (2, *cfg.latent_shape)
        rows, x_rec = _walk(model.G, z)
        assert rows == _parse(table["G"], ch)
        assert x_rec.shape == x.shape
        rows, d = _walk(model.DX, x)
        assert rows == _parse(table["DX"], ch)
        assert d.shape == (2,)
        rows, dz = _walk(model.DZ, z)
        assert rows[:-1] == _parse(table["DZ"], ch)   # the last row (squeeze) is ours
        assert dz.shape == (2,)
        assert model.reconstruct(x).shape == x.shape
        assert model.G(z.flatten(1)).shape == x.shape                 # flat latents accepted
        assert model.DZ(z.flatten(1)).shape == (2,)


def test_table1_critic_is_one_setting_away():
    from dataclasses import replace

    cfg = replace(presets.network("mnist"), dx_channels=(32,) * 5)
    dx = piad.PIAD(config=cfg, channels=1).DX
    rows, d = _walk(dx, torch.randn(2, 1, 32, 32))
    assert rows == _parse(TABLE1_DX, 1) and d.shape == (2,)


def test_sample_latent(model):
    z = model.sample_latent(5, generator=torch.Generator().manual_seed(3))
    assert z.shape == (5, *model.config.latent_shape) and z.device == model.device
    assert torch.equal(z, model.sample_latent(5, generator=torch.Generator().manual_seed(3)))


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _conv(i, o, k):
    return i * o * k * k + o


def test_parameter_counts():
    m = piad.PIAD(config=presets.network("mnist"), channels=1)
    pre = 2 * _conv(32, 32, 3)
    assert count_parameters(piad.PreActBlock(32)) == pre
    # Table 1's G: 4×4 stem, three BlockUp(32, 32) (no 1×1 skip), a pre-act block, 1×1 output.
    assert count_parameters(m.G) == _conv(32, 32, 4) + 3 * pre + pre + _conv(32, 1, 1)
    assert count_parameters(piad.BlockUp(32, 64)) == _conv(32, 64, 3) + _conv(64, 64, 3) + _conv(32, 64, 1)
    assert count_parameters(piad.BlockDown(64, 64)) == 2 * _conv(64, 64, 3)
    for name in TABLES:
        cfg = presets.network(name)
        d, h = math.prod(cfg.latent_shape), cfg.dz_hidden
        dz = piad.LatentCritic(config=cfg)
        assert count_parameters(dz) == d * h + h + h * h + h + h + 1
    m.DZ.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == count_parameters(m) - count_parameters(m.DZ)


def test_blocks_shapes():
    x = torch.randn(2, 8, 6, 6)
    assert piad.BlockUp(8, 8)(x).shape == (2, 8, 12, 12)
    assert piad.BlockUp(8, 4)(x).shape == (2, 4, 12, 12)
    assert piad.BlockDown(8, 8)(x).shape == (2, 8, 3, 3)
    assert piad.BlockDown(8, 16)(x).shape == (2, 16, 3, 3)
    assert piad.BlockDown(8, 16, downsample=False)(x).shape == (2, 16, 6, 6)
    assert piad.ResidualBlock(8, 16)(x).shape == (2, 16, 6, 6)
    assert piad.PreActBlock(8)(x).shape == x.shape
    assert piad.MinibatchStdDev()(x).shape == (2, 9, 6, 6)


def test_blocks_are_residual():
    """With zeroed last convs the blocks reduce to their skip paths."""
    x = torch.randn(2, 4, 4, 4)
    up, down, pre = piad.BlockUp(4, 4), piad.BlockDown(4, 4), piad.PreActBlock(4)
    for b in (up, down, pre):
        nn.init.zeros_(b.conv2.weight), nn.init.zeros_(b.conv2.bias)
    assert torch.equal(pre(x), x)
    assert torch.equal(up(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.allclose(down(x), nn.functional.avg_pool2d(x, 2))


def test_minibatch_stddev_values():
    x = torch.randn(8, 3, 2, 2)
    out = piad.MinibatchStdDev(group_size=4, eps=0.0)(x)
    assert torch.equal(out[:, :3], x)
    for i in range(8):  # sample i is grouped with i ± 2k (ProGAN's strided grouping)
        group = x[i % 2::2]
        expected = group.std(dim=0, correction=0).mean()
        assert torch.allclose(out[i, 3], expected.expand(2, 2))
    # 6 is not divisible by 4: the whole batch is one group
    y = torch.randn(6, 3, 2, 2)
    out = piad.MinibatchStdDev(group_size=4, eps=0.0)(y)
    assert torch.allclose(out[:, 3], y.std(dim=0, correction=0).mean().expand(6, 2, 2))
    assert torch.isfinite(piad.MinibatchStdDev()(torch.randn(1, 3, 2, 2))).all()
    # default (authors' code): one scalar over the whole batch, whatever its size
    out = piad.MinibatchStdDev(eps=0.0)(x)
    assert torch.allclose(out[:, 3], x.std(dim=0, correction=0).mean().expand(8, 2, 2))


def test_authors_initialisation():
    torch.manual_seed(0)
    m = piad.PIAD(config=presets.network("cifar10"), channels=3)
    gain = math.sqrt(2 / (1 + 0.2 ** 2))
    for net in (m.G, m.E, m.DX):   # Kaiming-normal, fan_out, every convolution
        for conv in (c for c in net.modules() if isinstance(c, nn.Conv2d)):
            fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
            if conv.weight.numel() >= 4096:
                assert conv.weight.std().item() == pytest.approx(gain / math.sqrt(fan_out), rel=0.1)
    fc1, fc2, fc3 = (l for l in m.DZ.modules() if isinstance(l, nn.Linear))
    for fc, g in ((fc1, gain), (fc2, gain), (fc3, 1.0)):   # Xavier-uniform with the activation's gain
        bound = g * math.sqrt(6 / (fc.in_features + fc.out_features))
        assert fc.weight.abs().max().item() <= bound and fc.weight.abs().max().item() > 0.9 * bound
    torch.manual_seed(0)
    default = piad.PIAD(config=dataclasses.replace(presets.network("cifar10"), init="pytorch"), channels=3)
    assert default.G.conv_in.weight.std().item() < 0.5 * m.G.conv_in.weight.std().item()
    with pytest.raises(ValueError, match="init"):
        dataclasses.replace(presets.network("mnist"), init="xavier")


class Linear(nn.Module):
    """D(x) = <w, x> + b: ∇D = w everywhere."""

    def __init__(self, w, b=0.5):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        return x.flatten(1) @ self.w.flatten() + self.b


class Quadratic(nn.Module):
    def forward(self, x):  # D(x) = ||x||^2 / 2, ∇D = x
        return 0.5 * x.flatten(1).square().sum(1)


@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(3, 2, 4, 4), (5, 7, 1, 1), (4, 6)]),
       scale=st.floats(0.01, 3.0))
def test_gradient_penalty_linear_closed_form(seed, shape, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape[1:], generator=g, dtype=torch.float64) * scale
    critic = Linear(w)
    real = torch.randn(shape, generator=g, dtype=torch.float64)
    fake = torch.randn(shape, generator=g, dtype=torch.float64)
    gp = piad.gradient_penalty(critic, real, fake)
    norm = w.norm()
    assert gp.item() == pytest.approx((norm.item() - 1) ** 2, rel=1e-9, abs=1e-12)
    gp.backward()  # create_graph: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(critic.w.grad, 2 * (norm - 1) * w / norm)


def test_gradient_penalty_quadratic():
    real = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    expected = (real.flatten(1).norm(dim=1) - 1).square().mean()
    assert torch.allclose(piad.gradient_penalty(Quadratic(), real, real.clone()), expected)
    fake = torch.randn_like(real)
    alpha = torch.rand(6, 1, 1, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_hat = alpha * real + (1 - alpha) * fake   # per-sample interpolation
    expected = (x_hat.flatten(1).norm(dim=1) - 1).square().mean()
    gp = piad.gradient_penalty(Quadratic(), real, fake, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(gp, expected)


def test_critic_loss_linear_by_hand():
    w = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64)
    critic = Linear(w, b=0.25)
    real = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    fake = torch.tensor([[0.0, 1.0, 0.0, 1.0], [-1.0, 2.0, 0.0, 0.0]], dtype=torch.float64,
                        requires_grad=True)
    d_real = [0.3 + 4.0 - 0.5 + 0.25, 0.5 * 1.6 + 0.25]       # [4.05, 1.05]
    d_fake = [-1.2 + 0.5 + 0.25, -0.3 - 2.4 + 0.25]          # [-0.45, -2.45]
    gp = (math.sqrt(0.09 + 1.44 + 4.0 + 0.25) - 1) ** 2
    drift_real = (4.05 ** 2 + 1.05 ** 2) / 2               # paper: E[D(x)^2] on real samples
    drift = drift_real + (0.45 ** 2 + 2.45 ** 2) / 2       # authors' code: + E[D(x~)^2] (default)
    expected = sum(d_fake) / 2 - sum(d_real) / 2 + 10.0 * gp + 0.001 * drift   # eq. (5)
    loss, logged_gp = piad.critic_loss(critic, real, fake, gp_weight=10.0, drift=0.001)
    assert logged_gp.item() == pytest.approx(gp, rel=1e-12) and not logged_gp.requires_grad  # for log.csv
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, rel=1e-12)
    paper, _ = piad.critic_loss(critic, real, fake, gp_weight=10.0, drift=0.001, drift_fake=False)
    assert paper.item() == pytest.approx(expected - 0.001 * (drift - drift_real), rel=1e-12)
    # each term on its own: the Wasserstein estimate, the penalty's weight, the drift's weight
    wasserstein, _ = piad.critic_loss(critic, real, fake, gp_weight=0.0, drift=0.0)
    assert wasserstein.item() == pytest.approx(sum(d_fake) / 2 - sum(d_real) / 2, rel=1e-12)
    assert (piad.critic_loss(critic, real, fake, gp_weight=1.0, drift=0.0)[0] - wasserstein).item() == \
        pytest.approx(gp, rel=1e-12)
    assert (piad.critic_loss(critic, real, fake, gp_weight=0.0, drift=1.0)[0] - wasserstein).item() == \
        pytest.approx(drift, rel=1e-12)
    loss.backward()
    assert fake.grad is None and critic.w.grad is not None   # fake is detached inside


def test_adversarial_loss_sign_and_graph():
    torch.manual_seed(0)
    critic = Linear(torch.randn(5))
    real = torch.randn(4, 5)
    fake = nn.Parameter(torch.randn(4, 5))
    loss = piad.adversarial_loss(critic, real, fake)
    with torch.no_grad():
        assert loss.item() == pytest.approx((critic(real).mean() - critic(fake).mean()).item(), rel=1e-6)
        before = critic(fake).mean()
    loss.backward()
    assert torch.allclose(fake.grad, -critic.w.detach().expand(4, 5) / 4)
    assert critic.b.grad.item() == pytest.approx(-1.0)   # the real term carries no graph
    with torch.no_grad():
        fake -= 0.1 * fake.grad                           # minimising it increases D(fake)
        assert critic(fake).mean() > before
    no_real = piad.adversarial_loss(critic, None, fake)
    assert no_real.item() == pytest.approx(-critic(fake).mean().item(), rel=1e-6)


def test_critic_loss_on_image_critic_backprops():
    m = piad.PIAD(config=presets.network("mnist"), channels=1)
    x = torch.randn(4, 1, 32, 32)
    loss, _ = piad.critic_loss(m.DX, x, m.G(m.sample_latent(4)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.DX.parameters())
    assert all(p.grad is None for p in m.G.parameters())
    loss, _ = piad.critic_loss(m.DZ, m.sample_latent(4), m.E(x))
    loss.backward()
    assert all(p.grad is not None for p in m.DZ.parameters())
    assert all(p.grad is None for p in m.E.parameters())


def test_anomaly_score_batching_no_grad_and_modes():
    torch.manual_seed(0)
    tiny = piad.PIADConfig(name="tiny", image_size=8, latent_shape=(4, 1, 1), gen_channels=(4, 4),
                           enc_channels=(4, 4), dx_channels=(4, 4), dx_head_channels=4, dz_hidden=8)
    m = piad.PIAD(config=tiny, channels=1)
    x = torch.randn(7, 1, 8, 8)
    seen = []

    def mse(a, b):
        seen.append((torch.is_grad_enabled(), m.training, m.G.training, a.shape[0]))
        return (a - b).flatten(1).square().mean(1)

    m.train()
    full = piad.anomaly_score(m, x, mse)
    assert full.shape == (7,) and not full.requires_grad and full.grad_fn is None
    assert all(not grad and not t and not tg for grad, t, tg, _ in seen)
    assert m.training and all(mod.training for mod in m.modules())
    seen.clear()
    for bs in (1, 3):
        assert torch.allclose(piad.anomaly_score(m, x, mse, batch_size=bs), full, rtol=1e-5, atol=1e-7)
    assert [n for *_, n in seen] == [1] * 7 + [3, 3, 1]
    with torch.no_grad():
        assert torch.allclose(full, mse(x, m.reconstruct(x)), rtol=1e-5, atol=1e-7)
    m.eval()
    m.DX.train()   # mixed modes come back as they were
    piad.anomaly_score(m, x, mse)
    assert not m.training and not m.G.training and m.DX.training
    with pytest.raises(ValueError, match="per-sample"):
        piad.anomaly_score(m, x, lambda a, b: (a - b).square().mean())


def test_preset_names_json_round_trips_and_sizes():
    """The presets' values are checked against the authors' configs (tests/test_parity.py); here
    what PIADConfig does with names, lists from a JSON round trip and image sizes."""
    with pytest.raises(ValueError, match="mnist, cifar10, lsun, celeba"):
        presets.network("unknown")
    restored = piad.PIADConfig(**{k: list(v) if isinstance(v, tuple) else v
                                  for k, v in asdict(presets.network("lsun")).items()})
    assert restored == presets.network("lsun")   # a JSON-style round trip (lists) gives the preset
    assert [presets.network(n).n_resample for n in ("mnist", "cifar10", "lsun", "celeba")] == [3, 3, 4, 4]
    small = dict(name="s", latent_shape=(8, 1, 1), dx_head_channels=8, dz_hidden=8)
    assert piad.PIADConfig(image_size=8, gen_channels=(8,) * 2, enc_channels=(8,) * 2, dx_channels=(8,) * 2,
                           **small).n_resample == 1
    for size in (48, 4, 2, 0, -8):  # not 4·2^k with k >= 1
        with pytest.raises(ValueError, match="image_size"):
            piad.PIADConfig(image_size=size, gen_channels=(8,) * 4, enc_channels=(8,) * 4, dx_channels=(8,) * 4,
                            **small)
    with pytest.raises(ValueError, match="gen_channels and enc_channels need 4 entries"):
        piad.PIADConfig(image_size=32, gen_channels=(8,) * 3, enc_channels=(8,) * 4, dx_channels=(8,) * 4, **small)
