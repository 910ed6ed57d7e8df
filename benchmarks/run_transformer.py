"""A small transformer on this CPU: PyTorch eager vs ONNX Runtime (opt) vs ONNX Runtime with the transformer
optimizer (fused) vs dynamic INT8, at sequence 16 and 128, batch 1 and 8, with each one's cosine vs FP32.

    python benchmarks/run_transformer.py [--model bert|fixture] [--size small|base] [--rounds 7] [--calls 5]

``bert`` (default): a random-init Hugging Face BertModel (vocabulary 8000, hidden 256, 4 heads, 4 layers,
intermediate 1024; int64 input_ids + attention_mask + token_type_ids) saved to the work folder and converted
through ``hf:`` (needs ``.[hf]``); ``--size base``: BERT-base widths (hidden 768, 12 heads, intermediate 3072),
still 4 layers. ``fixture``: tests/fixtures/tiny_transformer.py:build_small (same sizes,
nn.TransformerEncoder: one packed QKV projection). Each is converted once with ``cli.py convert ...
--int8-dynamic``. Timing: in each round every backend runs ``--calls`` timed calls in
turn, the order rotated from round to round, ONNX Runtime's thread spinning off (so no session steals
the cores from the next); a backend's figure is the median over rounds of its per-round p50, with a
95% bootstrap interval of that median. "Faster" is claimed only when the intervals do not overlap.
Targets (issue 11): fused at least 1.2x faster than plain ORT at sequence 128; dynamic INT8 faster than
FP32 on a CPU with VNNI, with embedding cosine >= 0.99. Writes benchmarks/results/transformer_cpu.{json,md} (bert, small), transformer_bert_base_cpu.* or
transformer_fixture_cpu.*.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write
from core.metrics import median_interval

FIXTURE = f"{ROOT / 'tests' / 'fixtures' / 'tiny_transformer.py'}:build_small"
BACKENDS = [("eager", "torch"), ("ort", "opt"), ("ort", "fused"), ("ort", "int8_dynamic")]


SIZES = {"small": {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
         "base": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}}


def _bert_folder(work: Path, size: str) -> str:
    """A random-init 4-layer BERT, saved once (seeded) as a Hugging Face folder."""
    folder = work / "bert-src"
    if not (folder / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=8000, num_hidden_layers=4, max_position_embeddings=512,
                                      **SIZES[size])
        transformers.BertModel(cfg).save_pretrained(folder)
    return f"hf:{folder}"


def _runners(folder: Path) -> list[Any]:
    from core.manifest import Manifest
    from runtimes import RUNNERS
    from runtimes.base import RunnerOptions

    manifest = Manifest.load(folder)
    opts = RunnerOptions(device="cpu", ort_spinning=False)
    return [RUNNERS[b](manifest, folder, manifest.artifacts[v], opts).load() for b, v in BACKENDS]


def measure(folder: Path, batch: int, seq: int, rounds: int, calls: int) -> dict[str, Any]:
    from core.manifest import Manifest
    from core.metrics import compare_outputs

    spec = Manifest.load(folder).iospec
    feed = spec.random_feed(batch, seed=batch * 1000 + seq, dims={"sequence": seq})
    runners = _runners(folder)
    try:
        prepared = [r.prepare(feed) for r in runners]
        outs = [r.infer(feed) for r in runners]
        for r, p in zip(runners, prepared, strict=True):
            r.time_iterations(p, 2, 0)  # warm-up
        p50s: list[list[float]] = [[] for _ in runners]
        for k in range(rounds):
            order = [(k + i) % len(runners) for i in range(len(runners))]
            for i in order:
                p50s[i].append(float(np.median(runners[i].time_iterations(prepared[i], 0, calls))))
    finally:
        for r in runners:
            r.close()
    out: dict[str, Any] = {}
    for (backend, variant), samples, o in zip(BACKENDS, p50s, outs, strict=True):
        lo, hi = median_interval(samples)
        out[f"{backend}:{variant}"] = {"p50_ms": float(np.median(samples)), "ci95_ms": [lo, hi], "round_p50s_ms": samples,
                                       "cosine_vs_eager": compare_outputs(o, outs[0]).cosine}
    return out


def _faster(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` faster than ``b`` by the rule every comparison uses (``core.metrics.clearly_slower``)."""
    from core.metrics import LatencyStats, clearly_slower

    def stats(x: dict[str, Any]) -> LatencyStats:
        return LatencyStats.from_samples(x["round_p50s_ms"], [[v] for v in x["round_p50s_ms"]])

    return clearly_slower(stats(b), stats(a))


#: Op types that say which fusions a graph has when ONNX Runtime runs it.
FUSION_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
              "LayerNormalization", "BiasGelu", "Gelu", "FastGelu", "FusedMatMul", "Softmax", "MatMul")


