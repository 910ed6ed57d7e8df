"""The basis a drop rests on, before and now, over architectures: which verdicts the old bases got wrong.

    python benchmarks/run_centered_cosine.py [--only resnet18,transformer,hf:bert,...] [--work artifacts/centered_cosine]
                                             [--name centered_cosine_cpu] [--fresh]

Where a variant's drop is graded on the output cosine (random-init weights, and outputs that are not class scores),
convert's gate now uses the centered cosine (``core.metrics.centered_cosine``: both outputs minus the FP32
reference's mean over the held-out inputs) instead of the plain one. Each model is converted through the CLI as a
user does (``convert MODEL --fp16 --int8 --int8-nncf --calib ...``, the default gate; a gate failure, exit 5, is a
verdict and recorded). Per variant the manifest gives its basis, plain and centered cosine and the gate; the verdict
the plain cosine gave (100 x (1 - cosine) within the 1-point budget and cosine >= 0.99) is set beside it. Per model,
on the FP32 reference's outputs on the same held-out inputs (ONNX Runtime): the share of their energy that depends on
the input, and the plain cosine two variants that keep none or half of that part would score (the reference's mean
for every input; mean + half of each input's deviation): where they pass the 1-point budget, the plain cosine checks
nothing. And OpenVINO's bf16 compute of the FP32 file on the same inputs (where the CPU has bf16), both cosines.
The README's INT8 models (AUTO) are also converted with ``--int8 --auto``: how many nodes it keeps in FP32.

Top-1 agreement (a classifier without labels) is no basis where it sees nothing: where the FP32 reference's top-1 is
one class for every held-out input (``core.metrics.vacuous_agreement``), and on random inputs (``--calib synthetic``,
as bench on random inputs); both are graded on the centered cosine now. Per variant the number of classes the
reference's top-1 takes is recorded, and for the one-class rows the verdict top-1 agreement gave (its disagreement
within the budget and cosine >= 0.99) is the verdict before (random inputs kept no agreement to recompute it from).

Models: torchvision architectures at full size (random init, ``--calib imagenet_subset``), the deploy benchmark's
BERT (``transformer``: benchmarks/run_transformer.py's, sequence 128, ``--int8-dynamic`` too, ``--calib synthetic``)
and tiny random-init Hugging Face configs (benchmarks/run_coverage_hf.py's ARCHS). Accuracy only: nothing is timed.

Writes benchmarks/results/<name>.{json,md} with the command, the CPU and the library versions.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import convert_row, convert_run_args, header_lines, machine, write
from benchmarks.run_coverage_hf import versions
from benchmarks.run_deploy import BERT_FLAGS
from benchmarks.run_nncf_model_type import _HF_IMAGES, _IMAGES, _TEXT, _ov_versions, _source
from core.manifest import Manifest
from core.metrics import AccuracyStats, accuracy_drop, accuracy_stats, compare_outputs

_VARIANTS = ["--fp16", "--int8", "--int8-nncf"]
MODELS: dict[str, list[str]] = {
    "resnet18": _IMAGES, "resnet50": _IMAGES, "densenet121": _IMAGES, "vit_b_16": _IMAGES,
    "mobilenet_v3_large": _IMAGES, "efficientnet_b0": _IMAGES, "shufflenet_v2_x1_0": _IMAGES,
    "regnet_y_400mf": _IMAGES, "convnext_tiny": _IMAGES, "swin_t": _IMAGES,
    "transformer": [*BERT_FLAGS, "--int8-dynamic"],
    "hf:bert": _TEXT, "hf:distilbert": _TEXT, "hf:vit": _HF_IMAGES,
    **{f"hf:{name}": _HF_IMAGES for name in ("deit", "beit", "dinov2", "resnet", "regnet", "convnext", "swin",
                                             "mobilenet_v2", "mobilevit")},
}
BUDGET, MIN_COSINE = 1.0, 0.99  # convert's default gate
#: the basis's words for a reference whose top-1 is one class (core.metrics.vacuous_agreement)
ONE_CLASS = "top-1 is one class for all"
#: The README's INT8 models (`make demo`'s, and the example's): also converted with --int8 --auto
AUTO = ("resnet18", "densenet121")


def _src(model: str, work: Path, hf_root: Path) -> str:
    if model == "transformer":
        from benchmarks.run_transformer import _bert_folder

        return str(_bert_folder(work / "transformer-src", "small"))
    return _source(model, hf_root)


def _bf16_cpu() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def reference_figures(folder: Path, man: Manifest, reference: str, bf16: bool) -> dict[str, Any]:
    """On the held-out inputs the gates graded on: per output, the share of the FP32 reference's energy that depends on
    the input and the plain cosine of a variant keeping none / half of it; OpenVINO bf16's stats on the FP32 file."""
    from calibration.pools import heldout_pool
    from runtimes.ort import ort_session

    if man.held_out is None:
        return {"error": "no held-out inputs kept"}
    pool = heldout_pool(folder, man.held_out, man.iospec, man.held_out.samples)
    if isinstance(pool, str):
        return {"error": pool}
    path = folder / man.artifacts[reference].file.path
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    ref = [np.asarray(o) for o in session.run(None, pool.arrays)]
    per: dict[str, Any] = {}
    for name, r in zip(names, ref, strict=True):
        r64 = r.astype(np.float64)
        mean = r64.mean(axis=0, keepdims=True)
        dev = r64 - mean
        per[name] = {"input_share": float(np.sum(dev * dev) / np.sum(r64 * r64)),
                     "ignore_input_cosine": compare_outputs([np.broadcast_to(mean, r64.shape)], [r64]).cosine,
                     "half_input_cosine": compare_outputs([mean + 0.5 * dev], [r64]).cosine,
                     "absmax": float(np.abs(r64).max())}
    out: dict[str, Any] = {"samples": int(ref[0].shape[0]), "outputs": per}
    if not bf16:
        out["ov_bf16"] = {"skipped": "this CPU has no bf16 (avx512_bf16 / amx_bf16)"}
        return out
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    got = compiled(pool.arrays)
    outs = [np.asarray(got[compiled.output(i)]) for i in range(len(names))]
    stats = accuracy_stats(outs, ref, None, f"ort:{reference}:fp32", names)
    drop, basis = accuracy_drop(stats, random_init=man.source.kind == "torchvision" and man.source.weights is None)
    out["ov_bf16"] = {"cosine": stats.cosine, "centered_cosine": stats.centered_cosine, "drop": drop, "basis": basis}
    return out


