"""The serving commands from the command line: bad input is one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_package_and_verify_from_the_cli(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    proc = _cli("package", str(tiny_artifacts), "--format", "triton", "--out", str(out), "--variants", "opt,fp32",
                "--max-batch-size", "4", "--no-dynamic-batching", "--instances", "2", "--kind", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "max_batch_size: 4" in (out / "tiny_cnn_opt" / "config.pbtxt").read_text()
    proc = _cli("verify", str(out))
    assert proc.returncode == 0 and "ok: 4 files" in proc.stdout, proc.stderr
    model = out / "tiny_cnn_fp32" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 0xFF]))
    _one_error_line(_cli("verify", str(out)), "tiny_cnn_fp32/1/model.onnx: sha256")


@pytest.mark.parametrize("args,needle", [
    (["package", "{missing}", "--out", "{tmp}/r"], "does not exist"),
    (["package", "{art}", "--out", "{tmp}/r", "--variants", "int9"], "unknown variant 'int9'"),
    (["package", "{art}", "--out", "{tmp}/file/r"], "cannot be written"),
    (["package", "{art}", "--out", "{tmp}/r", "--format", "torchserve"], "unknown --format"),
    (["serve", "{missing}"], "does not exist"),
    (["serve", "{art}", "--variant", "int9", "--port", "0"], "unknown variant 'int9'"),
    (["verify", "{tmp}"], "not a repository written by `package`"),
    (["loadtest", "http://127.0.0.1:9/v2/models/x", "--duration", "1"], "cannot reach"),
    (["loadtest", "ftp://127.0.0.1/x", "--duration", "1"], "malformed URL"),
], ids=["package-missing", "package-variant", "package-unwritable", "package-format", "serve-missing",
        "serve-variant", "verify-not-repo", "loadtest-unreachable", "loadtest-url"])
def test_bad_input_is_one_line(tiny_artifacts: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "file").write_text("a file where a folder is expected")
    subs = {"{missing}": str(tmp_path / "no_such_dir"), "{art}": str(tiny_artifacts), "{tmp}": str(tmp_path)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    _one_error_line(_cli(*argv), needle)
    assert not (tmp_path / "r").exists()
