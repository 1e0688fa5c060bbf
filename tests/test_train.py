"""Tests of train.py (Algorithm 1) and evaluate.py: end to end, exact resume, clear errors."""
import csv
import json
import re

import numpy as np
import pytest
import torch

import evaluate
import features
import checkpoint
import guard
import precision
import presets
from sampler import Sampler
import train


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", normal="3", iterations=4, batch_size=8, out=str(tmp_path / "run"),
                loss="mse", progress=False, evaluate=False)
    base.update(kw)
    return train.TrainConfig(**base)


# The end-to-end run's bar. Measured (seed 0, one thread, 2-core CPU): ROC AUC 0.930 after 300
# iterations (0.916 after 200); the same run with L_rec switched off (--weights-policy fixed,
# γ_G = γ_E = 1e-6) reaches 0.744, the reversed score 0.070, a random one 0.5 ± 0.07 (74 test images).
E2E_ITERATIONS, E2E_AUC_BAR = 300, 0.85


@pytest.fixture
def one_thread():
    """``threads=1`` sets torch's thread count for the process: put it back afterwards."""
    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


def test_end_to_end_digits_detects_the_anomalies_and_writes_every_output(tmp_path, one_thread):
    """Algorithm 1 on real (scikit-learn) digits, normal class 3 (L_rec = mse, batch 8, one thread),
    evaluated with the ImageNet VGG-19: A(x) of eq. (1) ranks the other digits above the 3s well
    past chance (E2E_AUC_BAR, which a run without L_rec or a reversed score misses), and every
    output is written."""
    from sklearn.metrics import roc_auc_score

    cfg = _cfg(tmp_path, iterations=E2E_ITERATIONS, batch_size=8, vgg_weights="caffe", evaluate=True,
               threads=one_thread)
    metrics = train.train(cfg)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "log.csv", "metrics.json", "scores.csv", "roc.png",
                 "reconstructions.png", "extremes.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("roc_auc", "dataset", "normal", "iterations", "loss", "seed", "contamination", "vgg_weights"):
        assert key in saved
    assert saved["iterations"] == E2E_ITERATIONS and saved["score"] == "mse"
    assert saved["roc_auc"] > E2E_AUC_BAR, saved["roc_auc_per_score"]
    assert set(saved["roc_auc_per_score"]) == set(evaluate.SCORES)  # the VGG scores too, with a pixel L_rec
    assert all(0 <= auc <= 1 for auc in saved["roc_auc_per_score"].values())
    with open(run / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == saved["n_test"] and {"id", "label", "mse", "rel-perc-l1", "latent-norm"} <= set(rows[0])
    labels = [int(r["label"]) for r in rows]
    assert sum(labels) == saved["n_test_anomalous"]
    # the reported AUC is that of the scores written, anomalies labelled 1 (higher = more anomalous)
    assert roc_auc_score(labels, [float(r["mse"]) for r in rows]) == pytest.approx(saved["roc_auc"], abs=1e-3)
    with open(run / "log.csv") as fh:
        log = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in log] == [*range(0, E2E_ITERATIONS, 10), E2E_ITERATIONS - 1]
    assert all(np.isfinite(float(r["rec"])) and float(r["gamma_g"]) > 0 for r in log)
    # re-evaluating from the checkpoint reproduces the scores
    evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["roc_auc"] == pytest.approx(saved["roc_auc"], abs=1e-6)


