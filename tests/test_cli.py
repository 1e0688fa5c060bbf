"""The command-line programs as a person meets them: one `error:` line and exit status 2 for every
mistake (no traceback, no run folder touched), checkpoints that cannot run code, Ctrl-C/SIGTERM
that keep the work, and a divergence that keeps the last good state."""
import csv
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from tools import experiments
import errors
import features
import checkpoint
import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--dataset", "digits", "--normal", "3", "--batch-size", "8", "--loss", "mse", "--vgg-weights", "random",
        "--no-progress"]


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if anything runs the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "config": {}, "iteration": 1, "payload": _Payload(marker)}, path)
    return path


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def _quiet_train(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn
        return train.train(cfg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run, and the bad files and folders a user may hand to the programs."""
    from PIL import Image

    w = tmp_path_factory.mktemp("world")
    _quiet_train(train.parse_args(FAST + ["--iterations", "2", "--out", str(w / "finished")]))
    (w / "corrupt").mkdir()
    (w / "corrupt" / "checkpoint.pt").write_bytes((w / "finished" / "checkpoint.pt").read_bytes()[:2000])
    (w / "evil").mkdir()
    _malicious(w / "evil" / "checkpoint.pt", w / "PWNED")
    _malicious(w / "evil-stats.pt", w / "PWNED")
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "payload": _Payload(w / "PWNED")}, w / "evil-legacy.pt",
               _use_new_zipfile_serialization=False)  # torch's old file format
    with open(w / "evil.pkl", "wb") as fh:
        pickle.dump({"payload": _Payload(w / "PWNED")}, fh)  # a bare pickle
    (w / "not-a-checkpoint.pt").write_text("hello")
    (w / "foreign").mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, w / "foreign" / "checkpoint.pt")  # a torch file, not ours
    for sub in ("normal", "test/normal", "test/anomalous"):
        (w / "empty" / sub).mkdir(parents=True)
    (w / "no-images").mkdir()
    (w / "no-images" / "readme.txt").write_text("not an image")
    (w / "images").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(w / "images" / "0.png")
    return w


def test_the_malicious_file_would_run_code_if_loaded_unsafely(tmp_path):
    """The test's payload is real: an unrestricted torch.load creates the marker file."""
    marker = tmp_path / "ran"
    state = torch.load(_malicious(tmp_path / "x.pt", marker), weights_only=False)
    state["payload"].close()
    assert marker.exists()


FIN = "{w}/finished"
BAD_INPUTS = {  # id: (program, argv with {w} for the world folder, words the error line must hold)
    "unknown dataset": (train, ["--dataset", "imagenet", "--out", FIN], "invalid choice"),
    "class out of range": (train, FAST + ["--normal", "11", "--out", FIN], "unknown normal class '11'"),
    "empty folder": (train, ["--dataset", "folder", "--data-root", "{w}/empty", "--normal", "mine", "--loss", "mse",
                             "--no-progress", "--out", "{w}/new-run"], "no images"),
    "missing VGG file": (train, FAST[:-3] + ["--vgg-weights", "{w}/vgg19.pth", "--out", FIN], "--vgg-weights"),
    "corrupt checkpoint": (train, FAST + ["--resume", "--out", "{w}/corrupt"], "corrupt or truncated"),
    "malicious checkpoint": (train, FAST + ["--resume", "--out", "{w}/evil"], "pickled Python objects (io.open"),
    "out is a file": (train, FAST + ["--resume", "--out", "{w}/not-a-checkpoint.pt"], "is a file"),
    "foreign checkpoint": (train, FAST + ["--resume", "--out", "{w}/foreign"], "not a checkpoint written by train.py"),
    "iterations 0": (train, FAST + ["--iterations", "0", "--out", FIN], "--iterations must be a whole number >= 1"),
    "iterations -5": (train, FAST + ["--iterations", "-5", "--out", FIN], "got -5"),
    "iterations not a number": (train, FAST + ["--iterations", "ten"], "invalid int value"),
    "contamination 1": (train, FAST + ["--contamination", "1", "--out", FIN], "0 <= P < 1"),
    "contamination -0.1": (train, FAST + ["--contamination", "-0.1", "--out", FIN], "0 <= P < 1"),
    "batch size 0": (train, FAST + ["--batch-size", "0", "--out", FIN], "--batch-size"),
    "gamma 0": (train, FAST + ["--weights-policy", "fixed", "--gamma-g", "0", "--out", FIN], "--gamma-g must be"),
    "checkpoint minutes nan": (train, FAST + ["--checkpoint-minutes", "nan", "--out", FIN], "--checkpoint-minutes"),
    "finished run without --resume": (train, FAST + ["--iterations", "2", "--out", FIN], "pass --resume"),
    "resume with other settings": (train, FAST + ["--seed", "5", "--resume", "--out", FIN], "--seed 5 (checkpoint: 0)"),
    "fewer iterations than done": (train, FAST + ["--iterations", "1", "--resume", "--out", FIN], "already done"),
    "missing statistics file": (train, FAST[:-3] + ["--stats", "{w}/stats.pt", "--out", FIN], "features.py stats"),
    "malicious statistics": (train, FAST[:-5] + ["--loss", "rel-perc-l1", "--vgg-weights", "random", "--stats",
                                                 "{w}/evil-stats.pt", "--out", "{w}/new-run"], "refusing to load"),
    "evaluate: missing checkpoint": (evaluate, ["--checkpoint", "{w}/nothing.pt"], "not found"),
    "evaluate: corrupt checkpoint": (evaluate, ["--checkpoint", "{w}/corrupt/checkpoint.pt"], "corrupt or truncated"),
    "evaluate: malicious checkpoint": (evaluate, ["--checkpoint", "{w}/evil/checkpoint.pt"], "could run arbitrary code"),
    "evaluate: malicious old-format file": (evaluate, ["--checkpoint", "{w}/evil-legacy.pt"], "(io.open)"),
    "evaluate: malicious bare pickle": (evaluate, ["--checkpoint", "{w}/evil.pkl"], "could not read checkpoint"),
    "evaluate: not a checkpoint": (evaluate, ["--checkpoint", "{w}/not-a-checkpoint.pt"], "corrupt or truncated"),
    "evaluate: no images": (evaluate, ["--checkpoint", FIN + "/checkpoint.pt", "--images", "{w}/no-images"],
                            "no images"),
    "evaluate: missing image folder": (evaluate, ["--checkpoint", FIN + "/checkpoint.pt", "--images", "{w}/nope"],
                                       "does not exist"),
    "experiments: class out of range": (experiments, ["custom", "--dataset", "digits", "--classes", "3", "11",
                                                      "--root", "{w}/grid"], "unknown normal class '11'"),
    "experiments: iterations 0": (experiments, ["custom", "--dataset", "digits", "--iterations", "0",
                                                "--root", "{w}/grid"], "--iterations must be"),
    "experiments: contamination 1": (experiments, ["custom", "--dataset", "digits", "--contaminations", "0", "1",
                                                   "--root", "{w}/grid"], "0 <= P < 1"),
    "stats: no images": (features, ["stats", "--images", "{w}/no-images", "--out", "{w}/s.pt"], "no images"),
    "stats: missing folder": (features, ["stats", "--images", "{w}/nope", "--out", "{w}/s.pt"], "does not exist"),
    "stats: missing VGG file": (features, ["stats", "--images", "{w}/images", "--weights", "{w}/vgg19.pth",
                                         "--out", "{w}/s.pt"], "--weights"),
    "stats: image size 4": (features, ["stats", "--images", "{w}/images", "--image-size", "4", "--out", "{w}/s.pt"],
                            "--image-size must be at least 16"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the bare pickle
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(case, world, capsys, monkeypatch):
    program, argv, words = BAD_INPUTS[case]
    argv = [a.replace("{w}", str(world)) for a in argv]
    monkeypatch.delenv("PIAD_DEBUG", raising=False)
    before = _snapshot(world)
    with pytest.raises(SystemExit) as exit_info:
        program.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert words in errors[0], err
    assert _snapshot(world) == before  # the finished run (and everything else) untouched, nothing created
    assert not (world / "PWNED").exists()  # the malicious files ran nothing


def test_debug_shows_the_traceback(world, monkeypatch):
    argv = FAST + ["--iterations", "0", "--out", str(world / "finished")]
    with pytest.raises(errors.UserError, match="--iterations"):
        train.main(argv + ["--debug"])
    monkeypatch.setenv("PIAD_DEBUG", "1")
    with pytest.raises(errors.UserError, match="--iterations"):
        train.main(argv)


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *FAST, "--iterations", "-5", "--out",
                        str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PIAD_DEBUG": ""})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: --iterations must be a whole number >= 1 (or left out for "
                                             "the paper's schedule), got -5"]
    assert not (tmp_path / "run").exists()


def test_validate_is_one_function_on_the_config():
    cfg = train.TrainConfig(dataset="digits", normal="3", iterations=0, batch_size=0, contamination=1.5,
                            gamma_e=-1.0, n_weight=0, seed=-1)
    with pytest.raises(errors.UserError) as e:
        cfg.validate()
    for flag in ("--iterations", "--batch-size", "--contamination", "--gamma-e", "--n-weight", "--seed"):
        assert flag in str(e.value)
    given = train.TrainConfig(dataset="digits", normal="3")
    assert given.validate() is given and given == train.TrainConfig(dataset="digits", normal="3")  # checks only


def test_help_shows_the_settings_by_group(capsys):
    """``train.py --help``: one section per group of config.GROUPS, each flag in its field's group."""
    import config

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    titles = list(config.GROUPS.values())
    at = [text.index(f"\n{t}:\n") for t in titles]
    assert at == sorted(at), "the groups appear in config.GROUPS' order"
    sections = dict(zip(titles, (text[a:b] for a, b in zip(at, at[1:] + [len(text)]))))
    for f in dataclasses.fields(config.TrainConfig):
        homes = [t for t, body in sections.items() if re.search(rf"^  {config.flag(f.name)}\b", body, re.M)]
        assert homes == [config.GROUPS[f.metadata["group"]]], f.name
    assert re.search(r"^  --fmap-max", sections["Berg et al. (--method latent-norm)"], re.M)
    assert re.search(r"^  --loss", sections["PIAD (§3, Algorithm 1)"], re.M)
    with pytest.raises(ValueError, match="group"):
        config.knob(1, "a setting of no group", group="other")


# --- safe loading --------------------------------------------------------------------------------

def test_checkpoints_hold_only_plain_data(world, tmp_path):
    """Loadable with weights_only=True and no allow-listed types (piad and latent-norm runs)."""
    torch.load(world / "finished" / "checkpoint.pt", weights_only=True)
    for networks in ("piad", "pgan"):  # pgan: narrow (--fmap-max 8), lod, Gs and the schedule in the state
        _quiet_train(train.parse_args(FAST + ["--method", "latent-norm", "--iterations", "1", "--no-evaluate",
                                              "--networks", networks, "--fmap-max", "8",
                                              "--out", str(tmp_path / networks)]))
        state = torch.load(tmp_path / networks / "checkpoint.pt", weights_only=True)
        assert state["config"]["method"] == "latent-norm" and state["config"]["networks"] == networks


def test_a_checkpoint_holding_numpy_arrays_is_refused(world, tmp_path):
    """Checkpoints hold tensors and plain data only: numpy's own RNG tuple (an ndarray inside) is
    refused as any pickled object is, before it is used."""
    state = torch.load(world / "finished" / "checkpoint.pt", weights_only=True)
    np.random.seed(3)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(errors.BadFile, match="pickled Python objects"):
        checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")


def test_malicious_statistics_are_refused(world):
    with pytest.raises(errors.BadFile, match="pickled Python objects"):
        features.FeatureStats.load(world / "evil-stats.pt")
    assert not (world / "PWNED").exists()


# --- signals -------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    try:
        with open(path) as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def _python_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def test_sigterm_saves_and_the_resumed_run_ends_with_the_same_scores(tmp_path):
    """A job scheduler's SIGTERM mid-run: exit 143 with a checkpoint and the --resume command,
    which finishes the run with the scores of an uninterrupted one."""
    args = FAST + ["--iterations", "16", "--checkpoint-minutes", "1000"]
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--out", str(part)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not _rows(part / "log.csv") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # the first log row is written after iteration 0: the loop is running
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and not (part / "metrics.json").exists()
    done = checkpoint.load_checkpoint(part / "checkpoint.pt")["iteration"]
    assert 1 <= done < 16
    assert f"stopped after iteration {done} of 16" in err
    command = err.split("Resume with: ", 1)[1].strip().splitlines()[0]
    assert command.endswith("--resume")

    r = subprocess.run(_python_argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    full = _quiet_train(train.parse_args(args + ["--out", str(tmp_path / "full")]))
    resumed = checkpoint.load_checkpoint(part / "checkpoint.pt")
    whole = checkpoint.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert resumed["iteration"] == whole["iteration"] == 16
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])
    assert json.loads((part / "metrics.json").read_text())["roc_auc_per_score"] == full["roc_auc_per_score"]
    assert (part / "scores.csv").read_text() == (tmp_path / "full" / "scores.csv").read_text()
    assert [r["rec"] for r in _rows(part / "log.csv")] == [r["rec"] for r in _rows(tmp_path / "full" / "log.csv")]


def _signal_at(monkeypatch, it: int, times: int = 1):
    real = train.PIADTrainer.step

    def step(self, i, sample, **kw):
        if i == it:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the iteration runs
        return real(self, i, sample, **kw)
    monkeypatch.setattr(train.PIADTrainer, "step", step)
    return lambda: monkeypatch.setattr(train.PIADTrainer, "step", real)


def test_ctrl_c_finishes_the_iteration_saves_and_exits_130(tmp_path, monkeypatch, capsys):
    argv = FAST + ["--iterations", "5", "--checkpoint-minutes", "1000", "--no-evaluate"]
    handler = signal.getsignal(signal.SIGINT)
    disarm = _signal_at(monkeypatch, 2)
    with pytest.raises(SystemExit) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main(argv + ["--out", str(tmp_path / "part")])
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is handler
    err = capsys.readouterr().err
    assert "SIGINT: stopped after iteration 3 of 5" in err and "Traceback" not in err
    assert checkpoint.load_checkpoint(tmp_path / "part" / "checkpoint.pt")["iteration"] == 3
    command = err.split("Resume with: ", 1)[1].strip().splitlines()[0]
    assert shlex.split(command)[1:] == ["train.py", *argv, "--out", str(tmp_path / "part"), "--resume"]
    disarm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main(shlex.split(command)[2:])  # (resuming exactly: the SIGTERM test and test_train)
    assert checkpoint.load_checkpoint(tmp_path / "part" / "checkpoint.pt")["iteration"] == 5


def test_ctrl_c_twice_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _signal_at(monkeypatch, 2, times=2)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--iterations", "5", "--checkpoint-minutes", "0", "--no-evaluate", "--out",
                           str(tmp_path / "run")])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "keeps the last good state (iteration 2)" in err and "Traceback" not in err
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 2
    assert not (tmp_path / "run" / checkpoint.CRASHED).exists()


