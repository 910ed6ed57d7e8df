"""Every command's --help shows its help texts intact: rich markup must not eat a bracketed text such as
``'.[hf]'`` (rich reads ``[word]`` as a style tag and drops it unless it is written ``\\[word]``)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

import cli

runner = CliRunner()
#: name -> command object (typer's own click group; duck-typed: typer vendors click)
COMMANDS: dict[str, Any] = dict(getattr(typer.main.get_command(cli.app), "commands", {}))
#: A bracketed text in a help string, escaped (``\\[x]``) or not.
BRACKETED = re.compile(r"\\?\[[^\]\n]*\]")


def _flat(text: str) -> str:
    """The help screen without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _bracketed_texts(cmd: Any) -> list[str]:
    """Every bracketed text of the command's own help and its options' and arguments' help, as it should read."""
    helps = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
    return [_flat(m.replace("\\[", "[")) for h in helps for m in BRACKETED.findall(h)]


def _help(name: str) -> str:
    res = runner.invoke(cli.app, [name, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    return _flat(res.output)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bracketed_help_texts_render_intact(name: str) -> None:
    out = _help(name)
    missing = [t for t in _bracketed_texts(COMMANDS[name]) if t not in out]
    assert not missing, f"`{name} --help` lost {missing}"


def test_the_known_bracketed_texts_are_checked() -> None:
    """The check above is not vacuous: the install hints with extras are among what it checks, and render."""
    assert {"convert", "bench", "tune", "report", "profile", "package", "serve", "sweep"} <= set(COMMANDS)
    checked = {name: _bracketed_texts(cmd) for name, cmd in COMMANDS.items()}
    assert any("[hf]" in t for t in checked["convert"])
    assert any("[trt]" in t for t in checked["convert"])
    assert any("[ray]" in t for t in checked["sweep"])
    assert "pip install -e '.[hf]'" in _help("convert")
    assert "(Hugging Face, needs .)" not in _help("convert")