def test_score_new_images(tmp_path):
    from PIL import Image

    train.train(_cfg(tmp_path, iterations=2))
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--images", str(folder)])
    with open(tmp_path / "run" / "scores_new.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and rows[0]["id"].endswith("0.png") and float(rows[0]["mse"]) >= 0


def _state(path):
    s = checkpoint.load_checkpoint(path)
    return s["model"], s["trainer"], s["iteration"]


@pytest.mark.parametrize("policy", ["gradnorm", "fixed"])
def test_kill_and_resume_is_exact(tmp_path, kill_at, policy):
    full = _cfg(tmp_path, iterations=6, out=str(tmp_path / "full"), weights_policy=policy, n_weight=2)
    train.train(full)

    part = _cfg(tmp_path, iterations=6, out=str(tmp_path / "part"), weights_policy=policy, n_weight=2,
                checkpoint_minutes=0.0)  # checkpoint after every iteration
    disarm = kill_at(train.PIADTrainer, 4)
    with pytest.raises(KeyboardInterrupt):
        train.train(part)
    assert checkpoint.load_checkpoint(tmp_path / "part" / "checkpoint.pt")["iteration"] == 4
    disarm()
    train.train(part, resume=True)

    m1, t1, i1 = _state(tmp_path / "full" / "checkpoint.pt")
    m2, t2, i2 = _state(tmp_path / "part" / "checkpoint.pt")
    assert i1 == i2 == 6
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert (t1["gamma_g"], t1["gamma_e"]) == (t2["gamma_g"], t2["gamma_e"])
    assert t1["hist_g"] == t2["hist_g"]
    with open(tmp_path / "full" / "log.csv") as a, open(tmp_path / "part" / "log.csv") as b:
        ra, rb = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb]
    assert [r["rec"] for r in ra] == [r["rec"] for r in rb]


def test_keep_every_keeps_each_kth_state_through_a_resume(tmp_path, kill_at):
    """--keep-every 2: kept/checkpoint-<iteration>.pt holds the run's state after iterations 2, 4, 6,
    whatever the checkpoint timer does; a killed and resumed run keeps the same states (and the
    timer's later saves of checkpoint.pt leave the kept ones as they were)."""
    kw = dict(iterations=6, keep_every=2, checkpoint_minutes=1000.0)
    train.train(_cfg(tmp_path, out=str(tmp_path / "full"), **kw))
    disarm = kill_at(train.PIADTrainer, 3)
    with pytest.raises(KeyboardInterrupt):
        train.train(_cfg(tmp_path, out=str(tmp_path / "part"), **kw))
    assert sorted(p.name for p in (tmp_path / "part" / "kept").iterdir()) == ["checkpoint-0000002.pt"]
    checkpoint.kept_path(tmp_path / "part", 2).unlink()  # as if killed between checkpoint.pt and its copy
    disarm()
    train.train(_cfg(tmp_path, out=str(tmp_path / "part"), **kw), resume=True)
    for run in ("full", "part"):
        kept = sorted((tmp_path / run / "kept").iterdir())
        assert kept == [checkpoint.kept_path(tmp_path / run, i) for i in (2, 4, 6)]
        assert [_state(p)[2] for p in kept] == [2, 4, 6]
    for i in (2, 4, 6):
        m1 = _state(checkpoint.kept_path(tmp_path / "full", i))[0]
        m2 = _state(checkpoint.kept_path(tmp_path / "part", i))[0]
        assert all(torch.equal(m1[k], m2[k]) for k in m1)
    m2, m6 = _state(checkpoint.kept_path(tmp_path / "full", 2))[0], _state(tmp_path / "full" / "checkpoint.pt")[0]
    assert not all(torch.equal(m2[k], m6[k]) for k in m2)  # the kept state is not the last one
    assert all(torch.equal(v, _state(checkpoint.kept_path(tmp_path / "full", 6))[0][k]) for k, v in m6.items())
    with pytest.raises(ValueError, match="keep-every"):
        train.train(_cfg(tmp_path, out=str(tmp_path / "bad"), keep_every=-1))


def test_finished_checkpoint_is_never_overwritten(tmp_path):
    cfg = _cfg(tmp_path, iterations=2)
    train.train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(train.UserError, match="--resume"):
        train.train(cfg)
    with pytest.raises(ValueError, match="differ"):
        train.train(cfg, resume=True, seed=5)
    assert ckpt.read_bytes() == before