# --- divergence and crashes ----------------------------------------------------------------------

def _finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("minutes,good", [("0", 3), ("1000", None)])
def test_divergence_keeps_the_last_good_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys,
                                                                           minutes, good):
    real = train.PIADTrainer.step

    def step(self, i, sample, **kw):
        out = real(self, i, sample, **kw)
        if i == 3:  # the update blows up: a weight and the loss are NaN
            with torch.no_grad():
                next(self.model.G.parameters()).fill_(float("nan"))
            out["rec"] = torch.tensor(float("nan"))
        return out
    monkeypatch.setattr(train.PIADTrainer, "step", step)
    run = tmp_path / "run"
    argv = FAST + ["--iterations", "5", "--checkpoint-minutes", minutes, "--no-evaluate", "--out", str(run)]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "a loss became non-finite at iteration 3" in errors[0]
    if good is not None:  # found right away (before the next checkpoint), with the values
        assert "at iteration 3 (rec=nan)" in errors[0]
    diverged = checkpoint.load_checkpoint(run / checkpoint.DIVERGED)
    assert diverged["status"] == "diverged" and not _finite(diverged)
    if good is None:
        assert not (run / checkpoint.CHECKPOINT).exists() and "No checkpoint had been written yet" in errors[0]
    else:
        state = checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT)
        assert state["iteration"] == good and _finite(state)
        assert f"keeps the last good state (iteration {good})" in errors[0]
    assert all(math.isfinite(float(r["rec"])) for r in _rows(run / "log.csv"))
    command = errors[0].split("draws: ", 1)[1].split(";")[0]
    assert command.endswith("--resume --reseed 1")

    monkeypatch.setattr(train.PIADTrainer, "step", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main(shlex.split(command)[2:])
    state = checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT)
    assert state["iteration"] == 5 and _finite(state) and state["config"]["reseed"] == 1


