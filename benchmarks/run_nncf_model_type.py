"""Which NNCF model type ``--int8-nncf`` chooses, over architectures it was not built on, and what it costs or saves.

    python benchmarks/run_nncf_model_type.py [--only resnet18,hf:bert,...] [--work artifacts/nncf_model_type]
                                             [--name nncf_model_type_cpu] [--fresh] [--rounds 3] [--seconds 8]

Each model is converted twice through the CLI, as a user does, into folders of its own:
``convert MODEL --int8-nncf --calib ... --nncf-model-type auto`` (the default) and the same with ``generic`` (what
``--int8-nncf`` did before it chose NNCF's transformer type for a graph with attention). Per run the manifest gives
the model type used and why (``params.model_type``, ``model_type_reason``), the FakeQuantize count, and the variant's
held-out gate: its output cosine against FP32 on OpenVINO (f32 compute where not quantized) and whether it passed
convert's default budget (a gate failure, exit 5, is a verdict, recorded); and the largest |output| of the FP32
reference on the gate's held-out inputs (a random-init network whose activations vanish outputs ~1e-14, which INT8
rounds to 0 whatever the model type). Then OpenVINO's ``benchmark_app`` times the two IRs of each full-size model
in interleaved rounds (:func:`time_pairs`); run it alone. A folder an earlier run left in ``--work`` is read again,
not converted again, unless ``--fresh``.

Models: torchvision architectures at their real sizes (random init, 224x224, ``--calib imagenet_subset``), with and
without attention; and tiny random-init Hugging Face configs of real families (benchmarks/run_coverage_hf.py's
ARCHS, ``save_pretrained`` here, ``--calib imagenet_subset`` for images, ``synthetic`` for text). The expected
model type of each is written here from what the architecture is (attention or none), not from the detector; a
row whose choice differs is a MISS.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import convert_row, convert_run_args, header_lines, machine, write
from benchmarks.run_coverage_hf import ARCHS, build_folder, versions
from benchmarks.run_nncf_int8 import _benchmark_app
from convert.ovir import versions as nncf_versions
from core.manifest import Manifest

#: model -> (expected NNCF model type from the architecture, convert flags beyond --int8-nncf)
_IMAGES = ["--calib", "imagenet_subset"]
_TEXT = ["--calib", "synthetic", "--calib-size", "32"]
#: the tiny Hugging Face vision configs' images (their pixel_values have symbolic height and width)
_HF_IMAGES = ["--input-shape", "pixel_values:1x3x32x32", *_IMAGES]
MODELS: dict[str, tuple[str, list[str]]] = {
    "resnet18": ("generic", _IMAGES),
    "efficientnet_b0": ("generic", _IMAGES),  # squeeze-excitation: Multiply, no attention
    "convnext_tiny": ("generic", _IMAGES),
    "mobilenet_v3_small": ("generic", _IMAGES),
    "vit_b_32": ("transformer", _IMAGES),
    "swin_t": ("transformer", _IMAGES),  # windowed attention
    "maxvit_t": ("transformer", _IMAGES),  # convolutions and attention
    "hf:bert": ("transformer", _TEXT),
    "hf:distilbert": ("transformer", _TEXT),
    "hf:roberta": ("transformer", _TEXT),
    "hf:deberta-v2": ("transformer", _TEXT),
    "hf:vit": ("transformer", _HF_IMAGES),
    "hf:deit": ("transformer", _HF_IMAGES),
    "hf:swin": ("transformer", _HF_IMAGES),
    "hf:mobilevit": ("transformer", _HF_IMAGES),  # MobileNet blocks and transformer blocks
    "hf:resnet": ("generic", _HF_IMAGES),
    "hf:convnext": ("generic", _HF_IMAGES),
}
KINDS = ("auto", "generic")


def _source(model: str, hf_root: Path) -> str:
    """The convert argument: a torchvision name, or ``hf:FOLDER`` of the tiny config saved here."""
    if not model.startswith("hf:"):
        return model
    name = model[3:]
    folder = hf_root / name
    if not (folder / "config.json").is_file():
        build_folder(name, ARCHS[name], folder)
    return f"hf:{folder}"


def run_one(model: str, kind: str, work: Path, hf_root: Path, fresh: bool) -> dict[str, Any]:
    """Convert ``model`` with ``--nncf-model-type kind`` (unless ``work`` holds that folder from an earlier run and
    not ``fresh``); what the manifest records of int8_nncf."""
    expected, flags = MODELS[model]
    out = work / f"{model.replace(':', '_')}-{kind}"
    row: dict[str, Any] = {"model": model, "kind": kind, "expected": expected,
                           **convert_row(_source(model, hf_root), out, ["--int8-nncf", *flags, "--nncf-model-type",
                                                                         kind], fresh, timeout=1800)}
    if "error" in row:
        return row
    man = Manifest.load(out)
    art = man.artifacts.get("int8_nncf")
    if art is None or art.params is None or art.metrics.accuracy is None:
        failed = [f.reason for f in man.failed_variants if f.name == "int8_nncf"]
        row["error"] = f"int8_nncf not made: {failed[0]}" if failed else "no int8_nncf with its accuracy recorded"
        return row
    params = art.params.model_dump()
    acc = art.metrics.accuracy
    gate = art.metrics.gate
    row.update(model_type=params["model_type"], reason=params["model_type_reason"],
               fake_quantize=params["fake_quantize"], cosine=acc.cosine,
               gate_passed=None if gate is None else gate.passed, gate_reason=None if gate is None else gate.reason,
               samples=None if gate is None else gate.samples,
               reference_absmax=reference_absmax(out, man, art.parent))
    return row


def reference_absmax(folder: Path, man: Manifest, reference: str | None) -> float | None:
    """The largest |output| of the FP32 reference file on the held-out inputs the gate graded on (the manifest's
    ``held_out`` file, read as bench reads it; ONNX Runtime): a random-init network whose activations vanish gives
    ~1e-14, which INT8 rounds to 0 whatever the model type. None without kept held-out inputs."""
    import numpy as np

    from calibration.pools import heldout_pool
    from runtimes.ort import ort_session

    if reference is None or man.held_out is None:
        return None
    pool = heldout_pool(folder, man.held_out, man.iospec, man.held_out.samples)
    if isinstance(pool, str):
        return None
    session = ort_session(folder / man.artifacts[reference].file.path)
    outputs = session.run(None, pool.arrays)
    return float(max(np.abs(np.asarray(o, dtype=np.float64)).max() for o in outputs))


def _ov_versions() -> dict[str, str]:
    nncf, openvino = nncf_versions()
    return {"nncf": nncf, "openvino": openvino}


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: the auto row's choice against the expected type (pass or MISS; "not measured" where convert made
    no int8_nncf, with its line), and the cosine and gate of auto against generic."""
    by = {(r["model"], r["kind"]): r for r in rows}
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        auto, generic = by.get((model, "auto"), {}), by.get((model, "generic"), {})
        choice = "not measured" if "error" in auto else \
            "pass" if auto.get("model_type") == auto.get("expected") else "MISS"
        out[model] = {"choice": choice, "auto": auto, "generic": generic}
    return out


