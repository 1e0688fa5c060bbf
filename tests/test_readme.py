"""README.md's two commands are the ones CI and users run."""
import re
from pathlib import Path

import train

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = _commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_cmd


def test_readme_main_command_parses():
    main_cmd, _ = _commands()
    argv = main_cmd.split()
    assert argv[:2] == ["python", "train.py"]
    cfg = train.parse_args(argv[2:])
    assert (cfg.dataset, cfg.normal) == ("mnist", "8")