def test_truncated_checkpoint_error(tmp_path):
    cfg = _cfg(tmp_path, iterations=2)
    train.train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        train.train(cfg, resume=True, iterations=4)
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        evaluate.load_run(ckpt)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_checkpoint(tmp_path / "nothing.pt")


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="digits"):
        train.train(_cfg(tmp_path, dataset="imagenet"))
    with pytest.raises(ValueError, match="class"):
        train.train(_cfg(tmp_path, normal="11"))
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises((FileNotFoundError, ValueError), match="normal"):
        train.train(_cfg(tmp_path, dataset="folder", data_root=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="method"):
        train.train(_cfg(tmp_path, method="ocgan"))
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "imagenet"])


def test_cli_parsing():
    cfg = train.parse_args(["--dataset", "fashion-mnist", "--normal", "8", "--iterations", "200",
                            "--vgg-weights", "caffe", "--weights-policy", "fixed", "--resume"])
    assert (cfg.dataset, cfg.normal, cfg.iterations, cfg.vgg_weights, cfg.weights_policy, cfg.resume) == \
        ("fashion-mnist", "8", 200, "caffe", "fixed", True)
    assert str(train.TrainConfig(dataset="mnist", normal="8").run_dir()).startswith("runs/mnist-8-piad")
    assert cfg.download and not train.parse_args(["--no-download"]).download  # MNIST/CIFAR-10 fetched when missing


def test_generator_encoder_step_has_the_gradients_of_eq_8_and_9():
    """Lines 16-17 give G  γ_G·∇L_rec + ∇L_adv(G)  and E  γ_E·∇L_rec + ∇L_adv(E)  (eq. 8-9),
    computed here from the same batch, latents and critics as autograd.grad of those sums."""
    import piad
    import presets

    torch.manual_seed(0)
    cfg = train.TrainConfig(loss="mse", weights_policy="fixed", gamma_g=0.3, gamma_e=4.0).resolved()
    model = piad.PIAD(config=presets.network("mnist"), channels=1).double()
    trainer = train.PIADTrainer(model, features.build_loss(cfg.loss)[0], cfg)
    x = torch.rand(8, 1, 32, 32, dtype=torch.float64) * 2 - 1
    z = model.sample_latent(8).double()
    model.sample_latent = lambda n, **kw: z
    got, adam_step = {}, trainer.opt_ge.step

    def step_with_check():  # line 18, after the critics' steps: the same D_X, D_Z as lines 16-17
        got.update({name: q.grad.clone() for name, q in model.named_parameters() if name[:2] in ("G.", "E.")})
        z_enc = model.E(x)
        rec = trainer.rec_loss(x, model.G(z_enc))
        want_g = torch.autograd.grad(0.3 * rec + piad.adversarial_loss(model.DX, x, model.G(z)),
                                     list(model.G.parameters()), retain_graph=True)
        want_e = torch.autograd.grad(4.0 * rec + piad.adversarial_loss(model.DZ, z, z_enc), list(model.E.parameters()))
        got["want"] = dict(zip([f"G.{n}" for n, _ in model.G.named_parameters()], want_g))
        got["want"].update(zip([f"E.{n}" for n, _ in model.E.named_parameters()], want_e))
        adam_step()
    trainer.opt_ge.step = step_with_check
    trainer.step(0, lambda: (x, None))
    want = got.pop("want")
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-14, msg=name)


