"""The README's commands are the ones CI and users run: keep them in sync."""

from __future__ import annotations

import re

from .conftest import REPO_ROOT


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1]
    test_command = _bash_blocks(section)[0].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_quickstart_command_installs_and_runs_the_loop() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    quickstart = _bash_blocks(readme.split("## Quickstart", 1)[1])[0].strip()
    assert quickstart.endswith("vla-dist quickstart")  # tests/test_quickstart.py runs it end to end
    assert "torch==" in quickstart.split("pip install -e .")[0]  # torch first: keeps the CPU build
