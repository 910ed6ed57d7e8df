"""Hugging Face models exported by Optimum's own exporter: a decoder with its KV cache (past inputs, present outputs)
that bench runs, a vision model whose channel axis is not varied, an encoder-decoder exported as four components
(each hashed, validated and benchmarked), task inference as Optimum chooses, and the dynamo fallback where
optimum-onnx cannot be imported. Tiny random-init configs saved in the test; nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path, pre: str = "") -> subprocess.CompletedProcess[str]:
    if pre:  # run cli.py after ``pre`` (Python) in the same process
        code = f"{pre}\nimport runpy, sys\nsys.argv = {['cli.py', *args]!r}\nrunpy.run_path({str(ROOT / 'cli.py')!r}, " \
               "run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    root = tmp_path_factory.mktemp("hfo")
    torch.manual_seed(0)
    t = transformers
    t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)) \
        .save_pretrained(root / "gpt2")
    t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)) \
        .save_pretrained(root / "llama")
    t.GemmaForCausalLM(t.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=16, vocab_size=100, max_position_embeddings=64)) \
        .save_pretrained(root / "gemma")
    t.ViTForImageClassification(t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=32, patch_size=8)) \
        .save_pretrained(root / "vit")
    t.T5ForConditionalGeneration(t.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100)) \
        .save_pretrained(root / "t5")
    t.BartForConditionalGeneration(t.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                                                decoder_ffn_dim=64, encoder_attention_heads=2,
                                                decoder_attention_heads=2, vocab_size=100,
                                                max_position_embeddings=64)).save_pretrained(root / "bart")
    t.BertModel(t.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    return root


def test_decoder_with_past_convert_and_bench(root: Path) -> None:
    """gpt2's default task is Optimum's: text-generation-with-past. The file continues a real prefix as transformers
    does with its cache (a check random inputs could not make), and bench runs it."""
    import onnxruntime as ort
    import torch

    from core.manifest import Manifest

    out = root / "art_gpt2"
    proc = _cli("convert", f"hf:{root / 'gpt2'}", "--no-optimize", "--fp16", "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    man = Manifest.load(out)
    # FP16 of a KV-cache decoder: onnxconverter-common's converter wrote a file ONNX Runtime refused (or hung)
    assert man.artifacts["fp16"].status == "ok" and man.artifacts["fp16"].metrics.checker == "ok"
    assert man.source.task == "text-generation-with-past" and man.exporter == "optimum"
    names = man.iospec.input_names
    assert [n for n in names if n.startswith("past_key_values.")] == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert [n for n in man.iospec.output_names if n.startswith("present.")] == [
        "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    mask = man.iospec.input("attention_mask")
    assert mask.shape == ["batch", "past_sequence + sequence"]
    parity = man.artifacts["fp32"].metrics.parity
    assert any("sequence_24" in k for k in parity), parity  # varied at Optimum's second sequence length

    model = transformers.GPT2LMHeadModel.from_pretrained(str(root / "gpt2")).eval()
    ids = torch.tensor([[5, 17, 42, 7, 9, 11]])
    feed = {"input_ids": ids[:, 4:].numpy(), "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.array([[4, 5]], np.int64)}
    with torch.inference_mode():
        prefix = model(ids[:, :4], use_cache=True)
        cache = prefix.past_key_values
        for i in range(2):  # copied before the next call grows the cache in place
            k, v = cache[i] if isinstance(cache, tuple) else (cache.layers[i].keys, cache.layers[i].values)
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k.numpy().copy(), v.numpy().copy()
        want = model(ids[:, 4:], past_key_values=cache, use_cache=True).logits.numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    bench = _cli("bench", str(out), "--backends", "eager,ort", "--batch-sizes", "1", "--warmup", "1", "--iters", "3",
                 "--accuracy-samples", "4", cwd=root)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-2000:]
    # a decoder with its KV cache is benchmarked as generation (prefill, then decode steps), not one call
    gen = json.loads((out / "bench" / "results.json").read_text())["generation"]
    assert {r["backend"] for r in gen["rows"]} == {"eager", "ort"}
    assert {r["variant"] for r in gen["rows"] if r["backend"] == "ort"} == {"fp32", "fp16"}
    ort_fp32 = next(c for c in gen["checks"] if c["backend"] == "ort" and c["variant"] == "fp32")
    assert ort_fp32["forced_agreement"] == 1.0 and ort_fp32["cosine_min"] > 0.9999 and ort_fp32["kv_matches_no_cache"]


def test_llama_explicit_with_past_task(root: Path) -> None:
    """--task text-generation-with-past was a KeyError; llama was an export failure without Optimum's patchers."""
    out = root / "art_llama"
    proc = _cli("convert", f"hf:{root / 'llama'}", "--task", "text-generation-with-past", "--no-optimize", "--out",
                str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    spec = json.loads((out / "manifest.json").read_text())["iospec"]
    assert sum(t["name"].startswith("past_key_values.") for t in spec["inputs"]) == 4


def test_gemma_fused_without_rotary_fusion(root: Path) -> None:
    """ONNX Runtime's fused RotaryEmbedding takes position_ids of the batch's size and the optimizer feeds it gemma's
    broadcast [1, sequence] positions: that file fails at batch 2 (the fused variant was left out, exit 5). The
    fusion is made again without rotary-embedding fusion, validated at batch 1 and 2, and says so."""
    from core.manifest import Manifest

    out = root / "art_gemma"
    proc = _cli("convert", f"hf:{root / 'gemma'}", "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "fusing again without rotary-embedding fusion" in proc.stderr + proc.stdout
    fused = Manifest.load(out).artifacts["fused"]
    assert fused.status == "ok" and any("rotary-embedding fusion off" in n for n in fused.notes)
    assert any(k.startswith("batch_2") for k in fused.metrics.parity), fused.metrics.parity


def test_vision_channels_fixed(root: Path) -> None:
    """Optimum marks the channel axis dynamic; the model takes 3 channels only: fixed in the file, never varied."""
    out = root / "art_vit"
    proc = _cli("convert", f"hf:{root / 'vit'}", "--no-optimize", "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    spec = json.loads((out / "manifest.json").read_text())["iospec"]
    assert spec["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    static = _cli("convert", f"hf:{root / 'vit'}", "--no-dynamic-batch", "--out", str(root / "art_vit_static"),
                  cwd=root)  # Optimum keeps the batch dynamic: refused in one line, not recorded as static
    assert static.returncode == 2 and "--no-dynamic-batch" in static.stderr + static.stdout
    assert not (root / "art_vit_static").exists()


def test_encoder_decoder_components(root: Path) -> None:
    """t5 with past: four files, one artifact; each component hashed (a changed one fails verify), validated,
    converted to FP16 and dynamically quantized (each graded on its own held-out inputs; the variant's merged decoder
    merged from its two decoders, as Optimum makes its own) and benchmarked; static INT8 is refused in one line
    before the export."""
    import onnxruntime as ort

    from core.manifest import Manifest

    out = root / "art_t5"
    proc = _cli("convert", f"hf:{root / 't5'}", "--fp16", "--int8-dynamic", "--out", str(out), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    man = Manifest.load(out)
    comps = man.artifacts["fp32"].components
    assert list(comps) == ["encoder_model", "decoder_model", "decoder_with_past_model", "decoder_model_merged"]
    for name in ("opt", "fp16", "int8_dynamic"):  # each component optimized / converted / quantized
        assert list(man.artifacts[name].components) == list(comps), name
    for comp in [*comps.values(), *man.artifacts["opt"].components.values()]:
        assert (out / comp.file.path).is_file() and comp.metrics.parity, comp.file.path
    for name in ("fp16", "int8_dynamic"):
        art = man.artifacts[name]
        assert art.status == "ok" and art.parent == "opt"
        for stem, comp in art.components.items():
            assert comp.metrics.gate is not None and comp.metrics.gate.passed, (name, stem)
            assert comp.metrics.accuracy is not None and comp.metrics.accuracy.cosine > 0.99, (name, stem)
    assert comps["decoder_model_merged"].iospec.input("use_cache_branch").fill == "zeros"
    assert man.verify(out) == []

    # the FP16 merged decoder's no-cache branch is the FP16 decoder (merged from it, not converted on its own)
    spec = man.artifacts["fp16"].components["decoder_model_merged"].iospec
    feed = spec.random_feed(1, seed=3)
    feed["use_cache_branch"] = np.zeros_like(feed["use_cache_branch"])
    merged = ort.InferenceSession(str(out / "decoder_model_merged.fp16.onnx"), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(out / "decoder_model.fp16.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in plain.get_inputs()]
    np.testing.assert_allclose(merged.run(["logits"], feed)[0], plain.run(["logits"], {k: feed[k] for k in names})[0],
                               rtol=1e-5, atol=1e-5)

    bench = _cli("bench", str(out), "--backends", "eager,ort", "--batch-sizes", "1", "--warmup", "1", "--iters", "2",
                 "--accuracy-samples", "2", "--component", "decoder_with_past_model", cwd=root)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-2000:]
    rows = json.loads((out / "bench" / "results.json").read_text())["records"]
    assert {r["variant"] for r in rows} == {"fp32", "opt", "fp16", "int8_dynamic", "torch"}
    assert all(r["accuracy"]["max_abs_err"] < (0.5 if r["variant"] == "int8_dynamic" else 1e-2) for r in rows)

    data = (out / "decoder_model.onnx").read_bytes()
    (out / "decoder_model.onnx").write_bytes(data + b"\0")
    assert any("decoder_model.onnx" in p for p in Manifest.load(out).verify(out))
    (out / "decoder_model.onnx").write_bytes(data)

    refused = _cli("convert", f"hf:{root / 't5'}", "--int8", "--calib", "synthetic", "--out",
                   str(root / "art_t5_int8"), cwd=root)
    assert refused.returncode == 2 and "several files" in refused.stderr + refused.stdout
    assert not (root / "art_t5_int8").exists()


def test_task_inference_matches_optimum(root: Path) -> None:
    """BartForConditionalGeneration: Optimum's class lookup says fill-mask, which it does not export for bart; the
    task is the exportable one of that class, with past."""
    from core.hf import infer_task

    assert infer_task(root / "bart", None) == "text2text-generation-with-past"
    assert infer_task(root / "gpt2", None) == "text-generation-with-past"
    assert infer_task(root / "vit", None) == "image-classification"
    assert infer_task(root / "bert", None) == "feature-extraction"


def test_without_optimum_falls_back_to_dynamo(root: Path) -> None:
    """Where optimum-onnx cannot be imported (a transformers newer than it supports), one line says so with the
    versions and the dynamo exporter exports the model from its own inputs."""
    out = root / "art_bert_dynamo"
    block = "import sys\nsys.modules['optimum.exporters.onnx'] = None"
    proc = _cli("convert", f"hf:{root / 'bert'}", "--no-optimize", "--out", str(out), cwd=root, pre=block)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text = proc.stderr + proc.stdout
    assert "cannot be used with transformers" in text and "dynamo" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["exporter"] == "dynamo"
    assert [t["name"] for t in man["iospec"]["inputs"]] == ["input_ids", "attention_mask"]
