"""pgan.py against the tables of Berg et al.'s supplement (Appendix A §1.1 KTH-Cellvideos, §1.2
CIFAR-10): every row's parameter count, weight shape and output shape, and every total; and the
building blocks: equalised learning rate, pixel-norm, minibatch-stddev groups, fade-in."""
import math
import re
from pathlib import Path

import pytest
import torch

from berg import pgan

# The six tables as printed in the supplement (tab-separated: row, Params, OutputShape, WeightShape),
# one file of data beside this test.
TABLES = (Path(__file__).parent / "berg_supplement_tables.tsv").read_text()

# Rows of the CIFAR-10 G table that contradict the table's own total: the total 20,719,628 is the
# KTH trunk (20,713,472) plus four 3-channel ToRGB layers of 1,539 parameters (4x4 .. 32x32 =
# lod3 .. lod0); the printed rows (513 parameters, 1 channel, lod4/lod3/lod2) were copied from the
# KTH table. Printed row -> (our row, params, output shape).
ERRATA = {("cifar10", "Generator", "ToRGB lod4"): ("ToRGB lod3", 1539, (3, 4, 4), (1, 1, 512, 3)),
          ("cifar10", "Generator", "ToRGB lod3"): ("ToRGB lod2", 1539, (3, 8, 8), (1, 1, 512, 3)),
          ("cifar10", "Generator", "ToRGB lod2"): ("ToRGB lod1", 1539, (3, 16, 16), (1, 1, 512, 3)),
          ("cifar10", "Generator", "Grow lod3"): ("Grow lod2", None, (3, 8, 8), ()),
          ("cifar10", "Generator", "Grow lod2"): ("Grow lod1", None, (3, 16, 16), ())}
# Parameterless rows whose printed shape is an artefact of their TF name scopes (not a layer output).
NOT_LAYERS = {"Upscale2D", "Downscale2D", "labels in", "labels out", "lod"}


def row_name(key: str) -> str:
    """The supplement's row name of a ``layers`` key: ``"8x8/Conv0_up"`` -> ``"8x8/Conv0 up"``."""
    return key.replace("_", " ")


def parse_tables():
    tables = {}
    for chunk in TABLES.strip().split("# ")[1:]:
        preset, body = chunk.split("\n", 1)
        lines = body.strip().splitlines()
        net = lines[0].split("\t")[0]
        rows = []
        for line in lines[1:]:
            cells = line.split("\t")
            if cells[0] == "Total":
                total = int(cells[1])
                continue
            params = None if cells[1] in ("-", "") else int(cells[1])
            shape = tuple(int(v) for v in re.findall(r"\d+", cells[2]))
            wshape = tuple(int(v) for v in re.findall(r"\d+", cells[3])) if len(cells) > 3 else ()
            rows.append((cells[0], params, shape, wshape))
        tables[preset, net] = (rows, total)
    return tables


TABLE = parse_tables()
BATCH = 4


def build(preset: str, net: str):
    with torch.device("meta"):  # full width without the cost of initialising 22 M weights
        g, d, e = pgan.networks(preset)
    return {"Generator": g, "Discriminator": d, "Encoder": e}[net]


def run_at(net, lod: float):
    """Output shapes (without the batch dim) of every row of ``net`` run at ``lod``, and the output."""
    net.lod = torch.tensor(float(lod))
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(row_name(k), tuple(o.shape[1:])))
             for k, m in net.layers.items()]
    x = (torch.empty(BATCH, pgan.LATENT, device="meta") if isinstance(net, pgan.Generator)
         else torch.empty(BATCH, net.channels, net.resolution, net.resolution, device="meta"))
    out = net(x)
    for h in hooks:
        h.remove()
    return shapes, tuple(out.shape[1:]), tuple(x.shape[1:])


