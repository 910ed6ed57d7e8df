"""GPU benchmark (issue 4): eager FP32 vs FP16 vs BF16 autocast vs TorchScript, plus ONNX Runtime
(CUDA / TensorRT providers) and a TensorRT FP16 engine wherever those are installed, on one GPU.

    python benchmarks/run_gpu.py [--models resnet50,densenet121,vit_b_16] [--batch-sizes 1,8,32] [--iters 100]

Writes benchmarks/results/gpu_<GPU name>.{json,md}. The reference to compare with: the T4 study this
project grew from, as quoted in the project's issue 15 ("The study this project grew from measured, on a T4,
FP16 eager at 2.14x the FP32 throughput for ResNet-50 at batch 32 and 4.24x for ViT-B/16"; the issue does
not name the publication, so neither can we); the same ratios are computed here for this GPU. Weights are random (no download), which
does not change the timings. Exits with status 2 and one line when no CUDA GPU is visible.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, machine, write

#: FP16 / FP32 eager throughput at batch 32 on a T4: the figures issue 15 quotes from the study the project grew
#: from (not measured by this repository; shown beside this GPU's own ratios, never mixed with them).
T4_FP16_OVER_FP32 = {"resnet50": 2.14, "vit_b_16": 4.24}


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def ensure_converted(model: str, out: Path, engine_batch: int | None) -> Path:
    """Convert once; with ``engine_batch`` also build a TensorRT FP16 engine tuned for that batch."""
    from convert.config import ConvertConfig, EngineConfig, ExportConfig
    from convert.pipeline import run_convert
    from core.manifest import Manifest

    if (out / "manifest.json").is_file():
        have = Manifest.load(out).artifacts
        if engine_batch is None or "trt_fp16" in have:
            return out
    engine = EngineConfig(fp16=True, opt_batch=engine_batch, max_batch=engine_batch) if engine_batch else None
    run_convert(ConvertConfig(export=ExportConfig(model=model), out=out, engine=engine), log=print)
    return out


def ratio(records: list[Any], model: str, batch: int, num: str, den: str) -> float | None:
    """Throughput of eager at precision ``num`` over ``den`` at ``batch``."""
    tp = {r.precision: r.throughput for r in records
          if r.model == model and r.backend == "eager" and r.batch_size == batch}
    return tp[num] / tp[den] if num in tp and den in tp else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,densenet121,vit_b_16")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--cuda-graphs", action="store_true", help="eager: replay CUDA graphs")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_gpu"))
    args = ap.parse_args()

    from core.resources import cuda_problem
    from runtimes import RUNNERS
    from runtimes.harness import BenchConfig, run_bench

    if (why := cuda_problem()) is not None:
        print(f"error: this benchmark needs a CUDA GPU: {why}", file=sys.stderr)
        return 2
    import torch

    gpu = torch.cuda.get_device_name(0)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    torch_backends = [b for b, r in RUNNERS.items() if r.torch_like]
    optional = [b for b, r in RUNNERS.items() if not r.torch_like]  # ONNX Runtime and TensorRT, where installed
    extra = [b for b in optional if RUNNERS[b].available("cuda") is None]
    skipped = {b: RUNNERS[b].available("cuda") for b in optional if b not in extra}
    # A TensorRT FP16 engine is built for the backends that run plans themselves.
    plans = any("plan" in RUNNERS[b].artifact_kinds for b in extra)
    precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else [])
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "gpu": gpu, "machine": machine(),
                               "backends_skipped": skipped, "precisions": precisions, "models": {}}
    records: list[Any] = []
    for model in args.models.split(","):
        folder = ensure_converted(model, Path(args.work) / model, max(batches) if plans else None)
        variants = ["opt", *(["trt_fp16"] if plans else [])]
        cfg = BenchConfig(artifact_dir=folder, backends=[*torch_backends, *extra], variants=variants,
                          batch_sizes=batches, warmup=args.warmup, iters=args.iters, device="cuda",
                          precisions=precisions, accuracy_samples=32,
                          options={"cuda_graphs": True} if args.cuda_graphs else {})
        res = run_bench(cfg, log=print)
        records += res.records
        payload["models"][model] = res.model_dump(mode="json")

    big = max(batches)
    md = [f"# GPU benchmark: {gpu}\n", f"Command: `{payload['command']}`  ",
          f"Random-init weights, 224x224, warm-up {args.warmup}, {args.iters} timed iterations, CUDA-event timing; "
          f"inputs on the device (no host copies in the timed loop).\n",
          "| model | backend | variant | precision | batch | p50 ms | p99 ms | samples/s | peak MB | GPU % |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        md.append(f"| {r.model} | {r.backend} | {r.variant} | {r.precision} | {r.batch_size} | {r.latency_ms.p50:.3f} | "
                  f"{r.latency_ms.p99:.3f} | {r.throughput:.1f} | "
                  f"{'-' if r.vram_mb is None else f'{r.vram_mb:.0f}'} | "
                  f"{'-' if r.gpu_util is None else f'{r.gpu_util:.0f}'} |")
    md += ["", f"## Eager FP16 / FP32 throughput at batch {big}", "",
           f"| model | {gpu} | T4 (published) |", "|---|---|---|"]
    ratios: dict[str, Any] = {}
    for model in args.models.split(","):
        here = ratio(records, model, big, "fp16", "fp32")
        bf16 = ratio(records, model, big, "bf16", "fp32")
        ratios[model] = {"fp16_over_fp32": here, "bf16_over_fp32": bf16, "t4_fp16_over_fp32": T4_FP16_OVER_FP32.get(model)}
        t4 = T4_FP16_OVER_FP32.get(model)
        md.append(f"| {model} | {'-' if here is None else f'{here:.2f}x'} | {'-' if t4 is None else f'{t4:.2f}x'} |")
    payload["fp16_over_fp32_at_batch"] = {"batch": big, "ratios": ratios}
    if skipped:
        md += ["", "## Not measured here", *[f"- {b}: {why}" for b, why in skipped.items()]]
    j, m = write(f"gpu_{gpu_slug(gpu)}", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written: {j} {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
