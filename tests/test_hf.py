"""Hugging Face models from a local folder (``hf:folder``): tiny random-init BERTs saved in the test, through
convert (export from Optimum's ONNX config, parity, dynamic INT8), bench (eager + ORT at two sequence lengths)
and the CLI's one-line errors. Nothing is downloaded."""

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


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _bert_config() -> object:
    return transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(root / "encoder")
    cfg = _bert_config()
    cfg.id2label = {0: "negative", 1: "positive"}
    cfg.label2id = {"negative": 0, "positive": 1}
    transformers.BertForSequenceClassification(cfg).save_pretrained(root / "classifier")
    return {"encoder": root / "encoder", "classifier": root / "classifier", "root": root}


def test_encoder_convert_int8_bench(folders: dict[str, Path]) -> None:
    from core.manifest import Manifest

    out = folders["root"] / "art_encoder"
    proc = _cli("convert", f"hf:{folders['encoder']}", "--int8-dynamic", "--out", str(out), cwd=folders["root"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    man = Manifest.load(out)
    assert man.source.kind == "hf" and man.source.task == "feature-extraction"
    spec = man.iospec
    assert spec.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert spec.output_names == ["last_hidden_state"]
    assert spec.symbolic_dims() == ["batch", "sequence"]
    ids = next(t for t in spec.inputs if t.name == "input_ids")
    assert ids.dtype == "int64" and ids.int_range == (0, 120)  # the vocabulary, read from the embedding table
    assert man.artifacts["int8_dynamic"].status == "ok"
    assert man.artifacts["fused"].params.fused_ops.get("Attention") == 2  # fused from the plain export
    # ONNX Runtime's symbolic shape inference leaves files in the working directory when it fails: not ours
    assert not [p.name for p in folders["root"].iterdir() if p.suffix == ".data" or p.name.startswith("sym_shape")]

    # the exported graph answers what transformers computes, at a sequence length it was not traced at
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 120, (3, 37)).astype(np.int64),
            "attention_mask": np.ones((3, 37), np.int64), "token_type_ids": np.zeros((3, 37), np.int64)}
    feed["attention_mask"][0, 30:] = 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)[0]
    model = transformers.BertModel.from_pretrained(str(folders["encoder"])).eval()
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    bench = _cli("bench", str(out), "--backends", "eager,ort", "--batch-sizes", "1", "--warmup", "1", "--iters",
                 "3", "--dims", "sequence=8,24", "--accuracy-samples", "4", cwd=folders["root"])
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr
    rows = json.loads((out / "bench" / "results.json").read_text())["records"]
    seen = {(r["backend"], r["variant"], r["input_shapes"]["input_ids"][1]) for r in rows}
    assert {("eager", "torch", 8), ("eager", "torch", 24), ("ort", "int8_dynamic", 24)} <= seen


def test_classifier_task_and_labels(folders: dict[str, Path]) -> None:
    from core.manifest import Manifest
    from core.models import categories_for, resolve_model

    loaded = resolve_model(f"hf:{folders['classifier']}")
    assert loaded.source.task == "text-classification"
    assert categories_for(loaded.source) == ["negative", "positive"]
    out = folders["root"] / "art_cls"
    proc = _cli("convert", f"hf:{folders['classifier']}", "--input-shape",
                "input_ids:1x12,attention_mask:1x12,token_type_ids:1x12", "--out", str(out), cwd=folders["root"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    spec = Manifest.load(out).iospec
    assert spec.dims == {"sequence": 12} and spec.output_names == ["logits"]
    assert [t.shape for t in spec.outputs] == [["batch", 2]]


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "image-classification"], "is not exportable for 'bert'; choose one of"),
    (["--weights", "w.pt"], "--weights cannot be combined with an hf: model"),
])
def test_bad_hf_input_is_one_line(folders: dict[str, Path], args: list[str], message: str) -> None:
    proc = _cli("convert", f"hf:{folders['encoder']}", *args, "--out", str(folders["root"] / "bad"),
                cwd=folders["root"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (folders["root"] / "bad").exists()


def test_not_a_hf_folder_and_task_elsewhere(tmp_path: Path) -> None:
    proc = _cli("convert", f"hf:{tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a Hugging Face model folder (no config.json there)" in proc.stderr
    proc = _cli("convert", "resnet18", "--task", "feature-extraction", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "--task is for Hugging Face models" in proc.stderr, proc.stderr
