"""tools/launch.py: a grid's cells in parallel processes and through submitit, with the grid's promises
(same scores as a sequential run, failures reported, Ctrl-C leaves every cell resumable), and the
per-cell status. Real tiny cells: scikit-learn digits, a few iterations, random VGG-19 weights."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tools import experiments as ex
from tools import launch
import checkpoint
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["custom", "--dataset", "digits", "--losses", "mse", "--vgg-weights", "random", "--device", "cpu",
        "--no-progress"]


def _cells(root):
    return sorted(p.parent for p in Path(root).rglob("metrics.json"))


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_two_jobs_give_the_same_scores_as_one(tmp_path, keep_threads):
    grid = ["--classes", "3", "8", "--seeds", "0", "1", "--iterations", "2", "--threads-per-cell", "1"]
    ex.main(TINY + grid + ["--root", str(tmp_path / "seq")])  # in this process, one cell after another
    ex.main(TINY + grid + ["--root", str(tmp_path / "par"), "--jobs", "2"])  # two spawned processes
    seq, par = _cells(tmp_path / "seq"), _cells(tmp_path / "par")
    assert len(seq) == len(par) == 4
    for a, b in zip(seq, par):
        assert a.relative_to(tmp_path / "seq") == b.relative_to(tmp_path / "par")
        assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
        assert json.loads((a / "metrics.json").read_text())["threads"] == 1  # T recorded with the cell
        assert json.loads((b / "metrics.json").read_text())["threads"] == 1
    for name in ("table.csv", "cells.csv", "table.md"):
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "par" / name).read_bytes()


def test_a_failing_cell_is_reported_while_the_others_finish(tmp_path):
    grid = ex.Grid("t", "digits", ("3", "8", "5"), (0,), (ex.Variant("mse", loss="mse"),))
    bad = grid.cells()[0].folder(tmp_path)
    bad.mkdir(parents=True)
    (bad / checkpoint.CHECKPOINT).write_bytes(b"not a checkpoint")  # the cell raises when it loads it
    lines = []
    failures = ex.run_grid(grid, tmp_path, jobs=2, threads=1, gpus=[], log=lines.append, iterations=2,
                           vgg_weights="random", device="cpu", progress=False)
    assert [(c.normal, "BadFile" in e or "could not read" in e) for c, e in failures] == [("3", True)]
    text = (tmp_path / "failures.txt").read_text()
    assert text.startswith(f"{bad}\n") and "Traceback" in text and "could not read checkpoint" in text
    assert _cells(tmp_path) == sorted(c.folder(tmp_path) for c in grid.cells()[1:])
    assert any("FAILED" in line for line in lines)


def test_sigint_to_the_parent_leaves_every_running_cell_resumable(tmp_path):
    cmd = [sys.executable, "-m", "tools.experiments", *TINY, "--classes", "3", "8", "--iterations", "8",
           "--jobs", "2", "--threads-per-cell", "1", "--root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folders = [tmp_path / "digits" / "piad-mse-c0" / f"normal{k}-s0" for k in (3, 8)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not all((f / "log.csv").is_file() and len((f / "log.csv").read_text().splitlines()) > 1 for f in folders):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the parent only, as `kill -INT`; it forwards one SIGINT to each cell
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out
    assert "grid stopped" in out and "Resume with:" in out
    for f in folders:
        assert (f / checkpoint.CHECKPOINT).is_file(), out  # saved, though the parent was the one signalled
    assert not all((f / "metrics.json").is_file() for f in folders), out  # stopped before the end
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming" in rerun.stdout and "2/2 cells finished" in rerun.stdout
    assert all(json.loads((f / "metrics.json").read_text())["iterations"] == 8 for f in folders)


def test_local_launcher_runs_a_grid_through_submitit(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored afterwards
    monkeypatch.setattr(ex.train_mod, "train", lambda cfg: pytest.fail("cells must run in submitit's tasks"))
    ex.main(TINY + ["--classes", "3", "8", "--iterations", "2", "--threads-per-cell", "1", "--launcher", "local",
                    "--root", str(tmp_path)])
    assert len(_cells(tmp_path)) == 2 and "2/2 cells finished" in (tmp_path / "table.md").read_text()
    assert list((tmp_path / "submitit").glob("*_result.pkl"))  # went through submitit's executor
    assert not (tmp_path / "failures.txt").exists()


def test_submitit_checkpoint_hook_saves_and_the_requeued_task_resumes(tmp_path, keep_threads):
    """What Slurm preemption does: submitit calls CellTask.checkpoint while the task trains."""
    cfg = ex.cell_config(ex.Grid("t", "digits", ("3",), (0,), (ex.Variant("mse", loss="mse"),)),
                         ex.Cell("digits", "3", 0, ex.Variant("mse", loss="mse"), 0.0), tmp_path,
                         iterations=8, vgg_weights="random", device="cpu", progress=False, threads=1)
    task, outcome = launch.CellTask(cfg), {}

    def run():
        try:
            outcome["result"] = task()
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    log = Path(cfg.out) / "log.csv"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > 1):
        assert t.is_alive() and time.time() < deadline, outcome
        time.sleep(0.05)
    requeued = task.checkpoint()
    t.join(60)
    assert isinstance(outcome.get("error"), train.Interrupted), outcome
    done = outcome["error"].done
    assert 1 <= done < 8
    state = checkpoint.load_checkpoint(Path(cfg.out) / checkpoint.CHECKPOINT)
    assert state["iteration"] == done
    metrics = requeued.result()  # the requeued task: resumes from the checkpoint and finishes
    assert metrics["iterations"] == 8 and (Path(cfg.out) / "metrics.json").is_file()
    assert requeued.function.cfg.out == cfg.out


def record_env(cfg):
    """A fake cell (imported by name in the spawned workers): records what its process was given."""
    time.sleep(1.0)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    m = {"roc_auc": 0.5, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": cfg.threads,
         "omp": os.environ.get("OMP_NUM_THREADS"), "start": time.time()}
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(m))
    return m


def test_cells_go_round_robin_over_gpus_with_threads_set(tmp_path):
    cfgs = [(f"c{k}", train.TrainConfig(out=str(tmp_path / f"c{k}"), device="auto")) for k in range(4)]
    assert launch.run_processes(cfgs, jobs=2, threads=3, gpus=["4", "7"], per_gpu=1, train_fn=record_env,
                                log=lambda s: None) == []
    got = [json.loads((tmp_path / f"c{k}" / "metrics.json").read_text()) for k in range(4)]
    assert [m["threads"] for m in got] == [3] * 4 and {m["omp"] for m in got} == {"3"}
    assert [m["gpu"] for m in got[:2]] == ["4", "7"]
    assert sorted(m["gpu"] for m in got) == ["4", "4", "7", "7"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "7"  # the parent's environment is restored


def test_status_has_one_line_per_cell(tmp_path):
    grid = ex.Grid("t", "digits", ("0", "1", "2", "3", "4"), (0,), (ex.Variant("mse", loss="mse"),))
    f = [c.folder(tmp_path) for c in grid.cells()]
    for k in range(4):
        f[k].mkdir(parents=True)
    (f[0] / "metrics.json").write_text(json.dumps({"roc_auc": 0.8123, "iterations": 100, "train_time_s": 65,
                                                   "threads": 2}))
    for k in (1, 2):
        (f[k] / "log.csv").write_text("iteration,time_s\n0,1.0\n9,10.0\n19,20.0\n")
        (f[k] / checkpoint.CHECKPOINT).write_bytes(b"x")
    os.utime(f[2] / "log.csv", (time.time() - 3600, time.time() - 3600))
    (f[3] / "log.csv").write_text("iteration,time_s\n0,1.0\n")
    (tmp_path / "failures.txt").write_text(f"{f[3]}\nTraceback ...\n")
    lines = ex.grid_status(grid, tmp_path, iterations=100)
    assert len(lines) == 5 and all(line.startswith(f"[{i}/5] digits/piad-mse-c0/normal{i - 1}-s0: ")
                                   for i, line in enumerate(lines, 1))
    assert lines[0].endswith("done     ROC AUC 0.812, 100 it in 1m05s, 2 thread(s)")
    assert lines[1].endswith("running  iteration 20/100 (20%), ETA 1m20s")  # 1 s per iteration
    assert lines[2].endswith("stopped  iteration 20/100 (20%), resumable")
    assert lines[3].endswith("failed   iteration 1/100 (1%)")
    assert lines[4].endswith("pending")
    assert ex.grid_status(grid, tmp_path)[4].endswith("pending")  # the supplement's schedule by default


@pytest.mark.parametrize("flag", ["--jobs", "--threads-per-cell", "--jobs-per-gpu"])
def test_bad_parallel_flags_are_one_error_line(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ex.main(TINY + ["--classes", "3", flag, "0", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"error: {flag} must be a whole number >= 1, got 0"
    assert not any(tmp_path.iterdir())


def test_status_flag_prints_the_lines_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ex.train_mod, "train", lambda cfg: pytest.fail("--status must not train"))
    ex.main(TINY + ["--classes", "3", "8", "--iterations", "50", "--root", str(tmp_path), "--status"])
    out = capsys.readouterr().out.splitlines()
    assert out == ["[1/2] digits/piad-mse-c0/normal3-s0: pending", "[2/2] digits/piad-mse-c0/normal8-s0: pending"]
    assert not (tmp_path / "table.md").exists()


def test_slurm_launcher_submits_one_array_task_per_cell(tmp_path, capsys, monkeypatch):
    """No Slurm here: a fake `sbatch` keeps the submission file; nothing trains in this process."""
    pytest.importorskip("submitit")
    import pickle
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/job.sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(ex.train_mod, "train", lambda cfg: pytest.fail("cells must run in the Slurm tasks"))
    grid = tmp_path / "grid"
    ex.main(TINY + ["--classes", "3", "8", "--iterations", "50", "--root", str(grid), "--launcher", "slurm",
                    "--partition", "gpu", "--time", "30", "--gpus-per-task", "1", "--threads-per-cell", "2",
                    "--jobs", "1"])
    assert "submitted" in capsys.readouterr().out and not (grid / "table.md").exists()
    script = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --signal=USR2@"):
        assert line in script, script
    tasks = []
    for path in sorted((grid / "submitit").glob("*_submitted.pkl")):
        with open(path, "rb") as fh:
            tasks.append(pickle.load(fh).function)
    assert [Path(t.cfg.out).name for t in tasks] == ["normal3-s0", "normal8-s0"]
    assert all(isinstance(t, launch.CellTask) and t.cfg.threads == 2 and t.cfg.iterations == 50 for t in tasks)