def run_one(model: str, work: Path, hf_root: Path, fresh: bool, bf16: bool) -> dict[str, Any]:
    out = work / model.replace(":", "_")
    row: dict[str, Any] = {"model": model, **convert_row(_src(model, work, hf_root), out, [*_VARIANTS, *MODELS[model]],
                                                         fresh)}
    if "error" in row:
        return row
    man = Manifest.load(out)
    variants: dict[str, Any] = {}
    reference = None
    for art in man.artifacts.values():
        acc, gate = art.metrics.accuracy, art.metrics.gate
        if acc is None or gate is None:
            continue
        reference = reference or acc.reference
        variants[art.name] = {"basis": gate.basis, "cosine": acc.cosine, "centered_cosine": acc.centered_cosine,
                              "drop": gate.drop_points, "passed": gate.passed, "reason": gate.reason,
                              "ref_top1_classes": acc.ref_top1_classes, **_before(acc, gate.basis, gate.passed)}
    failed = {f.name: f.reason for f in man.failed_variants}
    ref_name = next((a.name for a in man.artifacts.values() if a.name == "opt"), "fp32")
    row.update(variants=variants, not_made=failed, reference=reference,
               figures=reference_figures(out, man, ref_name, bf16))
    return row


def _before(acc: AccuracyStats, basis: str, passed: bool | None) -> dict[str, Any]:
    """The basis, drop and verdict the gate gave before: the plain cosine where the centered one is graded now, top-1
    agreement where it saw nothing (a one-class reference; random inputs, whose agreement was not kept: no verdict)."""
    if ONE_CLASS in basis and acc.top1_agreement is not None:  # random-init weights were on the cosine before
        drop = 100.0 * (1.0 - acc.top1_agreement)
        return {"before": "top-1 agreement", "before_drop": drop,
                "before_passed": drop <= BUDGET + 1e-9 and acc.cosine >= MIN_COSINE}
    if "random inputs" in basis:
        return {"before": "top-1 agreement on random inputs", "before_drop": None, "before_passed": None}
    if "cosine" in basis:
        drop = 100.0 * (1.0 - acc.cosine)
        return {"before": "plain cosine", "before_drop": drop,
                "before_passed": drop <= BUDGET + 1e-9 and acc.cosine >= MIN_COSINE}
    return {"before": "unchanged", "before_drop": None, "before_passed": passed}


