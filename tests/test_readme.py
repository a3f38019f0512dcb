"""README's commands run as shown: the quick start is what CI runs, every listed command answers
--help, and every example recipe validates."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> str:
    """The first fenced code block after a heading."""
    rest = README.split(heading, 1)[1]
    return rest.split("```", 2)[1]


def test_quick_start_command_1_is_what_ci_runs():
    """CI (.ci/run) runs README's command 1 verbatim in a fresh clone, then command 2 (itself)."""
    block = _block_after("## Quick start")
    commands = [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert commands[1] == "bash .ci/run"
    ci = (ROOT / ".ci/run").read_text()
    assert any(line.strip() == commands[0] for line in ci.splitlines()), commands[0]


def _listed_commands() -> list[str]:
    block = _block_after("## Commands")
    return sorted({m.group(1) for m in re.finditer(r"^launcher (\w+)", block, re.MULTILINE)})


def test_readme_lists_the_commands():
    assert {"train", "validate", "fields", "plan", "submit", "sweep", "generate", "merge"} <= set(_listed_commands())


@pytest.mark.parametrize("command", _listed_commands())
def test_each_listed_command_answers_help(command):
    res = run_cli(command, "--help", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: launcher " + command in res.stdout


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_each_example_recipe_validates(example):
    res = run_cli("validate", ROOT / "examples" / example, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "model:" in res.stdout  # the resolved recipe
