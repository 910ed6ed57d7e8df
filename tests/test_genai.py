"""ONNX Runtime GenAI's generator as a generation-benchmark backend (runtimes.genai) on tiny random-init gpt2 and
llama decoders exported with their KV cache by the toolkit (nothing downloaded): the genai_config.json written beside
links to the variant (the artifact folder untouched), greedy tokens equal to ONNX Runtime's KVCacheSession at batch 1
and 2, teacher forcing, the no-cache forward, `genai` rows and checks in run_generation, and the skips with their
reasons (not installed; an EOS fed to a batch GenAI ends)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from core.manifest import Manifest  # noqa: E402
from runtimes.base import RunnerOptions  # noqa: E402
from runtimes.decoding import (  # noqa: E402
    GenerationConfig,
    RunnerDecoder,
    greedy,
    greedy_no_cache,
    max_positions,
)
from runtimes.genai import GenaiDecoder, genai_config  # noqa: E402
from runtimes.generation import run_generation  # noqa: E402
from runtimes.ort import OrtRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



def _decoders(art: Path) -> tuple[RunnerDecoder, GenaiDecoder]:
    manifest = Manifest.load(art)
    ort = RunnerDecoder(OrtRunner(manifest, art, manifest.artifacts["fp32"], RunnerOptions(threads=1)))
    genai = GenaiDecoder(manifest, art, manifest.artifacts["fp32"], max_positions(manifest), threads=1)
    ort.load()
    genai.load()
    return ort, genai


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_genai_greedy_tokens_equal_ort_kv_cache_session(family: str, request: pytest.FixtureRequest) -> None:
    """FP32: GenAI's generator chooses ORT's KVCacheSession tokens at batch 1 and 2, with the same logits per step;
    fed the other's tokens (teacher forcing) it follows them; its no-cache forward gives the KV-cache tokens; and
    the artifact folder is left as the manifest records it."""
    art: Path = request.getfixturevalue(f"{family}_art")
    before = sorted(p.name for p in art.iterdir())
    ort, genai = _decoders(art)
    try:
        for prompt in (np.array([[5, 17, 42, 7, 9, 11]], np.int64),
                       np.array([[5, 17, 42, 7, 9, 11], [3, 1, 4, 1, 5, 9]], np.int64)):
            a = greedy(ort, prompt, 8, keep_logits=True)
            b = greedy(genai, prompt, 8, keep_logits=True)
            assert b.tokens.shape == (prompt.shape[0], 9) and len(set(b.tokens[0].tolist())) > 2
            np.testing.assert_array_equal(a.tokens, b.tokens)
            for x, y in zip(a.logits, b.logits, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
            assert b.cache_bytes == a.cache_bytes > 0  # GenAI's present tensors: the same cache
            forced = np.roll(a.tokens, 1, axis=1)  # other tokens than its own choices
            fa = greedy(ort, prompt, 8, keep_logits=True, forced=forced)
            fb = greedy(genai, prompt, 8, keep_logits=True, forced=forced)
            np.testing.assert_array_equal(fa.tokens, fb.tokens)
            np.testing.assert_array_equal(greedy_no_cache(genai, prompt, 8).tokens, b.tokens)
    finally:
        ort.close()
        genai.close()
    assert sorted(p.name for p in art.iterdir()) == before
    assert not Manifest.load(art).verify(art)


def test_genai_config_follows_the_builders_schema(llama_art: Path, gpt2_art: Path) -> None:
    """The config's decoder block as ONNX Runtime GenAI's model builder writes it, its numbers from the export."""
    llama = genai_config(Manifest.load(llama_art), "model.onnx", 64)
    dec = llama["model"]["decoder"]
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                             "past_value_names": "past_key_values.%d.value"}
    assert dec["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                              "present_value_names": "present.%d.value"}
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (2, 2, 1, 16, 32)
    assert llama["model"]["vocab_size"] == 100 and llama["model"]["context_length"] == 64
    gpt2 = genai_config(Manifest.load(gpt2_art), "model.onnx", 64)["model"]
    assert 0 <= gpt2["eos_token_id"] < 100  # gpt2's 50256 is outside this vocabulary: GenAI refuses one outside


def test_run_generation_measures_genai_and_checks_it_against_eager(llama_art: Path) -> None:
    gen = run_generation(GenerationConfig(
        artifact_dir=llama_art, backends=["eager", "ort", "genai"], prompt_lengths=[6], batch_sizes=[1, 2],
        new_tokens=4, no_cache_tokens=5, check_prompts=2, check_tokens=5, warmup=0, iters=2, rounds=2,
        round_warmup=0, threads=1), log=lambda _: None)
    rows = [r for r in gen.rows if r.backend == "genai"]
    assert {(r.variant, r.batch_size, r.kv_cache) for r in rows} == \
        {("fp32", 1, True), ("fp32", 2, True), ("fp32", 1, False)}
    assert all(r.ttft_ms.p50 > 0 and r.decode_tokens_per_s > 0 for r in rows)
    ort = next(r for r in gen.rows if r.backend == "ort" and r.kv_cache and r.batch_size == 2)
    assert next(r for r in rows if r.batch_size == 2).kv_cache_mb == ort.kv_cache_mb
    check = next(c for c in gen.checks if c.backend == "genai")
    assert check.reference == "eager:torch:fp32" and check.kv_matches_no_cache
    assert check.agreement == 1.0 and check.forced_agreement == 1.0 and check.cosine_min > 0.9999, check


def test_genai_skipped_with_the_install_line_when_not_importable(llama_art: Path) -> None:
    """Without onnxruntime_genai the backend is skipped with 'pip install .[genai]' (the others still run)."""
    code = ("import sys; sys.modules['onnxruntime_genai'] = None\n"
            "from pathlib import Path\n"
            "from core.manifest import Manifest\n"
            "from runtimes.decoding import GenerationConfig\nfrom runtimes.generation import build_decoders\n"
            f"art = Path({str(llama_art)!r}); skipped = []\n"
            "ds = build_decoders(Manifest.load(art), art, GenerationConfig(artifact_dir=art, "
            "backends=['ort', 'genai']), skipped)\n"
            "print([d.label for d in ds]); print(skipped)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels, skipped = proc.stdout.strip().splitlines()
    assert labels == "['ort:fp32']"
    assert "genai: onnxruntime-genai is not installed (pip install .[genai])" in skipped


def test_a_batch_step_that_feeds_the_eos_token_is_replayed(llama_art: Path) -> None:
    """GenAI's search ends a sequence of a batch at its EOS token (0.18.0 then fails the next step with a cache shape
    error): a batch > 1 step feeding it is run as a prefill over everything fed so far, counted, and its logits and
    the steps after it are ORT's; batch 1 appends it like any token."""
    manifest = Manifest.load(llama_art)
    ort, genai = _decoders(llama_art)
    try:
        eos = genai.eos
        prompt = np.array([[5, 17, 42], [3, 1, 4]], np.int64)
        forced = np.array([[7, eos, 9, 11], [eos, 8, eos, 6]], np.int64)
        a = greedy(ort, prompt, 4, keep_logits=True, forced=forced)
        b = greedy(genai, prompt, 4, keep_logits=True, forced=forced)
        assert genai.eos_replays == 3 and genai.extra()["genai_eos_replays"] == 3  # steps 1-3 feed it
        np.testing.assert_array_equal(a.tokens, b.tokens)
        for x, y in zip(a.logits, b.logits, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
        one = greedy(genai, prompt[:1], 4, forced=forced[:1])
        np.testing.assert_array_equal(one.tokens, a.tokens[:1])
        assert genai.eos_replays == 3  # batch 1: no replay
    finally:
        ort.close()
        genai.close()
    assert manifest.iospec.dynamic_batch


def test_a_variant_genai_cannot_run_is_refused_with_the_librarys_line(llama_art: Path) -> None:
    """load() runs a generator before the benchmark does: what GenAI refuses (here a context of 2 positions, too
    short for its probe) is a BackendUnavailableError with GenAI's own reason, which run_generation lists as
    skipped; the temporary folder is removed."""
    from core.errors import BackendUnavailableError

    manifest = Manifest.load(llama_art)
    genai = GenaiDecoder(manifest, llama_art, manifest.artifacts["fp32"], 2, threads=1)
    with pytest.raises(BackendUnavailableError, match=r"^onnxruntime-genai cannot run model\.onnx: .*max length"):
        genai.load()
    assert genai._tmp is None and genai.model is None
