"""How `convert` reads its flags, through the real CLI: which flags ask for which variants, which are
user errors on their own, and every command's --help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import cli


def _convert(digits: Any, out: Path, *extra: str) -> Any:
    args = ["convert", digits.factory, "--weights", str(digits.weights), "--out", str(out), *extra]
    return CliRunner().invoke(cli.app, args)


def _one_error_line(res: Any) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return " ".join(res.output.split())


def test_sparsity_with_eval_data_needs_no_quantization(digits_model: Any, tmp_path: Path) -> None:
    """The README's `convert path/to/model.py:build --weights w.pt --sparsity 2:4 --eval-data test.npz`: the
    sparse variant is made and measured on test.npz; without fine-tuning it loses 40-62 points (by CPU: the
    model is trained here), so the default gate fails it (exit 5, one line saying why), and a budget that allows
    it passes."""
    test_npz = tmp_path / "test.npz"
    np.savez(test_npz, input=digits_model.x_test, labels=digits_model.y_test)
    res = _convert(digits_model, tmp_path / "out", "--sparsity", "2:4", "--eval-data", str(test_npz))
    assert res.exit_code == 5 and "variant gate failed: sparse24 lost" in " ".join(res.output.split()), res.output
    arts = json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"]
    assert arts["sparse24"]["status"] == "failed" and arts["sparse24"]["metrics"]["gate"]["budget_points"] == 1.0
    res = _convert(digits_model, tmp_path / "out", "--sparsity", "2:4", "--eval-data", str(test_npz),
                   "--max-accuracy-drop", "100", "--min-cosine", "0")
    assert res.exit_code == 0, res.output
    arts = json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"]
    assert arts["sparse24"]["status"] == "ok"
    assert not any(name.startswith(("fp16", "int8")) for name in arts), "no quantized variant was asked for"
    assert arts["sparse24"]["metrics"]["accuracy_vs_fp32"]["samples"] == len(digits_model.y_test)  # measured on it


@pytest.mark.parametrize("extra,names", [
    (["--calib-method", "entropy"], "--calib-method applies"),
    (["--calib-method", "minmax"], "--calib-method applies"),  # explicit, even when it equals the default
    (["--sparsity", "2:4", "--auto", "--eval-size", "50"], "--auto, --eval-size apply"),
], ids=["calib_method", "calib_method_default_value", "with_sparsity"])
def test_quantization_flag_without_a_variant_is_one_line(digits_model: Any, tmp_path: Path, extra: list[str],
                                                         names: str) -> None:
    text = _one_error_line(_convert(digits_model, tmp_path / "out", *extra))
    assert names in text and "add --fp16, --int8, --int8-dynamic, --int8-nncf, --int4 or --int4-ov" in text
    assert not (tmp_path / "out" / "model.onnx").exists(), "refused before the export"


def test_eval_data_without_any_variant_is_one_line(digits_model: Any, tmp_path: Path) -> None:
    np.savez(tmp_path / "test.npz", input=digits_model.x_test, labels=digits_model.y_test)
    text = _one_error_line(_convert(digits_model, tmp_path / "out", "--eval-data", str(tmp_path / "test.npz")))
    assert "--eval-data measures variants" in text and "--sparsity" in text
    assert not (tmp_path / "out" / "model.onnx").exists()


COMMANDS = sorted(typer.main.get_command(cli.app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    res = CliRunner().invoke(cli.app, [command, "--help"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert "Usage:" in res.output
    if command == "loadtest":  # brackets in help text are shown, not read as rich markup
        assert "http://host:port[/v2/models/NAME]" in res.output


def test_every_command_is_checked() -> None:
    assert {"convert", "bench", "report", "profile", "package", "verify", "serve", "loadtest"} <= set(COMMANDS)
