"""OpenVINO's own generation path for KV-cache decoders, on tiny random-init gpt2 and llama exported with their cache
by the toolkit (nothing downloaded): the stateful model of runtimes.ovstateful (past/present made internal state, a
beam_idx input) gives the greedy tokens and logits of the stateless ONNX on ONNX Runtime at two prompt lengths and
batch 1 and 2; the openvino generation backend runs it; openvino-genai's LLMPipeline (runtimes.ovgenai, backend
ovgenai) on the same IR gives those tokens and the benchmark's token timings and agreement through `cli.py bench`;
a wrong state mapping and OpenVINO's default u8 KV cache are caught by the same comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("openvino_genai")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from core.errors import BackendUnavailableError
from core.flops import openvino_config
from core.manifest import Manifest
from runtimes.base import RunnerOptions
from runtimes.decoding import Decoder, GenerationConfig, RunnerDecoder, cosines, greedy, greedy_no_cache
from runtimes.genbackends import requested
from runtimes.openvino import OpenVinoRunner
from runtimes.ort import OrtRunner
from runtimes.ovgenai import OvGenaiDecoder
from runtimes.ovstateful import OvStatefulDecoder, StatefulRequest, make_stateful, state_map, stateful_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {6: np.array([[5, 17, 42, 7, 9, 11], [3, 1, 4, 1, 5, 9]], np.int64),
           20: np.random.default_rng(3).integers(0, 100, (2, 20), dtype=np.int64)}
STEPS = 8


def _ort(art: Path) -> RunnerDecoder:
    m = Manifest.load(art)
    d = RunnerDecoder(OrtRunner(m, art, m.artifacts["fp32"], RunnerOptions(threads=1)))
    d.load()
    return d


def _disagreement(ref: Decoder, other: Decoder, prompt: np.ndarray) -> str | None:
    """None when ``other`` chooses ``ref``'s greedy tokens and, fed them (teacher forcing), gives its logits (cosine
    per step >= 0.9999 and within 1e-4); else what differs."""
    a = greedy(ref, prompt, STEPS, keep_logits=True)
    b = greedy(other, prompt, STEPS)
    if not np.array_equal(a.tokens, b.tokens):
        return f"tokens {b.tokens.tolist()} != {a.tokens.tolist()}"
    f = greedy(other, prompt, STEPS, keep_logits=True, forced=a.tokens)
    cos = min(float(cosines(x, y).min()) for x, y in zip(a.logits, f.logits, strict=True))
    err = max(float(np.abs(x - y).max()) for x, y in zip(a.logits, f.logits, strict=True))
    return None if cos >= 0.9999 and err < 1e-4 else f"logits: cosine min {cos:.6f}, max error {err:.2e}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stateful_model_and_pipeline_give_the_stateless_onnx_tokens_and_logits(family: str,
                                                                                request: pytest.FixtureRequest) -> None:
    """At prompt lengths 6 and 20 and batch 1 and 2: the stateful model (openvino backend) and openvino-genai's
    pipeline choose ONNX Runtime's greedy tokens on the stateless export, the stateful model with its logits; the
    cache's bytes are ORT's; the stateful model's no-cache forward gives the same tokens; the artifact folder is
    left as its manifest records it."""
    art: Path = request.getfixturevalue(f"{family}_art")
    m = Manifest.load(art)
    ort = _ort(art)
    ov = OvStatefulDecoder(OpenVinoRunner(m, art, m.artifacts["fp32"], RunnerOptions(threads=1)))
    pipe = OvGenaiDecoder(m, art, m.artifacts["fp32"], threads=1)
    ov.load()
    pipe.load()
    try:
        assert [p.get_any_name() for p in ov._request().compiled.inputs] == \
            [n for n in m.iospec.input_names if not n.startswith("past_key_values.")] + ["beam_idx"]
        for length, prompts in PROMPTS.items():
            for batch in (1, 2):
                prompt = prompts[:batch]
                assert _disagreement(ort, ov, prompt) is None, (length, batch, _disagreement(ort, ov, prompt))
                a, b, c = greedy(ort, prompt, STEPS), greedy(ov, prompt, STEPS), greedy(pipe, prompt, STEPS)
                assert len(set(a.tokens[0].tolist())) > 2  # a continuation that changes token, not one repeated
                np.testing.assert_array_equal(c.tokens, a.tokens)
                assert a.cache_bytes == b.cache_bytes == c.cache_bytes > 0
                assert c.prefill_ms > 0 and c.decode_ms > 0
                np.testing.assert_array_equal(greedy_no_cache(ov, prompt, STEPS).tokens, a.tokens)
    finally:
        ort.close()
        ov.close()
        pipe.close()
    assert not m.verify(art)


def test_the_llama_attention_is_fused_with_its_state(llama_art: Path, gpt2_art: Path) -> None:
    """The stateful llama runs OpenVINO's ScaledDotProductAttention (the CPU plugin's fused attention with the KV
    cache: what makes the stateful decode step fast), not a decomposed Softmax (read_model alone keeps that); the
    gpt2 export's attention (Select on its causal bias) is not fused, as the module docstring says."""
    def ops(art: Path) -> set[str]:
        return {o.get_type_name() for o in stateful_model(art / "model.onnx", Manifest.load(art).iospec).get_ops()}

    llama, gpt2 = ops(llama_art), ops(gpt2_art)
    assert {"ScaledDotProductAttention", "ReadValue", "Assign"} <= llama and "Softmax" not in llama
    assert {"Softmax", "ReadValue", "Assign"} <= gpt2 and "ScaledDotProductAttention" not in gpt2


