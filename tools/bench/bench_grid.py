"""Wall time of a grid (the paper's Tables 2-3 are grids of runs) with --jobs 1 and --jobs N.

Runs ``python -m tools.experiments custom`` on a 4-cell grid (digits, classes 3 and 8, seeds 0 and 1, PIAD with
rel-perc-l1) in fresh folders, alternating ``--jobs 1`` (one cell at a time on every core) and
``--jobs N`` (N cells at once, cores // N threads each), and prints each wall time and the ratio
jobs-1 / jobs-N measured in the same run (above 1: the parallel grid is faster), with the load
average before and after each run (the machine may be shared).

    python tools/bench/bench_grid.py [--iterations 200] [--rounds 2] [--jobs 2] [--vgg-weights caffe] [--device cpu]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def run_grid(jobs: int, threads: int, a) -> float:
    root = tempfile.mkdtemp(prefix=f"bench-grid-j{jobs}-")
    cmd = [sys.executable, "-m", "tools.experiments", "custom", "--dataset", "digits", "--classes", "3", "8",
           "--seeds", "0", "1", "--iterations", str(a.iterations), "--vgg-weights", a.vgg_weights,
           "--device", a.device, "--no-progress", "--root", root, "--jobs", str(jobs),
           "--threads-per-cell", str(threads)]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    shutil.rmtree(root, ignore_errors=True)
    if out.returncode != 0 or "4/4 cells finished" not in out.stdout:
        sys.exit(f"grid failed (--jobs {jobs}):\n{out.stdout}\n{out.stderr}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (jobs 1, jobs N), alternating")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--vgg-weights", default="caffe")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    wide, narrow = max(1, a.cores), max(1, a.cores // a.jobs)
    print(f"4-cell grid, digits, {a.iterations} iterations per cell, VGG-19 {a.vgg_weights}, {a.device}, "
          f"{a.cores} cores; --jobs 1 --threads-per-cell {wide} vs --jobs {a.jobs} --threads-per-cell {narrow}")
    ratios = []
    for r in range(a.rounds):
        walls = {}
        for jobs, threads in ((1, wide), (a.jobs, narrow)) if r % 2 == 0 else ((a.jobs, narrow), (1, wide)):
            before = loadavg()
            walls[jobs] = run_grid(jobs, threads, a)
            print(f"round {r + 1}: --jobs {jobs}: {walls[jobs]:7.1f} s   (load average before {before}, "
                  f"after {loadavg()})", flush=True)
        ratios.append(walls[1] / walls[a.jobs])
        print(f"round {r + 1}: jobs-1 / jobs-{a.jobs} wall time = {ratios[-1]:.2f}", flush=True)
    print(f"ratio per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"mean {sum(ratios) / len(ratios):.2f} (above 1: --jobs {a.jobs} is faster)")


if __name__ == "__main__":
    main()
