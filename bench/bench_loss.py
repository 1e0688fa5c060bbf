"""Benchmark of the relative-perceptual-L1 loss (paper §3.1, eq. (3)-(4)): fused op vs PyTorch.

Measures, in the same run, forward and forward+backward of ``fused_op.rel_perc_l1`` (csrc/)
and of the pure-PyTorch reference ``losses.rel_perc_l1_torch`` on relu4_2-like feature shapes,
float32, median over repeats after warm-up.

On CUDA the effective memory bandwidth (bytes the fused kernels must move / time) is printed
against ``--peak-gbs``. Peak extra memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the
peak of the running sum of bytes allocated/freed by the ops of one call, from the torch
profiler's memory accounting (``profile_memory=True``); both include the returned
gradients (2 x input size for fwd+bwd).

    python bench/bench_loss.py [--device cpu|cuda] [--grad both|fy] [--repeats 30] [--threads N]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused_op  # noqa: E402

from losses import rel_perc_l1_torch  # noqa: E402  (the pure-PyTorch reference)

SHAPES = [(64, 512, 4, 4), (64, 512, 8, 8), (32, 512, 16, 16)]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fns, dev, warmup, repeats):
    """Median wall time (ms) of each function; repeats interleave the functions so that both
    implementations see the same machine load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(dev)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def _peak_bytes(fn, dev):
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        _sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += ev.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def bench_shape(shape, dev, args):
    gen = torch.Generator().manual_seed(0)
    fx = torch.randn(shape, generator=gen).relu_().to(dev)  # ReLU features, like relu4_2
    fy = (fx.cpu() + 0.3 * torch.randn(shape, generator=gen)).relu_().to(dev)
    mean, std = fx.mean((0, 2, 3)), fx.std((0, 2, 3)) + 1e-3
    fx.requires_grad_(args.grad == "both")
    fy.requires_grad_(True)
    impls = (("torch", rel_perc_l1_torch), ("fused", fused_op.rel_perc_l1))

    def fwd(f):
        def run():
            with torch.no_grad():
                return f(fx, fy, mean, std)
        return run

    def fwd_bwd(f):
        def run():
            fx.grad = fy.grad = None
            f(fx, fy, mean, std).sum().backward()
        return run

    fns = [fwd(f) for _, f in impls] + [fwd_bwd(f) for _, f in impls]
    for _ in range(args.warmup):  # all variants, so the allocator reaches its steady state
        for fn in fns:
            fn()
    t_f = _median_ms(fns[:2], dev, 1, args.repeats)
    t_fb = _median_ms(fns[2:], dev, 1, args.repeats)
    rows = []
    for i, (name, f) in enumerate(impls):
        fx.grad = fy.grad = None
        rows.append((name, t_f[i], t_fb[i], _peak_bytes(fwd(f), dev), _peak_bytes(fwd_bwd(f), dev)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--grad", default="both", choices=["both", "fy"],
                    help="inputs that require grad (training only needs fy = f(G(E(x))))")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--peak-gbs", type=float, default=3350.0,
                    help="peak memory bandwidth in GB/s for the CUDA efficiency column (H100 SXM)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fused_op.available(dev):
        sys.exit(f"fused op not available for {dev.type}: build with "
                 "`pip install --no-build-isolation -e .`")
    print(f"device={dev.type} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"float32 grad={args.grad} median of {args.repeats} (warm-up {args.warmup} rounds)")
    if dev.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(dev)}")
    hdr = f"{'shape (N,C,H,W)':<18} {'impl':<6} {'fwd ms':>8} {'fwd+bwd ms':>11} " \
          f"{'speed-up f/fb':>14} {'peak MiB f/fb':>14}"
    if dev.type == "cuda":
        hdr += f" {'GB/s f/fb (% peak)':>26}"
    print(hdr)
    print("-" * len(hdr))
    for shape in SHAPES:
        rows = bench_shape(shape, dev, args)
        ref_f, ref_fb = rows[0][1], rows[0][2]
        nbytes = 4 * torch.Size(shape).numel()
        for name, t_f, t_fb, m_f, m_fb in rows:
            line = (f"{str(shape):<18} {name:<6} {t_f:8.3f} {t_fb:11.3f} "
                    f"{ref_f / t_f:6.2f}x/{ref_fb / t_fb:5.2f}x "
                    f"{m_f / 2**20:6.1f}/{m_fb / 2**20:6.1f}")
            if dev.type == "cuda":
                # Effective bandwidth: bytes the fused kernels move (same count for both impls):
                # fwd reads fx, fy; bwd reads fx (denominator), fx, fy, writes grad_fx, and
                # for --grad both reads grad_fx and writes grad_fy = -grad_fx.
                bw_f = 2 * nbytes / t_f / 1e6
                bw_fb = (8 if args.grad == "both" else 6) * nbytes / t_fb / 1e6
                line += (f" {bw_f:7.0f} ({100 * bw_f / args.peak_gbs:3.0f}%)/"
                         f"{bw_fb:6.0f} ({100 * bw_fb / args.peak_gbs:3.0f}%)")
            print(line)


if __name__ == "__main__":
    main()