def test_a_wrong_state_mapping_and_a_u8_cache_are_caught(llama_art: Path) -> None:
    """The comparison above fails on a stateful model whose state pairs layer 0's past with layer 1's present, and on
    OpenVINO's default KV cache (u8 on its CPU plugin: why the backend pins it to the compute precision); the right
    mapping in f32 passes."""
    m = Manifest.load(llama_art)
    ort = _ort(llama_art)
    pairs = state_map(m.iospec)
    wrong = dict(pairs) | {"past_key_values.0.key": "present.1.key", "past_key_values.1.key": "present.0.key"}

    import openvino as ov

    stateless = ov.convert_model(str(llama_art / "model.onnx"))

    class Stateful(Decoder):
        def __init__(self, pairs: dict[str, str], kv: str) -> None:
            self.req = StatefulRequest(make_stateful(stateless.clone(), pairs),
                                       openvino_config("LATENCY", 1) | {"KV_CACHE_PRECISION": kv})

        def session(self):  # type: ignore[no-untyped-def]
            return self.req.session()

    prompt = PROMPTS[6]
    try:
        assert _disagreement(ort, Stateful(pairs, "f32"), prompt) is None
        assert _disagreement(ort, Stateful(wrong, "f32"), prompt) is not None
        assert _disagreement(ort, Stateful(pairs, "u8"), prompt) is not None
    finally:
        ort.close()


def test_one_request_serves_one_sequence_at_a_time(gpt2_art: Path) -> None:
    """A session whose request another session has reset since is refused, never decoded on the other's cache."""
    m = Manifest.load(gpt2_art)
    req = StatefulRequest(stateful_model(gpt2_art / "model.onnx", m.iospec), openvino_config("LATENCY", 1))
    first, second = req.session(), req.session()
    first.step(PROMPTS[6][:1])
    second.step(PROMPTS[6][:1])
    assert first.cache_bytes() == 0 and second.cache_bytes() > 0
    with pytest.raises(RuntimeError, match="another session ran"):
        first.step(np.array([[1]], np.int64))


