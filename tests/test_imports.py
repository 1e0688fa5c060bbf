"""The modules import each other one way only, and below the entry points (train.py, evaluate.py)
no root module imports any folder, berg/, baselines/ or tools/ (README, "How the modules depend on each other").

Every import of a project module, wherever it is written (function-local ones included), must
name a module earlier in the chain, and must sit at the top of the file; so a cycle, or a module
that reaches up the chain (e.g. evaluate.py importing train.py), fails here. The chain's one home is
README's line `errors` → `readers` → ...; it is read from there. Project modules are the root's
``*.py`` (PIAD), ``berg/*.py`` (Berg et al.'s system, named ``berg.x``), ``baselines/*.py`` (the k-NN
beside PIAD: ``baselines.x``) and ``tools/*.py`` (grids, launch, export, TensorBoard: ``tools.x``);
``tools/bench/`` holds scripts, not modules.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("berg", "tools", "baselines")
# PIAD's sections (§3.1-3.3): they import nothing of Berg et al.'s folder, the baselines' nor the tooling's.
CORE = ("fused_op", "features", "losses", "piad", "weights_policy")
# The entry points: of the root's modules only these may import berg/, baselines/ and tools/.
ENTRY_POINTS = ("train", "evaluate")


def readme_chain(root: Path = ROOT) -> tuple[str, ...]:
    """README's import chain, lower first: each module may import only modules before it."""
    text = (root / "README.md").read_text()
    section = text.split("### How the modules depend on each other", 1)[1].split("\n## ", 1)[0]
    line = next(l for l in section.splitlines() if l.count(" → ") > 5)
    return tuple(re.findall(r"`([\w.]+)`", line))


def readme_file_table(root: Path = ROOT) -> set[str]:
    """The modules named in the first column of README's file table (the table whose header is
    ``| file | paper | what |``, up to its first blank line): ``berg.pgan`` for `berg/pgan.py`;
    `tests/...` rows left out."""
    table = (root / "README.md").read_text().split("| file |", 1)[1].split("\n\n", 1)[0]
    return {m.replace("/", ".") for row in table.splitlines()
            for m in re.findall(r"`([\w/]+)\.py`", row.split("|")[1]) if not m.startswith("tests/")}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: file}``: ``piad`` for ``piad.py``, ``berg.pgan`` for ``berg/pgan.py``."""
    mods = {p.stem: p for p in root.glob("*.py") if p.stem != "setup"}
    for folder in FOLDERS:
        mods |= {f"{folder}.{p.stem}": p for p in (root / folder).glob("*.py") if p.stem != "__init__"}
    return mods


def imports(module: str, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at top level) for every import statement of ``module``."""
    mods = project_modules(root)
    tree = ast.parse(mods[module].read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `try: import x` / `if ...: import x` at module level count as top level
        if isinstance(node, (ast.Try, ast.If)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from berg import pgan` imports berg.pgan; `from config import X` imports config
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                       for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top) for t in dict.fromkeys(targets)
                  if t in mods or t in FOLDERS]
    return found


CHAIN = readme_chain()
MODULES = sorted(project_modules())


def test_every_module_has_a_place_in_the_chain_and_the_file_table():
    assert set(MODULES) == set(CHAIN), "README's chain must name every module, and only those"
    listed = readme_file_table()
    assert listed == set(CHAIN), f"README's file table: missing {set(CHAIN) - listed}, extra {listed - set(CHAIN)}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_chain_only(module):
    rank = {m: i for i, m in enumerate(CHAIN)}
    bad = [f"{module}: line {line} imports {target}" for target, line, _ in imports(module)
           if target in FOLDERS or rank[target] >= rank[module]]
    assert not bad, "imports against the chain " + " < ".join(CHAIN) + ": " + "; ".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_project_imports_are_at_the_top_of_the_file(module):
    hidden = [f"{module}: line {line} imports {target}" for target, line, top in imports(module) if not top]
    assert not hidden, "function-local imports of project modules: " + "; ".join(hidden)


@pytest.mark.parametrize("module", CORE)
def test_piad_core_imports_nothing_of_either_folder(module):
    """The seam: §3.1-3.3 read without Berg et al.'s system or the tooling."""
    reached = [t for t, _, _ in imports(module) if t.split(".")[0] in FOLDERS]
    assert not reached, f"{module} imports {reached}"


def below_entry_points(root: Path = ROOT) -> list[str]:
    """The root's modules other than the entry points (setup.py is not a module of the project)."""
    return sorted(m for m in project_modules(root) if "." not in m and m not in ENTRY_POINTS)


def folder_imports(module: str, root: Path = ROOT) -> list[str]:
    """The imports of berg/, baselines/ or tools/ in ``module``, as ``line N imports X``."""
    return [f"line {line} imports {t}" for t, line, _ in imports(module, root) if t.split(".")[0] in FOLDERS]


@pytest.mark.parametrize("module", below_entry_points())
def test_no_module_below_the_entry_points_imports_either_folder(module):
    """Imports go one way, visibly: below train.py and evaluate.py, the root's modules are given what
    they need of Berg et al.'s system or of the tooling (e.g. ``berg.system.PROTOCOLS``,
    ``berg.system.THEIRS``, ``tools.provenance.record()``), never import it."""
    assert not folder_imports(module), f"{module}.py: " + "; ".join(folder_imports(module))


def test_the_folder_check_fails_on_a_module_below_the_entry_points(tmp_path):
    """The check itself: a root module that imports berg/ or tools/ (top level or in a function) is
    found; the entry points may."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "berg" / "protocol.py").write_text("import data\n")
    (tmp_path / "tools" / "provenance.py").write_text("")
    (tmp_path / "data.py").write_text("import berg.protocol\n")
    (tmp_path / "guard.py").write_text("def f():\n    from tools import provenance\n")
    (tmp_path / "train.py").write_text("from tools import provenance\nimport berg.protocol\n")
    (tmp_path / "evaluate.py").write_text("from berg import protocol\n")
    assert below_entry_points(tmp_path) == ["data", "guard"]
    assert folder_imports("data", tmp_path) == ["line 1 imports berg.protocol"]
    assert folder_imports("guard", tmp_path) == ["line 2 imports tools.provenance"]
    assert folder_imports("train", tmp_path) and folder_imports("evaluate", tmp_path)  # allowed there


def test_the_walk_sees_function_local_and_folder_imports(tmp_path):
    """The checker itself: a function-local import, and `from berg import x`, are found."""
    (tmp_path / "berg").mkdir()
    (tmp_path / "berg" / "pgan.py").write_text("import piad\n")
    (tmp_path / "errors.py").write_text("def f():\n    import train\n")
    (tmp_path / "train.py").write_text("import errors\nfrom berg import pgan\n")
    (tmp_path / "piad.py").write_text("from errors import f\n")
    assert imports("errors", tmp_path) == [("train", 2, False)]
    assert imports("train", tmp_path) == [("errors", 1, True), ("berg.pgan", 2, True)]
    assert imports("berg.pgan", tmp_path) == [("piad", 1, True)]
