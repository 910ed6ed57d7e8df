"""Which op types static INT8 (``--int8``) quantizes per architecture (``--int8-ops auto``), against every type ONNX
Runtime can quantize and against Optimum's default set: accuracy on the held-out data, and latency.

    python benchmarks/run_int8_ops.py [--only vit_b_16,swin_t,hf:bert,...] [--work artifacts/int8_ops]
                                      [--name int8_ops_cpu] [--fresh] [--rounds 5] [--seconds 3]

Each model is converted through the CLI, as a user does, into folders of its own:

- ``auto``: ``convert MODEL --int8 --calib ...`` (the default, ``--int8-ops auto``): where the graph has attention,
  only Conv/ConvTranspose/Gemm/MatMul are quantized (their inputs and outputs); else every type ONNX Runtime can quantize;
- ``all``: the same with ``--int8-ops all``: every type ONNX Runtime can quantize (its ``quantize_static`` default,
  and what ``--int8`` did before). Not converted where ``auto`` chose it too (the same file);
- ``optimum``: the op types Optimum's ``ORTQuantizer`` quantizes by default for static QDQ
  (``optimum.onnxruntime.configuration.ORT_DEFAULT_OPS_STATIC_QUANTIZATION_QDQ``, ONNX Runtime's QDQ registry), as
  ``--int8-ops all --exclude-op-types`` of the types outside it that the pre-processed graph has; the same
  calibration data, ranges and settings otherwise. Not converted where the graph has none of those types.

Per run the manifest gives the op types quantized and why, the QuantizeLinear count, and the held-out gate (drop in
points on its basis, centered cosine; a gate failure, exit 5, is a verdict, recorded). The expected op set of each
model is written here from what the architecture is (attention or none), not from the detector; a row whose choice
differs is a MISS. Then a bare ``onnxruntime.InferenceSession.run`` loop (default session options) times the FP32
reference and each INT8 file of the full-size models with attention, batch 1, in interleaved rounds (the order
flipped each round): run it alone. A folder an earlier run left in ``--work`` is read again unless ``--fresh``.

Models: torchvision architectures at their real sizes (random init, seeded head, ``--calib imagenet_subset``), with
and without attention; the deploy benchmark's BERT (``transformer``, sequence 128, ``--calib synthetic``); tiny
random-init Hugging Face configs of real families (benchmarks/run_coverage_hf.py's ARCHS).

``int8_trt`` (the Q/DQ file for a TensorRT INT8 engine) follows the static op set: per model with attention it is
built from the auto run's ranges with and without the Adds, and graded as convert grades it (:func:`trt_rows`).

Writes benchmarks/results/<name>.{json,md} with the command, the CPU and the library versions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import convert_row, convert_run_args, header_lines, machine, write
from benchmarks.run_centered_cosine import _src
from benchmarks.run_coverage_hf import versions
from benchmarks.run_deploy import BERT_FLAGS
from benchmarks.run_fidelity import bare_loop
from benchmarks.run_nncf_model_type import _HF_IMAGES, _IMAGES, _TEXT
from convert.config import Budget, QuantConfig
from core.manifest import Manifest

#: model -> (the op set expected from the architecture: weighted with attention, else all; convert flags)
MODELS: dict[str, tuple[str, list[str]]] = {
    "resnet18": ("all", _IMAGES),
    "densenet121": ("all", _IMAGES),
    "efficientnet_b0": ("all", _IMAGES),  # squeeze-excitation: Mul, no attention
    "convnext_tiny": ("all", _IMAGES),  # layer norms, no attention
    "vit_b_16": ("weighted", _IMAGES),
    "swin_t": ("weighted", _IMAGES),  # windowed attention
    "maxvit_t": ("weighted", _IMAGES),  # convolutions and attention
    "transformer": ("weighted", BERT_FLAGS),
    "hf:bert": ("weighted", _TEXT),
    "hf:distilbert": ("weighted", _TEXT),
    "hf:roberta": ("weighted", _TEXT),
    "hf:deberta-v2": ("weighted", _TEXT),
    "hf:vit": ("weighted", _HF_IMAGES),
    "hf:deit": ("weighted", _HF_IMAGES),
    "hf:beit": ("weighted", _HF_IMAGES),
    "hf:dinov2": ("weighted", _HF_IMAGES),
    "hf:swin": ("weighted", _HF_IMAGES),
    "hf:mobilevit": ("weighted", _HF_IMAGES),  # MobileNet blocks and transformer blocks
    "hf:resnet": ("all", _HF_IMAGES),
    "hf:convnext": ("all", _HF_IMAGES),
}
KINDS = ("auto", "all", "optimum")
VARIANT = "int8_static_minmax"


def optimum_exclusions(folder: Path) -> list[str]:
    """The op types of ``folder``'s pre-processed FP32 reference that ONNX Runtime can quantize but Optimum's default
    static QDQ set leaves out (``--exclude-op-types`` makes ``--int8-ops all`` that set)."""
    import onnx
    from optimum.onnxruntime.configuration import ORT_DEFAULT_OPS_STATIC_QUANTIZATION_QDQ

    from convert.ort_quant import preprocess_for_quantization, quantizable_op_types

    man = Manifest.load(folder)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        preprocess_for_quantization(folder / man.artifacts[man.best_fp32()].file.path, prepped)
        present = {n.op_type for n in onnx.load(str(prepped), load_external_data=False).graph.node}
    return sorted((set(quantizable_op_types([])) - set(ORT_DEFAULT_OPS_STATIC_QUANTIZATION_QDQ)) & present)


def _quantize_linear(path: Path) -> int:
    import onnx

    return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path), load_external_data=False).graph.node)


def run_one(model: str, kind: str, work: Path, hf_root: Path, fresh: bool, exclude: list[str]) -> dict[str, Any]:
    out = work / f"{model.replace(':', '_')}-{kind}"
    flags = ["--int8", *MODELS[model][1]]
    if kind != "auto":
        flags += ["--int8-ops", "all"] + (["--exclude-op-types", ",".join(exclude)] if kind == "optimum" else [])
    row: dict[str, Any] = {"model": model, "kind": kind, "expected": MODELS[model][0],
                           **convert_row(_src(model, work, hf_root), out, flags, fresh)}
    if "error" in row:
        return row
    man = Manifest.load(out)
    art = man.artifacts.get(VARIANT)
    if art is None:
        failed = {f.name: f.reason for f in man.failed_variants}
        return row | {"error": f"no {VARIANT}: {failed.get(VARIANT, 'not made')}"}
    params, acc, gate = art.params.model_dump() if art.params else {}, art.metrics.accuracy, art.metrics.gate
    assert acc is not None and gate is not None
    ops = params.get("op_types") or []
    row.update(folder=str(out), op_types=ops, reason=params.get("op_types_reason"),
               op_set="weighted" if set(ops) <= {"Conv", "ConvTranspose", "Gemm", "MatMul"} else "all",
               excluded=params.get("exclude_op_types"), quantize_linear=_quantize_linear(out / art.file.path),
               drop=gate.drop_points, basis=gate.basis, passed=gate.passed, gate_reason=gate.reason,
               cosine=acc.cosine, centered_cosine=acc.centered_cosine)
    return row


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["kind"]: r for r in rows if r["model"] == model}
        auto = by.get("auto", {})
        choice = "not measured" if "error" in auto or not auto else \
            "pass" if auto.get("op_set") == auto.get("expected") else "MISS"
        out[model] = {"choice": choice, **{k: by.get(k, {}) for k in KINDS}}
    return out


def trt_rows(verdicts: dict[str, Any]) -> dict[str, Any]:
    """``int8_trt`` (Q/DQ by TensorRT's rules, convert/trt_qdq.py) of each model with attention, from the auto run's
    ranges: TensorRT's op set as ``--int8-ops auto`` gives it (no Add) against with the Adds (every op type), graded
    as convert grades int8_trt (simulated Q/DQ on ONNX Runtime, core.metrics on the kept held-out inputs; text models
    keep none: skipped). TensorRT itself is not installed here."""
    from calibration.pools import heldout_pool
    from convert.gates import gate_verdict
    from convert.ort_quant import preprocess_for_quantization, quantizable_op_types
    from convert.trt_qdq import quantize_trt_file, trt_op_types
    from core.metrics import accuracy_stats
    from core.models import is_random_init
    from runtimes.ort import ort_session

    out: dict[str, Any] = {}
    for model, v in verdicts.items():
        auto = v["auto"]
        if auto.get("op_set") != "weighted" or "error" in auto:
            continue
        folder = Path(auto["folder"])
        man = Manifest.load(folder)
        if man.held_out is None:
            out[model] = {"skipped": "no held-out inputs kept (random ones)"}
            continue
        pool = heldout_pool(folder, man.held_out, man.iospec, man.held_out.samples)
        assert not isinstance(pool, str), pool
        params = man.artifacts[VARIANT].params
        cache = folder / params.calibration.cache  # type: ignore[union-attr]
        ref = ort_session(folder / man.artifacts[man.best_fp32()].file.path)
        names = [o.name for o in ref.get_outputs()]
        reference = [np.asarray(o) for o in ref.run(None, pool.arrays)]
        rows: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            prepped, built = Path(tmp) / "prepped.onnx", Path(tmp) / "int8_trt.onnx"
            preprocess_for_quantization(folder / man.artifacts[man.best_fp32()].file.path, prepped)
            for kind, static in (("auto", auto["op_types"]), ("all", quantizable_op_types([]))):
                ops = trt_op_types(static)
                quantize_trt_file(prepped, built, "minmax", cache, QuantConfig(), [], ops)
                got = [np.asarray(o) for o in ort_session(built, simulate_qdq=True).run(None, pool.arrays)]
                stats = accuracy_stats(got, reference, pool.labels, "fp32", names)
                gate = gate_verdict(stats, Budget(), is_random_init(man.source))  # convert's default gate
                rows[kind] = {"op_types": ops, "drop": gate.drop_points, "basis": gate.basis,
                              "centered_cosine": stats.centered_cosine, "passed": gate.passed}
        out[model] = rows
        print(f"{model} int8_trt: auto {rows['auto']['drop']:.2f}, with Add {rows['all']['drop']:.2f} points",
              flush=True)
    return out


def time_models(verdicts: dict[str, Any], rounds: int, seconds: float) -> dict[str, Any]:
    """A bare InferenceSession loop (default options) on FP32 and each INT8 file of the full-size models with
    attention, batch 1, one session per file, in ``rounds`` interleaved rounds (the order flipped each round): the
    median of the per-round medians with their range."""
    import onnxruntime as ort

    files: dict[str, dict[str, Path]] = {}
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for model, v in verdicts.items():
        auto = v["auto"]
        if model.startswith("hf:") or auto.get("op_set") != "weighted" or "error" in auto:
            continue
        folder = Path(auto["folder"])
        man = Manifest.load(folder)
        files[model] = {"fp32": folder / man.artifacts[man.best_fp32()].file.path,
                        **{k: Path(v[k]["folder"]) / Manifest.load(Path(v[k]["folder"])).artifacts[VARIANT].file.path
                           for k in KINDS if v[k].get("folder")}}
        feeds[model] = man.iospec.random_feed(1, seed=0)
    per: dict[str, dict[str, list[float]]] = {m: {k: [] for k in f} for m, f in files.items()}
    sessions = {m: {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in f.items()}
                for m, f in files.items()}
    for i in range(rounds):
        for model, by in sessions.items():
            for kind in (list(by) if i % 2 == 0 else list(reversed(by))):
                per[model][kind].append(bare_loop(by[kind], feeds[model], 5, seconds))
        print(f"timing round {i + 1}/{rounds} done", flush=True)
    return {"models": {m: {k: {"median_ms": statistics.median(v), "range_ms": [min(v), max(v)], "rounds": v}
                           for k, v in by.items()} for m, by in per.items()},
            "rounds": rounds, "seconds_per_call": seconds}


def summarize(verdicts: dict[str, Any]) -> dict[str, Any]:
    def gate_ok(kind: str) -> list[str]:  # a run not made is the same file as all's (optimum), auto's (all)
        return [m for m, v in verdicts.items()
                if (v[kind] or (kind == "optimum" and v["all"]) or v["auto"]).get("passed") is True]

    return {"models": len(verdicts), "pass": sum(v["choice"] == "pass" for v in verdicts.values()),
            "miss": [m for m, v in verdicts.items() if v["choice"] == "MISS"],
            "not_measured": [m for m, v in verdicts.items() if v["choice"] == "not measured"],
            **{f"{k}_gate_ok": gate_ok(k) for k in KINDS}}


def _fmt(row: dict[str, Any], auto: dict[str, Any]) -> str:
    if not row:
        return f"= auto ({auto.get('op_set', '')})" if auto and "error" not in auto else "not run"
    if "error" in row:
        return f"failed: {row['error']}"
    gate = "gate ok" if row["passed"] else "gate FAILED"
    return f"{row['drop']:.2f} pts, centered {row['centered_cosine']:.4f}, {row['quantize_linear']} Q, {gate}"


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    lines = [*header_lines("Static INT8: the op types quantized per architecture (--int8-ops auto) against all and "
                           "Optimum's default", payload),
             "Random-init weights (torchvision: seeded head). Per run: the variant's drop in points on the gate's "
             "basis (top-1 agreement with FP32 on held-out photos where the reference's top-1 varies, else 100 x (1 - "
             "centered cosine)), its centered cosine, its QuantizeLinear count and convert's default gate (1 point). "
             "all: --int8-ops all (ONNX Runtime's default, what --int8 did before); optimum: Optimum's default static "
             "QDQ op set on the same ranges. The expected op set is the architecture's (attention or none).", "",
             f"Choice: {s['pass']} of {s['models']} as expected"
             + (f"; MISS: {', '.join(s['miss'])}" if s["miss"] else "")
             + (f"; not measured: {', '.join(s['not_measured'])}" if s["not_measured"] else "") + ".",
             f"Gate passed: auto (the default) {len(s['auto_gate_ok'])}, all {len(s['all_gate_ok'])}, "
             f"optimum {len(s['optimum_gate_ok'])} of {s['models']}.", "",
             "| model | expected | auto's choice | auto (default) | all | optimum | auto's reason |",
             "|---|---|---|---|---|---|---|"]
    for model, v in payload["verdicts"].items():
        a = v["auto"]
        lines.append(f"| {model} | {a.get('expected', '')} | {v['choice']} | {_fmt(a, {})} | {_fmt(v['all'], a)} | "
                     f"{_fmt(v['optimum'], a)} | {a.get('reason', a.get('error', ''))} |")
    excl = {m: v["optimum"].get("excluded") for m, v in payload["verdicts"].items() if v["optimum"].get("excluded")}
    if excl:
        lines += ["", "optimum's --exclude-op-types per model: "
                  + "; ".join(f"{m}: {','.join(e)}" for m, e in excl.items())]
    trt = payload.get("int8_trt", {})
    if trt:
        lines += ["", "## int8_trt (Q/DQ by TensorRT's rules) of the models with attention, from the same ranges", "",
                  "Graded as convert grades int8_trt: simulated Q/DQ on ONNX Runtime against FP32 on the held-out "
                  "photos (TensorRT is not installed here). auto: TensorRT's op set among --int8-ops auto's "
                  "(no Add); with Add: TensorRT's whole set (Conv, ConvTranspose, Gemm, MatMul, Add), what int8_trt "
                  "quantized before.", "", "| model | auto | with Add |", "|---|---|---|"]
        for model, r in trt.items():
            if "skipped" in r:
                lines.append(f"| {model} | skipped: {r['skipped']} | |")
                continue
            lines.append(f"| {model} | " + " | ".join(
                f"{r[k]['drop']:.2f} pts, centered {r[k]['centered_cosine']:.4f}, "
                f"{'gate ok' if r[k]['passed'] else 'gate FAILED'}" for k in ("auto", "all")) + " |")
    timing = payload["timing"]
    if timing.get("models"):
        lines += ["", f"## Latency (bare onnxruntime.InferenceSession.run loop, default options, batch 1, "
                      f"{timing['rounds']} interleaved rounds of {timing['seconds_per_call']:g} s each, run alone)", "",
                  "Median of the per-round medians in ms [their range].", "",
                  "| model | fp32 | auto | all | optimum | fp32 / auto | all / auto |", "|---|---|---|---|---|---|---|"]
        for model, t in timing["models"].items():
            def cell(k: str, t: dict[str, Any] = t) -> str:
                return f"{t[k]['median_ms']:.2f} [{t[k]['range_ms'][0]:.2f}-{t[k]['range_ms'][1]:.2f}]" if k in t \
                    else "= auto" if k == "all" else "-"
            ratio = {k: f"{t[k]['median_ms'] / t['auto']['median_ms']:.2f}x" if k in t else "-" for k in ("fp32", "all")}
            lines.append(f"| {model} | {cell('fp32')} | {cell('auto')} | {cell('all')} | {cell('optimum')} | "
                         f"{ratio['fp32']} | {ratio['all']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    def timing_args(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--rounds", type=int, default=5, help="timing rounds per file (0: no timing)")
        ap.add_argument("--seconds", type=float, default=3.0, help="seconds per file and round")

    args = convert_run_args(__doc__, list(MODELS), "int8_ops", "int8_ops_cpu", timing_args)
    work = Path(args.work)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="int8-ops-hf-") as hf_root:
        for model in args.only:
            auto = run_one(model, "auto", work, Path(hf_root), args.fresh, [])
            rows.append(auto)
            print(f"{model} auto: {_fmt(auto, {})} ({auto['seconds']} s) {auto.get('reason', '')}", flush=True)
            if "error" in auto:
                continue
            if auto["op_set"] != "all":
                rows.append(row := run_one(model, "all", work, Path(hf_root), args.fresh, []))
                print(f"{model} all: {_fmt(row, auto)} ({row['seconds']} s)", flush=True)
            if exclude := optimum_exclusions(Path(auto["folder"])):
                rows.append(row := run_one(model, "optimum", work, Path(hf_root), args.fresh, exclude))
                print(f"{model} optimum: {_fmt(row, auto)} ({row['seconds']} s)", flush=True)
    verdicts = verdict(rows)
    trt = trt_rows(verdicts)
    timing = time_models(verdicts, args.rounds, args.seconds) if args.rounds else {"models": {}}
    payload = {"command": "python benchmarks/run_int8_ops.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "versions": versions(), "seconds": time.perf_counter() - t0, "rows": rows, "verdicts": verdicts,
               "summary": summarize(verdicts), "int8_trt": trt, "timing": timing}
    j, m = write(args.name, payload, markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