def test_stats_from_training_images_are_streamed(monkeypatch):
    """--stats train: μ, σ over the training images, batch by batch (lazy datasets too)."""
    import warnings

    import data
    import features

    ds = data.load_dataset("digits", "3")
    lazy = torch.utils.data.Subset(ds.train, range(len(ds.train)))  # not TensorImages: per-item path
    batches = list(data.image_batches(lazy, "cpu", size=50))
    n = len(ds.train)
    assert [len(b) for b in batches] == [50] * (n // 50) + [n % 50] and torch.equal(torch.cat(batches), ds.train.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, stats = features.build_loss(weights="random", stats="train", train_batches=data.image_batches(lazy, "cpu"))
        want = features.feature_stats(loss.features, [ds.train.images])
    assert stats.source == "training images" and stats.count == want.count
    assert torch.allclose(stats.mean, want.mean, rtol=1e-5) and torch.allclose(stats.std, want.std, rtol=1e-4)


def test_stats_auto_uses_the_authors_statistics_only_for_their_weights(monkeypatch):
    """--stats auto: the authors' ImageNet μ, σ when the VGG weights are the ones they belong to."""
    import warnings

    import features

    real = features.authors_stats()
    for weights_id, expect_authors in (("random:seed0", True), ("torchvision:IMAGENET1K_V1", False)):
        monkeypatch.setattr(features, "authors_stats", lambda w=weights_id: features.FeatureStats(
            real.mean, real.std, w, "relu4_2", 0, "authors"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, stats = features.build_loss(weights="random", stats="auto")
        assert (stats.source == "authors") == expect_authors
        assert stats.weights == "random:seed0"   # never statistics of other weights


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__")  # each waits for the device on a GPU


@pytest.mark.parametrize("method", ["piad", "latent-norm"])
def test_an_iteration_that_logs_nothing_brings_no_value_to_the_host(tmp_path, monkeypatch, method):
    """Iteration 1 of 3 (log.csv: every 100, and the last) runs with Tensor.item, tolist, float(),
    int() and bool() watched: none may be called from the project's code (torch's own CPU-side
    bookkeeping, e.g. Adam's step counter, is not ours to change)."""
    from pathlib import Path
    import sys

    from berg import latent_norm

    root = Path(train.__file__).resolve().parent
    calls, watching = [], [False]

    def spy(name, real):
        def wrapped(self, *args, **kwargs):
            frame = sys._getframe(1)
            if watching[0] and Path(frame.f_code.co_filename).resolve().parent == root:
                calls.append(f"{name}() at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return real(self, *args, **kwargs)
        return wrapped

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    trainer_cls = train.PIADTrainer if method == "piad" else latent_norm.LatentNormTrainer
    real_step = trainer_cls.step

    def step(self, it, sample, **kw):
        watching[0] = it == 1  # from iteration 1's step to iteration 2's: the step and the loop's bookkeeping
        return real_step(self, it, sample, **kw)

    monkeypatch.setattr(trainer_cls, "step", step)
    train.train(_cfg(tmp_path, iterations=3, method=method, loss="rel-perc-l1", vgg_weights="random",
                     log_every=100, checkpoint_minutes=60))
    assert not calls, "host syncs in a non-logging iteration: " + "; ".join(calls)
    watching[0] = True  # the watch sees the project's conversions (this one reads a flag on the host)
    guard._params_finite(torch.nn.Linear(2, 2))
    assert calls and calls[0].startswith("__bool__() at guard.py")


def _offline(monkeypatch):
    """torchvision's MNIST as it behaves without internet: nothing on disk, the download fails."""
    import torchvision

    def no_network(root, train=True, download=False, **kw):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz" if download else
                           "Dataset not found. You can use download=True to download it")
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)


def test_mnist_offline_is_one_error_line_naming_the_offline_choices(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "mnist", "--normal", "8", "--data-root", str(tmp_path / "empty"),
                    "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: mnist is not in ")
    assert "downloading it failed" in err[0] and "--data-root" in err[0] and "--dataset mnist-5k" in err[0]
    assert not (tmp_path / "run").exists()


def test_fallback_trains_mnist_5k_when_mnist_cannot_be_had(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    metrics = train.train(_cfg(tmp_path, dataset="mnist", normal="8", fallback="mnist-5k", iterations=2,
                               data_root=str(tmp_path / "empty"), evaluate=True))
    note = capsys.readouterr().err.strip().splitlines()
    assert note == ["note: mnist cannot be had here; training on mnist-5k instead (--fallback)"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["dataset"] == "mnist-5k" and saved["fallback_from"] == "mnist" and saved["normal"] == "8"
    assert metrics["dataset"] == "mnist-5k"
    state = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["config"]["dataset"] == "mnist-5k" and state["config"]["fallback"] is None


# --------------------------------------------------------------------------- --precision (issue 26)
def _bf16_trainer(precision: str, *, loss: str = "rel-perc-l1"):
    import data
    import piad
    import presets

    torch.manual_seed(0)
    ds = data.load_dataset("digits", "3")
    cfg = train.TrainConfig(loss=loss, precision=precision, n_weight=1, policy_at_start=True).resolved()
    model = piad.PIAD(config=presets.network("mnist"), channels=1).to(memory_format=torch.channels_last)
    rec = features.build_loss(cfg.loss, weights="random", stats="sklearn")[0] if loss != "mse" else \
        features.build_loss(cfg.loss)[0]
    return train.PIADTrainer(model, rec, cfg), Sampler(ds.train, 8, "cpu", seed=0, memory_format=torch.channels_last)


@pytest.mark.parametrize("precision_name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_is_honoured_by_the_step(precision_name, dtype):
    """The step, in train.py's precision region (precision.autocast), runs G, E, D_X, D_Z and VGG-19
    in the run's precision (forward hooks see the activations), with fp32 weights, gradients and
    Adam state, fp32 losses and a finite γ."""
    trainer, sampler = _bf16_trainer(precision_name)
    seen = {}
    nets = {"G": trainer.model.G, "E": trainer.model.E, "DX": trainer.model.DX, "DZ": trainer.model.DZ,
            "VGG": trainer.rec_loss.features}
    for name, net in nets.items():
        net.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, set()).add(out.dtype))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with precision.autocast(precision_name, "cpu"):
        out = trainer.step(0, sampler)  # γ measured (n_weight 1, from iteration 0)
    assert seen == {name: {dtype} for name in nets}
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())
    # kept fp32: the penalties (their norm), eq. (4) (the fused op's sums), the critics' total loss
    assert {out[k].dtype for k in ("loss_dx", "loss_dz", "gp_dx", "gp_dz", "rec")} == {torch.float32}
    assert {out[k].dtype for k in ("adv_g", "adv_e")} == {dtype}  # means of the critics' outputs
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(s.dtype == torch.float32 for st in trainer.opt_ge.state.values() for s in st.values() if s.dim())
    assert out["gamma_g"] > 0 and out["gamma_e"] > 0 and out["gamma_g"] != 1.0
    assert not torch.is_autocast_enabled("cpu")  # the region ends with the step
    from torch.optim import optimizer

    assert not optimizer._global_optimizer_post_hooks  # and so does its cache-clearing hook
    after = trainer.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def _first_conv_calls(trainer, sampler) -> list:
    """(output, what the first convolution of D_X gives from its input and its weights at that call)
    for every call of that convolution in one bf16 step."""
    conv = next(m for m in trainer.model.DX.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []

    def hook(mod, inp, out):
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            fresh = torch.nn.functional.conv2d(inp[0].bfloat16(), mod.weight.bfloat16(), mod.bias.bfloat16(),
                                               mod.stride, mod.padding)
        calls.append((out.detach().float(), fresh.float()))
    handle = conv.register_forward_hook(hook)
    with precision.autocast("bf16", "cpu"):
        trainer.step(1, sampler)
    handle.remove()
    return calls


def test_bf16_critic_steps_see_the_updated_weights(monkeypatch):
    """Autocast caches its bf16 weight casts for the whole step: without the cache cleared after each
    optimizer step, the second critic step would run on the weights from before the first update."""
    trainer, sampler = _bf16_trainer("bf16", loss="mse")
    calls = _first_conv_calls(trainer, sampler)
    assert len(calls) >= 6  # 2 critic steps x (real, fake, penalty) and the G/E step
    assert all(torch.equal(out, fresh) for out, fresh in calls)
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: None)  # the stale cache: detected
    trainer, sampler = _bf16_trainer("bf16", loss="mse")
    assert not all(torch.equal(out, fresh) for out, fresh in _first_conv_calls(trainer, sampler))


def test_precision_recorded_and_resume_refuses_a_switch(tmp_path):
    cfg = _cfg(tmp_path, iterations=2, precision="bf16", evaluate=True, vgg_weights="random", stats="sklearn",
               loss="rel-perc-l1")
    metrics = train.train(cfg)
    assert metrics["precision"] == "bf16"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["precision"] == "bf16"
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["precision"] == "bf16"
    with pytest.raises(train.UserError, match=r"--precision 'fp32' \(checkpoint: 'bf16'\)"):
        train.train(cfg, resume=True, iterations=3, precision="fp32")
    assert "precision" not in train.TrainConfig.RESUMABLE


def test_bf16_on_a_cpu_without_it_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "digits", "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--precision fp32" in err[0]
    assert "AVX-512 BF16" in err[0]
    with pytest.raises(train.UserError, match="--method piad only"):
        train.TrainConfig(method="latent-norm", precision="bf16").validate()


@pytest.mark.parametrize("units,expected", [((True, False), "bf16"), ((False, True), "bf16"), ((False, False), "fp32")])
def test_precision_auto_is_decided_by_the_cpu_and_recorded(tmp_path, monkeypatch, units, expected):
    """``--precision auto`` (``make run``'s): bf16 where the CPU has AVX-512 BF16 or AMX, else fp32,
    decided once (``TrainConfig.run_precision``) and recorded as decided in metrics.json and the
    checkpoint, which a resume with ``auto`` on the same machine continues."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units[0])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units[1])
    assert train.TrainConfig().precision == "fp32"  # the default keeps parity with the authors' code
    assert train.TrainConfig(precision="auto", device="cpu").resolved().precision == expected
    assert train.TrainConfig(precision="auto", device="cpu", method="latent-norm",
                             networks="piad").resolved().precision == "fp32"  # bf16 trains PIAD only
    cfg = _cfg(tmp_path, iterations=2, precision="auto", device="cpu", evaluate=True, vgg_weights="random",
               stats="sklearn")
    assert train.train(cfg)["precision"] == expected
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["precision"] == expected
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["precision"] == expected
    assert train.train(cfg, resume=True, iterations=3)["precision"] == expected


def test_a_run_forecasts_its_duration_and_ends_with_its_result(tmp_path, capsys):
    """After the first timed iterations one line gives the schedule, the precision and the time to go;
    the last lines give the result, the run folder with its figures and, for a run shorter than the
    paper's schedule, that schedule's command and duration at this run's speed (make run's ending)."""
    out = tmp_path / "run"
    train.main(["--dataset", "digits", "--normal", "3", "--iterations", "12", "--batch-size", "8", "--loss", "mse",
                "--vgg-weights", "random", "--stats", "sklearn", "--no-progress", "--out", str(out), "--resume"])
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "s per iteration here" in line]
    assert len(notes) == 1 and re.fullmatch(
        r"note: 12 iterations \(--iterations\), fp32: at \d+\.\d\d s per iteration here, about \d+ min to go", notes[0])
    last = captured.out.strip().splitlines()[-3:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert last[0].startswith(f"ROC AUC {metrics['roc_auc']:.3f}, average precision {metrics['average_precision']:.3f}")
    assert last[1].startswith(f"run folder: {out} (") and "roc.png" in last[1] and "reconstructions.png" in last[1]
    schedule = presets.iterations("digits")
    assert re.fullmatch(rf"the paper's schedule, {schedule:,} iterations \(about \d+\.\d h at this run's speed, fp32\): "
                        r"python train.py --dataset digits --normal 3 --batch-size 8 --loss mse --vgg-weights random "
                        r"--stats sklearn --no-progress", last[2])
