"""Every `python cli.py ...` command the README shows names a real command and only options that command has,
with values of the right kind: parsed by the CLI's own click command, without running it. (What the commands
do is tested end to end elsewhere; this keeps the README from drifting away from the CLI.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The `python cli.py` command lines of the README's bash blocks (continuations joined, comments cut)."""
    text = README.read_text(encoding="utf-8")
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python cli.py "):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 15 and any(" convert densenet121 --int8 --calib imagenet_subset" in c for c in COMMANDS)
    assert any(c.startswith("python cli.py bench --backends ort,trt") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line: str) -> None:
    group = typer.main.get_command(cli.app)
    args = shlex.split(line)[2:]
    commands = group.commands  # type: ignore[attr-defined]
    name = args[0]
    assert name in commands, f"{line}: no command {name!r}"
    command = commands[name]
    try:  # typer may vendor its own click: its exceptions are matched by class name
        with command.make_context(name, args[1:], resilient_parsing=False) as ctx:
            assert ctx.params is not None
    except Exception as exc:
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "UsageError" in kinds:
            pytest.fail(f"README: `{line}`: {exc.format_message()}")  # type: ignore[attr-defined]
        if "Exit" not in kinds:
            raise
