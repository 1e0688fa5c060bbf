"""Gradient-normalizing weights policy (paper §3.3, Algorithms 2-3, eq. 10-12)."""
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import piad
import presets
from weights_policy import NORMS, GradientHistory, exp_smoothing, record_losses


class Net(nn.Module):
    """A shared conv trunk and two dense heads, in float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head_a = nn.Linear(48, 5)
        self.head_b = nn.Linear(48, 4)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)   # (B, 48)
        return self.head_a(h), self.head_b(h)


def _f(net, x):
    a, b = net(x)
    return a.square().sum() + torch.sin(b).sum()


@given(k=st.floats(1e-3, 1e3), norm=st.sampled_from(NORMS), reduce=st.sampled_from(["mean", "median"]),
       smoothing=st.floats(0.0, 0.99), last_n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_recovers_known_factor(k, norm, reduce, smoothing, last_n, seed):
    torch.manual_seed(seed)
    net = Net()
    hist = GradientHistory(net, norm=norm)
    for _ in range(3):   # Algorithm 1, lines 10-12, with l1 = k·f(w), l2 = f(w)
        f = _f(net, torch.randn(2, 2, 4, 4, dtype=torch.float64))
        for name, loss in (("l1", k * f), ("l2", f)):
            net.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            hist.record(name)
    assert set(hist.layer_weights("l1", "l2")) == {"conv", "head_a", "head_b"}
    gamma = hist.weight("l1", "l2", last_n=last_n, smoothing=smoothing, reduce=reduce)
    assert gamma == pytest.approx(k, rel=1e-9)
    assert hist.weight("l2", "l1", last_n=last_n, smoothing=smoothing, reduce=reduce) == pytest.approx(1 / k, rel=1e-9)


class Layers(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(4, 5, dtype=torch.float64) for _ in range(n))


def _set_grads(module, values):
    """Give layer i a gradient of L2 norm values[i] (None = not reached)."""
    g = torch.Generator().manual_seed(0)
    for fc, v in zip(module.fcs, values):
        u = torch.randn(fc.weight.shape, generator=g, dtype=torch.float64)
        fc.weight.grad = None if v is None else v * u / u.norm()


def _hand_history(num, den, n_layers=1):
    """num[t][i], den[t][i]: L2 norms of layer i at record t."""
    module = Layers(n_layers)
    hist = GradientHistory(module, norm="l2")
    for a, b in zip(num, den):
        _set_grads(module, a), hist.record("num")
        _set_grads(module, b), hist.record("den")
    return hist


def test_mean_vs_median_over_layers():
    hist = _hand_history([[1.0, 2.0, 10.0]], [[1.0, 1.0, 1.0]], n_layers=3)
    assert hist.layer_weights("num", "den") == pytest.approx({"fcs.0": 1.0, "fcs.1": 2.0, "fcs.2": 10.0})
    assert hist.weight("num", "den", reduce="mean") == pytest.approx(13 / 3)   # the paper: mean
    assert hist.weight("num", "den", reduce="median") == pytest.approx(2.0)
    assert hist.weight("num", "den") == pytest.approx(2.0)   # authors' code: pooled median
    with pytest.raises(ValueError, match="reduce"):
        hist.weight("num", "den", reduce="max")


def test_smoothing_and_last_n_by_hand():
    hist = _hand_history([[2.0], [4.0], [8.0]], [[1.0], [1.0], [1.0]])
    # smoothing 0.5: s = [2, 3, 5.5]
    mean = dict(reduce="mean")
    assert hist.weight("num", "den", smoothing=0.5, last_n=1, **mean) == pytest.approx(5.5)
    assert hist.weight("num", "den", smoothing=0.5, last_n=2, **mean) == pytest.approx(4.25)
    assert hist.weight("num", "den", smoothing=0.5, last_n=10, **mean) == pytest.approx(3.5)
    assert hist.weight("num", "den", smoothing=0.0, last_n=3, **mean) == pytest.approx(14 / 3)
    # pooled median over the last N ratios [2, 3, 5.5]
    assert hist.weight("num", "den", smoothing=0.5, last_n=10) == pytest.approx(3.0)
    assert hist.weight("num", "den", smoothing=0.5, last_n=2) == pytest.approx(4.25)
    # the ratio of smoothed values, not the smoothed ratio: den s = [1, 2] -> ratios [1, 0.5]
    hist = _hand_history([[1.0], [1.0]], [[1.0], [3.0]])
    assert hist.weight("num", "den", smoothing=0.5, last_n=2, **mean) == pytest.approx(0.75)
    assert exp_smoothing([2.0, 4.0, 8.0], 0.9) == pytest.approx([2.0, 2.2, 2.78])
    with pytest.raises(ValueError):
        hist.weight("num", "den", last_n=0)
    with pytest.raises(ValueError):
        hist.weight("num", "den", smoothing=1.0)


def test_records_the_chosen_norm_only():
    module = Layers(1)
    grad = torch.tensor([[3.0, -1.0, 0.5, 2.0]] * 5, dtype=torch.float64)
    module.fcs[0].weight.grad = grad
    std, l2 = GradientHistory(module), GradientHistory(module, norm="l2")  # norm="std" by default
    std.record("a"), l2.record("a")
    assert std.norm == "std" and std.history == {"a": {"fcs.0": [pytest.approx(grad.std(correction=0).item())]}}
    assert l2.history == {"a": {"fcs.0": [pytest.approx(grad.norm().item())]}}


def test_state_dict_round_trip():
    torch.manual_seed(0)
    net, net2 = Net(), Net()
    hist = GradientHistory(net, norm="l2")
    for _ in range(3):
        f = _f(net, torch.randn(2, 2, 4, 4, dtype=torch.float64))
        record_losses(hist, {"a": f, "b": 3 * f.square()}, net.parameters())
    buf = io.BytesIO()
    torch.save(hist.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with pytest.raises(ValueError, match="'l2' norm, this history the 'std' norm"):
        GradientHistory(net2).load_state_dict(state)   # the default norm: another history
    resumed = GradientHistory(net2, norm="l2")
    resumed.load_state_dict(state)
    assert resumed.norm == "l2" and resumed.history == hist.history
    assert resumed.weight("a", "b") == hist.weight("a", "b")
    net2.load_state_dict(net.state_dict())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for h, n in ((hist, net), (resumed, net2)):  # training goes on identically
        f = _f(n, x)
        record_losses(h, {"a": f, "b": 3 * f.square()}, n.parameters())
    assert resumed.weight("a", "b", reduce="median") == hist.weight("a", "b", reduce="median")
    with pytest.raises(ValueError, match="different layers"):
        GradientHistory(Layers(2)).load_state_dict(hist.state_dict())


def test_loads_a_state_that_recorded_both_norms():
    """Checkpoints written when every record stored both norms (history[loss][norm][layer])."""
    old = {"norm": "std", "layers": ["fcs.0"], "max_history": 200,
           "history": {"a": {"std": {"fcs.0": [1.0, 2.0]}, "l2": {"fcs.0": [5.0, 9.0]}},
                       "b": {"std": {"fcs.0": [4.0, 4.0]}, "l2": {"fcs.0": [3.0, 3.0]}}}}
    for norm, want in (("std", [1.0, 2.0]), ("l2", [5.0, 9.0])):
        hist = GradientHistory(Layers(1), norm=norm)
        hist.load_state_dict(old)
        assert hist.history["a"] == {"fcs.0": want}
    assert hist.weight("a", "b", smoothing=0.0, reduce="mean") == pytest.approx((5 / 3 + 3) / 2)


def test_errors():
    hist = GradientHistory(Layers(1))
    with pytest.raises(ValueError, match="no gradient history"):
        hist.weight("adv", "rec")
    with pytest.raises(ValueError, match="norm"):
        GradientHistory(Layers(1), norm="l1")
    with pytest.raises(ValueError, match="no layer"):
        GradientHistory(nn.Sequential(nn.ReLU()))


def test_losses_reaching_only_some_layers():
    torch.manual_seed(1)
    net = Net()
    hist = GradientHistory(net)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for zero_to_none in (True, False):     # both zero_grad conventions mark unreached layers
        a, b = net(x)
        for name, loss in (("a", a.square().sum()), ("b", b.sum()),
                           ("head_only", net.head_a(torch.randn(1, 48, dtype=torch.float64)).sum()),
                           ("const", net.head_a(torch.ones(1, 48, dtype=torch.float64)).sum())):
            net.zero_grad(set_to_none=zero_to_none)
            loss.backward(retain_graph=True)
            hist.record(name)
    for layer, values in hist.history["a"].items():
        assert all(math.isnan(v) for v in values) == (layer == "head_b")
    per_layer = hist.layer_weights("a", "b")
    assert set(per_layer) == {"conv"} and math.isfinite(per_layer["conv"])
    assert hist.weight("a", "b") == pytest.approx(per_layer["conv"])
    assert set(hist.layer_weights("a", "head_only")) == {"head_a"}
    with pytest.raises(ValueError, match="no tracked layer"):
        hist.weight("b", "head_only")   # disjoint: head_b vs head_a
    # a constant gradient has std 0: skipped as a denominator, no inf
    assert hist.layer_weights("a", "const") == {}
    assert hist.layer_weights("const", "a") == {"head_a": 0.0}


def test_record_losses_on_piad_networks():
    torch.manual_seed(0)
    m = piad.PIAD(config=presets.network("mnist"), channels=1)
    hist_g, hist_e = GradientHistory(m.G), GradientHistory(m.E)
    assert len(hist_g.params) == sum(isinstance(x, nn.Conv2d) for x in m.G.modules())
    x = torch.randn(4, 1, 32, 32)
    z = m.sample_latent(4)
    losses = {"adv_G": piad.adversarial_loss(m.DX, x, m.G(z)),
              "adv_E": piad.adversarial_loss(m.DZ, z, m.E(x)),
              "rec": (m.reconstruct(x) - x).abs().mean()}
    for p in m.DX.parameters():
        p.grad = torch.ones_like(p)
    params = [*m.G.parameters(), *m.E.parameters()]
    assert record_losses([hist_g, hist_e], losses, params) is None
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in m.DX.parameters())  # untouched
    expected = torch.autograd.grad(losses["rec"], [*hist_g.params.values(), *hist_e.params.values()],
                                   retain_graph=True)
    recorded = [v[-1] for h in (hist_g, hist_e) for v in h.history["rec"].values()]
    assert recorded == pytest.approx([g.std(correction=0).item() for g in expected], rel=1e-6)
    gamma_g, gamma_e = hist_g.weight("adv_G", "rec"), hist_e.weight("adv_E", "rec")
    assert math.isfinite(gamma_g) and gamma_g > 0 and math.isfinite(gamma_e) and gamma_e > 0
    assert "adv_E" not in hist_g.history and "adv_G" not in hist_e.history   # they reach no layer there
    with pytest.raises(ValueError, match="no gradient history for loss 'adv_E'"):
        hist_g.weight("adv_E", "rec")
    with pytest.raises(ValueError, match="not among params"):
        record_losses(hist_e, losses, m.G.parameters())
    (losses["rec"] + losses["adv_G"]).backward()   # graph retained for Algorithm 1, lines 15-17


def test_history_keeps_the_last_records_and_smooths_from_the_oldest_kept():
    module = Layers(1)
    hist = GradientHistory(module, norm="l2", max_history=2)
    for a in (2.0, 4.0, 8.0):   # the first record falls out of the history
        _set_grads(module, [a]), hist.record("num")
        _set_grads(module, [1.0]), hist.record("den")
    assert hist.history["num"]["fcs.0"] == pytest.approx([4.0, 8.0])
    # smoothing restarts from 4 (the oldest record kept): s = [4, 6] -> pooled median 5
    assert hist.weight("num", "den", smoothing=0.5, last_n=10) == pytest.approx(5.0)
    everything = GradientHistory(module, norm="l2", max_history=None)
    assert everything.max_history is None
    with pytest.raises(ValueError, match="max_history"):
        GradientHistory(module, max_history=0)
