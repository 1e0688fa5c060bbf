"""What `pip install .` puts on the path: the extension piad_C, and no module with a generic name.

The flat modules (``data``, ``config``, ``train``, ...) run from the clone; installed at the top of
site-packages they would shadow any other package's ``import data`` or ``import config``. This test
asks a Python started outside the clone, with the installed environment only, what it can import.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_imports import project_modules

ROOT = Path(__file__).resolve().parent.parent


def _importable_outside_the_clone(names, tmp_path) -> dict:
    code = ("import importlib.util, json, sys; "
            "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_no_project_module_is_installed_on_the_path(tmp_path):
    modules = sorted({m.split(".")[0] for m in project_modules()})  # berg.pgan: the package berg
    assert {"data", "config", "train", "errors", "piad", "berg", "tools"} <= set(modules)
    found = _importable_outside_the_clone(modules, tmp_path)
    installed = sorted(m for m, ok in found.items() if ok)
    assert not installed, (f"modules of the clone importable from anywhere: {installed}; setup.py must install "
                           "none of them (py_modules=[]), only the extension piad_C")


def test_setup_declares_no_module_and_one_extension():
    text = (ROOT / "setup.py").read_text()
    assert "py_modules=[]" in text and "packages=[]" in text
    assert '"piad_C"' in text
