"""Does ``--precision bf16`` cost quality? The study of issue 26 (docs/speed.md).

Fashion-MNIST "bag" (class 8, the gpnd protocol of §4), the ImageNet (Caffe) VGG-19, 2,000
iterations of Algorithm 1, seeds 0, 1 and 2, each trained twice: ``--precision fp32`` and
``--precision bf16`` (both with the default ``--channels-last``). Every run is its own process
(``python train.py ... --threads 1``), ``--jobs`` of them at once; a run whose ``metrics.json`` exists is
not run again, so the study continues where it stopped. Then:

* ``bf16_study.json``: ROC AUC per seed and precision, mean ± std (over seeds, ddof 1), and the
  trajectories of log.csv per run (the gradient penalties ``gp_dx``, ``gp_dz`` of eq. (5), γ_G,
  γ_E), with the verdict of the pass rule: bf16 passes when its mean AUROC is within one fp32
  standard deviation of the fp32 mean, or better;
* ``bf16_study.png``: the trajectories, fp32 and bf16 side by side.

    python docs/bf16_study.py [--runs runs/bf16_study] [--iterations 2000] [--seeds 0 1 2] [--jobs 2]

(``--dataset digits --normal 3 --iterations 20 --vgg-weights random`` checks the script in a minute.)
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRECISIONS = ("fp32", "bf16")
TRAJECTORIES = ("gp_dx", "gp_dz", "gamma_g", "gamma_e")


def run_folder(runs: Path, precision: str, seed: int) -> Path:
    return runs / f"{precision}-s{seed}"


def train_once(args, precision: str, seed: int) -> Path:
    """One run in its own process at one thread, skipped when its metrics.json exists."""
    out = run_folder(Path(args.runs), precision, seed)
    if (out / "metrics.json").is_file():
        print(f"{out}: done already, skipped", flush=True)
        return out
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []  # a run killed half-way
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", args.dataset, "--normal", args.normal,
           "--protocol", args.protocol, "--vgg-weights", args.vgg_weights, "--iterations", str(args.iterations),
           "--seed", str(seed), "--precision", precision, "--threads", "1", "--device", "cpu",
           "--out", str(out), "--no-progress", *resume]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def trajectories(run: Path) -> dict:
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    out = {"iteration": [int(r["iteration"]) for r in rows]}
    for name in TRAJECTORIES:
        out[name] = [float(r[name]) if r.get(name) not in (None, "") else None for r in rows]
    return out


def summarise(args, runs: dict) -> dict:
    result = {"dataset": args.dataset, "normal": args.normal, "protocol": args.protocol,
              "vgg_weights": args.vgg_weights, "iterations": args.iterations, "seeds": args.seeds,
              "threads": 1, "runs": {}}
    for precision in PRECISIONS:
        aucs, traj, secs = {}, {}, {}
        for seed in args.seeds:
            metrics = json.loads((runs[precision, seed] / "metrics.json").read_text())
            aucs[seed], secs[seed] = metrics["roc_auc"], metrics.get("train_time_s")
            traj[seed] = trajectories(runs[precision, seed])
        values = list(aucs.values())
        result["runs"][precision] = {
            "auroc": aucs, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "train_time_s": secs, "log": traj}
    fp32, bf16 = result["runs"]["fp32"], result["runs"]["bf16"]
    result["pass_rule"] = "bf16 mean AUROC >= fp32 mean - one fp32 std (over seeds)"
    result["passes"] = bf16["mean"] >= fp32["mean"] - fp32["std"]
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TRAJECTORIES), len(PRECISIONS), figsize=(10, 2.6 * len(TRAJECTORIES)),
                             sharex=True, sharey="row", squeeze=False)
    for j, precision in enumerate(PRECISIONS):
        r = result["runs"][precision]
        for i, name in enumerate(TRAJECTORIES):
            ax = axes[i][j]
            for seed, log in r["log"].items():
                pts = [(t, v) for t, v in zip(log["iteration"], log[name]) if v is not None]
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=f"seed {seed}", lw=1)
            if name.startswith("gp"):
                ax.set_yscale("log")
            ax.set_ylabel(name)
            if i == 0:
                ax.set_title(f"{precision}: AUROC {r['mean']:.3f} ± {r['std']:.3f}")
            if i == len(TRAJECTORIES) - 1:
                ax.set_xlabel("iteration")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['dataset']} class {result['normal']} ({result['protocol']}), "
                 f"{result['iterations']} iterations: {'passes' if result['passes'] else 'fails'} "
                 "the rule (bf16 mean >= fp32 mean - fp32 std)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "bf16_study"), help="folder of the runs")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--normal", default="8")
    p.add_argument("--protocol", default="gpnd")
    p.add_argument("--vgg-weights", default="caffe")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(HERE), help="folder of bf16_study.json and bf16_study.png")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each at one thread (at most the cores)")
    args = p.parse_args(argv)
    keys = [(precision, seed) for precision in PRECISIONS for seed in args.seeds]  # fp32 first: the longer runs
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each run is its own process
        runs = dict(zip(keys, pool.map(lambda k: train_once(args, *k), keys)))
    result = summarise(args, runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_study.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "bf16_study.png")
    for precision in PRECISIONS:
        r = result["runs"][precision]
        print(f"{precision}: AUROC {r['mean']:.4f} ± {r['std']:.4f} "
              f"({', '.join(f'{v:.4f}' for v in r['auroc'].values())})")
    print("bf16", "passes" if result["passes"] else "FAILS", "the rule:", result["pass_rule"])
    return result


if __name__ == "__main__":
    main()
