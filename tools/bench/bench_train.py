"""Iterations/s of Algorithm 1 (paper §3.2-3.3) on random data, several speed settings, one run.

Each row trains the same model (same seed) with one combination of the speed-ups of train.py:
the relative-perceptual-L1 reduction (fused op vs pure PyTorch), caching the real images' VGG
features, and channels_last tensors. The first row is the plain pure-PyTorch path; ratios are
against it, measured in the same run. For scale, the authors' public implementation was timed
(by the issue's author, not here) at about 0.93 s/iteration (mnist preset) and 2.7 s/iteration
(cifar10 preset) on the same 2-core CPU with random data, batch 32, n_dis 2.

    python tools/bench/bench_train.py [--preset mnist|cifar10] [--iterations 20] [--device cpu|cuda]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import features  # noqa: E402
import losses  # noqa: E402
import piad  # noqa: E402
import train  # noqa: E402

AUTHORS_S_PER_IT = {"mnist": 0.93, "cifar10": 2.7}  # quoted in the issue, CPU, 2 cores


def run(preset: str, *, impl: str, cache: bool, channels_last: bool, iterations: int, warmup: int,
        device, vgg, stats, batch_size: int) -> float:
    torch.manual_seed(0)
    cfg_model = piad.preset(preset)
    channels = 1 if preset == "mnist" else 3
    n = 512
    images = torch.rand(n, channels, cfg_model.image_size, cfg_model.image_size) * 2 - 1
    ds = data.TensorImages(images, torch.zeros(n, dtype=torch.int64))
    model = piad.PIAD(config=cfg_model, channels=channels).to(device)
    rec = losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats, impl=impl).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    rec.to(memory_format=fmt)
    feats = None
    if cache:
        feats = torch.cat([rec.real_features(images[i:i + 256].to(device).contiguous(memory_format=fmt)).cpu()
                           for i in range(0, n, 256)])
    cfg = train.TrainConfig(batch_size=batch_size)
    trainer = train.PIADTrainer(model, rec, cfg)
    sampler = train.Sampler(ds, batch_size, device, seed=0, features=feats, channels_last=channels_last)
    for it in range(warmup):
        trainer.step(it + 1, sampler, log=False)  # it % 100 != 0: no γ measurement in the timing
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for it in range(iterations):
        trainer.step(it + 1 + warmup, sampler, log=it % 10 == 0)  # train.py logs every 10th
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iterations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist", choices=["mnist", "cifar10", "lsun", "celeba"])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--weights", default="caffe", help="VGG weights (timing does not depend on them)")
    a = p.parse_args()
    device = torch.device(a.device)
    vgg = features.VGG19Features(weights=a.weights).to(device)
    stats = features.default_stats(vgg)
    rows = [("torch", False, False), ("ext", False, False), ("ext", True, False), ("ext", True, True),
            ("torch", True, True)]
    print(f"Algorithm 1, preset {a.preset}, batch {a.batch_size}, n_dis {piad.preset(a.preset).n_dis}, "
          f"{a.device} ({torch.get_num_threads()} threads), {a.iterations} timed iterations")
    print(f"{'loss impl':>9} {'feat cache':>10} {'chan last':>9} {'s/it':>7} {'it/s':>6} {'speed-up':>8}")
    base, times = None, []
    for impl, cache, cl in rows:
        if impl == "ext" and not losses._fused_available(device):
            print(f"{impl:>9}  (fused op not built for {a.device}; skipped)")
            continue
        s = run(a.preset, impl=impl, cache=cache, channels_last=cl, iterations=a.iterations, warmup=a.warmup,
                device=device, vgg=vgg, stats=stats, batch_size=a.batch_size)
        base = base or s
        times.append(s)
        print(f"{impl:>9} {str(cache):>10} {str(cl):>9} {s:7.3f} {1 / s:6.2f} {base / s:7.2f}x")
    if a.device == "cpu" and a.preset in AUTHORS_S_PER_IT:
        ref = AUTHORS_S_PER_IT[a.preset]
        print(f"authors' implementation, quoted (not measured in this run): {ref:.2f} s/it; "
              f"fastest row here: {min(times):.3f} s/it ({ref / min(times):.2f}x)")

if __name__ == "__main__":
    main()
