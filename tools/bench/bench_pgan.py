"""Images/s of one progressive-growing step (critic + Gs, G, E: progressive.ProgressiveTrainer.step)
of Berg et al.'s pGAN (pgan.py) at full width, at each working resolution of a preset.

One measured step per resolution (after one untimed warm-up step), at a stable lod (no fade-in),
on a minibatch of ``--batch`` images (their schedule uses 128/128/128/64/32 at 4..64; the cost of a
step grows with the batch about linearly, so images/s carries over). Prints seconds per step and
images/s; docs/berg.md quotes the numbers and progressive.CPU_IMAGES_PER_S keeps them for the
note train.py prints when a pgan run starts on a CPU.

    OMP_NUM_THREADS=1 python tools/bench/bench_pgan.py [--preset cifar10|kth] [--batch 8] [--fmap-max 512]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from berg import pgan  # noqa: E402
from berg import progressive  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cifar10", choices=tuple(pgan.PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fmap-max", type=int, default=pgan.FMAP_MAX)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(progressive.SEED)
    c, r = pgan.PRESETS[args.preset]
    model = pgan.PGAN(pgan.PGANConfig(c, r, fmap_max=args.fmap_max)).to(args.device)
    data = torch.rand(args.batch, c, r, r, device=args.device) * 2 - 1
    print(f"{args.preset} fmap_max {args.fmap_max}, batch {args.batch}, {args.device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("resolution  s/step  images/s")
    for res_log2 in range(2, int(r).bit_length()):
        lod = float(model.G.R - res_log2)
        # a schedule that stays at this lod: start at this resolution, never grow
        sched = progressive.Schedule(lod_initial_resolution=2 ** res_log2, lod_training_kimg=1e9)
        trainer = progressive.ProgressiveTrainer(model, sched)

        def sample(n):
            return data, None

        trainer.step(0, sample)  # warm-up
        assert model.lod == lod
        if args.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.step(1, sample)
        if args.device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"{2 ** res_log2:>10}  {dt:6.2f}  {args.batch / dt:8.2f}", flush=True)


if __name__ == "__main__":
    main()
