"""Hostile input (issue 38): nothing finished is ever lost, one process per run folder, every input
checked before work starts, and a ``note:`` line for what was assumed (docs/safety.md).

One test per class. Each asserts the exit status, the single ``error:`` line (or the ``note:``),
and that every file of the finished runs is byte-identical afterwards. The lock is tested with
real processes, including a holder killed with SIGKILL whose folder is usable at once.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import features
import readers
import train
from tools import experiments, progress

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--dataset", "digits", "--normal", "3", "--batch-size", "8", "--loss", "mse", "--vgg-weights", "random",
        "--no-progress"]
TINY = ["--dataset", "folder", "--normal", "mine", "--batch-size", "2", "--loss", "mse", "--vgg-weights", "random",
        "--no-progress", "--iterations", "2"]


def _snapshot(root: Path) -> dict:
    """Every file under ``root``: its bytes (what "byte-identical afterwards" compares)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_main(module, argv, capsys) -> tuple[int, list[str], list[str]]:
    """``module.main(argv)`` in this process: (exit status, error lines, note lines) of its stderr."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn
        try:
            module.main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
    err = capsys.readouterr().err.splitlines()
    return code, [ln for ln in err if ln.startswith("error:")], [ln for ln in err if ln.startswith("note:")]


def _process(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def _one_error(err: str) -> str:
    """The stderr of a refused command: exactly one line, ``error: ...``, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _png(path: Path, array) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def _folder(root: Path, n_train=6, n_normal=3, n_anomalous=2, rgb=False, seed=0) -> Path:
    """A folder dataset of random 32x32 images (grey, or RGB)."""
    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if rgb else (32, 32)
    for sub, n in (("normal", n_train), ("test/normal", n_normal), ("test/anomalous", n_anomalous)):
        for i in range(n):
            _png(root / sub / f"{i}.png", rng.integers(0, 256, shape))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two finished runs (one evaluated, with a kept checkpoint), and the statistics files a user may give."""
    w = tmp_path_factory.mktemp("hostile")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.train(train.parse_args(FAST + ["--iterations", "2", "--keep-every", "1", "--out", str(w / "R")]))
        train.train(train.parse_args(FAST + ["--iterations", "2", "--seed", "1", "--out", str(w / "OTHER")]))
    vgg = features.VGG19Features("relu4_2", "random")
    good = features.feature_stats(vgg, [torch.rand(1, 3, 32, 32) * 2 - 1], source="test")
    for name, change in {"inf-std": lambda s: s.std.__setitem__(0, float("inf")),
                         "nan-mean": lambda s: s.mean.__setitem__(3, float("nan")),
                         "zero-std": lambda s: s.std.__setitem__(5, 0.0)}.items():
        bad = features.FeatureStats(good.mean.clone(), good.std.clone(), good.weights, good.layer, good.count)
        change(bad)
        torch.save(dict(vars(bad)), w / f"{name}.pt")  # as a hostile user writes it, not through save()
    torch.save({**vars(good), "mean": good.mean[:256], "std": good.std[:256]}, w / "256-channels.pt")
    _png(w / "images" / "0.png", np.zeros((20, 20, 3)))
    return w


def _finished(w: Path) -> dict:
    return {**_snapshot(w / "R"), **{f"OTHER/{k}": v for k, v in _snapshot(w / "OTHER").items()}}


# --- 1. no write destroys a finished result --------------------------------------------------------

WRITES = {  # (module, argv): a write over a finished result, refused
    "export over the checkpoint": (evaluate, ["--checkpoint", "{w}/R/checkpoint.pt", "--export", "{w}/R/checkpoint.pt"],
                                   "is the checkpoint it reads"),
    "export over another run's checkpoint": (evaluate, ["--checkpoint", "{w}/R/checkpoint.pt", "--export",
                                                        "{w}/OTHER/checkpoint.pt"], "--overwrite"),
    "export over a kept checkpoint": (evaluate, ["--checkpoint", "{w}/R/checkpoint.pt", "--export",
                                                 "{w}/R/kept/checkpoint-0000001.pt"], "--overwrite"),
    "stats over a checkpoint": (features, ["stats", "--images", "{w}/images", "--weights", "random", "--out",
                                           "{w}/R/checkpoint.pt"], "--overwrite"),
    "evaluate into another run": (evaluate, ["--checkpoint", "{w}/R/checkpoint.pt", "--out", "{w}/OTHER"],
                                  "another run's folder"),
    "train over a finished run": (train, FAST + ["--iterations", "2", "--out", "{w}/R"], "pass --resume"),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_no_write_destroys_a_finished_result(case, world, capsys):
    module, argv, expected = WRITES[case]
    before = _finished(world)
    code, errs, _ = _run_main(module, [a.format(w=world) for a in argv], capsys)
    assert code == 2 and len(errs) == 1 and expected in errs[0], (code, errs)
    assert _finished(world) == before


def test_a_results_folder_without_checkpoint_is_never_trained_over(world, tmp_path, capsys):
    (tmp_path / "evaluated").mkdir()
    (tmp_path / "evaluated" / "metrics.json").write_text('{"roc_auc": 0.9}')
    before = _snapshot(tmp_path)
    for extra in ([], ["--resume"]):
        code, errs, _ = _run_main(train, FAST + ["--iterations", "2", "--out", tmp_path / "evaluated", *extra], capsys)
        assert code == 2 and len(errs) == 1 and "never overwritten" in errs[0]
    assert _snapshot(tmp_path) == before


def test_a_full_disk_leaves_one_error_line_and_no_temporary(world, tmp_path):
    """RLIMIT_FSIZE makes every write past 4 KiB fail as a full disk does (EFBIG instead of ENOSPC)."""
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    before = _finished(world)
    out = tmp_path / "stats"
    r = _process(["features.py", "stats", "--images", world / "images", "--weights", "random", "--out",
                  out / "s.pt"], preexec_fn=small_disk)
    assert r.returncode == 2 and "could not write" in _one_error(r.stderr), r.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no temporary, no lock file left
    assert _finished(world) == before


# --- 2. one process per run folder -----------------------------------------------------------------

def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.2)


def test_a_second_process_is_refused_and_a_killed_holder_leaves_the_folder_usable(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    holder = subprocess.Popen([sys.executable, "train.py", *FAST, "--iterations", "1000000", "--log-every", "1",
                               "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(out / "log.csv", holder)  # training: the lock is held
        second = _process(["train.py", *FAST, "--iterations", "2", "--out", out])
        assert second.returncode == 2
        assert f"in use by another piad process (PID {holder.pid})" in _one_error(second.stderr)
        ev = _process(["evaluate.py", "--checkpoint", out / "checkpoint.pt", "--out", out])  # a reader that writes
        assert ev.returncode == 2 and f"PID {holder.pid}" in _one_error(ev.stderr)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL
    again = _process(["train.py", *FAST, "--iterations", "2", "--no-evaluate", "--resume", "--out", out])
    assert again.returncode == 0, again.stderr  # at once: the lock died with its holder
    assert (out / "checkpoint.pt").is_file() and not (out / ".piad.lock").exists()


def test_a_grid_refuses_duplicate_cells_before_starting(tmp_path, capsys):
    code, errs, _ = _run_main(experiments, ["custom", "--dataset", "digits", "--classes", "3", "3", "--seeds", "0", "0",
                                            "--iterations", "2", "--root", tmp_path / "grid"], capsys)
    assert code == 2 and len(errs) == 1 and "more than once" in errs[0]
    assert not (tmp_path / "grid").exists()  # nothing started


def test_a_grid_with_a_failed_cell_exits_non_zero(tmp_path, capsys):
    cell = tmp_path / "grid" / "digits" / "piad-mse-c0" / "normal3-s0"
    cell.mkdir(parents=True)
    (cell / "scores.csv").write_text("id,label\n")  # a result without its checkpoint: the cell fails
    before = _snapshot(tmp_path)
    code, errs, _ = _run_main(experiments, ["custom", "--dataset", "digits", "--classes", "3", "--losses", "mse",
                                            "--iterations", "2", "--vgg-weights", "random", "--no-progress",
                                            "--root", tmp_path / "grid"], capsys)
    assert code == 1 and len(errs) == 1 and "1 of 1 cells failed" in errs[0], errs
    assert _snapshot(cell) == {k.split("normal3-s0/")[1]: v for k, v in before.items() if "normal3-s0/" in k}


# --- 3. every input checked before work starts ---------------------------------------------------

@pytest.mark.parametrize("name, expected", [("inf-std", "non-finite"), ("nan-mean", "non-finite means"),
                                            ("zero-std", "non-positive"), ("256-channels", "per channel (512)")])
def test_statistics_files_are_checked_before_work(name, expected, world, tmp_path, capsys):
    before = _finished(world)
    argv = [*FAST[:-5], "--loss", "rel-perc-l1", "--vgg-weights", "random", "--stats", world / f"{name}.pt",
            "--iterations", "2", "--out", tmp_path / "run"]
    code, errs, _ = _run_main(train, argv, capsys)
    assert code == 2 and len(errs) == 1 and expected in errs[0] and "--stats" in errs[0], errs
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    assert _finished(world) == before


def test_outputs_sizes_and_resume_are_checked_before_work(world, tmp_path, capsys):
    before = _finished(world)
    data = _folder(tmp_path / "grey")
    cases = [([*FAST, "--iterations", "2", "--out", "/proc/piad-run"], "cannot write to --out"),
             ([*FAST, "--batch-size", "1000000", "--out", tmp_path / "a"], "--batch-size must be at most 65536"),
             ([*TINY, "--data-root", data, "--batch-size", "7", "--out", tmp_path / "b"],
              "larger than the training set (6 images")]
    for argv, expected in cases:
        code, errs, _ = _run_main(train, argv, capsys)
        assert code == 2 and len(errs) == 1 and expected in errs[0], (argv, errs)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code, _, _ = _run_main(train, [*TINY, "--data-root", data, "--no-evaluate", "--out", tmp_path / "c"], capsys)
    assert code == 0
    run = _snapshot(tmp_path / "c")
    _folder(tmp_path / "grey", rgb=True)  # the same files, now in colour
    code, errs, _ = _run_main(train, [*TINY[:-1], "3", "--data-root", data, "--resume", "--out", tmp_path / "c"],
                              capsys)
    assert code == 2 and len(errs) == 1 and "trained on 1-channel 32x32 images" in errs[0], errs
    assert _snapshot(tmp_path / "c") == run and _finished(world) == before


def _bomb_png(path: Path) -> Path:
    """A PNG that declares 30000 x 30000 pixels: PIL raises DecompressionBombError (not an OSError)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_any_image_decoder_failure_names_the_file(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    bomb = _bomb_png(data / "test" / "anomalous" / "bomb.png")
    code, errs, _ = _run_main(train, [*TINY, "--data-root", data, "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(errs) == 1 and str(bomb) in errs[0] and "DecompressionBombError" in errs[0], errs
    assert not (tmp_path / "run").exists()


def test_file_names_of_any_bytes_and_a_small_uneven_test_set(world, tmp_path, capsys):
    """3 normal and 2 anomalous test images, one named with a byte that is not UTF-8: every output
    is written, and scores.csv names that file readably."""
    data = _folder(tmp_path / "data")
    odd = os.fsdecode(bytes(data / "test" / "anomalous") + b"/caf\xe9.png")
    os.rename(data / "test" / "anomalous" / "1.png", odd)
    code, errs, _ = _run_main(train, [*TINY, "--data-root", data, "--out", tmp_path / "run"], capsys)
    assert code == 0 and errs == []
    run = tmp_path / "run"
    for name in ("metrics.json", "scores.csv", "roc.png", "pr.png", "reconstructions.png", "extremes.png"):
        assert (run / name).is_file(), name
    assert "caf\\xe9.png" in (run / "scores.csv").read_bytes().decode("utf-8")
    code, errs, _ = _run_main(evaluate, ["--checkpoint", run / "checkpoint.pt", "--images",
                                         data / "test" / "anomalous"], capsys)
    assert code == 0 and errs == []
    assert "caf\\xe9.png" in (run / "scores_anomalous.csv").read_text(encoding="utf-8")


def test_damaged_metrics_json_and_checkpoint_are_one_error_line(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "R"
    shutil.copytree(world / "R", run)
    (run / "metrics.json").write_text('{"roc_auc": ')
    before = _snapshot(run)
    code, errs, _ = _run_main(progress, [run], capsys)
    assert code == 2 and len(errs) == 1 and "metrics.json is damaged" in errs[0], errs
    assert _snapshot(run) == before
    state = torch.load(world / "R" / "checkpoint.pt", weights_only=True)
    del state["model"], state["trainer"]  # the right tag, but not what train.py writes
    (tmp_path / "S").mkdir()
    torch.save(state, tmp_path / "S" / "checkpoint.pt")
    before = _snapshot(tmp_path / "S")
    for module, argv in ((evaluate, ["--checkpoint", tmp_path / "S" / "checkpoint.pt"]),
                         (train, FAST + ["--iterations", "3", "--resume", "--out", tmp_path / "S"])):
        code, errs, _ = _run_main(module, argv, capsys)
        assert code == 2 and len(errs) == 1 and "lacks model, trainer" in errs[0], errs
    assert _snapshot(tmp_path / "S") == before


# --- 4. say what was assumed -----------------------------------------------------------------------

def test_notes_for_what_was_assumed(world, tmp_path, capsys):
    before = _finished(world)
    code, errs, notes = _run_main(train, FAST + ["--iterations", "2", "--no-evaluate", "--resume", "--out",
                                                 tmp_path / "new"], capsys)
    assert code == 0 and errs == [] and any("no checkpoint.pt" in n and "starting a new run" in n for n in notes)
    code, errs, notes = _run_main(experiments, ["table2-mnist", "--losses", "perc", "--methods", "latent-norm",
                                                "--status", "--root", tmp_path / "grid"], capsys)
    assert code == 0 and notes == ["note: preset table2-mnist ignores --methods, --losses (custom grids only); its "
                                   "own settings are used"]
    from PIL import Image

    tiff = tmp_path / "float" / "x.tif"
    tiff.parent.mkdir()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(tiff)
    readers._noted.clear()
    a = readers.read_image(tiff)
    assert a.min() == 0 and a.max() == 255  # scaled, not black
    readers.prepare(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), 32, 1)
    readers.prepare(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), 32, 1)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 2 and "values in [0, 1] scaled to 0..255" in notes[0] and "converted to grey" in notes[1]
    assert _finished(world) == before
