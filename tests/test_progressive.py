"""progressive.py: the lod / minibatch / learning-rate schedule of Berg et al.'s train.py
(TrainingSchedule with config.py's preset-v2-1gpu and the supplement's §2), the Adam resets,
the real images' fade, the moving average Gs, and exact resume in the middle of a fade-in."""
import copy
import math

import pytest
import torch

from berg import latent_norm
from berg import pgan
from berg import progressive
from berg import system

S = progressive.Schedule()


@pytest.mark.parametrize("kimg,lod,res,mb", [
    (0, 3.0, 4, 128), (599.9, 3.0, 4, 128),           # 32×32 (CIFAR-10): start at 4×4, lod 3
    (600, 3.0, 4, 128), (900, 2.5, 8, 128),          # fade-in of 8×8: lod 3 -> 2 over 600 kimg
    (1200, 2.0, 8, 128), (2100, 1.5, 16, 128),       # stabilise 8×8; fade in 16×16
    (3000, 1.0 - 0.0, 16, 128), (3300, 0.5, 32, 64),  # ...; fade in 32×32 with minibatch 64
    (3600, 0.0, 32, 64), (12000, 0.0, 32, 64),       # then 32×32 to the end (12000 kimg)
])
def test_schedule_cifar(kimg, lod, res, mb):
    p = progressive.phase(S, int(kimg * 1000), 32)
    assert p.lod == pytest.approx(lod) and p.resolution == res and p.minibatch == mb
    assert p.lrate == 0.001


def test_schedule_kth_64():
    assert progressive.phase(S, 0, 64).lod == 4.0
    last = progressive.phase(S, 4_500_000, 64)  # 4th phase: fading 64×64 in (lod 0.5)
    assert last.lod == pytest.approx(0.5) and last.resolution == 64 and last.minibatch == 32


def test_minibatches_counts_their_loop():
    s = progressive.Schedule(lod_training_kimg=1, lod_transition_kimg=1, total_kimg=9)
    n = progressive.minibatches(s, 32)
    nimg, count = 0, 0
    while nimg < 9000:  # their loop: the schedule is re-evaluated every 4 minibatches
        mb = progressive.phase(s, nimg, 32).minibatch
        nimg, count = nimg + 4 * mb, count + 4
    assert n == count and n > 9000 / 128


def test_process_reals_fade():
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(progressive.process_reals(x, 0.0), x)
    low = torch.nn.functional.avg_pool2d(x, 4)
    torch.testing.assert_close(progressive.process_reals(x, 2.0), low)
    half = progressive.process_reals(x, 1.25)  # 16×16, 25 % of the way to 8×8 upscaled
    x16 = torch.nn.functional.avg_pool2d(x, 2)
    up = torch.nn.functional.avg_pool2d(x16, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(half, 0.75 * x16 + 0.25 * up)


def _setup(seed=1000):
    torch.manual_seed(seed)
    model = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=16, fmap_base=32, fmap_max=8))
    # 2 minibatches of 128 at a fixed lod, then a fade-in over 4 (the schedule re-evaluated every 2)
    sched = progressive.Schedule(lod_training_kimg=0.256, lod_transition_kimg=0.512, minibatch_repeats=2)
    data = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.Generator().manual_seed(1)

    def sample(n):
        return data[torch.randint(len(data), (n,), generator=gen)], None

    return model, progressive.ProgressiveTrainer(model, sched), sample, gen


def test_adam_reset_at_start_and_end_of_each_fade_and_gs():
    model, tr, sample, _ = _setup()
    resets, lods = [], []
    for it in range(12):
        before = len(tr.opt_g.state)
        g0 = [p.detach().clone() for p in model.G.parameters()]
        gs0 = [p.detach().clone() for p in tr.Gs.parameters()]
        out = tr.step(it, sample)
        lods.append(out["lod"])
        resets.append(tr.repeat == 1 and before > 0 and
                      max(s["step"].item() for s in tr.opt_g.state.values()) == 1)
        for a, b, c in zip(tr.Gs.parameters(), gs0, g0):  # Gs = lerp(G before its step, Gs, 0.999)
            torch.testing.assert_close(a, b + (c - b) * 0.001)
    # 16×16 from 4×4: lod 2 for 4 minibatches, fade 2 -> 1 over 4 (lod 1.5 at the 5th), ...
    assert lods == [2.0] * 4 + [1.5] * 2 + [1.0] * 4 + [0.5] * 2
    changed = [i for i in range(1, 12) if math.floor(lods[i]) != math.floor(lods[i - 1])
               or math.ceil(lods[i]) != math.ceil(lods[i - 1])]
    assert changed == [4, 6, 10] and [i for i, r in enumerate(resets) if r] == changed