@pytest.mark.parametrize("preset,net", sorted(TABLE))
def test_every_row_and_total_as_the_supplement(preset, net):
    rows, total = TABLE[preset, net]
    model = build(preset, net)
    assert sum(p.numel() for p in model.parameters()) == total
    shapes, out, inp = run_at(model, 0.0)
    for lod in range(model.R - 2):  # lower resolutions' rows and the Grow rows work while lod is in (k, k+1)
        for k, v in run_at(model, lod + 0.5)[0].items():
            assert shapes.setdefault(k, v) == v, k  # a layer works at one resolution only
    ours = {row_name(k): m for k, m in model.layers.items()}
    seen = set()
    rows = [ERRATA.get((preset, net, r[0]), r) for r in rows]
    assert sum(r[1] for r in rows if r[1]) == total  # the rows add up to the table's total (after ERRATA)
    for name, params, shape, wshape in rows:
        if name.split()[0] in NOT_LAYERS or name in NOT_LAYERS:
            continue
        if name in ("images out", "scores out", "Z"):
            assert out == shape, name
            continue
        if name == "images in":
            assert inp == shape
            continue
        if name == "latents in":
            assert shape == (pgan.LATENT,) and model.latent_size == pgan.LATENT
            continue
        m = ours[name]
        seen.add(name)
        n = sum(p.numel() for p in m.parameters())
        assert n == (params or 0), name
        if name == "4x4/MinibatchStddev":  # the table shows the appended feature map
            assert shapes[name][0] == shapes[name.replace("MinibatchStddev", "Conv")][0] + 1
            assert (1, *shapes[name][1:]) == shape, name
        else:
            assert shapes[name] == shape, name
        if wshape:
            assert m.tf_weight_shape == wshape, name
    assert seen == set(ours), "a layer that no row of the table names"


def test_equalised_learning_rate():
    torch.manual_seed(0)
    conv = pgan.EqualizedConv2d(64, 32, 3)
    assert abs(conv.weight.std().item() - 1) < 0.02  # the optimiser sees N(0, 1) weights
    he = math.sqrt(2) / math.sqrt(64 * 9)
    x = torch.randn(2, 64, 8, 8)
    ref = torch.nn.functional.conv2d(x, conv.weight * he, conv.bias, padding=1)  # effective weight: He-scaled
    torch.testing.assert_close(conv(x), ref)
    dense = pgan.EqualizedDense(512, 16 * 8, gain=math.sqrt(2) / 4, reshape=(8, 4, 4))
    z = torch.randn(3, 512)
    ref = (z @ (dense.weight * math.sqrt(2) / 4 / math.sqrt(512)).T).reshape(3, 8, 4, 4)
    torch.testing.assert_close(dense(z), ref + dense.bias.reshape(1, -1, 1, 1))
    # Adam's step is scale-free, so an N(0,1) weight moves by ~lr whatever the fan-in: the gradient
    # w.r.t. the stored weight is the He constant times the one w.r.t. the effective weight
    conv(x).sum().backward()
    w = (conv.weight.detach() * he).requires_grad_()
    torch.nn.functional.conv2d(x, w, conv.bias.detach(), padding=1).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad * he)


def test_pixel_norm_after_every_conv_of_g():
    torch.manual_seed(0)
    g = pgan.Generator(1, 16, fmap_base=64, fmap_max=16)
    feats = []
    for k, m in g.layers.items():
        if "Conv" in k or "Dense" in k:
            m.register_forward_hook(lambda m, i, o: feats.append(o))
    g(torch.randn(5, 16) * 7)
    assert len(feats) == 6
    # the next layer sees pixel-normalised leaky-ReLU outputs: mean over channels of x^2 is 1
    for o in feats:
        y = pgan.latent_norm.pixel_norm(torch.nn.functional.leaky_relu(o, 0.2))
        torch.testing.assert_close(y.square().mean(1), torch.ones_like(y[:, 0]), rtol=1e-4, atol=1e-4)
    # the latent is pixel-normalised first: G depends on its direction only
    z = torch.randn(3, 16)
    torch.testing.assert_close(g(z), g(5 * z), rtol=1e-4, atol=1e-5)


