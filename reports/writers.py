"""results.json (source of truth) -> CSV, Markdown and a rich table."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.fsutil import atomic_write_text, check_not_an_input, check_output_file
from core.transaction import staged_files
from reports.models import BenchRecord, BenchResults

CSV_COLUMNS = [
    "model", "backend", "variant", "precision", "device", "batch_size", "dims", "input_shapes",
    "latency_ms_p50", "latency_ms_p50_lo", "latency_ms_p50_hi", "latency_ms_p90",
    "latency_ms_p99", "latency_ms_mean", "throughput", "ram_mb", "vram_mb", "cpu_util", "gpu_util",
    "model_size_mb", "gflop", "peak_fraction", "peak_precision", "peak_basis", "max_abs_err", "mean_abs_err", "cosine",
    "centered_cosine", "top1_agreement", "top5_agreement", "top1_acc", "top5_acc", "input_digest", "is_reference",
]


def is_reference(r: BenchRecord) -> bool:
    """The row *is* the accuracy reference (e.g. eager FP32 on CPU): its errors against itself are no check."""
    return r.accuracy is not None and r.accuracy.reference == f"{r.backend}:{r.variant}:{r.precision}:{r.device}"


def flat_row(r: BenchRecord) -> dict[str, Any]:
    acc = r.accuracy
    return {
        "model": r.model, "backend": r.backend, "variant": r.variant, "precision": r.precision, "device": r.device,
        "batch_size": r.batch_size, "dims": " ".join(f"{d}={v}" for d, v in sorted(r.dims.items())),
        "input_shapes": " ".join(f"{n}:{'x'.join(map(str, s))}" for n, s in r.input_shapes.items()),
        "latency_ms_p50": r.latency_ms.p50, "latency_ms_p90": r.latency_ms.p90,
        "latency_ms_p50_lo": r.latency_ms.p50_interval[0] if r.latency_ms.p50_interval else None,
        "latency_ms_p50_hi": r.latency_ms.p50_interval[1] if r.latency_ms.p50_interval else None,
        "latency_ms_p99": r.latency_ms.p99, "latency_ms_mean": r.latency_ms.mean, "throughput": r.throughput,
        "ram_mb": r.ram_mb, "vram_mb": r.vram_mb, "cpu_util": r.cpu_util, "gpu_util": r.gpu_util,
        "model_size_mb": r.model_size_mb, "gflop": r.gflop, "peak_fraction": r.peak_fraction,
        "peak_precision": r.peak_precision if r.peak_basis is not None else "fp32" if r.peak_fraction is not None else None,
        "peak_basis": peak_basis(r),
        "max_abs_err": acc.max_abs_err if acc else None, "mean_abs_err": acc.mean_abs_err if acc else None,
        "cosine": acc.cosine if acc else None, "centered_cosine": acc.centered_cosine if acc else None,
        "top1_agreement": acc.top1_agreement if acc else None,
        "top5_agreement": acc.top5_agreement if acc else None, "top1_acc": acc.top1_acc if acc else None,
        "top5_acc": acc.top5_acc if acc else None, "input_digest": r.input_digest, "is_reference": is_reference(r),
    }


def _display(r: BenchRecord) -> dict[str, str]:
    """The summary columns as shown: the p50 with its interval, and 'reference' where the row is the
    reference (never 'max abs err 0')."""
    row = flat_row(r)
    shown = {k: _fmt(row[k]) for _, k in SUMMARY_COLUMNS}
    if r.latency_ms.p50_interval:
        lo, hi = r.latency_ms.p50_interval
        shown["latency_ms_p50"] += f" [{_fmt(lo)}-{_fmt(hi)}]"
    if r.peak_fraction is not None:
        legacy_mixed = r.peak_basis is None and r.precision != "fp32"  # an old file: every row against FP32's peak
        shown["peak_fraction"] = f"{100 * r.peak_fraction:.0f}%" + (" of fp32" if legacy_mixed else "")
    elif r.gflop is not None and r.peak_basis is not None:
        shown["peak_fraction"] = "n/a"  # no peak of its precision: peak_note says why
    if row["is_reference"]:
        shown["max_abs_err"], shown["top1_agreement"] = "reference", "reference"
    return shown


#: the peak_fraction column's header: each row is read against the peak of its own precision
PEAK_HEADER = "% of peak (own precision)"
#: the basis of a fraction in a results file written before peaks per precision: every row against FP32's
LEGACY_BASIS = "fp32 GEMM (results written before peaks per precision: every row divided by FP32's)"


def peak_basis(r: BenchRecord) -> str | None:
    """What ``r``'s peak_fraction is divided by, or why it has none; for an older file's fraction: FP32's peak."""
    if r.peak_basis is not None:
        return r.peak_basis
    return LEGACY_BASIS if r.peak_fraction is not None else None


def peak_note(results: BenchResults) -> str | None:
    """One line under a table: which peak each precision's rows are divided by, and why a row has none (n/a)."""
    used = {r.precision: b for r in results.records if r.peak_fraction is not None and (b := peak_basis(r))}
    missing = sorted({b for r in results.records if r.peak_fraction is None and r.gflop is not None
                      and (b := r.peak_basis) is not None})
    if not used and not missing:
        return None
    if any(b == LEGACY_BASIS for b in used.values()):
        peak = results.machine.get("matmul_peak_gflops")
        text = (f"{PEAK_HEADER}: this file predates peaks per precision: every row is divided by the FP32 GEMM peak"
                + (f" ({peak:.0f} GFLOP/s)" if isinstance(peak, int | float) else "")
                + ", so a non-FP32 row's fraction (marked 'of fp32') overstates it")
    else:
        text = (f"{PEAK_HEADER}: GFLOP (INT8: GOP) per call / p50 over the measured matrix-multiply peak of the row's "
                "own precision: " + "; ".join(sorted(set(used.values()))))
    return text + "".join(f"; n/a: {m}" for m in missing) + "."


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{v:.{digits}f}" else f"{v:.{digits}f}"
    return str(v)


