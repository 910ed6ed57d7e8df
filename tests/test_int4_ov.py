"""OpenVINO's own INT4 weight compression (``--int4-ov``, convert/int4_ov.py): NNCF's ``compress_weights`` on a tiny
random-init GPT-2 exported with its KV cache (built here, nothing downloaded), written as an OpenVINO IR that only the
openvino backend runs.

The tiny decoder (initializer_range 0.5, tests/decoders.py) has near-tied logits, so INT4 moves many greedy tokens:
with the default generation gate (90% agreement, step cosine 0.98) its INT4 IR really fails, and convert exits 5 (the
planted case); the same IR graded with a wide gate passes, so the failure is the budget's, not a broken decode."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from convert.config import GenerationGate, Int4Config
from convert.flags import from_flags
from core.errors import InputError
from core.manifest import Manifest

pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from tests.test_hf_optimum import _cli  # after the skips: it needs transformers too

#: 4 projections (Conv1D, a Gemm) per layer, 2 layers: each weight INT4, with its zero point (u4) when asymmetric
INT4_WEIGHTS = 4 * 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """`convert hf:gpt2 --task text-generation-with-past --int4-ov` with the default gate: (folder, process)."""
    from tests.decoders import tiny_gpt2

    root = tmp_path_factory.mktemp("int4_ov")
    tiny_gpt2().save_pretrained(root / "gpt2")  # type: ignore[attr-defined]
    out = root / "art"
    proc = _cli("convert", f"hf:{root / 'gpt2'}", "--task", "text-generation-with-past", "--no-optimize", "--int4-ov",
                "--int4-block-size", "16", "--out", str(out), cwd=root)
    return out, proc


def test_the_ir_is_4_bit_smaller_and_hashed(converted: tuple[Path, Any]) -> None:
    from convert.ovir import constant_types

    out, _ = converted
    m = Manifest.load(out)
    art = m.artifacts["int4_ov"]
    assert art.kind == "openvino_ir" and art.precision == "int4" and art.parent == "fp32"
    xml = out / art.file.path
    assert xml.name == "model.int4_ov.xml" and [d.path for d in art.file.external_data] == ["model.int4_ov.bin"]
    types = constant_types(xml)
    assert types.get("u4") == 2 * INT4_WEIGHTS  # weight and zero point of every projection
    assert types.get("u8", 0) >= 2  # the embeddings and the LM head stay INT8 (NNCF's default)
    p = art.params
    assert p.step == "compress_weights_ov" and p.mode == "int4_asym" and p.group_size == 16 and p.ratio == 1.0
    assert (out / "model.int4_ov.bin").stat().st_size == p.bin_bytes
    assert p.weights_ratio < 0.3 and p.bin_bytes < 0.3 * (out / "model.onnx").stat().st_size
    assert m.verify(out) == []


def test_a_changed_bin_fails_verify(converted: tuple[Path, Any], tmp_path: Path) -> None:
    """The .bin holds the weights: it is hashed with the .xml, so a changed one is caught."""
    folder = tmp_path / "art"
    shutil.copytree(converted[0], folder)
    data = bytearray((folder / "model.int4_ov.bin").read_bytes())
    data[0] ^= 0xFF
    (folder / "model.int4_ov.bin").write_bytes(bytes(data))
    assert Manifest.load(folder).verify(folder) == ["int4_ov: model.int4_ov.bin sha256 does not match the manifest"]


def test_an_int4_ov_variant_over_its_budget_fails_its_gate(converted: tuple[Path, Any]) -> None:
    out, proc = converted
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "int4_ov greedy token agreement with FP32" in proc.stderr + proc.stdout
    art = Manifest.load(out).artifacts["int4_ov"]
    assert art.status == "failed" and art.metrics.gate is not None and art.metrics.gate.passed is False
    gen = art.metrics.generation
    assert gen is not None and gen.vs_fp32 is not None and gen.vs_fp32.token_agreement < 0.9
    assert gen.vs_eager is not None  # graded against eager PyTorch too


def test_greedy_on_openvino_passes_a_wide_gate(converted: tuple[Path, Any], tmp_path: Path) -> None:
    """The same IR decoded greedily on OpenVINO (its KV cache matches its no-cache path) passes a wide budget."""
    from convert.genvalidate import grade_generation

    folder = tmp_path / "art"
    shutil.copytree(converted[0], folder)
    m = Manifest.load(folder)
    grade_generation(m, folder, "fp32", ["int4_ov"], GenerationGate(min_token_agreement=0.0, min_cosine=-1.0),
                     seed=0, random_init=True, log=lambda _: None)
    art = m.artifacts["int4_ov"]
    assert art.status == "ok" and art.metrics.gate is not None and art.metrics.gate.passed is True
    gen = art.metrics.generation
    assert gen is not None and gen.vs_fp32 is not None and gen.vs_fp32.min_cosine > 0.3
    assert gen.cache.min_cosine > 0.9999


def test_bench_runs_it_on_openvino_and_ort_skips_it(converted: tuple[Path, Any]) -> None:
    from runtimes.decoding import GenerationConfig
    from runtimes.generation import run_generation_bench

    cfg = GenerationConfig(artifact_dir=converted[0], backends=["ort", "openvino"], variants=["fp32", "int4_ov"],
                           prompt_lengths=[8], batch_sizes=[1], new_tokens=4, no_cache_tokens=0, check_prompts=1,
                           check_tokens=4, warmup=0, iters=1, rounds=1, round_warmup=0, threads=1)
    gen = run_generation_bench(cfg, log=lambda _: None).generation
    assert gen is not None
    ran = {(r.backend, r.variant) for r in gen.rows}
    assert ("openvino", "int4_ov") in ran and ("ort", "fp32") in ran and ("ort", "int4_ov") not in ran
    assert any(s.startswith("ort:int4_ov: an OpenVINO IR") and "only openvino runs it" in s for s in gen.skipped)
    ir = next(r for r in gen.rows if r.variant == "int4_ov")  # its size is the .xml and the .bin (the weights)
    files = sum((converted[0] / f"model.int4_ov.{ext}").stat().st_size for ext in ("xml", "bin"))
    assert ir.model_size_mb == pytest.approx(files / 2**20)


def test_sym_and_ratio_reach_nncf(converted: tuple[Path, Any], tmp_path: Path) -> None:
    """--int4-symmetric writes signed 4-bit weights without zero points; a ratio below 1 leaves layers in INT8."""
    from convert.int4_ov import compress_file

    src = converted[0] / "model.onnx"
    sym = compress_file(src, tmp_path / "sym.xml", Int4Config(symmetric=True))
    assert sym.get("i4") == INT4_WEIGHTS and "u4" not in sym
    half = compress_file(src, tmp_path / "half.xml", Int4Config(ratio=0.5))
    assert 0 < half.get("u4", 0) < 2 * INT4_WEIGHTS and half.get("u8", 0) > sym.get("u8", 0)


@pytest.mark.parametrize(("given", "message"), [
    ({"int4_ratio": 0.5}, "--int4-ratio tunes NNCF's INT4 for OpenVINO: add --int4-ov"),
    ({"int4_symmetric": True}, "--int4-symmetric tunes INT4: add --int4 or --int4-ov"),
    ({"int4_ov": True, "int4_algorithm": "hqq"}, "--int4-algorithm tunes INT4: add --int4"),
    ({"int4_ov": True, "int4_ratio": 0.0}, "--int4-ratio is the share of the layers in INT4: above 0"),
])
def test_int4_ov_flags_refused_in_one_line(given: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        from_flags(model="x", **given)


def test_int4_ov_flags_map_to_the_config() -> None:
    cfg = from_flags(model="x", int4_ov=True, int4_block_size=64, int4_symmetric=True, int4_ratio=0.8)
    assert cfg.quant is not None and cfg.quant.int4_ov and not cfg.quant.int4
    assert cfg.quant.int4_options == Int4Config(block_size=64, symmetric=True, ratio=0.8)


def test_refused_in_one_line_without_nncf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the export: NNCF not importable (its module entry None, as Python marks a failed import)."""
    import sys

    from convert.variants import check_config

    monkeypatch.setitem(sys.modules, "nncf", None)
    cfg = from_flags(model="x", int4_ov=True).quant
    assert cfg is not None
    with pytest.raises(InputError, match=r"--int4-ov needs nncf \(pip install"):
        check_config(cfg)


def test_a_decoder_without_kv_cache_is_refused(converted: tuple[Path, Any], tmp_path: Path) -> None:
    """Its gate is greedy decoding on OpenVINO: a model without a KV cache is refused in one line, nothing written."""
    out = tmp_path / "art"
    proc = _cli("convert", f"hf:{converted[0].parent / 'gpt2'}", "--task", "text-generation", "--no-optimize",
                "--int4-ov", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "--int4-ov is gated by greedy decoding on OpenVINO: it needs a decoder exported with its KV cache" in (
        proc.stdout + proc.stderr)
    assert not out.exists()
