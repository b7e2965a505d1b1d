"""The README's commands are the ones CI and users run (tests/test_docs.py runs the rest of its blocks)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _bash_blocks(text):
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)]


def test_ci_runs_the_readme_test_command():
    test_cmds = [b for b in _bash_blocks(_read("README.md")) if "pytest" in b]
    assert len(test_cmds) == 1, test_cmds
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert test_cmds[0] in ci_lines, f"{test_cmds[0]!r} is not a line of .ci/run"


def test_readme_has_exactly_two_setup_commands_first():
    readme = _read("README.md")
    section = readme.split("## Install and the two commands", 1)[1].split("\n## ", 1)[0]
    assert _bash_blocks(section) == [
        "python scripts/install.py && vqfast train --preset demo",
        "python scripts/install.py --test && python -m pytest tests -q --durations=20",
    ]
    assert readme.index("## Install and the two commands") < readme.index("## Three examples")