def test_bench_with_backends_ovgenai_gives_token_timings_and_agreement(gpt2_art: Path, tmp_path: Path) -> None:
    """`cli.py bench --backends ovgenai,openvino`: TTFT/TPOT rows for both, and both checked against eager with full
    agreement; the openvino rows run the stateful model."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", str(gpt2_art), "--backends",
                           "ovgenai,openvino", "--batch-sizes", "1,2", "--iters", "2", "--rounds", "1", "--warmup",
                           "0", "--threads", "1", "--dims", "sequence=6", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    gen = json.loads(out.read_text())["generation"]
    rows = [r for r in gen["rows"] if r["kv_cache"]]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, n) for b in ("ovgenai", "openvino") for n in (1, 2)}
    assert all(r["ttft_ms"]["p50"] > 0 and r["tpot_ms"]["p50"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert all(r["extra"].get("openvino_stateful") for r in rows if r["backend"] == "openvino")
    checks = {c["backend"]: c for c in gen["checks"]}
    for name in ("ovgenai", "openvino"):
        c = checks[name]
        assert c["reference"] == "eager:torch:fp32" and c["agreement"] == 1.0 and c["kv_matches_no_cache"], c
        assert c["cosine_min"] > 0.9999


def test_ovgenai_skipped_with_the_install_line_when_not_importable(gpt2_art: Path) -> None:
    code = ("import sys; sys.modules['openvino_genai'] = None\n"
            "from pathlib import Path\nfrom core.manifest import Manifest\n"
            "from runtimes.decoding import GenerationConfig\nfrom runtimes.generation import build_decoders\n"
            f"art = Path({str(gpt2_art)!r}); skipped = []\n"
            "ds = build_decoders(Manifest.load(art), art, GenerationConfig(artifact_dir=art, "
            "backends=['openvino', 'ovgenai']), skipped)\nprint([d.label for d in ds]); print(skipped)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels, skipped = proc.stdout.strip().splitlines()
    assert labels == "['openvino:fp32']"
    assert "ovgenai: openvino-genai is not installed (pip install .[ovgenai])" in skipped


def test_a_variant_the_pipeline_cannot_build_is_refused_in_one_line(gpt2_art: Path) -> None:
    """A state mapping that names no such output is a BackendUnavailableError naming it (run_generation lists it as
    skipped); the temporary folder is removed."""
    m = Manifest.load(gpt2_art)
    pipe = OvGenaiDecoder(m, gpt2_art, m.artifacts["fp32"], threads=1, pairs={"past_key_values.0.key": "present.9.key"})
    with pytest.raises(BackendUnavailableError, match=r"^the OpenVINO model has no present\.9\.key$"):
        pipe.load()
    assert pipe._tmp is None and pipe.pipe is None
    assert requested(GenerationConfig(artifact_dir=gpt2_art))[-1] == "ovgenai"


def test_a_signal_after_the_pipeline_is_handled_not_a_crash(gpt2_art: Path) -> None:
    """OpenVINO's CPU plugin puts back, when a model compiled during a pipeline's life is released, the signal stack
    the (freed) pipeline had set: the next SIGTERM was a segmentation fault (exit -11) instead of Python's handler.
    After the decoder closes, the stack set is core.sigstack's own and the handler runs."""
    code = ("import os, signal, sys\nimport numpy as np\nfrom pathlib import Path\nfrom core.manifest import Manifest\n"
            "from core import sigstack\nfrom runtimes.decoding import greedy\n"
            "from runtimes.ovgenai import OvGenaiDecoder\n"
            f"art = Path({str(gpt2_art)!r}); m = Manifest.load(art)\n"
            "d = OvGenaiDecoder(m, art, m.artifacts['fp32'], threads=1); d.load()\n"
            "greedy(d, np.ones((1, 4), np.int64), 2); d.close(); del d\n"
            "assert sigstack.current() == sigstack.own_stack(), (sigstack.current(), sigstack.own_stack())\n"
            "def h(*_): raise SystemExit(7)\n"
            "signal.signal(signal.SIGTERM, h)\nos.kill(os.getpid(), signal.SIGTERM)\nsum(range(1000))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-2000:])
