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
