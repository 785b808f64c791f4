"""The README's `launcher validate|plan ...` lines on the bundled specs run as written (exit 0), and
its `submit` lines' overrides plan (validate/plan only: fast, nothing is written or submitted)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launcher.cli import main

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"^(?:\$ )?launcher\s+(validate|plan|submit)\s+(jobs/\S+\.ya?ml)\b(.*)$")


def readme_examples() -> list[list[str]]:
    """Every example line in the README's code blocks that runs a bundled spec, as `launcher` args;
    a submit line becomes `plan` with the same spec and overrides (its options are submit's own)."""
    examples, fenced = [], False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = COMMAND.match(line.strip()) if fenced else None
        if match is None:
            continue
        command, spec, rest = match.groups()
        args = shlex.split(rest, comments=True)
        if command == "submit":
            command, args = "plan", [a for a in args if "=" in a and not a.startswith("-")]
        examples.append([command, spec, *args])
    return examples


EXAMPLES = readme_examples()


def test_the_readme_has_examples_to_run() -> None:
    assert len(EXAMPLES) >= 5 and any("sweep.grid.training.learning_rate=" in a for e in EXAMPLES for a in e)


@pytest.mark.parametrize("args", EXAMPLES, ids=[" ".join(e) for e in EXAMPLES])
def test_a_readme_example_runs_as_written(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    code = main(args)
    assert code == 0, capsys.readouterr().err
