"""losses.py reused alone (paper §3.1): copied by itself into an empty folder, its documented
snippet runs in a Python that sees nothing else of the project (torch and torchvision only).

The snippet is read from losses.py's docstring (README shows the same text). Offline, its
variant with a state-dict file runs (a VGG-19 of random weights saved in torchvision's layout);
the ``"torchvision"`` variant runs when torch hub's cache holds the ImageNet weights. With
fused_op.py copied beside it (and the extension piad_C installed) the same snippet uses the op.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_op
import losses

ROOT = Path(__file__).resolve().parent.parent
PROJECT = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "setup") + ["berg", "tools"]

PRELUDE = """\
import torch
g = torch.Generator().manual_seed(0)
batches = [torch.rand(4, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2)]  # the user's images
x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
x_rec = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
"""
CHECKS = """
import importlib.util, json, sys
assert scores.shape == (3,) and (scores > 0).all()
assert torch.equal(FeatureStats.load("stats.pt").std, stats.std)  # μ, σ from a file
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).requires_grad_(False)  # any extractor
own = ReconstructionLoss(kind="rel-perc-l1", features=net, stats=feature_stats(net, batches), reduction="none")
assert own(x, x_rec).shape == (3,)
print(json.dumps({"scores": scores.tolist(), "fused": loss.fused, "weights": vgg.weights_id,
                  "project": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
                  "paths": [p for p in sys.path if p.startswith(sys.argv[1]) and not p.startswith(sys.prefix)]}))
"""


def documented_snippet() -> str:
    """The indented block after ``Use the loss::`` in losses.py's docstring, dedented."""
    lines = []
    for line in losses.__doc__.split("Use the loss::", 1)[1].splitlines()[1:]:
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def run_alone(tmp_path: Path, snippet: str, *, with_op: bool = False) -> dict:
    """The snippet, run from a new folder holding losses.py (and fused_op.py) only."""
    tmp_path.mkdir()
    (tmp_path / "losses.py").write_text((ROOT / "losses.py").read_text())
    if with_op:
        (tmp_path / "fused_op.py").write_text((ROOT / "fused_op.py").read_text())
    (tmp_path / "snippet.py").write_text(PRELUDE + snippet + CHECKS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "snippet.py", str(ROOT), *PROJECT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # the interpreter's own environment may sit in the clone (make's .venv): its site-packages is no project path
    assert out["paths"] == [], "the subprocess' sys.path reaches into the project"
    # the copied files, and nothing else of the project
    assert sorted(out["project"]) == sorted(["losses"] + (["fused_op"] if with_op else [])), out["project"]
    return out


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory):
    """A VGG-19 up to relu4_2 of random weights, saved in the layout of torchvision's vgg19().features."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(losses.VGG19Features("relu4_2", weights=None).body.state_dict(), path)
    return path


def test_the_documented_snippet_runs_with_losses_py_alone(tmp_path, state_dict_file):
    snippet = documented_snippet()
    assert 'weights="torchvision"' in snippet
    offline = snippet.replace('weights="torchvision"', f"weights={str(state_dict_file)!r}", 1)
    alone = run_alone(tmp_path / "alone", offline)
    assert alone["weights"] == "file:vgg19.pth" and alone["fused"] is False  # PyTorch only
    if fused_op.is_built():  # the same snippet with the op beside it: the op, the same values
        beside = run_alone(tmp_path / "with-op", offline, with_op=True)
        assert beside["fused"] is True
        torch.testing.assert_close(torch.tensor(beside["scores"]), torch.tensor(alone["scores"]), rtol=1e-5, atol=0)


@pytest.mark.skipif(not (Path(torch.hub.get_dir()) / "checkpoints" / "vgg19-dcbb9e9d.pth").is_file(),
                    reason="torchvision's VGG-19 IMAGENET1K_V1 is not in torch hub's cache (offline)")
def test_the_documented_snippet_runs_with_torchvision_weights(tmp_path):
    out = run_alone(tmp_path, documented_snippet())
    assert out["weights"] == "torchvision:IMAGENET1K_V1"
