"""Seconds per iteration of Algorithm 1 (paper §3.2-3.3): precision x memory format, and the authors' code.

Every row trains the same model (same seed, random data, random VGG-19 weights: timing does not
depend on them) with the speed-ups of train.py's default path (fused eq. (4), cached real VGG
features) at one ``--precision`` (``TrainConfig.precision``) and memory format; the last row is
the authors' own training loop (ninatu/piad, their ``PIADTrainer.train``, one iteration per call,
fp32, patched as ``tests/test_parity.py`` patches it: ``.cuda()`` the identity, a NumPy-2 shim).
All rows are built first and then run one iteration each in turn, round after round, in this one
process, so a busy machine slows them alike; each row's number is its median over the rounds.

FLOPs: one iteration counted with ``torch.utils.flop_counter``'s formulas (:class:`Flops`; the
same for every row: convolutions and matrix products, forward and backward). Peak: threads x clock (lscpu's
max MHz, else /proc/cpuinfo's) x FLOP/cycle per core from the CPU flags: fp32 32 (AVX2: 2 FMA
pipes x 8 lanes x 2) or 64 (AVX-512: 2 x 16 x 2); bf16 128 with AVX512_BF16 (2 VDPBF16PS pipes x
16 lanes x 2 products x 2) or 1024 with AMX (a TDPBF16PS, 16x16x32 multiply-adds, per 16 cycles).
Best convolution: the same FLOPs over the rate of this CPU's fastest large convolution at the
row's precision, measured after the rounds (:func:`conv_ceiling`): a step made of nothing but such
convolutions would reach 100%.

    python tools/bench/bench_train.py [--preset mnist|cifar10] [--rounds 10] [--threads N] [--no-authors]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import data  # noqa: E402
import features  # noqa: E402
import losses  # noqa: E402
import piad  # noqa: E402
import presets  # noqa: E402
import precision as precision_mod  # noqa: E402
import sampler as sampler_mod  # noqa: E402
import train  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from test_parity import AUTHORS, _Counter, _import_authors, _Log, _Stream  # noqa: E402  (the authors' code as the parity test imports it)
N_IMAGES = 512


def _images(preset: str) -> torch.Tensor:
    cfg = presets.network(preset)
    channels = 1 if preset == "mnist" else 3
    return torch.rand(N_IMAGES, channels, cfg.image_size, cfg.image_size,
                      generator=torch.Generator().manual_seed(0)) * 2 - 1


def ours(preset: str, images, *, precision: str, channels_last: bool, vgg, stats, batch_size: int):
    """A step function of our trainer at ``precision`` and memory format (fused op, feature cache)."""
    torch.manual_seed(0)
    ds = data.TensorImages(images, torch.zeros(len(images), dtype=torch.int64))
    model = piad.PIAD(config=presets.network(preset), channels=images.shape[1])
    rec = losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg, stats=stats)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    rec.to(memory_format=fmt)
    feats = torch.cat([rec.real_features(images[i:i + 256].contiguous(memory_format=fmt))
                       for i in range(0, len(images), 256)])
    trainer = train.PIADTrainer(model, rec, train.TrainConfig(batch_size=batch_size, precision=precision).resolved())
    sampler = sampler_mod.Sampler(ds, batch_size, "cpu", seed=0, features=feats, memory_format=fmt)
    count = iter(range(1, 10 ** 9))

    def step():
        it = next(count)
        if it % 100 == 0:  # no γ measurement in the timing (train.py: every 100th)
            it = next(count)
        with precision_mod.autocast(precision, "cpu"):  # as train.py's loop runs the step
            trainer.step(it, sampler)
    return step


def authors(preset: str, images, *, batch_size: int):
    """A step function of the authors' training loop (their config of the preset, fp32, CPU)."""
    import torchvision
    import yaml

    a = _import_authors()
    a["feature_extractor"].vgg19 = lambda *_, **__: torchvision.models.vgg19(weights=None)  # no download
    torch.Tensor.cuda = lambda self, *_, **__: self  # their .cuda() calls: CPU
    torch.nn.Module.cuda = lambda self, *_, **__: self
    c = yaml.safe_load((AUTHORS / "configs" / f"{preset}.yaml").read_text())
    torch.manual_seed(0)
    net = a["networks"]
    args = (c["image_res"], c["image_dim"], c["latent_res"], c["latent_dim"])
    t = object.__new__(a["train"].PIADTrainer)
    nets = dict(gen=net.ResNetGenerator(*args, c["gen"]), enc=net.ResNetEncoder(*args, c["enc"]),
                image_dis=net.ResNetEncoder(c["image_res"], c["image_dim"], 1, 1, c["image_dis"], use_mbstddev=True),
                latent_dis=net.LatentDiscriminator(input_dim=c["latent_dim"] * c["latent_res"] ** 2,
                                                   inner_dims=c["latent_dis"]))
    opt = a["optimizer"].Optimizer(
        gen_params=nets["gen"].parameters(), enc_params=nets["enc"].parameters(),
        image_dis_params=nets["image_dis"].parameters(), latent_dis_params=nets["latent_dis"].parameters(),
        image_adv_loss=a["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        latent_adv_loss=a["adv_losses"].WassersteinLoss(**c["wasserstein_loss_kwargs"]),
        rec_loss=a["rec_losses"].PerceptualLoss(**c["perceptual_loss_kwargs"], reduction="mean"),
        adam_kwargs=c["adam_kwargs"], enc_rec_loss_weight=c["enc_rec_loss_weight"],
        gen_rec_loss_weight=c["gen_rec_loss_weight"], use_grad_norm_policy=c["use_grad_norm_policy"])
    g = torch.Generator().manual_seed(1)

    t.__dict__.update(nets, optimizer=opt, n_dis=c["n_dis"], iters=10 ** 9, log_iter=c["log_iter"],
                      checkpoint_iter=10 ** 9, image_sample_iter=10 ** 9,
                      update_grad_norm_iter=c["update_grad_norm_iter"], logger=_Log(), tqdm_logger=_Counter(),
                      image_model=_Stream(lambda: images[torch.randint(len(images), (batch_size,), generator=g)]),
                      latent_model=_Stream(lambda: torch.randn(batch_size, c["latent_dim"], c["latent_res"],
                                                              c["latent_res"], generator=g)))
    t._do_checkpoint = lambda: None

    def step():
        if (t.tqdm_logger.n + 1) % t.update_grad_norm_iter == 0:  # no γ measurement, as ours
            t.tqdm_logger.n += 1
        t.tqdm_logger.total = t.tqdm_logger.n + 1
        t.train()
    return step


class Flops(TorchDispatchMode):
    """FLOPs of the ops run under it, by ``torch.utils.flop_counter``'s formulas (those of
    ``FlopCounterMode``, whose module tracker rejects the penalty's ``autograd.grad`` of a leaf)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **(kwargs or {}), out_val=out)
        return out


def cpu_peak(threads: int) -> tuple[dict, str]:
    """GFLOP/s peaks {fp32, bf16} of ``threads`` cores, and how they were derived (module docstring)."""
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = set(re.search(r"^Flags:\s*(.*)$", info, re.M).group(1).split())
    mhz = re.search(r"^CPU max MHz:\s*([\d.]+)", info, re.M)
    if mhz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    ghz = float(mhz.group(1)) / 1000
    fp32 = 64 if "avx512f" in flags else 32 if "fma" in flags else 16
    bf16 = 1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    model = re.search(r"^Model name:\s*(.*)$", info, re.M).group(1).strip()
    how = (f"{model}: {threads} cores x {ghz:.2f} GHz x FLOP/cycle fp32 {fp32} "
           f"({'AVX-512' if fp32 == 64 else 'AVX2'} FMA), bf16 {bf16} "
           f"({'AMX' if bf16 == 1024 else 'AVX512_BF16' if bf16 == 128 else 'no bf16 unit'})")
    return {"fp32": threads * ghz * fp32, "bf16": threads * ghz * bf16}, how


def conv_ceiling(dtype: torch.dtype, *, repeats: int = 5) -> float:
    """GFLOP/s of this CPU's best convolution at ``dtype``, measured: the fastest of a few large
    3x3 convolutions (batch 32, channels_last, the step's own kernels), so the step's rate can be
    read against what its convolutions could reach here. The flag-derived peak above overstates
    CPUs that split AVX-512 into two 256-bit halves (AMD Zen 4)."""
    best = 0.0
    for c, hw in ((256, 16), (512, 8), (128, 32)):
        x = torch.randn(32, c, hw, hw).to(dtype=dtype, memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3).to(dtype=dtype, memory_format=torch.channels_last)
        for r in range(2 + repeats):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            if r >= 2:
                best = max(best, 2 * 32 * c * c * 9 * hw * hw / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (one iteration of every row each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--authors", action=argparse.BooleanOptionalAction, default=True,
                   help="time the authors' code too (needs it at PIAD_AUTHORS_CODE)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    images = _images(a.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights: fine for timing
        vgg = features.VGG19Features(weights="random")
    stats = features.FeatureStats(mean=torch.zeros(512), std=torch.ones(512), weights=vgg.weights_id,
                                  layer=vgg.layer, count=1)
    rows = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and config.bf16_unsupported(torch.device("cpu")):
            print(f"bf16 rows skipped: {config.bf16_unsupported(torch.device('cpu'))}")
            continue
        for cl in (False, True):
            rows[(precision, "channels_last" if cl else "contiguous")] = ours(
                a.preset, images, precision=precision, channels_last=cl, vgg=vgg, stats=stats,
                batch_size=a.batch_size)
    if a.authors and (AUTHORS / "piad" / "networks.py").is_file():
        rows[("authors' code", "fp32, contiguous")] = authors(a.preset, images, batch_size=a.batch_size)
    flops = Flops()
    with flops:  # one more iteration of the first row, counted (the FLOPs do not depend on the row)
        next(iter(rows.values()))()
    gflop = flops.total / 1e9
    times = {k: [] for k in rows}
    for r in range(a.warmup + a.rounds):
        for k, step in rows.items():
            t = time.perf_counter()
            step()
            if r >= a.warmup:
                times[k].append(time.perf_counter() - t)
    load = os.getloadavg()
    peak, how = cpu_peak(threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get(("fp32", "channels_last"))
    ref = med.get(("authors' code", "fp32, contiguous"))
    print(f"Algorithm 1, preset {a.preset}, batch {a.batch_size}, n_dis {presets.network(a.preset).n_dis}, cpu, "
          f"{threads} threads; {a.rounds} rounds alternating the rows; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at the end")
    print(f"one iteration: {gflop:.1f} GFLOP (torch.utils.flop_counter); peak {peak['fp32']:.0f} GFLOP/s fp32, "
          f"{peak['bf16']:.0f} bf16 ({how})")
    kinds = {"fp32": torch.float32, "bf16": torch.bfloat16}
    ceiling = {k: conv_ceiling(dtype) for k, dtype in kinds.items() if k == "fp32" or (k, "contiguous") in rows}
    print("best convolution here (conv_ceiling): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceiling.items())
          + (f"; bf16/fp32 {ceiling['bf16'] / ceiling['fp32']:.2f}x" if len(ceiling) == 2 else ""))
    print("| path | memory format | s/it (median) | min | vs fp32 channels_last | vs authors' | % of peak "
          "| % of best conv |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (prec, fmt), s in med.items():
        kind = "bf16" if prec == "bf16" else "fp32"
        print(f"| {prec} | {fmt} | {s:.3f} | {min(times[(prec, fmt)]):.3f} | "
              f"{base / s if base else float('nan'):.2f}x | {ref / s if ref else float('nan'):.2f}x | "
              f"{100 * gflop / s / peak[kind]:.1f} | {100 * gflop / s / ceiling[kind]:.1f} |")


if __name__ == "__main__":
    main()
