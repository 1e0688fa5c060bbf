"""Two shortcuts of Algorithm 1 (paper §3.2, lines 8 and 16-17), timed against the literal step.

``train.PIADTrainer.step`` is written as the paper writes it: eq. (6) with its real-data term on
every iteration, and lines 16-17 as two backward passes (L_rec, then γ_G, γ_E scale G's and E's
gradients, then the adversarial losses). Each shortcut below gives the same gradients:

* ``skip-real``: eq. (6) without E[D_X(x)] and E[D_Z(z)], constants for G and E (two critic
  forwards fewer; the logged L_adv would then not be eq. (6)'s);
* ``one-pass``: one backward of ``γ_G·L_rec + L_adv(G) + L_adv(E)``, with E's incoming gradient
  from L_rec scaled by γ_E/γ_G by a node closed over the step's own γ values (one backward
  through E fewer).

A shortcut earns its place in train.py only if it saves at least 10% of a CPU step. The variants
run alternately on one trainer in one process (the order rotated every round), one thread, the
MNIST preset at batch 32 with train.py's other defaults (fused op when built, cached real
features, channels_last); the table gives each variant's median time and the median of its
per-round ratio to the literal step.

    python tools/bench/bench_step.py [--rounds 30] [--weights random] [--clock wall|cpu]

``--clock cpu`` times with the CPU time of the process (one thread): on a loaded machine it
counts this process's work only.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import features  # noqa: E402
import losses  # noqa: E402
import piad  # noqa: E402
import presets  # noqa: E402
import sampler  # noqa: E402
import train  # noqa: E402


def literal(trainer: train.PIADTrainer, sample) -> None:
    trainer.step(1, sample)  # it = 1: no γ update (none is due before iteration 99)


def skip_real(trainer: train.PIADTrainer, sample) -> None:
    """The literal step with eq. (6)'s real-data term left out."""
    full = piad.adversarial_loss
    piad.adversarial_loss = lambda critic, real, fake: full(critic, None, fake)
    try:
        trainer.step(1, sample)
    finally:
        piad.adversarial_loss = full


def one_pass(trainer: train.PIADTrainer, sample) -> None:
    """The step with lines 16-17 in one backward pass (γ update left out: none is due)."""
    m, p = trainer.model, trainer.model.config
    for _ in range(p.n_dis):
        x, _ = sample()
        trainer.critic_step(x, m.sample_latent(x.shape[0]))
    x, fx = sample()
    z = m.sample_latent(x.shape[0])
    critics = [*m.DX.parameters(), *m.DZ.parameters()]
    for q in critics:
        q.requires_grad_(False)
    gammas = {}  # filled once γ is chosen (lines 9-14), read by the hook during the backward pass
    z_enc = m.E(x)
    z_rec = z_enc.view_as(z_enc)
    z_rec.register_hook(lambda g: g * (gammas["e"] / gammas["g"]))  # L_rec's gradient to E: γ_E/γ_G
    adv_g = piad.adversarial_loss(m.DX, x, m.G(z))
    adv_e = piad.adversarial_loss(m.DZ, z, z_enc)
    rec = trainer.rec_loss(x, m.G(z_rec), fx=fx)
    gammas.update(g=trainer.gamma_g, e=trainer.gamma_e)
    trainer.opt_ge.zero_grad(set_to_none=True)
    (gammas["g"] * rec + adv_g + adv_e).backward()  # G: γ_G·∇L_rec + ∇L_adv(G); E: γ_E·∇L_rec + ∇L_adv(E)
    trainer.opt_ge.step()
    for q in critics:
        q.requires_grad_(True)


VARIANTS = {"literal": literal, "skip-real": skip_real, "one-pass": one_pass}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--weights", default="random", help="VGG weights (timing does not depend on them)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall clock or CPU time of the process")
    a = p.parse_args()
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = train.TrainConfig(batch_size=32).resolved()
    preset = presets.network("mnist")
    n = 512
    images = torch.rand(n, 1, preset.image_size, preset.image_size) * 2 - 1
    ds = data.TensorImages(images, torch.zeros(n, dtype=torch.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn: timing only
        rec, _ = features.build_loss(weights=a.weights, stats="train", impl=cfg.impl, train_batches=[images[:64]])
    model = piad.PIAD(config=preset, channels=1)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        rec.to(memory_format=torch.channels_last)
    feats = torch.cat([rec.real_features(images[i:i + 128]).cpu() for i in range(0, n, 128)])
    trainer = train.PIADTrainer(model, rec, cfg)
    sample = sampler.Sampler(ds, cfg.batch_size, "cpu", seed=0, features=feats, memory_format=cfg.memory_format)
    names = list(VARIANTS)
    times = {k: [] for k in names}
    for r in range(a.warmup + a.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always first
            t = clock()
            VARIANTS[k](trainer, sample)
            if r >= a.warmup:
                times[k].append(clock() - t)
    fused = "fused op" if losses._fused_available(torch.device("cpu")) else "PyTorch loss"
    print(f"Algorithm 1 step, MNIST preset, batch {cfg.batch_size}, n_dis {preset.n_dis}, 1 thread, {fused}, "
          f"channels_last {cfg.channels_last}, {a.rounds} rounds, {a.clock} clock")
    print(f"{'variant':>10} {'median s':>9} {'ratio':>7} {'saves':>6}")
    for k in names:
        ratio = statistics.median(b / t for b, t in zip(times[k], times["literal"]))
        print(f"{k:>10} {statistics.median(times[k]):9.4f} {ratio:7.3f} {1 - ratio:6.1%}")


if __name__ == "__main__":
    main()