def time_pairs(rows: list[dict[str, Any]], work: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """OpenVINO's ``benchmark_app`` (the runner's settings: latency hint, f32 compute where not quantized) on the
    auto and generic IRs of each full-size model (torchvision; the tiny Hugging Face configs run in microseconds),
    batch 1, alternating in ``rounds`` interleaved rounds (the order flipped each round): the median of its
    per-round medians, with their range."""
    pairs = [r["model"] for r in rows if r["kind"] == "auto" and not r["model"].startswith("hf:") and "error" not in r
             and any(g["model"] == r["model"] and g["kind"] == "generic" and "error" not in g for g in rows)]
    per: dict[str, dict[str, list[float]]] = {m: {k: [] for k in KINDS} for m in pairs}
    errors: dict[str, str] = {}
    for i in range(rounds):
        for model in pairs:
            for kind in KINDS if i % 2 == 0 else tuple(reversed(KINDS)):
                folder = work / f"{model}-{kind}"
                man = Manifest.load(folder)
                shape = ",".join(f"{t.name}[{','.join(map(str, t.concrete_shape(1, man.iospec.dims)))}]"
                                 for t in man.iospec.inputs)
                got = _benchmark_app(folder / man.artifacts["int8_nncf"].file.path, shape, seconds)
                if "error" in got:
                    errors[f"{model}-{kind}"] = got["error"]
                else:
                    per[model][kind].append(got["median_ms"])
        print(f"timing round {i + 1}/{rounds} done", flush=True)
    out: dict[str, Any] = {}
    for model, by_kind in per.items():
        out[model] = {k: {"median_ms": statistics.median(v), "range_ms": [min(v), max(v)], "rounds": v}
                      for k, v in by_kind.items() if v}
    return {"models": out, "errors": errors, "rounds": rounds, "seconds_per_call": seconds}


def summarize(verdicts: dict[str, Any]) -> dict[str, Any]:
    def gate_ok(kind: str) -> int:
        return sum(1 for v in verdicts.values() if v[kind].get("gate_passed") is True)

    return {"models": len(verdicts), "pass": sum(v["choice"] == "pass" for v in verdicts.values()),
            "miss": [m for m, v in verdicts.items() if v["choice"] == "MISS"],
            "not_measured": [m for m, v in verdicts.items() if v["choice"] == "not measured"],
            "auto_gate_ok": gate_ok("auto"), "generic_gate_ok": gate_ok("generic")}


def _fmt(row: dict[str, Any]) -> str:
    if not row:
        return "not run"
    if "error" in row:
        return f"failed: {row['error']}"
    gate = "gate ok" if row["gate_passed"] else f"gate FAILED ({row['gate_reason']})"
    tiny = row.get("reference_absmax")
    vanish = f"; the FP32 reference's largest output is {tiny:.1e} on those inputs" if tiny is not None and \
        tiny < 1e-6 else ""
    return f"{row['model_type']}, cos {row['cosine']:.4f}, {row['fake_quantize']} FQ, {gate}{vanish}"


def markdown(payload: dict[str, Any]) -> str:
    summary = payload["summary"]
    lines = [*header_lines("int8_nncf: NNCF's model type chosen per architecture (auto) and against generic",
                           payload),
             "Random-init weights; cosine: output cosine of int8_nncf against FP32 on the held-out part of "
             "the calibration data, on OpenVINO (f32 compute where not quantized); gate: convert's default "
             "(random init: cosine >= 0.99). The expected type is the architecture's (attention or none).", "",
             f"Choice: {summary['pass']} of {summary['models']} as expected"
             + (f"; MISS: {', '.join(summary['miss'])}" if summary["miss"] else "")
             + (f"; not measured (no int8_nncf made): {', '.join(summary['not_measured'])}"
                if summary["not_measured"] else "") + ".",
             f"Gate (auto, the default): {summary['auto_gate_ok']} passed; generic: {summary['generic_gate_ok']}.", "",
             "| model | expected | auto's choice | auto (default) | generic | auto's reason |", "|---|---|---|---|---|---|"]
    for model, v in payload["verdicts"].items():
        a, g = v["auto"], v["generic"]
        lines.append(f"| {model} | {a.get('expected', '')} | {v['choice']} | {_fmt(a)} | {_fmt(g)} | "
                     f"{a.get('reason', '')} |")
    timing = payload["timing"]
    if timing["models"]:
        lines += ["", f"## Latency of the two IRs (benchmark_app, batch 1, {timing['rounds']} interleaved rounds of "
                      f"{timing['seconds_per_call']:g} s each, run alone)", "",
                  "benchmark_app -hint latency -api sync, the runner's settings (f32 compute where not quantized); "
                  "median of the per-round medians [their range].", "",
                  "| model | auto's type | auto ms | generic ms | generic / auto |", "|---|---|---|---|---|"]
        for model, t in timing["models"].items():
            a, g = t.get("auto"), t.get("generic")
            if a is None or g is None:
                continue
            kind = payload["verdicts"][model]["auto"].get("model_type", "")
            lines.append(f"| {model} | {kind} | {a['median_ms']:.2f} [{a['range_ms'][0]:.2f}-{a['range_ms'][1]:.2f}]"
                         f" | {g['median_ms']:.2f} [{g['range_ms'][0]:.2f}-{g['range_ms'][1]:.2f}] | "
                         f"{g['median_ms'] / a['median_ms']:.2f}x |")
        lines += [f"- benchmark_app failed: {k}: {e}" for k, e in timing["errors"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    def timing_args(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--rounds", type=int, default=3, help="benchmark_app rounds per IR (0: no timing)")
        ap.add_argument("--seconds", type=float, default=8.0, help="benchmark_app's -t per IR and round")

    args = convert_run_args(__doc__, list(MODELS), "nncf_model_type", "nncf_model_type_cpu", timing_args)
    work = Path(args.work)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nncf-hf-") as hf_root:
        for model in args.only:
            for kind in KINDS:
                row = run_one(model, kind, work, Path(hf_root), args.fresh)
                rows.append(row)
                print(f"{model} {kind}: {_fmt(row)} ({row['seconds']} s)", flush=True)
    timing = time_pairs(rows, work, args.rounds, args.seconds) if args.rounds else {"models": {}, "errors": {}}
    verdicts = verdict(rows)
    payload = {"command": "python benchmarks/run_nncf_model_type.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "versions": versions() | _ov_versions(), "seconds": time.perf_counter() - t0, "rows": rows, "verdicts": verdicts,
               "summary": summarize(verdicts), "timing": timing}
    j, m = write(args.name, payload, markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
