"""README.md's two commands are the ones CI and users run, and they do the whole set-up."""
import re
import shlex
from pathlib import Path

import train
from test_imports import project_modules

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def _make_rule(target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n)*)", text, flags=re.M)
    assert m, f"no rule for {target!r} in Makefile"
    return m.group(1).split(), [line.strip() for line in m.group(2).splitlines()]


def _make_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\??=\s*(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert m, name
    return m.group(1).strip()


def test_readme_has_exactly_two_one_line_commands():
    assert _commands() == ["make run", "make test"]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = _commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_cmd


def test_both_commands_do_the_setup_then_the_job():
    for target in ("run", "test"):
        prereqs, _ = _make_rule(target)
        assert "setup" in prereqs, target
    prereqs, _ = _make_rule("setup")
    assert "$(STAMP)" in prereqs and "data" in prereqs
    _, install = _make_rule("$(STAMP)")
    text = "\n".join(install)
    assert "-m venv" in text and "torch==2.14.1 torchvision==0.29.1" in text
    assert '--no-build-isolation -e ".[test,mnist5k]"' in text
    _, data = _make_rule("data")
    assert "dataset-fashion-mnist" in "\n".join(data)
    # the test command is exactly pytest's, in the venv: its exit status is make's
    assert _make_rule("test")[1] == ["$(PY) -m pytest -q tests"]


def test_readme_is_one_page_with_the_two_commands_first():
    """README is one page (at most 200 lines) and its two commands come within its first 40 lines;
    the detail lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to a page of docs/"
    first = {cmd: lines.index(cmd) + 1 for cmd in _commands()}
    assert max(first.values()) <= 40, f"README.md: the two commands stand at lines {first}, not within the first 40"


def _links(page: Path) -> list[str]:
    """Targets of a markdown page's links and images, fenced code left out."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_relative_links_of_readme_and_docs_resolve():
    """Every relative link or image of README.md and docs/*.md names a file of the repository, and
    every #anchor a heading of its page."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken, n = [], 0
    for page in pages:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            n += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert n > 30
    assert not broken, broken


def test_readme_links_every_page_of_docs():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"pages of docs/ that README.md does not link: {orphans}"


def test_readme_main_command_is_the_main_job():
    _, recipe = _make_rule("run")
    assert recipe == ["$(PY) train.py $(ARGS)"]
    cfg = train.parse_args(shlex.split(_make_var("ARGS")))
    # the quick start: the paper's method on MNIST 8 for a CPU-sized 1,500 iterations (the curve of
    # results/mnist-5k), bf16 where the CPU has it, into one folder that a second `make run` evaluates again
    assert (cfg.dataset, cfg.normal, cfg.iterations, cfg.fallback) == ("mnist", "8", 1500, "mnist-5k")
    assert (cfg.precision, cfg.out, cfg.resume) == ("auto", "runs/make-run", True)
    assert {k: v for k, v in vars(cfg).items() if k not in ("iterations", "fallback", "precision", "out", "resume")} \
        == {k: v for k, v in vars(train.TrainConfig(dataset="mnist", normal="8")).items()
            if k not in ("iterations", "fallback", "precision", "out", "resume")}  # the method unchanged


MISSING = object()
MODULES = project_modules()  # piad, berg.pgan, tools.experiments, ...
SHORT = {m.rsplit(".", 1)[1]: m for m in MODULES if "." in m}  # pgan -> berg.pgan (docs/berg.md's shorthand)
HOMES = {"PIADTrainer": "train", "GradientHistory": "weights_policy", "PIADConfig": "piad", "TrainConfig": "config"}


def _resolve(dotted: str):
    """``module.attr[.attr]``: a root module, ``berg.x`` / ``tools.x`` (or ``x`` alone for those),
    or ``Class.attr`` for a class of :data:`HOMES`."""
    import importlib

    first, *rest = dotted.split(".")
    if first in HOMES:
        obj = getattr(importlib.import_module(HOMES[first]), first)
    else:
        parts = SHORT.get(first, first).split(".") + rest
        i = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES or parts[:i] == parts[:1])
        obj, rest = importlib.import_module(".".join(parts[:i])), parts[i:]
    for attr in rest:
        if not hasattr(obj, attr):
            return MISSING
        obj = getattr(obj, attr)  # may be None: a field's default (TrainConfig.threads)
    return obj


def test_code_names_in_readme_and_docs_exist():
    """Every `module.name` that README.md or a page of docs/ cites (modules of berg/ and tools/
    included), every file of README's "From the paper to the code" table, every
    `PIADConfig(field=...)` / `TrainConfig(field=...)` setting and every train.py flag of
    docs/deviations.md exists."""
    import dataclasses

    import config
    import piad

    modules = {m.split(".")[0] for m in MODULES} | set(SHORT) | set(HOMES)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1
    missing = []
    for page in pages:
        text = page.read_text()
        for span in re.findall(r"`([^`\n]+)`", text):
            for dotted in re.findall(r"(?<![\w./-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/])", span):
                if dotted.split(".")[0] in modules and not dotted.endswith((".py", ".pt", ".h", ".md", ".json", ".csv", ".png", ".npz", ".pt2")) \
                        and _resolve(dotted) is MISSING:
                    missing.append(f"{page.name}: {dotted}")
            for cls, fields in (("PIADConfig", piad.PIADConfig), ("TrainConfig", config.TrainConfig)):
                for call in re.findall(rf"{cls}\(([^)]*)\)", span):
                    for name in re.findall(r"(\w+)=", call):
                        if name not in {f.name for f in dataclasses.fields(fields)}:
                            missing.append(f"{page.name}: {cls}({name}=...)")
    table = (ROOT / "README.md").read_text().split("### From the paper to the code", 1)[1].split("\n### ", 1)[0]
    missing += [f"README.md: {path}" for path in re.findall(r"`((?:[\w/]+/)?\w+\.(?:h|py))`", table)
                if not (ROOT / path).is_file()]
    dotted = re.findall(r"`([A-Za-z_]\w*(?:\.\w+)+)`", table)
    assert len(dotted) > 20
    missing += [f"README.md: {d} (no such module)" for d in dotted  # the table names modules of this project only
                if d.split(".")[0] not in modules and not d.endswith((".py", ".h"))]
    flags = {config.flag(f.name) for f in dataclasses.fields(config.TrainConfig)} | {"--classes"}
    for flag in re.findall(r"`(--[a-z][\w-]*)", (ROOT / "docs" / "deviations.md").read_text()):
        if flag not in flags:
            missing.append(f"deviations.md: {flag}")
    assert not missing, missing
