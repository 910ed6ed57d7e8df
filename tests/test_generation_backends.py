"""The generation backends' one table (runtimes.genbackends.GENERATION_BACKENDS) on the tiny random-init gpt2 decoder
exported with its KV cache (nothing downloaded): `tune --backends genai,ort` searches ONNX Runtime GenAI, which has no
runner; bench and tune refuse an unknown generation backend in one line naming the valid ones; every request's
default is the table's rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import InputError
from runtimes.decoding import GenerationConfig
from runtimes.genbackends import GENERATION_BACKENDS, check_generation_backends, requested

pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from tests.test_hf_optimum import _cli  # after the skips: it needs transformers too


def test_the_request_default_is_every_row_of_the_table(tmp_path: Path) -> None:
    assert requested(GenerationConfig(artifact_dir=tmp_path)) == list(GENERATION_BACKENDS)
    assert requested(GenerationConfig(artifact_dir=tmp_path, backends=["ort"])) == ["ort"]
    assert {"eager", "compile", "ort", "genai", "openvino"} <= set(GENERATION_BACKENDS)
    check_generation_backends(["genai", "ort", "torchscript"])  # a one-shot runner: skipped later, not refused
    with pytest.raises(InputError, match=r"unknown generation backend\(s\) \['nope'\]; generation backends: eager, "):
        check_generation_backends(["ort", "nope"])


def test_tune_searches_genai_and_ort_on_a_kv_cache_decoder(gpt2_art: Path) -> None:
    """genai is a row of the table, not a runner: tune's generation search times it beside ONNX Runtime (the old
    code refused `--backends genai` against runtimes.RUNNERS)."""
    pytest.importorskip("onnxruntime_genai")
    from runtimes.tune import TuneConfig, run_tune

    result = run_tune(TuneConfig(artifact_dir=gpt2_art, backends=["genai", "ort"], batch_sizes=[1], stages=[3],
                                 rounds=3, accuracy_samples=2), log=lambda _: None)
    assert {(c.backend, c.variant) for c in result.candidates} == {("genai", "fp32"), ("ort", "fp32")}
    for c in result.candidates:
        assert c.skipped is None and c.within_budget and c.throughput is not None and c.throughput > 0
    assert result.config["generation"]["backends"] == ["genai", "ort"]


@pytest.mark.parametrize("command", ["bench", "tune"])
def test_an_unknown_generation_backend_is_refused_in_one_line(gpt2_art: Path, tmp_path: Path, command: str) -> None:
    proc = _cli(command, str(gpt2_art), "--backends", "ort,gennai", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert "unknown generation backend(s) ['gennai']" in lines[0]
    assert "generation backends: " + ", ".join(GENERATION_BACKENDS) in lines[0]