def test_minibatch_stddev_groups_of_four():
    d = pgan.Discriminator(1, 8, fmap_base=32, fmap_max=8)
    mb = d.layers["4x4/MinibatchStddev"]
    x = torch.randn(8, 3, 4, 4)
    y = mb(x)[:, -1, 0, 0]
    for m in range(2):  # sample i is in group i mod 2 (their reshape to [4, -1, ...])
        grp = x[m::2]
        expected = (grp.var(0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[m::2], expected.expand(4))
    assert not torch.allclose(y[0], y[1])


@pytest.mark.parametrize("cls", ["G", "D", "E"])
def test_fade_in(cls):
    torch.manual_seed(0)
    g, d, e = pgan.networks("cifar10", fmap_base=64, fmap_max=16)
    net = dict(G=g, D=d, E=e)[cls]
    inp = torch.randn(8, 16) if cls == "G" else torch.rand(8, 3, 32, 32) * 2 - 1

    def at(lod):
        net.lod = torch.tensor(float(lod))
        return net(inp)

    # lod 2 -> 1: 8x8 -> 16x16 fades in while lod goes 2 -> 1 (alpha = 1 - (lod - 1))
    low, new = at(2.0), at(1.0)
    almost_low, almost_new = at(1.0 + 1 - 1e-6), at(1.0 + 1e-6)
    if cls == "G":
        torch.testing.assert_close(almost_low, pgan.upscale2d(low), rtol=1e-4, atol=1e-4)  # alpha 0: lower, upscaled
        torch.testing.assert_close(almost_new, new, rtol=1e-4, atol=1e-4)  # alpha 1: the new block alone
        assert low.shape[-1] == 8 and new.shape[-1] == 16 and net.full(inp).shape[-1] == 32
        half = at(1.5)
        expected = 0.5 * new + 0.5 * pgan.upscale2d(low)
        torch.testing.assert_close(half, expected, rtol=1e-4, atol=1e-4)  # the toRGB outputs blend linearly
    else:
        torch.testing.assert_close(almost_low, low, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(almost_new, new, rtol=1e-4, atol=1e-4)
        # a full-size input reads as its average-pooled working-resolution image (their downscale2d)
        net.lod = torch.tensor(1.0)
        torch.testing.assert_close(net(inp), net(torch.nn.functional.avg_pool2d(inp, 2)))


def test_encode_does_not_depend_on_the_other_images_of_the_batch():
    torch.manual_seed(0)
    m = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=8, fmap_base=32, fmap_max=8))
    m.set_reference(torch.rand(3, 1, 8, 8) * 2 - 1)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    alone = torch.cat([m.encode(x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(m.encode(x), alone)  # batch-independent
    torch.testing.assert_close(m.encode(x.flip(0)).flip(0), alone)
    # plain E: the minibatch-stddev feature makes E(x_i) depend on the images grouped with it
    assert not torch.allclose(m.E(x)[:4], m.E(torch.cat([x[:4], x[:4].flip(0) * 0.1]))[:4])
    # encode(x) is E on a group of x and the three reference images
    torch.testing.assert_close(m.encode(x[:1]), m.E(torch.cat([x[:1], m.reference]))[:1])


def test_checkpoints_of_the_earlier_layout_load():
    """Earlier checkpoints stored D under ``DX.`` and the loss weights in the preset: both load."""
    import dataclasses

    torch.manual_seed(0)
    m = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=8, fmap_base=32, fmap_max=8))
    m.set_lod(0.5)
    old = {("DX." + k[2:] if k.startswith("D.") else k): v.clone() for k, v in m.state_dict().items()}
    assert any(k.startswith("DX.") for k in old) and not any(k.startswith("D.") for k in old)
    preset = {**dataclasses.asdict(m.config), "gp_weight": 10.0, "drift": 1e-3}
    torch.manual_seed(1)
    m2 = pgan.PGAN(pgan.PGANConfig.from_saved(preset))
    assert m2.config == m.config
    m2.load_state_dict(old)  # strict: every key mapped, none left over
    assert m2.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert m2.image_critic is m2.D and float(m2.D.lod) == 0.5
    assert not hasattr(m2, "DX")
