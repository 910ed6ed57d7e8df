"""Fixes found by the generation coverage run over more decoder families (benchmarks/run_gen_coverage.py), each on a
tiny random-init decoder exported with its KV cache by the toolkit (nothing downloaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from core.hf import PREFIX
from core.manifest import Manifest
from runtimes.base import RunnerOptions
from runtimes.decoding import RunnerDecoder, greedy, hf_folder
from runtimes.ort import OrtRunner

PROMPT = np.array([[5, 17, 42, 7, 9, 11], [3, 1, 4, 1, 5, 9]], np.int64)
STEPS = 8


@pytest.fixture(scope="module")
def eos_emitting(llama_art: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, np.ndarray]:
    """The tiny llama's manifest with its source folder's EOS id set to a token greedy decoding emits mid-way (the
    third token of the first prompt), and ONNX Runtime's greedy tokens: a model that emits EOS, as mistral's did."""
    m = Manifest.load(llama_art)
    ort = RunnerDecoder(OrtRunner(m, llama_art, m.artifacts["fp32"], RunnerOptions(threads=1)))
    ort.load()
    try:
        ref = greedy(ort, PROMPT, STEPS).tokens
    finally:
        ort.close()
    src = hf_folder(m)
    assert src is not None
    folder = tmp_path_factory.mktemp("eos_src")
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = int(ref[0, 2])
    (folder / "config.json").write_text(json.dumps(config))
    moved = m.model_copy(update={"source": m.source.model_copy(update={"model": f"{PREFIX}{folder}"})})
    assert hf_folder(moved) == folder
    return moved, ref


def test_ovgenai_emits_the_eos_token_greedy_chooses(eos_emitting: tuple[Manifest, np.ndarray], llama_art: Path
                                                    ) -> None:
    """openvino-genai's pipeline keeps generating past EOS (the benchmark asks for a fixed number of steps) but must
    not forbid it: ``min_new_tokens`` masks EOS's logit, so the pipeline chose another token where every other backend
    chose EOS (mistral's coverage row: tokens differed from eager at position 2 and from its own no-cache path)."""
    pytest.importorskip("openvino_genai")
    from runtimes.ovgenai import OvGenaiDecoder

    manifest, ref = eos_emitting
    pipe = OvGenaiDecoder(manifest, llama_art, manifest.artifacts["fp32"], threads=1)
    pipe.load()
    try:
        got = pipe.generate(PROMPT, STEPS)
        assert got is not None
        assert got.tokens.tolist() == ref.tolist()
    finally:
        pipe.close()


def _matmuls_onnx(path: Path) -> Path:
    """x (batch x 64) through two 64-wide MatMuls, and t (batch x 1) times a 1 x 8 constant: the shape of the rotary
    embedding's ``inv_freq`` MatMul in gemma's export (K = 1, which no group of 32 divides)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"W1": rng.normal(size=(64, 64)), "W2": rng.normal(size=(64, 64)), "F": rng.normal(size=(1, 8))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["t", "F"], ["r"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
                     helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_int4_ov_leaves_a_weight_no_group_divides_in_float(tmp_path: Path) -> None:
    """gemma's --int4-ov failed as a whole (NNCF InvalidGroupSizeError on /model/rotary_emb/MatMul, K = 1): a weight
    whose K no group divides now stays as it is (NNCF's group_size_fallback_mode IGNORE), the others are 4-bit."""
    pytest.importorskip("nncf")
    import openvino as ov

    from convert.config import Int4Config
    from convert.int4_ov import compress_file

    xml = tmp_path / "m.xml"
    types = compress_file(_matmuls_onnx(tmp_path / "m.onnx"), xml, Int4Config())
    assert types.get("u4", 0) + types.get("i4", 0) >= 1, types
    consts = {tuple(op.get_output_shape(0)): op.get_element_type().get_type_name()
              for op in ov.Core().read_model(str(xml)).get_ops() if op.get_type_name() == "Constant"}
    assert consts.get((1, 8)) == "f32", consts  # the rotary-like weight, untouched


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init gemma2 with attention logit softcapping (gemma2's default, 50), large weights so the cap
    bites."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gemma2")
    t.Gemma2ForCausalLM(t.Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64,
        initializer_range=0.5, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def test_eager_reference_applies_gemma2_attention_softcapping(gemma2_folder: Path, llama_art: Path) -> None:
    """transformers loads gemma2 with SDPA attention by default, which ignores ``attn_logit_softcapping``; Optimum's
    export applies it (the model's own attention), so every ONNX backend differed from the eager reference at a greedy
    step (gemma2's coverage row: agreement 84%, cosine 0.998). The eager decoder now loads such a model with its eager
    attention: its logits are those of the model's own attention, not SDPA's."""
    import torch
    import transformers as t

    from runtimes.decoding import TorchDecoder

    ids = np.random.default_rng(1).integers(0, 128, (1, 16))
    logits = {}
    for impl in ("eager", "sdpa"):
        model = t.AutoModelForCausalLM.from_pretrained(gemma2_folder, attn_implementation=impl).eval()
        with torch.inference_mode():
            logits[impl] = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits["eager"] - logits["sdpa"]).max() > 1e-2  # the cap changes this model's logits
    d = TorchDecoder(Manifest.load(llama_art), llama_art, gemma2_folder, compiled=False, threads=1,
                     saved_weights=False)
    d.load()
    try:
        assert np.abs(d.forward(ids) - logits["eager"]).max() < 1e-4
    finally:
        d.close()
