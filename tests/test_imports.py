"""The modules import each other one way only (README, "How the modules depend on each other").

Every import of a project module, wherever it is written (function-local ones included), must
name a module earlier in ``CHAIN``, and must sit at the top of the file. A cycle, or a module that
reaches up the chain (e.g. evaluate.py importing train.py), fails here.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lower first. Each module may import only modules before it.
CHAIN = ("errors", "fused_op", "features", "losses", "piad", "weights_policy", "readers", "berg_protocol", "data", "figures", "in_the_wild", "pgan", "progressive",
         "config", "checkpoint", "evaluate", "train", "experiments")
NOT_MODULES = {"setup"}  # the build script


def project_modules() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in NOT_MODULES)


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at top level) for every import statement of ``module``."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `try: import x` / `if ...: import x` at module level count as top level
        if isinstance(node, (ast.Try, ast.If)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    names = set(project_modules())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module.split(".")[0]]
        else:
            continue
        found += [(t, node.lineno, id(node) in top) for t in targets if t in names]
    return found


def test_every_module_has_a_place_in_the_chain():
    assert set(project_modules()) <= set(CHAIN), "add new modules to CHAIN (and README's table)"


@pytest.mark.parametrize("module", project_modules())
def test_imports_go_down_the_chain_only(module):
    rank = {m: i for i, m in enumerate(CHAIN)}
    up = [f"{module}.py:{line} imports {target}" for target, line, _ in imports(module)
          if rank[target] >= rank[module]]
    assert not up, "imports against the chain " + " < ".join(CHAIN) + ": " + "; ".join(up)


@pytest.mark.parametrize("module", project_modules())
def test_project_imports_are_at_the_top_of_the_file(module):
    hidden = [f"{module}.py:{line} imports {target}" for target, line, top in imports(module) if not top]
    assert not hidden, "function-local imports of project modules: " + "; ".join(hidden)


def test_no_import_cycle():
    """Independent of CHAIN: a depth-first walk of the import graph finds no cycle."""
    graph = {m: sorted({t for t, _, _ in imports(m)}) for m in project_modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in graph[m]:
            visit(t, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_the_walk_sees_function_local_imports(tmp_path, monkeypatch):
    """The checker itself: a function-local import up the chain is found."""
    (tmp_path / "errors.py").write_text("def f():\n    import train\n")
    (tmp_path / "train.py").write_text("import errors\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imports("errors") == [("train", 2, False)]
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