def to_csv(results: BenchResults) -> str:
    if results.generation is not None and not results.records:  # a KV-cache decoder's run: its generation rows
        from reports.generation import generation_csv

        return generation_csv(results.generation)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in results.records:
        w.writerow({k: ("" if v is None else v) for k, v in flat_row(r).items()})
    return buf.getvalue()


SUMMARY_COLUMNS = [("backend", "backend"), ("variant", "variant"), ("precision", "precision"),
                   ("batch", "batch_size"), ("dims", "dims"), ("p50 ms [95%]", "latency_ms_p50"), ("p90 ms", "latency_ms_p90"),
                   ("p99 ms", "latency_ms_p99"), ("samples/s", "throughput"), ("RAM MB", "ram_mb"),
                   ("size MB", "model_size_mb"), (PEAK_HEADER, "peak_fraction"), ("max abs err", "max_abs_err"), ("top-1 agree", "top1_agreement"),
                   ("top-1 acc", "top1_acc")]


def to_markdown(results: BenchResults) -> str:
    from calibration.cpu import describe_cpu

    lines = [f"# Benchmark: {results.model}", "",
             f"- created: {results.created_at}", f"- device: {results.records[0].device if results.records else '-'}",
             f"- machine: {describe_cpu(results.machine)}, "
             f"{results.machine.get('ram_gb')} GiB" + (f", GPU {results.machine['gpu']}" if 'gpu' in results.machine
                                                        else ""),
             f"- inputs: {results.config.get('inputs', '-')}",
             f"- warm-up {results.config.get('warmup')}, timed iterations {results.config.get('iters')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items() if k != "platform"), ""]
    if results.records or results.generation is None:  # a KV-cache decoder's run has generation rows only
        header = [h for h, _ in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
    for r in results.records:
        shown = _display(r)
        lines.append("| " + " | ".join(shown[k] for _, k in SUMMARY_COLUMNS) + " |")
    if note := peak_note(results):
        lines += ["", note]
    if results.generation is not None:
        from reports.generation import generation_markdown

        lines += generation_markdown(results.generation)
    if results.warnings:
        lines += ["", "## Warnings", *[f"- {w}" for w in results.warnings]]
    return "\n".join(lines) + "\n"


def result_paths(json_path: Path) -> dict[str, Path]:
    """results.json and its derived files (same stem): the set one run writes together."""
    json_path = Path(json_path)
    return {"csv": json_path.with_suffix(".csv"), "md": json_path.with_suffix(".md"),
            "html": json_path.with_suffix(".html"), "json": json_path}


def check_results_path(json_path: Path, flag: str = "--out", inputs: Iterable[Path] = ()) -> Path:
    """Refuse, before a run (nothing created; the folder is made only when the results are written), a results
    path where results.json or one of its .csv/.md/.html is a folder or one of the run's ``inputs``."""
    inputs = list(inputs)
    for p in result_paths(json_path).values():
        what = flag if p == Path(json_path) else f"{flag} (its {p.suffix} beside it)"
        check_output_file(p, what, "results.json")
        check_not_an_input(p, what, inputs)
    return Path(json_path)


def write_results(results: BenchResults, json_path: Path,
                  html: Callable[[BenchResults, Path], object] | None = None) -> dict[str, Path]:
    """Write results.json with its .csv and .md (and, given ``html``, .html) as one set; return the paths.

    The set is staged beside them and moved into place together, results.json last; a failure or signal
    before that leaves the earlier set as it was. Without ``html`` an older .html is left alone; with it,
    an .html that cannot be made is removed (it would describe another run) and the rest is still written.
    """
    paths = result_paths(json_path)
    names = [p.name for k, p in paths.items() if k != "html" or html is not None]
    with staged_files(paths["json"].parent, names) as stage:
        if html is not None:
            try:
                html(results, stage / paths["json"].name)
            except Exception as exc:  # the results must not be lost to a plotting problem
                results.warnings.append(f"{paths['html'].name} not written: {type(exc).__name__}: {exc}")
        atomic_write_text(stage / paths["csv"].name, to_csv(results))
        atomic_write_text(stage / paths["md"].name, to_markdown(results))
        atomic_write_text(stage / paths["json"].name, results.model_dump_json(indent=2) + "\n")
    if html is None or not paths["html"].is_file():
        paths.pop("html")
    return paths


def rich_table(results: BenchResults) -> Any:
    from rich.table import Table

    if results.generation is not None and not results.records:
        from reports.generation import generation_rich_table

        return generation_rich_table(results.generation, f"{results.model} — generation (cpu)")

    table = Table(title=f"{results.model} — {results.records[0].device if results.records else ''}",
                  caption=peak_note(results), caption_justify="left")
    for h, _ in SUMMARY_COLUMNS:
        table.add_column(h, justify="left" if h in ("backend", "variant", "precision") else "right")
    for r in results.records:
        shown = _display(r)
        table.add_row(*[shown[k] for _, k in SUMMARY_COLUMNS])
    return table
