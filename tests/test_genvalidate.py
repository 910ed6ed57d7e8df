"""Generation-aware validation (convert/genvalidate.py) on a tiny random-init llama exported with its KV cache (built
here, nothing downloaded): greedy decoding from seeded prompts with eager PyTorch and ONNX Runtime, compared token by
token and by logits cosine per step; the KV-cache path against the no-cache path; each variant gated against FP32.
INT4 of this model is over the default budget: its gate fails, is recorded, and convert exits 5, while FP16 of the
same run passes its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.config import GenerationGate
from convert.genvalidate import (
    BASIS,
    Decoded,
    GenerationRun,
    compare,
    generation_gate,
    ort_runner,
    start,
)
from core.manifest import Manifest
from runtimes.session import KVCacheSession

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from tests.test_hf_optimum import _cli  # noqa: E402  (after the skips: it needs transformers too)

GATE = GenerationGate()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """`convert hf:llama --task text-generation-with-past --fp16 --int4` with the default gate: (folder, process)."""
    import torch

    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200, max_position_embeddings=64,
                                   initializer_range=0.5)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    out = root / "art"
    proc = _cli("convert", f"hf:{root / 'llama'}", "--task", "text-generation-with-past", "--no-optimize", "--fp16",
                "--int4", "--out", str(out), cwd=root)
    return out, proc


def test_an_int4_variant_over_its_budget_fails_its_gate(converted: tuple[Path, Any]) -> None:
    out, proc = converted
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "int4 greedy token agreement with FP32" in proc.stderr + proc.stdout
    m = Manifest.load(out)
    int4, fp16 = m.artifacts["int4"], m.artifacts["fp16"]
    assert int4.status == "failed"
    gate = int4.metrics.gate
    assert gate is not None and gate.passed is False and gate.basis == BASIS
    gen = int4.metrics.generation
    assert gen is not None and gen.vs_fp32 is not None
    assert gen.vs_fp32.token_agreement < GATE.min_token_agreement and "greedy token agreement" in (gate.reason or "")
    assert len(gen.vs_fp32.step_cosines) == GATE.new_tokens + 1
    # the same run's FP16 is within the same gate: the gate tells them apart
    assert fp16.status == "ok" and fp16.metrics.gate is not None and fp16.metrics.gate.passed is True
    assert fp16.metrics.generation is not None and fp16.metrics.generation.vs_fp32 is not None
    assert fp16.metrics.generation.vs_fp32.token_agreement == 1.0


def test_fp32_onnx_decodes_as_eager_pytorch_and_its_cache_as_no_cache(converted: tuple[Path, Any]) -> None:
    out, _ = converted
    gen = Manifest.load(out).artifacts["fp32"].metrics.generation
    assert gen is not None and gen.vs_fp32 is None and gen.vs_eager is not None
    assert gen.vs_eager.token_agreement == 1.0 and gen.vs_eager.min_cosine > 0.9999
    assert gen.vs_eager.free_run_match == 1.0
    assert gen.cache.positions == GATE.new_tokens + 1 and gen.cache.min_cosine > 0.9999
    assert gen.prompts == GATE.prompts and gen.seed == 0 and gen.note


class _Forgetful(KVCacheSession):
    """A KV-cache session that drops its cache after every step: each decode step sees one token, no past."""

    def step(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = super().step(feed)
        self.cache, self.length = {}, 0
        return outs


def test_a_broken_cache_is_caught(converted: tuple[Path, Any]) -> None:
    """The real FP32 model through a session that forgets its past: its cached steps no longer equal the no-cache
    forward, and it no longer agrees with the reference decoding."""
    out, _ = converted
    m = Manifest.load(out)
    run = start(m, out, "fp32", GATE, seed=0, random_init=True)
    with ort_runner(m, out, m.artifacts["fp32"]) as runner:
        good = run.check(runner, is_reference=False)
        runner.open_session = lambda: _Forgetful(runner)
        broken = run.check(runner, is_reference=False)
    assert good.vs_fp32 is not None and good.vs_fp32.token_agreement == 1.0 and good.cache.min_cosine > 0.9999
    assert broken.vs_fp32 is not None and broken.cache.min_cosine < 0.99
    assert broken.vs_fp32.token_agreement < 1.0
    assert generation_gate(broken.vs_fp32, GATE).passed is False
    assert "random-init" in broken.note and broken.random_init


def test_compare_counts_steps_and_cosines() -> None:
    """Along the reference's tokens: one flipped step out of 3 (x 2 prompts) is 5/6 agreement; its cosine is the min."""
    ref_logits = np.zeros((3, 2, 4), np.float32)
    tokens = np.array([[0, 1, 2], [3, 3, 3]])
    for s in range(3):
        for p in range(2):
            ref_logits[s, p, tokens[p, s]] = 1.0
    ref = Decoded(tokens=tokens, logits=ref_logits)
    along = ref_logits.copy()
    along[1, 0] = [0.0, 0.5, 1.0, 0.0]  # step 1, prompt 0 now picks token 2
    cmp = compare("fp32", ref, along, own=Decoded(tokens=np.array([[0, 2, 2], [3, 3, 3]]), logits=along))
    assert cmp.token_agreement == round(5 / 6, 4) and cmp.steps == 3
    assert cmp.step_cosines[0] == 1.0 and cmp.min_cosine == pytest.approx(0.5 / np.sqrt(1.25), abs=1e-6)
    assert cmp.free_run_match == pytest.approx((1 / 3 + 1) / 2, abs=1e-4)
    assert generation_gate(cmp, GATE).passed is False
    assert generation_gate(cmp, GenerationGate(min_token_agreement=0.8, min_cosine=0.4)).passed is True


def test_generation_run_needs_no_hf_folder_for_onnx_only(converted: tuple[Path, Any]) -> None:
    """A model given as an ONNX file has no eager reference: the record says so (checked on the run object)."""
    out, _ = converted
    m = Manifest.load(out)
    run = start(m, out, "fp32", GATE, seed=1, random_init=False)
    bare = GenerationRun(gate=run.gate, seed=run.seed, prompt=run.prompt, reference=run.reference, ref=run.ref,
                         eager=None, random_init=False)
    with ort_runner(m, out, m.artifacts["fp32"]) as runner:
        check = bare.check(runner, is_reference=True)
    assert check.vs_eager is None and "no eager comparison" in check.note


def test_tune_keeps_a_variant_over_its_token_agreement_budget_out(converted: tuple[Path, Any]) -> None:
    """`tune` on the KV-cache decoder: the INT4 variant that failed its gate is over the accuracy budget (points of
    greedy token agreement with FP32) and is not timed; FP32 and FP16 are, and the winner is one of them."""
    from runtimes.tune import TuneConfig, run_tune

    out, _ = converted
    result = run_tune(TuneConfig(artifact_dir=out, backends=["ort"], batch_sizes=[1], variants=["fp32", "fp16", "int4"],
                                 stages=[3], rounds=3, accuracy_samples=GATE.prompts), log=lambda _: None)
    by = {c.variant: c for c in result.candidates}
    assert set(by) == {"fp32", "fp16", "int4"} and len(result.candidates) == 3  # a generation loop per variant
    assert "greedy token agreement with eager:torch:fp32" in result.reason
    assert by["int4"].accuracy_drop_points is not None and by["int4"].accuracy_drop_points > 1.0
    assert not by["int4"].within_budget and by["int4"].latency_ms is None
    for v in ("fp32", "fp16"):
        assert by[v].within_budget and by[v].throughput is not None and by[v].throughput > 0
    assert result.winner in {by["fp32"].label, by["fp16"].label}
