"""Benchmark of the relative-perceptual-L1 loss (paper §3.1, eq. (3)-(4)): fused op vs PyTorch.

Measures forward and forward+backward of ``fused_op.rel_perc_l1`` (csrc/) and of the
pure-PyTorch reference ``losses.rel_perc_l1_torch`` on relu4_2-like feature shapes, float32.
The two paths alternate call by call (which one goes first alternates too), so both see the
same load on a shared machine; printed are each path's median time and the median of the
pairwise ratios torch / fused (the speed-up).

On CUDA the effective memory bandwidth (bytes the fused kernels must move / time) is printed
against ``--peak-gbs``. Peak extra memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU the
peak of the running sum of bytes allocated/freed by the ops of one call, from the torch
profiler's memory accounting (``profile_memory=True``); both include the returned
gradients (2 x input size for fwd+bwd).

    python tools/bench/bench_loss.py [--device cpu|cuda] [--grad both|fy] [--repeats 100] [--threads N]
                               [--clock wall|cpu]

``--clock cpu`` times with the CPU time of the process instead of the wall clock: on a loaded
machine (more runnable jobs than cores) use it with ``--threads 1``, which then measures the work
of each path without the time spent waiting for a core.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import fused_op  # noqa: E402

from losses import rel_perc_l1_torch  # noqa: E402  (the pure-PyTorch reference)

SHAPES = [(64, 512, 4, 4), (64, 512, 8, 8), (32, 512, 16, 16)]


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


CLOCK = time.perf_counter


def _timed(fn, dev):
    t0 = CLOCK()
    fn()
    _sync(dev)
    return CLOCK() - t0


def _paired_ms(ref, fused, dev, repeats):
    """(median ms of ref, median ms of fused, median of the pairwise ratios ref / fused).

    Each repeat times one call of each, back to back, starting with ref on even repeats and
    with fused on odd ones."""
    t_ref, t_fused = [], []
    for r in range(repeats):
        if r % 2:
            t_fused.append(_timed(fused, dev))
            t_ref.append(_timed(ref, dev))
        else:
            t_ref.append(_timed(ref, dev))
            t_fused.append(_timed(fused, dev))
    ratio = statistics.median(a / b for a, b in zip(t_ref, t_fused))
    return 1e3 * statistics.median(t_ref), 1e3 * statistics.median(t_fused), ratio


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
    _sync(dev)
    *t_f, r_f = _paired_ms(fns[0], fns[1], dev, args.repeats)
    *t_fb, r_fb = _paired_ms(fns[2], fns[3], dev, args.repeats)
    rows = []
    for i, (name, f) in enumerate(impls):
        fx.grad = fy.grad = None
        rows.append((name, t_f[i], t_fb[i], (1.0, 1.0) if i == 0 else (r_f, r_fb),
                     _peak_bytes(fwd(f), dev), _peak_bytes(fwd_bwd(f), dev)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--grad", default="both", choices=["both", "fy"],
                    help="inputs that require grad (training only needs fy = f(G(E(x))))")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall clock or CPU time of the process (cpu: CPU only, for --threads 1)")
    ap.add_argument("--peak-gbs", type=float, default=3350.0,
                    help="peak memory bandwidth in GB/s for the CUDA efficiency column (H100 SXM)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if dev.type != "cpu" or torch.get_num_threads() != 1:
            sys.exit("--clock cpu measures the CPU time of one thread: use it with --device cpu --threads 1")
        global CLOCK
        CLOCK = time.process_time
    if not fused_op.available(dev):
        sys.exit(f"fused op not available for {dev.type}: build with "
                 "`pip install --no-build-isolation -e .`")
    print(f"device={dev.type} threads={torch.get_num_threads()} clock={args.clock} torch={torch.__version__} "
          f"float32 grad={args.grad} {args.repeats} alternating pairs (warm-up {args.warmup} "
          "rounds); speed-up = median of the pairwise ratios torch / fused")
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
        nbytes = 4 * torch.Size(shape).numel()
        for name, t_f, t_fb, (r_f, r_fb), m_f, m_fb in rows:
            line = (f"{str(shape):<18} {name:<6} {t_f:8.3f} {t_fb:11.3f} "
                    f"{r_f:6.2f}x/{r_fb:5.2f}x "
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