def test_exact_resume_in_the_middle_of_a_fade_in():
    model, tr, sample, gen = _setup()
    for it in range(5):
        tr.step(it, sample)
    assert 0 < tr.phase.lod % 1 and tr.repeat == 1  # mid fade-in, mid repeat
    state = copy.deepcopy({"model": model.state_dict(), "trainer": tr.state_dict(),
                           "rng": torch.get_rng_state(), "gen": gen.get_state()})
    for it in range(5, 11):
        out_a = tr.step(it, sample)
    model2, tr2, sample2, gen2 = _setup(seed=5)  # other initial weights: everything comes from the state
    model2.load_state_dict(state["model"])
    tr2.load_state_dict(state["trainer"])
    torch.set_rng_state(state["rng"])
    gen2.set_state(state["gen"])
    assert model2.lod == 1.5  # the checkpoint records the level of detail
    for it in range(5, 11):
        out_b = tr2.step(it, sample2)
    for a, b in zip(list(model.state_dict().values()) + list(tr.Gs.state_dict().values()),
                    list(model2.state_dict().values()) + list(tr2.Gs.state_dict().values())):
        assert torch.equal(a, b)
    assert out_a["lod"] == out_b["lod"] and torch.equal(out_a["cycle"], out_b["cycle"])
    assert tr.cur_nimg == tr2.cur_nimg


# --- through train.py: --method latent-norm trains pGAN networks by default ----------------------------

def _cfg(tmp_path, name, **kw):
    import train

    # narrow pGAN (fmap_max 8) grown 4×4 -> 32×32: 1,024 images per stabilise / fade-in phase (the
    # schedule is re-evaluated every 4 minibatches of 128: lod 3, 3, 3, 2.5, 2, 2, 2, 1.5, ...)
    base = dict(dataset="digits", normal="3", method="latent-norm", loss="mse", vgg_weights="random",
                fmap_max=8, lod_kimg=1.024, total_kimg=7.168, out=str(tmp_path / name), progress=False)
    return train.TrainConfig(**{**base, **kw})


def test_train_grows_to_full_resolution_and_evaluate_rebuilds_it(tmp_path, capsys):
    import csv

    import checkpoint
    import evaluate
    import train

    cfg = _cfg(tmp_path, "r")
    metrics = train.train(cfg)
    assert metrics["seed"] == 1000  # the method's default seed (their config.py)
    assert capsys.readouterr().err.count("note: pGAN on a CPU") == 1  # the measured step times, once
    assert math.isfinite(metrics["roc_auc"]) and metrics["score"] == "latent-norm"
    with open(tmp_path / "r" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    lods = [float(r["lod"]) for r in rows]
    assert lods[0] == 3.0 and lods[-1] == 0.0 and lods == sorted(lods, reverse=True)
    state = checkpoint.load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["config"]["networks"] == "pgan"  # the method's default networks
    assert state["iteration"] == progressive.minibatches(system.schedule(cfg), 32)
    assert float(state["model"]["G.lod"]) == 0.0 and state["trainer"]["cur_nimg"] >= 7168
    _, _, model, _ = evaluate.load_run(tmp_path / "r" / "checkpoint.pt", device="cpu")
    assert isinstance(model, pgan.PGAN) and model.lod == 0.0 and model.config.fmap_max == 8


def test_kill_and_resume_through_train_mid_fade_in_is_exact(tmp_path, kill_at):
    import checkpoint
    import train

    # 16 minibatches: lod 3 (4×4) for 12, then the 8×8 fade-in (lod 2.5 at minibatches 12-15)
    kw = dict(iterations=16, evaluate=False)
    train.train(_cfg(tmp_path, "full", **kw))
    disarm = kill_at(progressive.ProgressiveTrainer, 14)
    with pytest.raises(KeyboardInterrupt):
        train.train(_cfg(tmp_path, "part", checkpoint_minutes=0.0, **kw))
    disarm()
    mid = checkpoint.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert mid["iteration"] == 14 and mid["trainer"]["repeat"] == 2 and 2.0 < float(mid["model"]["G.lod"]) < 3.0  # in the middle of a fade-in
    train.train(_cfg(tmp_path, "part", checkpoint_minutes=0.0, **kw), resume=True)
    a, b = (checkpoint.load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["trainer"]["Gs"][k], b["trainer"]["Gs"][k]) for k in a["trainer"]["Gs"])
    for opt in ("opt_d", "opt_g", "opt_e"):
        sa, sb = a["trainer"][opt]["state"], b["trainer"][opt]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_networks_and_seed_defaults_of_the_method():
    import errors
    from berg.system import THEIRS  # config.py imports nothing of berg/: their defaults are passed in
    from config import TrainConfig

    given = TrainConfig(method="latent-norm")
    ln = given.validate().resolved(THEIRS)
    assert (ln.networks, ln.seed, ln.pgan) == ("pgan", 1000, True)
    assert (ln.fmap_max, ln.fmap_base, ln.lod_kimg, ln.total_kimg) == \
        (pgan.FMAP_MAX, pgan.FMAP_BASE, progressive.Schedule.lod_training_kimg, progressive.Schedule.total_kimg)
    assert (given.networks, given.seed) == (None, None)  # validate checks, resolved copies
    assert TrainConfig(method="latent-norm", seed=0).resolved(THEIRS).seed == 0
    assert TrainConfig(method="latent-norm", fmap_max=8).resolved(THEIRS).fmap_max == 8
    ours = TrainConfig(method="latent-norm", networks="piad").resolved(THEIRS)
    assert (ours.seed, ours.pgan) == (0, False)
    assert (TrainConfig().resolved(THEIRS).networks, TrainConfig().resolved(THEIRS).seed) == ("piad", 0)
    assert ln.resolved(THEIRS) == ln
    with pytest.raises(errors.UserError, match="--networks pgan"):
        TrainConfig(networks="pgan").validate()