def test_reseed_changes_the_draws_and_a_reseeded_run_resumes_exactly(tmp_path, kill_at):
    base = train.parse_args(FAST + ["--iterations", "3", "--checkpoint-minutes", "0", "--no-evaluate"])
    plain = _quiet_train(train.dataclasses.replace(base, out=str(tmp_path / "plain")))
    assert plain["iterations"] == 3
    _quiet_train(train.dataclasses.replace(base, out=str(tmp_path / "a"), reseed=1))
    disarm = kill_at(train.PIADTrainer, 2)
    with pytest.raises(KeyboardInterrupt):
        _quiet_train(train.dataclasses.replace(base, out=str(tmp_path / "b"), reseed=1))
    disarm()
    _quiet_train(train.dataclasses.replace(base, out=str(tmp_path / "b"), reseed=1, resume=True))
    p, a, b = (checkpoint.load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("plain", "a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], p[k]) for k in a)


def test_an_exception_mid_training_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = train.PIADTrainer.step

    def step(self, i, sample, **kw):
        if i == 3:
            raise RuntimeError("boom")
        return real(self, i, sample, **kw)
    monkeypatch.setattr(train.PIADTrainer, "step", step)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom") as e:  # a bug: its traceback is shown
        train.main(FAST + ["--iterations", "5", "--checkpoint-minutes", "0", "--no-evaluate", "--out", str(run)])
    note = " ".join(e.value.__notes__)
    assert "keeps the last good state (iteration 3)" in note and "--resume" in note
    assert checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT)["iteration"] == 3
    assert checkpoint.load_checkpoint(run / checkpoint.CRASHED)["status"] == "crashed"
    monkeypatch.setattr(train.PIADTrainer, "step", real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main(FAST + ["--iterations", "5", "--checkpoint-minutes", "0", "--no-evaluate", "--out", str(run),
                           "--resume"])
    assert checkpoint.load_checkpoint(run / checkpoint.CHECKPOINT)["iteration"] == 5


def test_ctrl_c_in_a_grid_stops_it_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    argv = ["custom", "--dataset", "digits", "--classes", "3", "--losses", "mse", "--iterations", "3",
            "--vgg-weights", "random", "--no-progress", "--root", str(tmp_path / "grid")]
    disarm = _signal_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        experiments.main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopped after iteration 2 of 3" in err and "Traceback" not in err
    assert "-m tools.experiments " + shlex.join(argv) + " (finished cells are skipped, this one resumes)" in err
    disarm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        experiments.main(argv)
    assert "resuming" in capsys.readouterr().out
    assert (tmp_path / "grid" / "table.md").is_file() and not (tmp_path / "grid" / "failures.txt").exists()
