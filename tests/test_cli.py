"""The CLI through typer's runner (and once as a real `python cli.py` subprocess)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from reports.models import BenchResults
from tests.conftest import ROOT, TINY

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(cli.app, list(args))
    return res.exit_code, res.output  # click >= 8.2: stdout and stderr interleaved


def test_convert_then_bench_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    code, text = invoke("convert", f"{TINY}:build", "--out", str(out))
    assert code == 0, text
    assert (out / "manifest.json").is_file() and (out / "model.opt.onnx").is_file()
    code, text = invoke("bench", str(out), "--backends", "ort,eager", "--batch-sizes", "1,2", "--iters", "3",
                        "--warmup", "1", "--out", str(tmp_path / "res" / "results.json"))
    assert code == 0, text
    res = BenchResults.load(tmp_path / "res" / "results.json")
    assert len(res.records) == 6 and res.schema_version == 2
    with open(tmp_path / "res" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for col in ("model", "backend", "precision", "device", "batch_size", "latency_ms_p50", "latency_ms_p90",
                "latency_ms_p99", "throughput", "ram_mb", "vram_mb", "cpu_util", "gpu_util", "model_size_mb",
                "max_abs_err", "top1_agreement", "top1_acc", "top5_acc"):
        assert col in rows[0], col
    md = (tmp_path / "res" / "results.md").read_text()
    assert md.count("| ort |") == 4 and md.count("| eager |") == 2


BAD_CONVERT = [
    (["convert", "densenet12"], 2, "did you mean densenet121"),
    (["convert", "/no/such/model.onnx"], 2, "does not exist"),
    (["convert", "resnet18", "--input-shape", "1x3xx64"], 2, "malformed --input-shape"),
    (["convert", "resnet18", "--exporter", "tflite"], 2, "unknown --exporter"),
    (["convert", f"{TINY}:missing"], 2, "no callable 'missing'"),
    (["convert", f"{TINY}:not_a_module"], 2, "not a torch.nn.Module"),
    (["convert", "resnet18", "--weights", "NOT_A_WEIGHT"], 2, "unknown weights"),
]


@pytest.mark.parametrize("args,code,msg", BAD_CONVERT, ids=[c[2][:24] for c in BAD_CONVERT])
def test_bad_convert_input_is_one_clear_line(args: list[str], code: int, msg: str) -> None:
    got, text = invoke(*args)
    assert got == code, text
    assert msg in text and "Traceback" not in text
    assert text.strip().count("\n") == 0, text


def test_corrupt_onnx_and_unwritable_output(tmp_path: Path, tiny_artifacts: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes((tiny_artifacts / "model.onnx").read_bytes()[:300])
    code, text = invoke("convert", str(corrupt), "--out", str(tmp_path / "c"))
    assert code == 2 and "not a readable ONNX model" in text
    assert not (tmp_path / "c").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = invoke("convert", f"{TINY}:build", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot be written" in text


def test_weights_that_do_not_match(tmp_path: Path) -> None:
    import torch

    from tests.fixtures.tiny_cnn import build

    w = tmp_path / "tiny.pt"
    torch.save(build().state_dict(), w)
    code, text = invoke("convert", "resnet18", "--weights", str(w), "--out", str(tmp_path / "o"))
    assert code == 2 and "do not match the architecture" in text
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    code, text = invoke("convert", "resnet18", "--weights", str(garbage), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a readable PyTorch state dict" in text


def test_torchvision_weights_offline_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty TORCH_HOME: no cached weights, and this machine has no internet to fetch them.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, text = invoke("convert", "resnet18", "--weights", "IMAGENET1K_V1", "--out", str(tmp_path / "o"))
    if code == 0:
        pytest.skip("this machine could download the weights (internet access)")
    assert code == 2 and "could not fetch weights" in text and "--weights PATH" in text


def test_bad_bench_input(tiny_artifacts: Path, tmp_path: Path) -> None:
    cases = [
        (["bench", str(tiny_artifacts), "--backends", "ort,mxnet"], 2, "unknown backend(s) ['mxnet']"),
        (["bench", str(tiny_artifacts), "--batch-sizes", "1,x"], 2, "comma-separated integers"),
        (["bench", str(tiny_artifacts), "--device", "tpu"], 2, "unknown --device"),
        (["bench", str(tmp_path)], 2, "no manifest.json"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["bench", str(tiny_artifacts), "--device", "cuda", "--backends", "eager"], 3,
                      "no CUDA GPU"))
    for args, code, msg in cases:
        got, text = invoke(*args)
        assert got == code and msg in text and "Traceback" not in text, (args, text)


def test_debug_flag_shows_the_traceback() -> None:
    res = runner.invoke(cli.app, ["--debug", "convert", "densenet12"])
    assert res.exit_code != 0 and res.exception is not None and "densenet12" in str(res.exception)


def test_real_subprocess(tmp_path: Path, tiny_artifacts: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "cli.py", "bench", str(tiny_artifacts), "--backends", "ort",
                           "--batch-sizes", "2", "--iters", "2", "--warmup", "0", "--out",
                           str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["records"][0]["backend"] == "ort"
    bad = subprocess.run([sys.executable, "cli.py", "convert", "resnet5000"], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown model 'resnet5000'")
    assert "Traceback" not in bad.stderr