def run_auto(model: str, work: Path, fresh: bool) -> dict[str, Any]:
    """``convert MODEL --int8 --auto``: the method and FP32 nodes --auto chose to get within the budget, and its gate."""
    import onnx

    out = work / f"{model}-auto"
    row: dict[str, Any] = {"model": model, **convert_row(model, out, ["--int8", "--auto", *MODELS[model]], fresh)}
    if "error" in row:
        return row
    man = Manifest.load(out)
    for art in man.artifacts.values():
        auto = getattr(art.params, "auto", None)
        if auto is None or art.metrics.gate is None:
            continue
        graph = onnx.load(str(out / man.artifacts[art.parent or "opt"].file.path), load_external_data=False).graph
        quantizable = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in graph.node)
        row.update(variant=art.name, method=auto.chosen_method, fp32_nodes=len(auto.fp32_nodes),
                   conv_gemm_matmul=quantizable, reason=auto.reason, passed=art.metrics.gate.passed,
                   drop=art.metrics.gate.drop_points)
    return row


def _n(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    flips = [f"{r['model']} {v} ({x['before']})" for r in rows for v, x in r.get("variants", {}).items()
             if x["before_passed"] is True and x["passed"] is False]
    rescued = [f"{r['model']} {v} ({x['before']})" for r in rows for v, x in r.get("variants", {}).items()
               if x["before_passed"] is False and x["passed"] is True]
    one_class = sorted({r["model"] for r in rows for x in r.get("variants", {}).values()
                        if x["ref_top1_classes"] == 1})
    vacuous = [r["model"] for r in rows
               if any(100 * (1 - o["ignore_input_cosine"]) <= BUDGET for o in r.get("figures", {}).get("outputs", {}).values())]
    return {"models": len(rows), "errors": [r["model"] for r in rows if "error" in r],
            "passed_before_failed_now": flips, "failed_before_passed_now": rescued,
            "one_class_reference": one_class,
            "plain_passes_a_variant_ignoring_its_input": vacuous}


_WHY = {"random-init": "random-init weights", "the FP32 reference's top-1 is one class": "one-class reference",
        "random inputs": "random inputs", "not a classifier": "not class scores"}


def _why(basis: str) -> str:
    tail = basis.split(": ", 1)[1] if ": " in basis else ""
    return next((f" ({short})" for start, short in _WHY.items() if tail.startswith(start)), "")


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    lines = [*header_lines("The basis of convert's gate, before and now: plain cosine and blind top-1 agreement against "
                           "the centered cosine", payload),
             "Random-init weights, the held-out part of the calibration data, convert's default gate (1 point, "
             "cosine >= 0.99). Before: 100 x (1 - plain cosine) where a drop rested on the cosine, and top-1 "
             "disagreement with FP32 for classifiers without labels, even where the FP32 reference's top-1 was one "
             "class for every held-out input or the inputs were random; now: the centered cosine (the outputs minus "
             "the FP32 reference's mean over the inputs) in all of those cases. "
             "input share: the part of the FP32 reference's energy that depends on the input; 'ignoring the input' "
             "and 'half of it': the plain cosine of a variant that outputs the reference's mean for every input, and "
             "of one that keeps half of each input's deviation from it.", "",
             f"Models: {s['models']}; conversion errors: {', '.join(s['errors']) or 'none'}.",
             "FP32 reference's top-1 one class for every held-out input (top-1 agreement sees nothing; torchvision "
             f"names were graded on the cosine already, as random-init): {', '.join(s['one_class_reference']) or 'none'}.",
             f"Passed before, fail now: {', '.join(s['passed_before_failed_now']) or 'none'}.",
             f"Failed before, pass now: {', '.join(s['failed_before_passed_now']) or 'none'}.",
             "The plain cosine would pass a variant that ignores its input (within 1 point): "
             f"{', '.join(s['plain_passes_a_variant_ignoring_its_input']) or 'none'}.", "",
             "## Reference outputs (FP32, ONNX Runtime, held-out inputs)", "",
             "| model | output | samples | largest | input share | plain cos, ignoring the input | plain cos, half of it |"
             " OpenVINO bf16: cos / centered / drop |", "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | |")
            continue
        f = r["figures"]
        if "error" in f:
            lines.append(f"| {r['model']} | {f['error']} | | | | | | |")
            continue
        bf = f.get("ov_bf16", {})
        bf_s = bf["skipped"] if "skipped" in bf else \
            f"{_n(bf['cosine'])} / {_n(bf['centered_cosine'])} / {bf['drop']:.2f}"
        for i, (name, o) in enumerate(f["outputs"].items()):
            lines.append(f"| {r['model'] if i == 0 else ''} | {name} | {f['samples']} | {o['absmax']:.3g} | "
                         f"{o['input_share']:.3g} | {o['ignore_input_cosine']:.5f} | {o['half_input_cosine']:.5f} | "
                         f"{bf_s if i == 0 else ''} |")
    lines += ["", "## Variants: convert's gate", "",
              "| model | variant | basis (why) | ref top-1 classes | cosine | centered | before: basis | drop | verdict "
              "| drop now | verdict now |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        for v, x in r.get("variants", {}).items():
            basis = x["basis"].split(":")[0]
            verdict = "pass" if x["passed"] else f"FAIL ({x['reason']})" if x["reason"] and "cosine" not in basis \
                else "FAIL"
            before = "-" if x["before_passed"] is None else "pass" if x["before_passed"] else "FAIL"
            classes = "-" if x["ref_top1_classes"] is None else x["ref_top1_classes"]
            lines.append(f"| {r['model']} | {v} | {basis}{_why(x['basis'])} | {classes} | {_n(x['cosine'], 5)} | "
                         f"{_n(x['centered_cosine'], 5)} | {x['before']} | {_n(x['before_drop'], 2)} | {before} | "
                         f"{_n(x['drop'], 2)} | {verdict} |")
        for v, why in r.get("not_made", {}).items():
            lines.append(f"| {r['model']} | {v} | not made: {why} | | | | | | | | |")
    if payload.get("auto"):
        lines += ["", "## `convert MODEL --int8 --auto --calib imagenet_subset` (the same budget)", "",
                  "| model | variant | method | nodes kept in FP32 | Conv/Gemm/MatMul in the FP32 graph | drop | gate |",
                  "|---|---|---|---|---|---|---|"]
        for a in payload["auto"]:
            if "error" in a or "variant" not in a:
                lines.append(f"| {a['model']} | failed: {a.get('error', 'no --auto variant')} | | | | | |")
                continue
            lines.append(f"| {a['model']} | {a['variant']} | {a['method']} | {a['fp32_nodes']} | "
                         f"{a['conv_gemm_matmul']} | {_n(a['drop'], 2)} | {'pass' if a['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = convert_run_args(__doc__, list(MODELS), "centered_cosine", "centered_cosine_cpu")
    work = Path(args.work)
    bf16 = _bf16_cpu()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="centered-hf-") as hf_root:
        for model in args.only:
            row = run_one(model, work, Path(hf_root), args.fresh, bf16)
            rows.append(row)
            got = row.get("error") or ", ".join(
                f"{v} {_n(x['cosine'])}/{_n(x['centered_cosine'])} {'ok' if x['passed'] else 'FAIL'}"
                for v, x in row["variants"].items())
            print(f"{model}: {got} ({row['seconds']} s)", flush=True)
    autos = [run_auto(m, work, args.fresh) for m in AUTO if m in args.only]
    payload = {"command": "python benchmarks/run_centered_cosine.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "versions": versions() | _ov_versions(), "seconds": time.perf_counter() - t0,
               "rows": rows, "summary": summarize(rows), "auto": autos}
    j, m = write(args.name, payload, markdown(payload))
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