def ops_after_load(path: Path) -> dict[str, int]:
    """The graph ONNX Runtime actually runs (its own extended fusions applied at session creation, as in the
    benchmark): counts of the fusion-relevant op types. Shows what the transformer optimizer adds on top."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "after_load.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        counts = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {op: counts[op] for op in FUSION_OPS if counts[op]}


def _verdicts(points: dict[str, dict[str, Any]], vnni: bool) -> list[str]:
    lines = []
    for key, res in points.items():
        opt, fused, dyn = res["ort:opt"], res["ort:fused"], res["ort:int8_dynamic"]
        if key.endswith("seq 128"):
            ratio = opt["p50_ms"] / fused["p50_ms"]
            met = ratio >= 1.2 and _faster(fused, opt)
            lines.append(f"{key}: fused is {ratio:.2f}x plain ORT (target >= 1.2x): {'met' if met else 'MISSED'}")
        ratio = opt["p50_ms"] / dyn["p50_ms"]
        ok_cos = dyn["cosine_vs_eager"] >= 0.99
        faster = _faster(dyn, opt)
        lines.append(f"{key}: dynamic INT8 is {ratio:.2f}x FP32 (opt), cosine {dyn['cosine_vs_eager']:.4f}: "
                     + ("faster" if faster else "not faster (intervals overlap or it is slower)")
                     + ("" if vnni else " (this CPU has no VNNI: the target does not apply)")
                     + ("" if ok_cos else "; cosine below 0.99"))
    return lines


def _markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = ["# Small transformer on CPU: eager vs ONNX Runtime vs transformer fusion vs dynamic INT8", "",
             f"Command: `{payload['command']}`", "",
             f"CPU: {m['cpu_model']} ({m.get('cpu_count')} cores visible), AVX-512 VNNI: {payload['vnni']}; "
             f"load average before: {payload['load_avg_before']}", "",
             f"Model: {payload['model']} (random init), {payload['rounds']} rounds x {payload['calls']} calls per "
             "backend, order rotated, ORT spinning off. p50 = median over rounds of each round's p50; "
             "[95% bootstrap interval].", "",
             "| point | backend | p50 ms | 95% interval | cosine vs eager FP32 |", "|---|---|---|---|---|"]
    for key, res in payload["points"].items():
        for name, r in res.items():
            lo, hi = r["ci95_ms"]
            lines.append(f"| {key} | {name} | {r['p50_ms']:.3f} | {lo:.3f}-{hi:.3f} | {r['cosine_vs_eager']:.5f} |")
    lines += ["", f"Ops the transformer optimizer fused: {payload['fused_ops']}", "",
              "Op counts of the graphs ONNX Runtime runs (its own fusions applied at session creation): "
              + "; ".join(f"{v}: {ops}" for v, ops in payload["ops_after_ort_load"].items()), "",
              "## Targets", "", *[f"- {v}" for v in payload["verdicts"]], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["bert", "fixture"], default="bert")
    ap.add_argument("--size", choices=list(SIZES), default="small", help="bert only")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_transformer"))
    args = ap.parse_args()
    from calibration.cpu import cpu_features

    if args.model == "fixture" and args.size != "small":
        ap.error("--size applies to --model bert only")
    name = {"fixture": "fixture", "bert": "bert" if args.size == "small" else f"bert_{args.size}"}[args.model]
    work = Path(args.work) / name
    model = _bert_folder(work, args.size) if args.model == "bert" else FIXTURE
    folder = ensure_converted(model, work / "converted", ["--int8-dynamic"])
    vnni = cpu_features().vnni
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": machine(), "vnni": vnni,
                               "load_avg_before": os.getloadavg(), "model": model, "rounds": args.rounds,
                               "calls": args.calls, "points": {}}
    for seq in (16, 128):
        for batch in (1, 8):
            payload["points"][f"batch {batch}, seq {seq}"] = measure(folder, batch, seq, args.rounds, args.calls)
    from core.manifest import Manifest

    fused = Manifest.load(folder).artifacts["fused"].params
    payload["fused_ops"] = getattr(fused, "fused_ops", {})
    manifest = Manifest.load(folder)
    payload["ops_after_ort_load"] = {v: ops_after_load(folder / manifest.artifacts[v].file.path)
                                     for v in ("opt", "fused")}
    payload["verdicts"] = _verdicts(payload["points"], vnni)
    payload["load_avg_after"] = os.getloadavg()
    j, m = write("transformer_cpu" if name == "bert" else f"transformer_{name}_cpu", payload, _markdown(payload))
    print("\n".join(payload["verdicts"]))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