def test_as_trained_gives_the_reals_of_the_lod_at_the_final_size():
    import data

    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ds = data.TensorImages(x, torch.arange(6) % 2)
    for lod, res in ((3.0, 4), (1.5, 16), (0.25, 32)):
        seen = progressive.AsTrained(ds, lod)
        assert (seen.resolution, seen.final_resolution, len(seen)) == (res, 32, 6)
        img, label = seen[4]
        assert img.shape == (1, 32, 32) and label == 0
        low = progressive.process_reals(x[4:5], lod)
        torch.testing.assert_close(img, low.repeat_interleave(32 // res, 2).repeat_interleave(32 // res, 3)[0])
        torch.testing.assert_close(torch.nn.functional.avg_pool2d(img[None], 32 // res), low)


def test_a_run_stopped_before_the_final_resolution_evaluates_at_the_one_it_reached(tmp_path, capsys):
    """issue 25 point 8: 30 iterations stay at 4×4 of 32×32 (lod 3); evaluation used to die in
    plot_reconstructions. Every output is written and metrics.json records the resolution."""
    import csv
    import json

    import evaluate
    import train

    out = tmp_path / "r"
    argv = ["--dataset", "digits", "--normal", "3", "--iterations", "30", "--vgg-weights", "random",
            "--contamination", "0.05", "--method", "latent-norm", "--out", str(out),
            "--fmap-max", "8", "--no-progress"]  # the command, narrow networks
    metrics = train.train(train.parse_args(argv))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert (saved["resolution"], saved["final_resolution"], saved["lod"]) == (4, 32, 3.0)
    err = capsys.readouterr().err
    assert err.count("note: the pGAN reached 4×4 of 32×32 (lod 3); evaluated at 4×4") == 1
    for name in ("roc.png", "reconstructions.png", "extremes.png", "latent_norms.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == saved["n_test"] and all(math.isfinite(float(r["latent-norm"])) for r in rows)
    # the scores are those of the test images at 4×4 (upscaled back), against G's 4×4 images upscaled
    _, cfg, model, _ = evaluate.load_run(out / "checkpoint.pt", device="cpu")
    test = cfg.load_run_data(protocols=system.PROTOCOLS, theirs=system.THEIRS)[1].test
    full = torch.stack([test[i][0] for i in range(len(test))])
    seen = progressive.AsTrained(test, model.lod)
    x = torch.stack([seen[i][0] for i in range(len(seen))])  # (N, 1, 32, 32), constant on 8×8 blocks
    with torch.no_grad():
        mse, mse_full = ((model.reconstruct(v) - v).flatten(1).square().mean(1) for v in (x, full))
        norms = latent_norm.code_norms(model.encode(x))
    torch.testing.assert_close(torch.tensor([float(r["mse"]) for r in rows]), mse, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mse, mse_full, rtol=1e-3)
    torch.testing.assert_close(torch.tensor([float(r["latent-norm"]) for r in rows]), norms, rtol=1e-5, atol=1e-6)


def test_saved_model_maps_the_earlier_checkpoint_keys():
    """A checkpoint of the earlier layout (D stored as ``DX``, loss weights in the preset) rebuilds."""
    import dataclasses

    import evaluate

    torch.manual_seed(0)
    m = pgan.PGAN(pgan.PGANConfig(channels=1, resolution=16, fmap_base=32, fmap_max=8))
    m.set_lod(1.5)
    state = {"config": {"method": "latent-norm", "networks": "pgan"}, "channels": 1,
             "preset": {**dataclasses.asdict(m.config), "gp_weight": 10.0, "drift": 1e-3},
             "model": {("DX." + k[2:] if k.startswith("D.") else k): v for k, v in m.state_dict().items()}}
    rebuilt = evaluate.saved_model(state, "cpu")
    assert isinstance(rebuilt, pgan.PGAN) and rebuilt.lod == 1.5
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), rebuilt.state_dict().values()))
