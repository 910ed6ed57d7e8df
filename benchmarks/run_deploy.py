"""The fastest deployment on this CPU, found and proven (issues 17 and 32): what `tune` picks against what `bench`
measures and against OpenVINO's own `benchmark_app` with its defaults.

    python benchmarks/run_deploy.py [--models densenet121,resnet50,vit_b_16,transformer] [--batch-sizes 1,8]
        [--layouts qop_pc_u8] [--iters 10] [--rounds 5] [--tune-minutes 1] [--name NAME]

Per model, everything through ``cli.py`` (what users run), random-init weights:

1. ``convert`` once. Image models (224x224): ``--int8 --calib imagenet_subset`` (the built-in photos; convert keeps
   held-out photos apart from the calibration ones, by source photo) plus ``--int8-layouts`` (the main INT8 variant
   is QDQ per-channel u8; each layout named adds one variant). ``transformer``: the random-init 4-layer BERT of
   benchmarks/run_transformer.py (``hf:``, needs ``.[hf]``) bound at sequence 128, with ``--int8-dynamic`` (what ORT
   advises for transformers) and static ``--int8 --calib synthetic`` (random token ids: no text set is built in)
   with ``--int8-ops auto,all``: its MatMul-only file and, from the same ranges, the every-op-type one (1.18x faster
   for this BERT in benchmarks/results/int8_ops_cpu.md's bare-loop timing, both within the gate); tune times both.
   Every model also gets ``--int8-nncf`` (OpenVINO's own INT8, an IR only openvino runs, same calibration data and
   gate); where NNCF fails or its variant misses the gate, convert records it failed and the run goes on without it
   (the model's "not made" line).
2. ``bench`` of every variant but the unoptimized ``fp32`` export (ORT and OpenVINO optimize it at load as they do
   ``opt``) on eager, compile, ort and openvino, at every batch size, interleaved in rounds (p50 with its 95% interval),
   in fp32 and in every reduced precision the CPU probe offers (``calibration.cpu.native_precisions``: bf16 with
   AVX512_BF16/AMX-BF16, fp16 with AVX512-FP16/AMX-FP16; the ONNXKIT_CPU_PRECISIONS override is honoured and recorded);
   a backend without a switch for one says so in a skipped line. tune searches the same precisions by itself.
3. ``tune`` once per batch size over the same variants (``--tune-backends``, default ort,openvino: the backends
   ``package --from-tune`` deploys): latency objective at batch 1, throughput at larger batches. At one batch size
   both objectives rank alike; one run per batch is chosen over one throughput run over 1,8 because there every
   batch-1 candidate is compared per sample with batch 8, pruned after the first stage, and its pick rests on
   10 calls; here each batch's pick comes out of its own search. Accuracy budget: ``--budget`` (1 point).
4. Head-to-head per batch (benchmarks/deploy_h2h.py): tune's winner, its best FP32, INT8, bf16 and fp16 candidate
   (with tune's settings), every bench configuration within the budget (at bench's defaults), OpenVINO's own
   ``benchmark_app -hint latency -api sync`` on the FP32 file at its defaults (no precision pinned: bf16 on an AMX
   CPU; one benchmark_app process per round, its median the round's figure) and an FP32 1024^3 GEMM, all timed in the
   same interleaved rounds (``--h2h-iters`` calls each). The machine's speed drifts by far within
   minutes (the run of 2026-12-03: GEMM peak 322 GFLOP/s during bench, 209 after tune, and every configuration tune
   timed 1.4-1.9x slower than bench had), so the targets are read from these same-round figures only.
5. Targets per model and batch, each met, MISSED (with the likely reason) or not measured (with why: never a
   figure from inputs that were not measured). (a) tune's pick is the fastest: met unless a bench configuration is
   clearly faster (its whole p50 interval below the pick's: core.metrics.clearly_slower, the rule used everywhere);
   (a2) likewise against benchmark_app's row (issue 32). (b) the FP32 pick reaches >= 70% of the GEMM's rate (its
   best call in the same rounds, core.flops' peak definition) at batch 1, >= 85% at batch 8. (c) on a CPU with VNNI:
   FP32 pick p50 / INT8 pick p50 >= 1.5 at batch 1 and 8 (not applicable without VNNI). Issue 32, on a CPU with AMX
   (else not measured, with the probe's line): (d) for the CNNs (densenet121, resnet50) FP32 pick p50 / bf16 pick p50
   >= 3 at batch 1 and 8; (e) bf16 pick p50 / INT8 pick p50 >= 1.5 at batch 8 for the same two. (f) the bf16 and INT8
   picks' accuracy drops (tune's, on the held-out data; cosine for random init) within tune's default budget (1
   point), whatever ``--budget`` let tune search. The target functions are pure functions of the head-to-head's
   figures and a CPU record (tests/test_deploy_targets.py).

The bench tables' "% of peak" of FP32 rows uses the FP32 matmul peak by PyTorch, ONNX Runtime or OpenVINO
(core.flops), the highest of three measurements per model (before bench, in bench, after tune); other precisions'
rows, their own precision's peak measured in bench (INT8: core.flops.int8_matmul_peaks); the GEMM library of the
head-to-head is the fastest before bench.

Writes benchmarks/results/NAME.{json,md}. Results are per CPU: the CPU is its model name and its ISA flags (AVX2,
AVX-512, VNNI, AMX, FP16; ``cpu_identity``). ``--name`` defaults to deploy_cpu when this CPU is the one deploy_cpu.json
was measured on (an Intel Xeon with AMX) or that file does not exist, else to deploy_cpu_<model>, e.g.
deploy_cpu_amd_epyc (``default_name``). A run refuses, before measuring anything, to write over a results file of
another CPU, and ``--merge`` refuses to mix CPUs (a smoke run: any other name, e.g. deploy_smoke, deleted after). Time,
measured on 2 cores before issue 32: all four models 45 minutes (2706 s), vit_b_16 about 31 of them (its batch-8
tune 17: 70 candidates at 1-5 s a call, screened with 3 calls each, in memory-sized chunks); each phase's seconds are
recorded. Issue 32 adds the int8_nncf conversions (minutes per model, once: the folders are reused), bf16/fp16 rows
and candidates where the CPU has them (about half again the bench and tune time), and ``--rounds`` benchmark_app
processes per head-to-head (a few seconds each). To shrink: --models densenet121,resnet50,transformer, --iters 5,
--backends ort,openvino (no eager/compile rows: target (a) then checks only the deployable backends), --layouts ''.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, ensure_converted, machine, write
from benchmarks.deploy_h2h import head_to_head

if TYPE_CHECKING:
    from core.metrics import LatencyStats
    from reports.models import BenchRecord, BenchResults
    from runtimes.tune import Candidate, TuneResult

TRANSFORMER = "transformer"
SEQUENCE = 128
#: the BERT's inputs bound at SEQUENCE, and its static INT8 calibrated on random token ids (no text set is built in);
#: run_centered_cosine and run_int8_ops convert the same model with BERT_FLAGS
BERT_SHAPE = ["--input-shape", ",".join(f"{n}:1x{SEQUENCE}" for n in ("input_ids", "attention_mask", "token_type_ids"))]
BERT_CALIB = ["--calib", "synthetic", "--calib-size", "32"]
BERT_FLAGS = [*BERT_SHAPE, *BERT_CALIB]
PEAK_TARGET = {1: 0.70, 8: 0.85}
INT8_TARGET = 1.5
INT8_TARGET_BATCHES = (1, 8)
#: issue 32, on a CPU with AMX: bf16 pick vs FP32 pick, INT8 pick vs bf16 pick, for the CNNs
AMX_MODELS = ("densenet121", "resnet50")
BF16_TARGET = 3.0
BF16_TARGET_BATCHES = (1, 8)
INT8_BF16_TARGET = 1.5
INT8_BF16_TARGET_BATCHES = (8,)
#: the picks timed in the head-to-head besides tune's winner: precision -> role
PICKS = {"fp32": "fp32 pick", "int8": "int8 pick", "bf16": "bf16 pick", "fp16": "fp16 pick"}
#: the ISA flags that tell two CPUs of one model name apart (a VM may name every Xeon "Intel(R) Xeon(R) Processor")
IDENTITY_FLAGS = ("avx2", "avx512", "vnni", "amx", "fp16_arith")
DEFAULT_NAME = "deploy_cpu"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=f"densenet121,resnet50,vit_b_16,{TRANSFORMER}",
                    help=f"torchvision names, and {TRANSFORMER} (the random-init BERT of run_transformer.py)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--layouts", default="qop_pc_u8", help="image models: --int8-layouts (all four: qdq_pt_u8,"
                                                           "qdq_pc_s8,qop_pc_u8,qop_pt_u8; '' for none)")
    ap.add_argument("--backends", default="eager,compile,ort,openvino", help="bench backends")
    ap.add_argument("--tune-backends", default="ort,openvino")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="bench timed calls per target and batch")
    ap.add_argument("--rounds", type=int, default=5, help="bench and head-to-head interleaved rounds")
    ap.add_argument("--h2h-iters", type=int, default=15, help="head-to-head timed calls per configuration")
    ap.add_argument("--tune-minutes", type=float, default=1.0, help="tune --max-minutes per batch size (its first "
                                                                     "stage always runs)")
    ap.add_argument("--budget", type=float, default=1.0, help="accuracy budget, points")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench_deploy"))
    ap.add_argument("--name", default=None, help="results name (default: deploy_cpu on the CPU deploy_cpu.json was "
                                                   "measured on, else deploy_cpu_<cpu>; a smoke run: e.g. deploy_smoke)")
    ap.add_argument("--merge", action="store_true", help="keep the sections of models not named in --models from "
                                                          "the existing NAME.json (each marked with its own run)")
    return ap.parse_args()


def _native() -> tuple[str, ...]:
    """fp32 and the reduced precisions the CPU probe offers (ONNXKIT_CPU_PRECISIONS overrides it)."""
    from calibration.cpu import native_precisions

    return native_precisions()


def cpu_record() -> dict[str, Any]:
    """What the issue-32 targets need to know about this CPU: the probe's summary and the flags, the precisions it
    offers, and the override if one is set (a pure-function input: tests build their own)."""
    from calibration.cpu import PRECISION_ENV, cpu_features, precision_problem

    f = cpu_features()
    return {"summary": f.summary, "isa": f.isa, "vnni": f.vnni, "amx_bf16": f.amx_bf16, "amx_int8": f.amx,
            "native": list(_native()), "override": os.environ.get(PRECISION_ENV),
            "problems": {p: why for p in ("bf16", "fp16") if (why := precision_problem(p)) is not None}}


def cpu_identity(machine: dict[str, Any]) -> str:
    """A results file's CPU: its model name and the ISA flags that decide these figures, e.g.
    "AMD EPYC (avx2)" or "Intel(R) Xeon(R) Processor (avx2, avx512, vnni, amx, fp16_arith)"."""
    flags = machine.get("cpu_flags") or {}
    return f"{machine.get('cpu_model') or flags.get('model') or 'unknown CPU'} " \
           f"({', '.join(k for k in IDENTITY_FLAGS if flags.get(k)) or 'no wide SIMD'})"


def cpu_slug(model: str) -> str:
    """"AMD EPYC 7B13" -> "amd_epyc_7b13"; "Intel(R) Xeon(R) Processor" -> "intel_xeon" (trademarks, "processor",
    "cpu" and clock speeds dropped, at most four words)."""
    import re

    words = re.sub(r"\((r|tm)\)|@.*$", " ", model.lower()).split()
    words = [re.sub(r"[^a-z0-9]", "", w) for w in words if w not in ("processor", "cpu")]
    return "_".join([w for w in words if w][:4]) or "unknown"


def default_name(machine: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    """deploy_cpu when ``recorded`` (deploy_cpu.json's machine record) is None or of this CPU, else deploy_cpu_<slug>."""
    if recorded is None or cpu_identity(recorded) == cpu_identity(machine):
        return DEFAULT_NAME
    return f"{DEFAULT_NAME}_{cpu_slug(str(machine.get('cpu_model') or 'unknown'))}"


def cpu_clash(machine: dict[str, Any], existing: dict[str, Any] | None, name: str) -> str | None:
    """None when ``name``'s results file (``existing``: its machine record, None when absent) is of this CPU, else the
    one line that refuses to write over or merge into it."""
    if existing is None or cpu_identity(existing) == cpu_identity(machine):
        return None
    return (f"benchmarks/results/{name}.json was measured on {cpu_identity(existing)}, this CPU is "
            f"{cpu_identity(machine)}: results of two CPUs are never mixed; run without --name (default "
            f"{default_name(machine, existing if name == DEFAULT_NAME else None)}) or give another one")


def _cli(*args: str) -> float:
    """One ``cli.py`` command, its output streamed to this terminal; the seconds it took."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _convert(model: str, args: argparse.Namespace) -> tuple[Path, list[str], float]:
    """(artifact folder, convert flags, seconds: 0 when an earlier run's folder with the same flags was reused)."""
    work = Path(args.work)
    if model == TRANSFORMER:
        from benchmarks.run_transformer import _bert_folder

        src = _bert_folder(work / TRANSFORMER, "small")
        flags = [*BERT_SHAPE, "--int8-dynamic", "--int8", "--int8-ops", "auto,all", "--int8-nncf", *BERT_CALIB]
    else:
        src = model
        flags = ["--int8", "--int8-nncf", "--calib", "imagenet_subset",
                 *(["--int8-layouts", args.layouts] if args.layouts else [])]
    key = hashlib.sha256(" ".join([src, *flags]).encode()).hexdigest()[:8]
    t0 = time.perf_counter()
    folder = ensure_converted(src, work / f"{model}-{key}", flags)
    return folder, flags, time.perf_counter() - t0


def _variants(folder: Path) -> list[str]:
    """The ONNX variants but ``fp32`` and the OpenVINO IRs (int8_nncf) that were made and passed their gate."""
    from core.manifest import Manifest

    return [a.name for a in Manifest.load(folder).artifacts.values()
            if a.kind in ("onnx", "openvino_ir") and a.status == "ok" and a.name != "fp32"]


def _bench(folder: Path, variants: list[str], args: argparse.Namespace) -> tuple[BenchResults, float]:
    from reports.models import BenchResults

    out = folder / "deploy" / "results.json"
    secs = _cli("bench", str(folder), "--device", "cpu", "--backends", args.backends, "--batch-sizes", args.batch_sizes,
                "--variants", ",".join(variants), "--warmup", str(args.warmup), "--iters", str(args.iters),
                "--rounds", str(args.rounds), "--precisions", ",".join(_native()), "--out", str(out))
    return BenchResults.load(out), secs


def _tune(folder: Path, variants: list[str], batch: int, args: argparse.Namespace) -> tuple[TuneResult, float]:
    from runtimes.tune import TuneResult

    out = folder / "deploy" / f"tune_b{batch}.json"
    secs = _cli("tune", str(folder), "--backends", args.tune_backends, "--variants", ",".join(variants),
                "--batch-sizes", str(batch), "--objective", "latency" if batch == 1 else "throughput",
                "--accuracy-budget", str(args.budget), "--max-minutes", str(args.tune_minutes), "--out", str(out))
    return TuneResult.model_validate_json(out.read_text(encoding="utf-8")), secs


def _drop(r: BenchRecord, random_init: bool) -> float:
    """Accuracy drop in points on tune's basis (core.metrics.accuracy_drop); the eager reference: 0."""
    from core.metrics import accuracy_drop

    return 0.0 if r.accuracy is None else accuracy_drop(r.accuracy, random_init)[0]


def _peaks() -> dict[str, float]:
    """This machine's FP32 GEMM rate by library (core.flops: the best of 16 1024^3 products each), measured
    afresh. Load from other processes only lowers it, so the run takes the highest of several measurements."""
    from core.flops import matmul_peaks

    matmul_peaks.cache_clear()
    return {k: round(v, 1) for k, v in matmul_peaks().items()}


def _row(r: BenchRecord, random_init: bool, peak: float) -> dict[str, Any]:
    lat = r.latency_ms
    lo, hi = lat.p50_interval or (lat.p50, lat.p50)
    frac = (None if not r.gflop else round(r.gflop / (lat.p50 / 1e3) / peak, 4)) if r.precision == "fp32" else (
        None if r.peak_fraction is None else round(r.peak_fraction, 4))  # other precisions: their own peak's, in bench
    return {"backend": r.backend, "variant": r.variant, "precision": r.precision, "batch": r.batch_size,
            "p50_ms": round(lat.p50, 3), "p50_interval_ms": [round(lo, 3), round(hi, 3)],
            "samples_per_s": round(r.throughput, 2), "gflop": r.gflop, "peak_fraction": frac,
            "bench_peak_fraction": None if r.peak_fraction is None else round(r.peak_fraction, 4),
            "bench_peak_basis": r.peak_basis,
            "accuracy_drop_points": _drop(r, random_init), "compile_s": r.extra.get("compile_s")}


def _ms(lat: Any) -> str:
    lo, hi = lat.p50_interval or (lat.p50, lat.p50)
    return f"{lat.p50:.2f} ms [{lo:.2f}-{hi:.2f}]"


def _pick(result: TuneResult, batch: int, precision: str | None = None) -> Candidate | None:
    """tune's winner (``precision`` None), or its best candidate of that precision at ``batch`` (best_per_precision:
    the one that lasted longest in the search, then the lowest p50; re-timed with the winner in tune's final stage
    if it was pruned early)."""
    label = result.winner if precision is None else result.best_per_precision.get(str(batch), {}).get(precision)
    return next((c for c in result.candidates if c.label == label and c.batch_size == batch), None)


def _lat(row: dict[str, Any]) -> LatencyStats:
    from core.metrics import LatencyStats

    return LatencyStats.model_validate(row["latency_ms"])


def _role(h2h: dict[str, Any], role: str) -> dict[str, Any] | None:
    return next((r for r in h2h["rows"] if role in r["roles"]), None)


def _target_fastest(h2h: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """(a) on the head-to-head's figures: no bench configuration clearly faster than tune's winner."""
    from core.metrics import clearly_slower

    out: dict[str, Any] = {"target": "tune's pick is the fastest (no bench configuration clearly faster, same rounds)",
                           "reason": None}
    pick, bench = _role(h2h, "winner"), [r for r in h2h["rows"] if "bench" in r["roles"]]
    if pick is None or not bench:
        return out | {"verdict": "MISSED", "figures": "no pick or no bench configuration",
                      "reason": "tune or bench measured nothing at this batch"}
    fastest = min(bench, key=lambda r: _lat(r).p50)
    faster = [r for r in bench if r is not pick and clearly_slower(_lat(pick), _lat(r))]
    figures = (f"pick {pick['config']}: {_ms(_lat(pick))}; fastest bench configuration {fastest['config']}: "
               f"{_ms(_lat(fastest))}")
    if not faster:
        return out | {"verdict": "met", "figures": figures}
    r = min(faster, key=lambda x: _lat(x).p50)
    reason = (f"tune does not search {r['backend']} (--tune-backends {args.tune_backends})"
              if r["backend"] not in args.tune_backends.split(",") else
              f"tune timed {r['backend']}:{r['variant']} and ranked it lower: its stages' intervals overlapped, or "
              "the machine's speed drifted within them")
    return out | {"verdict": "MISSED", "figures": f"{figures}; clearly faster: {r['config']} {_ms(_lat(r))}",
                  "reason": reason}


def _target_peak(h2h: dict[str, Any], batch: int, load: float) -> dict[str, Any]:
    """(b) the FP32 pick's GFLOP/s over the GEMM's best call, both in the head-to-head's rounds."""
    goal = PEAK_TARGET.get(batch)
    out: dict[str, Any] = {"target": f"FP32 pick >= {goal:.0%} of the FP32 GEMM peak (same rounds)" if goal else
                           "FP32 pick's fraction of the FP32 GEMM peak (no target at this batch)", "reason": None}
    fp32, gemm = _role(h2h, "fp32 pick"), h2h["gemm"]
    if fp32 is None:
        return out | {"verdict": "MISSED" if goal else "-", "figures": "no FP32 pick",
                      "reason": "tune measured no FP32 candidate"}
    if fp32["peak_fraction"] is None:
        return out | {"verdict": NOT_MEASURED if goal else "-", "figures": f"{fp32['config']}: no GFLOP count",
                      "reason": "core.flops could not count all of the model's arithmetic on any of its FP32 files "
                                "(bench's row for it says which ops)"}
    frac, p50 = fp32["peak_fraction"], _lat(fp32).p50
    out["figures"] = (f"{fp32['config']}: {fp32['gflop']:.2f} GFLOP in {p50:.2f} ms = {fp32['gflop'] / p50 * 1e3:.1f} "
                      f"GFLOP/s, {frac:.0%} of the {gemm['library']} GEMM's {gemm['peak_gflops']:.1f} GFLOP/s "
                      f"(its best call; at its p50 {gemm['p50_gflops']:.1f})")
    out["fraction"] = frac
    if goal is None:
        return out | {"verdict": "-"}
    if frac >= goal:
        return out | {"verdict": "met"}
    why = ("one sample makes thin GEMMs (few output pixels or tokens per layer), which 2 threads split further; the "
           "peak is a 1024^3 GEMM with full cache reuse" if batch == 1 else
           "the memory-bound ops between the GEMMs (normalization, concat, activations, layout reorders) take time "
           "the GEMM peak does not count")
    busy = f" (1-min load {load:.1f} on {os.cpu_count()} cores: other processes shared the CPU)" \
        if load > 0.5 * (os.cpu_count() or 1) else ""
    return out | {"verdict": "MISSED", "reason": f"likely: {why}{busy}"}


def _target_int8(h2h: dict[str, Any], batch: int, vnni: bool) -> dict[str, Any]:
    """(c) FP32 pick p50 / INT8 pick p50, both in the head-to-head's rounds."""
    out: dict[str, Any] = {"target": f"INT8 pick >= {INT8_TARGET}x the FP32 pick (CPU with VNNI; same rounds)",
                           "reason": None}
    if batch not in INT8_TARGET_BATCHES:
        return out | {"verdict": "-", "figures": "no target at this batch"}
    if not vnni:
        return out | {"verdict": "not applicable", "figures": "this CPU has no VNNI"}
    fp32, int8 = _role(h2h, "fp32 pick"), _role(h2h, "int8 pick")
    if fp32 is None or int8 is None:
        return out | {"verdict": "MISSED", "figures": "no INT8 or no FP32 candidate timed",
                      "reason": "no INT8 variant within the accuracy budget (or none could run)"
                                + (_gate_failures(h2h) if int8 is None else "")}
    ratio = _lat(fp32).p50 / _lat(int8).p50
    out["figures"] = f"{ratio:.2f}x: FP32 {fp32['config']} {_ms(_lat(fp32))}, INT8 {int8['config']} {_ms(_lat(int8))}"
    out["ratio"] = round(ratio, 3)
    if ratio >= INT8_TARGET:
        return out | {"verdict": "met"}
    why = ("INT8 is slower: the quantize/dequantize steps and FP32 islands cost more than the int8 kernels save"
           if ratio < 1 else "only the Conv/MatMul work runs at VNNI's int8 rate; activation quantization and "
           "the memory-bound ops between the GEMMs do not shrink")
    return out | {"verdict": "MISSED", "reason": f"likely: {why}"}


NOT_MEASURED = "not measured"


def _gate_failures(h2h: dict[str, Any]) -> str:
    """The INT8 variants that failed convert's gate, with its line (``int8_gate_failed``, beside ``tune_untimed``),
    for a target that found no INT8 pick; empty when none failed (or the record predates the field)."""
    failed = h2h.get("int8_gate_failed") or []
    return f"; failed convert's gate: {'; '.join(failed)}" if failed else ""


def _not_measured(out: dict[str, Any], why: str) -> dict[str, Any]:
    return out | {"verdict": NOT_MEASURED, "figures": "-", "reason": why}


def target_default(h2h: dict[str, Any]) -> dict[str, Any]:
    """(a2) tune's pick not clearly slower than OpenVINO's benchmark_app at its defaults on the FP32 file, same
    rounds."""
    from core.metrics import clearly_slower

    out: dict[str, Any] = {"target": "tune's pick at least as fast as benchmark_app -hint latency on the FP32 file "
                                     "(OpenVINO's defaults; same rounds, within the noise)", "reason": None}
    tool, pick = _role(h2h, "benchmark_app default"), _role(h2h, "winner")
    if tool is None:
        return _not_measured(out, f"benchmark_app did not run: {h2h.get('benchmark_app', {}).get('error', 'not timed')}")
    if pick is None:
        return out | {"verdict": "MISSED", "figures": f"benchmark_app {_ms(_lat(tool))}; no pick",
                      "reason": "tune measured nothing at this batch"}
    figures = f"pick {pick['config']}: {_ms(_lat(pick))}; {tool['config']}: {_ms(_lat(tool))}"
    if not clearly_slower(_lat(pick), _lat(tool)):
        return out | {"verdict": "met", "figures": figures}
    reduced = tool["precision"] in ("bf16", "fp16")
    why = (f"benchmark_app computes in {tool['precision']} (OpenVINO's default on this CPU) and tune had no "
           f"{tool['precision']} candidate within the budget" if reduced and _role(h2h, f"{tool['precision']} pick")
           is None else "benchmark_app compiles the batch's fixed shape (-shape) and picks its own streams and "
           "threads; the runners compile the file's dynamic batch")
    return out | {"verdict": "MISSED", "figures": figures, "reason": f"likely: {why}"}


def _amx_gate(out: dict[str, Any], cpu: dict[str, Any], *units: str) -> dict[str, Any] | None:
    """The not-measured row when the CPU lacks an AMX unit named in ``units`` (amx_bf16, amx_int8), else None."""
    lacks = [{"amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}[u] for u in units if not cpu.get(u)]
    if lacks:
        return _not_measured(out, f"CPU has no {'/'.join(lacks)} (probe: {cpu['summary']})")
    return None


def untimed(candidates: list[Candidate], batch: int) -> dict[str, dict[str, Any]]:
    """Per precision that tune has candidates of at ``batch`` but timed none: the smallest drop of those over the
    budget (None if none was) and the first skip line (None if none was skipped)."""
    out = {}
    for p in sorted({c.precision for c in candidates if c.batch_size == batch}):
        mine = [c for c in candidates if c.batch_size == batch and c.precision == p]
        if any(c.latency_ms is not None for c in mine):
            continue
        over = [c.accuracy_drop_points for c in mine if not c.within_budget and c.accuracy_drop_points is not None]
        out[p] = {"over_budget_drop": min(over) if over else None,
                  "skipped": next((c.skipped for c in mine if c.skipped), None)}
    return out


def _missing_pick(out: dict[str, Any], cpu: dict[str, Any], precision: str, h2h: dict[str, Any]) -> dict[str, Any]:
    """No ``precision`` pick in the head-to-head: not measured when the probe did not offer the precision or tune
    could run none of its candidates (their skip line); MISSED when they were over the accuracy budget or tune had
    none at all."""
    if precision in ("bf16", "fp16") and precision not in cpu["native"]:
        why = cpu["problems"].get(precision) or f"{precision} not offered by the probe"
        override = f"; ONNXKIT_CPU_PRECISIONS={cpu['override']!r}" if cpu.get("override") is not None else ""
        return _not_measured(out, f"no {precision} candidate: {why}{override}")
    info = h2h.get("tune_untimed", {}).get(precision, {})
    if info.get("over_budget_drop") is not None:
        return out | {"verdict": "MISSED", "figures": f"smallest {precision} drop {info['over_budget_drop']:.3f} points",
                      "reason": f"every {precision} candidate was over tune's accuracy budget"}
    if info.get("skipped"):
        return _not_measured(out, f"tune could run no {precision} candidate: {info['skipped']}")
    return out | {"verdict": "MISSED", "figures": f"no {precision} pick timed",
                  "reason": f"tune had no {precision} candidate (no such variant, or none within the budget)"
                            + (_gate_failures(h2h) if precision == "int8" else "")}


def target_bf16(h2h: dict[str, Any], batch: int, cpu: dict[str, Any]) -> dict[str, Any]:
    """(d) on an AMX CPU: FP32 pick p50 / bf16 pick p50 >= BF16_TARGET, same rounds."""
    out: dict[str, Any] = {"target": f"bf16 pick >= {BF16_TARGET:g}x the FP32 pick (CPU with AMX; same rounds)",
                           "reason": None}
    if (skip := _amx_gate(out, cpu, "amx_bf16")) is not None:
        return skip
    fp32, bf16 = _role(h2h, "fp32 pick"), _role(h2h, "bf16 pick")
    if bf16 is None:
        return _missing_pick(out, cpu, "bf16", h2h)
    if fp32 is None:
        return out | {"verdict": "MISSED", "figures": "no FP32 pick timed", "reason": "tune timed no FP32 candidate"}
    ratio = _lat(fp32).p50 / _lat(bf16).p50
    out |= {"figures": f"{ratio:.2f}x: FP32 {fp32['config']} {_ms(_lat(fp32))}, bf16 {bf16['config']} "
                       f"{_ms(_lat(bf16))}", "ratio": round(ratio, 3)}
    if ratio >= BF16_TARGET:
        return out | {"verdict": "met"}
    why = ("bf16 is not faster: the backend likely computed in f32 (check OpenVINO's reported precision)" if ratio < 1.2
           else "AMX speeds the convolutions/GEMMs only; the memory-bound ops between them (normalization, concat, "
                "activations, reorders) and at batch 1 the thin GEMMs do not scale with it")
    return out | {"verdict": "MISSED", "reason": f"likely: {why}"}


def target_int8_bf16(h2h: dict[str, Any], batch: int, cpu: dict[str, Any]) -> dict[str, Any]:
    """(e) on an AMX CPU: bf16 pick p50 / INT8 pick p50 >= INT8_BF16_TARGET, same rounds."""
    out: dict[str, Any] = {"target": f"INT8 pick >= {INT8_BF16_TARGET:g}x the bf16 pick (CPU with AMX; same rounds)",
                           "reason": None}
    if (skip := _amx_gate(out, cpu, "amx_bf16", "amx_int8")) is not None:
        return skip
    bf16, int8 = _role(h2h, "bf16 pick"), _role(h2h, "int8 pick")
    if bf16 is None:
        return _missing_pick(out, cpu, "bf16", h2h)
    if int8 is None:
        return _missing_pick(out, cpu, "int8", h2h)
    ratio = _lat(bf16).p50 / _lat(int8).p50
    out |= {"figures": f"{ratio:.2f}x: bf16 {bf16['config']} {_ms(_lat(bf16))}, INT8 {int8['config']} "
                       f"{_ms(_lat(int8))}", "ratio": round(ratio, 3)}
    if ratio >= INT8_BF16_TARGET:
        return out | {"verdict": "met"}
    why = ("the INT8 file keeps FP32/bf16 islands and quantize steps (QDQ not fused on OpenVINO, e.g. densenet's "
           "concat), so AMX-INT8 covers less of the model than AMX-BF16 does")
    return out | {"verdict": "MISSED", "reason": f"likely: {why}"}


def target_accuracy(h2h: dict[str, Any], precision: str, cpu: dict[str, Any], budget: float) -> dict[str, Any]:
    """(f) the ``precision`` pick's accuracy drop (tune's, held-out data) within ``budget`` (tune's default)."""
    out: dict[str, Any] = {"target": f"{precision} pick's accuracy drop within the default budget ({budget:g} point)",
                           "reason": None}
    pick = _role(h2h, f"{precision} pick")
    if pick is None:
        return _missing_pick(out, cpu, precision, h2h)
    drop = pick.get("accuracy_drop_points")
    if drop is None:
        return _not_measured(out, f"tune recorded no accuracy for {pick['config']}")
    out |= {"figures": f"{pick['config']}: drop {drop:.3f} points", "drop": drop}
    if drop <= budget + 1e-9:
        return out | {"verdict": "met"}
    return out | {"verdict": "MISSED", "reason": f"likely: tune searched with a larger --budget than the default "
                                                 f"{budget:g}, and this {precision} candidate was the fastest in it"}


def _targets(model: str, h2hs: dict[int, dict[str, Any]], args: argparse.Namespace, cpu: dict[str, Any],
             load: float) -> list[dict[str, Any]]:
    from runtimes.tune import TuneConfig

    default_budget = float(TuneConfig.model_fields["accuracy_budget"].default)
    out = []
    for b, h2h in h2hs.items():
        rows = [_target_fastest(h2h, args), target_default(h2h), _target_peak(h2h, b, load),
                _target_int8(h2h, b, cpu["vnni"])]
        if model in AMX_MODELS and b in BF16_TARGET_BATCHES:
            rows.append(target_bf16(h2h, b, cpu))
        if model in AMX_MODELS and b in INT8_BF16_TARGET_BATCHES:
            rows.append(target_int8_bf16(h2h, b, cpu))
        rows += [target_accuracy(h2h, p, cpu, default_budget) for p in ("bf16", "int8")]
        out += [{"model": model, "batch": b, **t} for t in rows]
    return out


def _tune_summary(result: TuneResult, batch: int, secs: float) -> dict[str, Any]:
    def label(c: Candidate | None) -> str | None:
        return None if c is None or c.latency_ms is None else f"{c.label}: {_ms(c.latency_ms)}"

    return {"objective": result.config.get("objective"), "winner": label(_pick(result, batch)), "reason": result.reason,
            "best_per_batch": result.best_per_batch, "stages_run": result.stages_run, "seconds": round(secs, 1),
            "final_stage": result.final_stage,
            **{f"{p}_pick": label(_pick(result, batch, p)) for p in PICKS},
            "candidates": len(result.candidates), "timed": sum(c.latency_ms is not None for c in result.candidates)}


def _model(model: str, args: argparse.Namespace, cpu: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Convert, bench, tune one model; (its entry, its targets)."""
    from core.manifest import Manifest
    from core.metrics import accuracy_drop
    from core.models import is_random_init

    entry: dict[str, Any] = {"load_avg_before": os.getloadavg()}
    folder, flags, entry["convert_s"] = _convert(model, args)
    variants = _variants(folder)
    manifest = Manifest.load(folder)
    random_init = is_random_init(manifest.source)
    entry |= {"artifact_dir": str(folder), "convert_flags": flags, "variants": variants,
              "not_made": [f"{f.name}: {f.reason}" for f in manifest.failed_variants],
              "int8_gate_failed": [f"{a.name} {a.metrics.gate.reason}" for a in manifest.artifacts.values()
                                   if a.precision == "int8" and a.metrics.gate is not None
                                   and a.metrics.gate.passed is False]}
    peaks = {"before bench": _peaks()}
    bench, entry["bench_s"] = _bench(folder, variants, args)
    checked = [r.accuracy for r in bench.records if r.accuracy is not None]
    entry["accuracy_basis"] = accuracy_drop(checked[0], random_init)[1] if checked else "-"
    tunes, entry["tune"] = {}, {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        tunes[b], secs = _tune(folder, variants, b, args)
        entry["tune"][str(b)] = _tune_summary(tunes[b], b, secs)
    peaks |= {"in bench": bench.machine.get("matmul_peaks_gflops") or {}, "after tune": _peaks()}
    gemm = max(peaks["before bench"], key=lambda lib: peaks["before bench"][lib])
    entry["head_to_head"] = {}
    for b, result in tunes.items():
        picks = {"winner": _pick(result, b), **{role: _pick(result, b, p) for p, role in PICKS.items()}}
        records = [r for r in bench.records if r.batch_size == b]
        entry["head_to_head"][str(b)] = head_to_head(
            folder, variants, b, picks, records, lambda r: _drop(r, random_init), args.budget, gemm,
            args.h2h_iters, args.rounds) | {"tune_untimed": untimed(result.candidates, b),
                                            "int8_gate_failed": entry["int8_gate_failed"]}
    peak = entry["matmul_peak_gflops"] = max(v for by_lib in peaks.values() for v in by_lib.values())
    entry |= {"peak_measurements_gflops": peaks, "warnings": bench.warnings,
              "rows": [_row(r, random_init, peak) for r in sorted(bench.records,
                                                                  key=lambda r: (r.batch_size, r.latency_ms.p50))]}
    return entry, _targets(model, {int(b): h for b, h in entry["head_to_head"].items()}, args, cpu,
                           entry["load_avg_before"][0])


def _model_md(model: str, e: dict[str, Any]) -> list[str]:
    if "error" in e:
        return [f"## {model}", "", f"Not measured: {e['error']}", ""]
    peak = e["matmul_peak_gflops"]
    lines = [f"## {model}", "", f"convert `{' '.join(e['convert_flags'])}` ({e['convert_s']:.0f} s; 0 = reused); "
             f"bench {e['bench_s']:.0f} s; variants {', '.join(e['variants'])}; accuracy drop basis: "
             f"{e['accuracy_basis']}; FP32 matmul peak {peak:.1f} GFLOP/s (the best of "
             + "; ".join(f"{when}: " + ", ".join(f"{lib} {v:.0f}" for lib, v in by_lib.items())
                         for when, by_lib in e["peak_measurements_gflops"].items())
             + f"); 1-min load before {e['load_avg_before'][0]:.2f}."
             + (f" Measured in another run: `{e['run']['command']}` ({e['run']['date']})." if "run" in e else ""), "",
             "| batch | backend | variant | precision | p50 ms | 95% interval | samples/s | % of peak | drop pts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in e["rows"]:
        frac, drop = r["peak_fraction"], r["accuracy_drop_points"]
        lines.append(f"| {r['batch']} | {r['backend']} | {r['variant']} | {r.get('precision', 'fp32')} | "
                     f"{r['p50_ms']:.2f} | "
                     f"{r['p50_interval_ms'][0]:.2f}-{r['p50_interval_ms'][1]:.2f} | {r['samples_per_s']:.1f} | "
                     f"{'' if frac is None else f'{100 * frac:.0f}%'} | {'' if drop is None else f'{drop:.3f}'} |")
    lines += ["", *[f"- not made: {n}" for n in e.get("not_made", [])],
              *[f"- failed convert's gate (not benched): {n}" for n in e.get("int8_gate_failed", [])],
              *[f"- skipped in bench: {w}" for w in e["warnings"]]]
    for b, t in e["tune"].items():
        lines.append(f"- tune at batch {b} ({t['objective']}, {t['timed']}/{t['candidates']} candidates timed, "
                     f"{t['stages_run']} stage(s){_final(t)}, {t['seconds']:.0f} s): winner {t['winner']}; "
                     + "; ".join(f"{p} pick {t.get(f'{p}_pick')}" for p in PICKS if f"{p}_pick" in t)
                     + f"; {t['reason']}")
    for b, h in e.get("head_to_head", {}).items():
        lines += _h2h_md(b, h)
    return [*lines, ""]


def _h2h_md(batch: str, h: dict[str, Any]) -> list[str]:
    g = h["gemm"]
    lines = ["", f"Head-to-head at batch {batch} ({h['seconds']:.0f} s; {h['iters']} calls each in {h['rounds']} "
             f"interleaved rounds; the {g['library']} {g['n']}^3 FP32 GEMM in the same rounds: {g['peak_gflops']:.1f} "
             f"GFLOP/s at its best call, {g['p50_gflops']:.1f} at its p50; settings: those not at RunnerOptions' "
             "defaults):", "", "| configuration | role | p50 ms | 95% interval | % of GEMM peak |", "|---|---|---|---|---|"]
    for r in h["rows"]:
        lo, hi = r["latency_ms"]["p50_interval"] or (r["latency_ms"]["p50"],) * 2
        frac = r["peak_fraction"]
        lines.append(f"| {r['config']} | {', '.join(r['roles'])} | {r['latency_ms']['p50']:.2f} | {lo:.2f}-{hi:.2f} | "
                     f"{'' if frac is None else f'{100 * frac:.0f}%'} |")
    tool = h.get("benchmark_app")
    if tool is not None:
        row = next((r for r in h["rows"] if r["backend"] == "benchmark_app"), None)
        lines += ["", f"benchmark_app: not timed ({tool['error']})" if "error" in tool else
                  f"benchmark_app: `{row['benchmark_app']['command'] if row else ''}` on {tool['shape']}, one "
                  f"process per round (its median per round; reported settings: "
                  f"{row['benchmark_app']['settings'] if row else {}})"]
    return [*lines, ""]


def _final(t: dict[str, Any]) -> str:
    """How many candidates tune's final stage re-timed with the winner (absent: measured before it existed)."""
    if "final_stage" not in t:
        return "; no final stage (an earlier tune)"
    return f" + a final stage re-timing {len(t['final_stage'])} side by side" if t["final_stage"] else ""


def _markdown(p: dict[str, Any]) -> str:
    m = p["machine"]
    lines = ["# The fastest deployment on this CPU: tune's pick against every bench row", "",
             f"Command: `{p['command']}`", "",
             f"CPU: {m['cpu_model']}, {m['cpu_count']} cores ({p['cpu_summary']}); 1-min load average before "
             f"{p['load_avg_before'][0]:.2f}, after {p['load_avg_after'][0]:.2f} (above about 2, this run's own "
             f"threads, other processes shared the CPU); {p['seconds']:.0f} s in all. Random-init weights. bench: "
             f"{p['config']['iters']} timed calls per target and batch in {min(p['config']['rounds'], p['config']['iters'])} "
             "interleaved rounds; p50 with the 95% bootstrap interval of the per-round p50s. % of peak: GFLOP per "
             "call / p50 over the FP32 matrix-multiply peak (the fastest 1024^3 product by PyTorch, ONNX Runtime or "
             "OpenVINO over the model's measurements: load only lowers it); INT8 rows over bench's INT8 matrix-multiply peak "
             "(core.flops.int8_matmul_peaks). tune: one search per batch "
             f"size over {p['config']['tune_backends']}, accuracy budget {p['config']['budget']:g} point(s). "
             + (f"Precisions offered by the CPU probe: {', '.join(p['cpu']['native'])}"
                + (f" (ONNXKIT_CPU_PRECISIONS={p['cpu']['override']!r})" if p['cpu'].get('override') is not None
                   else "") + "; " + "; ".join(f"{k}: {v}" for k, v in p['cpu']['problems'].items()) + "."
                if "cpu" in p else ""), ""]
    for model, e in p["models"].items():
        lines += _model_md(model, e)
    lines += ["## Targets", "", "| model | batch | target | verdict | figures | likely reason if missed, why not measured |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t['model']} | {t['batch']} | {t['target']} | {t['verdict']} | {t['figures']} | "
              f"{t['reason'] or ''} |" for t in p["targets"]]
    return "\n".join(lines) + "\n"


def _keep_earlier(payload: dict[str, Any], args: argparse.Namespace) -> None:
    """--merge: the sections of the models this run does not measure, from the results file, each marked with the
    run that measured it (figures are compared only within a model's section, all from one run)."""
    import json

    from benchmarks.common import RESULTS

    path = RESULTS / f"{args.name}.json"
    if not path.is_file():
        sys.exit(f"--merge: {path} does not exist (measure every model once without --merge first)")
    old = json.loads(path.read_text())
    if (clash := cpu_clash(payload["machine"], old.get("machine"), args.name)) is not None:
        sys.exit(f"--merge: {clash}")
    named = set(args.models.split(","))
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    for model, entry in old["models"].items():  # named ones keep their place and are measured again
        if model not in named:
            entry.setdefault("run", {"command": old["command"], "date": date})
        payload["models"][model] = entry
    payload["targets"] = [t for t in old["targets"] if t["model"] not in named]


def _recorded(name: str) -> dict[str, Any] | None:
    """The machine record of benchmarks/results/NAME.json, None when there is none."""
    import json

    from benchmarks.common import RESULTS

    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get("machine") if path.is_file() else None


def main() -> None:
    args = _args()
    cpu = cpu_record()
    here = machine()
    if args.name is None:
        args.name = default_name(here, _recorded(DEFAULT_NAME))
    if (clash := cpu_clash(here, _recorded(args.name), args.name)) is not None:  # before an hour of measuring
        sys.exit(clash)
    print(f"results: benchmarks/results/{args.name}.{{json,md}} ({cpu_identity(here)})")
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "machine": here,
                               "cpu_summary": cpu["summary"], "cpu": cpu, "load_avg_before": os.getloadavg(),
                               "config": vars(args), "models": {}, "targets": []}
    if args.merge:
        _keep_earlier(payload, args)
    for model in args.models.split(","):
        try:
            entry, targets = _model(model, args, cpu)
        except subprocess.CalledProcessError as exc:  # one model's failure is recorded; the others still run
            entry, targets = {"error": f"`{' '.join(map(str, exc.cmd[1:]))}` exited with {exc.returncode} (its output "
                                       "is above)"}, []
        except ImportError as exc:  # the transformer's Hugging Face model needs .[hf]
            entry, targets = {"error": f"{exc} (the {TRANSFORMER} needs pip install '.[hf]')"}, []
        payload["models"][model] = entry
        payload["targets"] += targets
    order = list(payload["models"])
    payload["targets"].sort(key=lambda t: order.index(t["model"]))
    payload |= {"load_avg_after": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)}
    j, m = write(args.name, payload, _markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
