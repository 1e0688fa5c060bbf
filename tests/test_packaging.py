"""What `pip install .` puts on the path: the extension piad_C, and no module with a generic name.

The flat modules (``data``, ``config``, ``train``, ...) run from the clone; installed at the top of
site-packages they would shadow any other package's ``import data`` or ``import config``. This test
asks a Python started outside the clone, with the installed environment only, what it can import.
"""
import json
import os
import subprocess
import sys

from test_imports import project_modules


def _importable_outside_the_clone(names, tmp_path) -> dict:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_no_project_module_is_installed_on_the_path(tmp_path):
    modules = project_modules()
    assert {"data", "config", "train", "errors", "piad", "berg.pgan", "tools.launch"} <= set(modules)
    top = sorted({m.split(".")[0] for m in modules})  # berg.pgan is importable only if berg is
    found = _importable_outside_the_clone(top, tmp_path)
    installed = sorted(m for m, ok in found.items() if ok)
    assert not installed, (f"modules of the clone importable from anywhere: {installed}; setup.py must install "
                           "none of them (py_modules=[], packages=[]), only the extension piad_C")


def test_the_installed_distribution_provides_the_extension_only(tmp_path):
    """What the installed distribution says it puts at the top of site-packages: piad_C, nothing else."""
    code = "import importlib.metadata as m; print(m.distribution('piad').read_text('top_level.txt') or '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["piad_C"]
