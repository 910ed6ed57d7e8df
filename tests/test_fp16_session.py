"""An FP16 ViT converts and benches instead of killing the process.

ONNX Runtime 1.32's NCHWc layout transformer segfaults while creating a session over some float16 graphs: a 2-layer
torchvision ViT after ONNX Runtime's float16 converter was enough, and ``convert --fp16`` (and ``bench`` of the file)
died with exit 139 and no message, its staging folder left behind. Sessions over a model with float16 tensors leave
that transformer off (it is for FP32 convolutions); these tests fail on the old code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.manifest import Manifest
from runtimes.harness import BenchConfig, run_bench
from runtimes.ort import FP16_DISABLED_OPTIMIZERS, TRITON_GRAPH_LEVELS, disabled_optimizers
from serving.triton import PackageConfig, package
from serving.triton_config import parse_config

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = '''
import torch
from torchvision.models import VisionTransformer

INPUT_SHAPE = (1, 3, 32, 32)


def build():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision's zero head would output 0 for every input
    return model
'''


def test_fp16_vit_converts_and_benches(tmp_path: Path) -> None:
    (tmp_path / "vit.py").write_text(TINY_VIT)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", f"{tmp_path / 'vit.py'}:build", "--fp16",
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    art = Manifest.load(out).artifacts["fp16"]
    assert art.status == "ok" and art.metrics.gate is not None and art.metrics.gate.passed
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    assert disabled_optimizers(out / art.file.path) == list(FP16_DISABLED_OPTIMIZERS)
    assert disabled_optimizers(out / "model.onnx") == []
    res = run_bench(BenchConfig(artifact_dir=out, backends=["ort"], variants=["fp16"], batch_sizes=[2], warmup=1,
                                iters=3, rounds=3), log=lambda _m: None)
    (row,) = [r for r in res.records if r.variant == "fp16"]
    assert row.accuracy is not None and row.accuracy.cosine > 0.999
    # Triton's onnxruntime backend has no key for one optimizer: the FP16 model is served at level extended
    repo, folder = package(PackageConfig(artifact_dir=out, out=tmp_path / "repo", variants=["fp16", "opt"]),
                           log=lambda _m: None)
    configs = {m.variant: parse_config(folder / m.name / "config.pbtxt") for m in repo.models}
    assert configs["fp16"].optimization.graph.level == TRITON_GRAPH_LEVELS["extended"]
    assert not configs["opt"].HasField("optimization")
    assert any("float16 tensors, so optimization.graph.level 1" in n for n in repo.notes)


def test_disabled_optimizers_reads_bytes_and_subgraphs() -> None:
    half = numpy_helper.from_array(np.ones(2, np.float16), "h")
    body = helper.make_graph([helper.make_node("Constant", [], ["y"], value=half)], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    cond = helper.make_node("If", ["c"], ["out"], then_branch=body, else_branch=body)
    graph = helper.make_graph([cond], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert disabled_optimizers(model.SerializeToString()) == list(FP16_DISABLED_OPTIMIZERS)
    float_graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    assert disabled_optimizers(onnx.helper.make_model(float_graph).SerializeToString()) == []
    assert disabled_optimizers(b"not a model") == []
