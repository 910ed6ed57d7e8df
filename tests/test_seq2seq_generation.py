"""Encoder-decoder generation (runtimes.seq2seq): tiny random-init t5 and whisper, built in the test and exported by
`cli.py convert` as Optimum's components, decoded greedily (the encoder once, then the decoder with its self-attention
and cross-attention past) on ONNX Runtime (merged decoder and decoder + decoder with past) and OpenVINO against
transformers' eager model; convert's generation gate decodes the components together (a decoder with past whose
cache outputs are swapped fails it) and bench on a t5 artifact gives token timings. Nothing is downloaded.

Weights are drawn wide (t5 initializer_factor 5, whisper init_std 0.5): the greedy continuation changes token from
step to step, which a broken cache would not reproduce (at the default scale the model repeats one token)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtimes.decoding import GenerationConfig
from tests.test_hf_optimum import _cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

STEPS = 8


def _convert(root: Path, name: str, task: str, *flags: str) -> Path:
    out = root / f"art_{name}"
    proc = _cli("convert", f"hf:{root / name}", "--task", task, "--no-optimize", *flags, "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    t = transformers
    root = tmp_path_factory.mktemp("s2s")
    torch.manual_seed(0)
    t.T5ForConditionalGeneration(t.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100,
                                            initializer_factor=5.0, decoder_start_token_id=0)).save_pretrained(
        root / "t5")
    torch.manual_seed(0)
    t.WhisperForConditionalGeneration(t.WhisperConfig(  # Optimum's dummy features are 3000 frames: 1500 positions
        vocab_size=100, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=32, max_source_positions=1500,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        init_std=0.5)).save_pretrained(root / "whisper")
    return root


@pytest.fixture(scope="module")
def t5_art(root: Path) -> Path:
    """t5 with past and its FP16 variant (per component), graded at convert by decoding."""
    return _convert(root, "t5", "text2text-generation-with-past", "--fp16")


@pytest.fixture(scope="module")
def whisper_art(root: Path) -> Path:
    return _convert(root, "whisper", "automatic-speech-recognition-with-past")


def _agree(art: Path, batch_lengths: list[tuple[int, int | None]], backends: list[tuple[str, str]]) -> None:
    """Each (backend, decoder path) decodes the same seeded sources as eager PyTorch: the same tokens, and (teacher
    forced) step logits with cosine > 0.9999; its no-cache path picks the same tokens."""
    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.decoding import cosines, forced_logits, greedy, greedy_no_cache, hf_folder
    from runtimes.seq2seq import Seq2SeqOnnxDecoder, Seq2SeqTorchDecoder, seeded_sources

    man = Manifest.load(art)
    folder = hf_folder(man)
    assert folder is not None
    eager = Seq2SeqTorchDecoder(man, art, folder)
    eager.load()
    changes = False
    for seed, (batch, length) in enumerate(batch_lengths):
        src = seeded_sources(man, batch, length, seed)
        ref = greedy(eager, src, STEPS, keep_logits=True)
        changes |= bool((ref.tokens[:, 1:] != ref.tokens[:, :-1]).any())
        for backend, path in backends:
            d = Seq2SeqOnnxDecoder(man, art, "fp32", backend, RunnerOptions(threads=1), path=path)
            d.load()
            try:
                got = greedy(d, src, STEPS)
                np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=f"{backend} {path} {batch}x{length}")
                cos = cosines(forced_logits(d, src, ref.tokens), np.stack(ref.logits))
                assert cos.min() > 0.9999, (backend, path, cos.min())
                np.testing.assert_array_equal(greedy_no_cache(d, src, STEPS).tokens, ref.tokens)
                assert got.cache_bytes > 0
            finally:
                d.close()
    eager.close()
    assert changes, "the eager continuation never changes token: the check could not see a broken cache"


def test_t5_greedy_onnx_matches_eager(t5_art: Path) -> None:
    """Prompt length and batch varied; ONNX Runtime through the merged decoder and through decoder + decoder with
    past, OpenVINO through the two decoders (its CPU plug-in refuses the merged decoder's If)."""
    import torch

    from core.manifest import Manifest
    from runtimes.decoding import greedy, hf_folder
    from runtimes.seq2seq import Seq2SeqTorchDecoder, seeded_sources

    _agree(t5_art, [(1, 3), (3, 9)], [("ort", "merged"), ("ort", "split"), ("openvino", "split")])
    man = Manifest.load(t5_art)  # the eager loop is transformers' own greedy generate (no end token)
    folder = hf_folder(man)
    assert folder is not None
    eager = Seq2SeqTorchDecoder(man, t5_art, folder)
    eager.load()
    src = seeded_sources(man, 2, 7, 5)
    ours = greedy(eager, src, STEPS).tokens
    want = eager.model.generate(torch.from_numpy(src), max_new_tokens=STEPS + 1, do_sample=False, num_beams=1,
                                eos_token_id=None)
    eager.close()
    np.testing.assert_array_equal(ours, want[:, 1:].numpy())


def test_whisper_greedy_onnx_matches_eager(whisper_art: Path) -> None:
    """Audio sources time-major (frames x mel bins), zero-padded to the encoder's window: a short clip and a whole
    window."""
    from core.errors import InputError
    from core.manifest import Manifest
    from runtimes.base import RunnerOptions
    from runtimes.decoding import greedy, greedy_no_cache
    from runtimes.seq2seq import Seq2SeqOnnxDecoder, seeded_sources

    _agree(whisper_art, [(1, 40), (2, None)], [("ort", "merged"), ("ort", "split"), ("openvino", "split")])
    man = Manifest.load(whisper_art)  # past the decoder's 32 positions: one line, not an index error in the model
    d = Seq2SeqOnnxDecoder(man, whisper_art, "fp32", "ort", RunnerOptions(threads=1))
    d.load()
    src = seeded_sources(man, 1, 20, 0)
    for loop in (greedy, greedy_no_cache):
        with pytest.raises(InputError, match="at most 32 positions"):
            loop(d, src, 32)
    d.close()


def test_convert_gate_decodes_components(t5_art: Path, tmp_path: Path) -> None:
    """convert graded FP16 by decoding its components (vs fp32) and fp32 against eager; a copy whose FP16 decoder with
    past returns its self-attention keys and values swapped (each file still runs, the merged one is untouched)
    fails the gate, naming the decoder path."""
    import onnx

    from convert.config import GenerationGate
    from convert.genvalidate import grade_generation
    from core.manifest import Manifest

    man = Manifest.load(t5_art)
    fp16, fp32 = man.artifacts["fp16"], man.artifacts["fp32"]
    assert fp16.status == "ok" and fp16.metrics.generation is not None
    assert fp16.metrics.generation.vs_fp32 is not None and fp16.metrics.generation.vs_fp32.token_agreement >= 0.9
    assert fp32.metrics.generation is not None and fp32.metrics.generation.vs_eager is not None
    assert fp32.metrics.generation.vs_eager.token_agreement == 1.0
    assert fp32.metrics.generation.cache.min_cosine > 0.9999

    broken = tmp_path / "art"
    shutil.copytree(t5_art, broken)
    path = broken / fp16.components["decoder_with_past_model"].file.path
    model = onnx.load(str(path))
    outs = {o.name: o for o in model.graph.output}
    swap = {"present.0.decoder.key": "present.0.decoder.value", "present.0.decoder.value": "present.0.decoder.key"}
    for node in model.graph.node:
        node.output[:] = [swap.get(n, n) for n in node.output]
    assert set(swap) <= set(outs)
    onnx.save(model, str(path))
    man = Manifest.load(broken)
    log: list[str] = []
    grade_generation(man, broken, "fp32", ["fp16"], GenerationGate(), 0, True, log.append)
    bad = man.artifacts["fp16"]
    assert bad.status == "failed" and bad.metrics.gate is not None and bad.metrics.gate.passed is False
    assert "split decoder" in (bad.metrics.gate.reason or ""), bad.metrics.gate
    assert man.artifacts["fp32"].status == "ok"


def _small(cfg: GenerationConfig) -> GenerationConfig:
    return cfg.model_copy(update={"backends": ["eager", "ort"], "new_tokens": 4, "no_cache_tokens": 6,
                                  "check_prompts": 2, "check_tokens": 6, "warmup": 0, "iters": 2, "rounds": 1})


def test_bench_generation(t5_art: Path, whisper_art: Path) -> None:
    """bench on an encoder-decoder is a generation request, and the generation benchmark gives TTFT (encoder + first
    decoder step), TPOT and tokens/s on eager and ONNX Runtime (both t5 variants), the KV-cache path beside the
    no-cache path, and the checks against eager; whisper's prompt length is its clip's frames."""
    from runtimes.generation import run_generation_bench
    from runtimes.harness import BenchConfig, generation_request

    gen_cfg = generation_request(BenchConfig(artifact_dir=t5_art, backends=["eager", "ort", "openvino"],
                                             batch_sizes=[1, 2], dims={"sequence": [5]}))
    assert gen_cfg is not None and gen_cfg.prompt_lengths == [5]
    gen = run_generation_bench(_small(gen_cfg), log=lambda _: None).generation
    assert gen is not None
    rows = gen.rows
    assert {(r.backend, r.variant, r.batch_size, r.kv_cache) for r in rows} >= {
        ("eager", "torch", 1, True), ("ort", "fp32", 2, True), ("ort", "fp16", 1, True), ("ort", "fp32", 1, False)}
    assert all(r.ttft_ms.p50 > 0 and r.tpot_ms.p50 > 0 and r.tokens_per_s > 0 for r in rows)
    assert all(r.kv_cache_mb for r in rows if r.kv_cache)
    ort = next(c for c in gen.checks if c.backend == "ort" and c.variant == "fp32")
    assert ort.forced_agreement == 1.0 and ort.cosine_min > 0.9999 and ort.kv_matches_no_cache

    wh_cfg = generation_request(BenchConfig(artifact_dir=whisper_art, batch_sizes=[1], dims={"sequence": [50]}))
    assert wh_cfg is not None
    gen = run_generation_bench(_small(wh_cfg), log=lambda _: None).generation
    assert gen is not None and {(r.backend, r.prompt_length) for r in gen.rows} == {("eager", 50), ("ort", 50)}
    assert all(c.forced_agreement == 1.0 and c.kv_matches_no_cache for c in gen.checks)
