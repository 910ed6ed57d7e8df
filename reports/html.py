"""One self-contained HTML report from one or more results files.

Plots are embedded as base64 PNG; there are no scripts, fonts or links to fetch, so the file opens
offline and can be mailed or attached to a CI run. Sections: recommendation, comparison (several
files), plots, every result row, and each run's machine, settings and warnings.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InputError
from core.fsutil import atomic_write_text, check_not_an_input, check_output_file, ensure_writable_dir
from core.metrics import NOISE_RATIO
from reports.compare import Comparison, Run, compare_runs, key_text, load_runs, row_key
from reports.models import BenchResults
from reports.plots import Plot, render_plots, write_pngs
from reports.recommend import Recommendation, recommend
from reports.writers import CSV_COLUMNS, PEAK_HEADER, _fmt, flat_row, peak_note

#: The default accuracy budget: at most this much top-1 (agreement or accuracy) may be lost.
DEFAULT_BUDGET = 1.0


class ReportConfig(BaseModel):
    """A `report` request."""

    model_config = ConfigDict(extra="forbid")

    results: list[Path] = Field(min_length=1, description="results.json files; the first is the baseline")
    html: Path = Field(description="HTML file to write")
    png_dir: Path | None = Field(default=None, description="Also write every plot as PNG into this folder")
    accuracy_budget: float = Field(default=DEFAULT_BUDGET, ge=0, description="Largest accuracy drop allowed, in points")
    fail_if_slower: float | None = Field(default=None, ge=0,
                                         description="Percent: rows slower than the baseline by more regress")


@dataclass
class Report:
    runs: list[Run]
    plots: list[Plot]
    recommendations: list[tuple[Run, list[Recommendation]]]
    comparison: Comparison | None
    html_path: Path
    png_paths: list[Path] = field(default_factory=list)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
 padding:0 24px 48px;color:#1d232b;background:#fff;line-height:1.45}
h1{margin:24px 0 4px;font-size:26px} h2{margin-top:36px;border-bottom:2px solid #e3e7ec;padding-bottom:4px}
h3{margin:18px 0 6px;font-size:17px} .muted{color:#5d6874;font-size:14px}
nav a{margin-right:14px;color:#2457a6;text-decoration:none} nav{margin:10px 0 8px}
.rec{border:1px solid #d6e4d3;background:#f5faf4;border-radius:8px;padding:10px 16px;margin:12px 0}
.rec.none{border-color:#ecd3d3;background:#fcf5f5} .pick{font-size:18px;margin:4px 0 8px}
.rec ul{margin:4px 0 6px 0;padding-left:20px} .rec li{margin:2px 0}
figure{margin:18px 0;border:1px solid #e3e7ec;border-radius:8px;padding:10px} figure img{max-width:100%;height:auto}
figcaption{color:#5d6874;font-size:13px;margin-top:4px}
.scroll{overflow-x:auto} table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #e3e7ec;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f5f8;white-space:normal;vertical-align:bottom;max-width:160px} td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafbfc}
td.slower{background:#fde2e1!important;color:#8a1c17} td.faster{background:#e1f5e1!important;color:#1b5e20}
tr.regressed td{font-weight:600} .warn{color:#8a5a00} .bad{color:#8a1c17;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:14px} dt{color:#5d6874}
"""

PLOT_CAPTIONS = {
    "latency_vs_batch": "p50 latency per call (line) and the p50–p90 spread (band). Lower is better.",
    "throughput_vs_batch": "Samples per second = batch size / mean latency. Higher is better.",
    "accuracy_vs_latency": "Each backend/variant at its smallest batch size. Points on the red Pareto front are "
                           "not beaten on both speed and accuracy by any other point.",
    "size_memory": "Model file size per variant; peak process memory per backend/variant (grey: already "
                   "resident before loading it, green: added by loading and running it).",
    "generation_tokens_per_s": "A KV-cache decoder: decode tokens/s (batch / p50 time per output token) per "
                               "backend and variant, at each batch size and the shortest prompt. Higher is better.",
    "generation_ttft_vs_prompt": "Time to first token (the prefill step, p50; band: its 95% interval) against the "
                                 "prompt length, at each backend and variant's smallest batch. Lower is better.",
}


def _e(v: Any) -> str:
    return escape(str(v), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int, attrs: Sequence[str] = ()) -> str:
    """rows hold ready HTML cells (``<td>..</td>``); the first ``left`` header cells are left-aligned."""
    head = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(f"<tr{attrs[i] if i < len(attrs) else ''}>{''.join(r)}</tr>" for i, r in enumerate(rows))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _td(v: Any, left: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("l" if left else "", cls) if c)
    return f'<td class="{classes}">{_e(v)}</td>' if classes else f"<td>{_e(v)}</td>"


def _recommendation_html(recs: list[tuple[Run, list[Recommendation]]], budget: float) -> str:
    parts = ['<section id="recommendation"><h2>Recommendation</h2>',
             f'<p class="muted">The fastest variant whose accuracy drop against the FP32 reference is at most '
             f"{budget:g} points (change with --accuracy-budget), per model and device.</p>"]
    many = len(recs) > 1
    for run, items in recs:
        for r in items:
            title = f"{r.model} on {r.device}" + (f" — {run.label}" if many else "")
            cls = "rec" if r.choice else "rec none"
            pick = (f'<p class="pick">Use <b>{_e(r.choice)}</b> for latency (batch {r.batch_size}); '
                    f"<b>{_e(r.throughput_choice)}</b> for throughput.</p>" if r.choice
                    else '<p class="pick bad">No variant fits the accuracy budget.</p>')
            ev = "".join(f"<li>{_e(x)}</li>" for x in r.evidence)
            exc = ("<p><b>Over the budget:</b></p><ul>" + "".join(f"<li>{_e(x)}</li>" for x in r.excluded) + "</ul>"
                   if r.excluded else "")
            parts.append(f'<div class="{cls}"><h3>{_e(title)}</h3>{pick}<ul>{ev}</ul>{exc}</div>')
    parts.append("</section>")
    return "".join(parts)


def _ratio_cell(ratio: float | None, higher_is_worse: bool, regressed: bool = False) -> str:
    if ratio is None:
        return _td("-")
    worse = ratio > NOISE_RATIO if higher_is_worse else ratio < 1 / NOISE_RATIO
    better = ratio < 1 / NOISE_RATIO if higher_is_worse else ratio > NOISE_RATIO
    cls = "slower" if (worse or regressed) else "faster" if better else ""
    return _td(f"{ratio:.2f}x", cls=cls)


def _comparison_html(cmp: Comparison, threshold: float | None) -> str:
    labels = cmp.labels
    regs = cmp.regressions(threshold) if threshold is not None else []
    regressed = {(r.key, r.run) for r in regs}
    header = ["model", "backend", "variant", "precision", "device", "batch"]
    header += [f"p50 ms {lab}" for lab in labels]
    header += [f"latency {lab} / {labels[0]}" for lab in labels[1:]]
    header += [f"samples/s {lab} / {labels[0]}" for lab in labels[1:]]
    header.append("note")
    rows, attrs = [], []
    for row in cmp.rows:
        cells = [_td(v, left=i < 5) for i, v in enumerate(row.key)]
        cells += [_td(_fmt(r.latency_ms.p50) if r else "-") for r in row.records]
        cells += [_ratio_cell(row.latency_ratio(i), True, (row.key, labels[i]) in regressed)
                  for i in range(1, len(labels))]
        cells += [_ratio_cell(row.throughput_ratio(i), False) for i in range(1, len(labels))]
        notes = []
        if not row.same_inputs():
            notes.append("different inputs")
        if any(r is None for r in row.records):
            notes.append("not in every run")
        is_regression = any((row.key, lab) in regressed for lab in labels[1:])
        if is_regression:
            notes.append(f"REGRESSION > {threshold:g}%")
        cells.append(_td(", ".join(notes), left=True))
        rows.append(cells)
        attrs.append(' class="regressed"' if is_regression else "")
    intro = (f'<p class="muted">Baseline: <b>{_e(labels[0])}</b>. Ratios are each run divided by the baseline '
             "(latency above 1 = slower; throughput above 1 = faster). Rows are matched by model, backend, "
             "variant, precision, device and batch size.</p>")
    machines = "".join(f"<li><b>{_e(r.label)}</b>: {_e(_machine_text(r.results))}</li>" for r in cmp.runs)
    gate = ""
    if threshold is not None:
        gate = (f'<p class="bad">{len(regs)} row(s) more than {threshold:g}% slower than the baseline:</p><ul>'
                + "".join(f"<li>{_e(r.describe(labels[0]))}</li>" for r in regs) + "</ul>" if regs
                else f"<p>No row is more than {threshold:g}% slower than the baseline.</p>")
    return (f'<section id="comparison"><h2>Comparison</h2>{intro}<ul>{machines}</ul>{gate}'
            f"{_table(header, rows, left=5, attrs=attrs)}</section>")


def _machine_text(res: BenchResults) -> str:
    from calibration.cpu import describe_cpu

    m = res.machine
    text = f"{describe_cpu(m)}, {m.get('ram_gb', '?')} GiB RAM"
    if m.get("gpu"):
        text += f", GPU {m['gpu']}"
    if m.get("hostname"):
        text += f" (host {m['hostname']})"
    threads = res.config.get("threads")
    return text + f"; threads {threads if threads else 'default'}; created {res.created_at}"


def _plots_html(plots: Sequence[Plot]) -> str:
    figs = []
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        figs.append(f'<figure id="plot-{_e(p.name)}"><img alt="{_e(p.title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_e(p.title)}: {_e(PLOT_CAPTIONS.get(p.name, ''))}</figcaption></figure>")
    return '<section id="plots"><h2>Plots</h2>' + "".join(figs) + "</section>"


def _results_html(runs: Sequence[Run]) -> str:
    parts = ['<section id="results"><h2>All results</h2>',
             '<p class="muted">Every measurement, as in results.json (latencies in ms, memory in MB).</p>']
    cols = [c for c in CSV_COLUMNS if c != "model"]
    header = [f"peak_fraction: {PEAK_HEADER}" if c == "peak_fraction" else c for c in cols]  # peak_basis says which
    for run in runs:
        rows, attrs = [], []
        for rec in run.results.records:
            flat = flat_row(rec)
            rows.append([_td(_fmt(flat[c]), left=i < 4) for i, c in enumerate(cols)])
            attrs.append(f' data-key="{_e(key_text(row_key(rec)))}"')
        models = ", ".join(sorted({r.model for r in run.results.records}))
        parts.append(f'<h3 data-run="{_e(run.label)}">{_e(run.label)} — {_e(models or run.results.model)}</h3>')
        if rows or run.results.generation is None:  # a KV-cache decoder's run: its generation tables only
            parts.append(_table(header, rows, left=4, attrs=attrs))
        if note := peak_note(run.results):
            parts.append(f'<p class="muted">{_e(note)}</p>')
        if run.results.generation is not None:
            from reports.generation import generation_html

            parts.append(generation_html(run.results.generation))
    parts.append("</section>")
    return "".join(parts)


def _runs_html(runs: Sequence[Run]) -> str:
    parts = ['<section id="runs"><h2>Runs</h2>']
    for run in runs:
        res = run.results
        cfg = res.config
        items = [("file", str(run.path)), ("machine", _machine_text(res)), ("inputs", cfg.get("inputs", "-")),
                 ("timing", f"{cfg.get('warmup', '?')} warm-up + {cfg.get('iters', '?')} timed iterations"),
                 ("backends", ", ".join(cfg.get("backends", [])) or "-"),
                 ("versions", ", ".join(f"{k} {v}" for k, v in res.versions.items()))]
        dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
        warn = ("".join(f'<li class="warn">{_e(w)}</li>' for w in res.warnings))
        parts.append(f"<h3>{_e(run.label)}</h3><dl>{dl}</dl>" + (f"<ul>{warn}</ul>" if warn else ""))
    parts.append("</section>")
    return "".join(parts)


def render_html(runs: Sequence[Run], plots: Sequence[Plot], recs: list[tuple[Run, list[Recommendation]]],
                comparison: Comparison | None, budget: float, threshold: float | None = None) -> str:
    models = ", ".join(dict.fromkeys(r.model for run in runs for r in run.results.records))
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    nav = ['<a href="#recommendation">Recommendation</a>']
    if comparison is not None:
        nav.append('<a href="#comparison">Comparison</a>')
    nav += ['<a href="#plots">Plots</a>', '<a href="#results">All results</a>', '<a href="#runs">Runs</a>']
    body = [f"<h1>Benchmark report: {_e(models)}</h1>",
            f'<p class="muted">Generated {_e(now)} from {len(runs)} results file(s): '
            f"{_e(', '.join(r.label for r in runs))}.</p>",
            f"<nav>{''.join(nav)}</nav>",
            _recommendation_html(recs, budget)]
    if comparison is not None:
        body.append(_comparison_html(comparison, threshold))
    body += [_plots_html(plots), _results_html(runs), _runs_html(runs)]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Benchmark report: {_e(models)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_report(runs: list[Run], html_path: Path, budget: float = DEFAULT_BUDGET,
                 png_dir: Path | None = None, threshold: float | None = None) -> Report:
    """Plots, recommendations and (for several runs) the comparison; writes the HTML (and PNGs)."""
    ensure_writable_dir(Path(html_path).parent)
    plots = render_plots(runs)
    recs = [(run, recommend(run.results, budget)) for run in runs]
    comparison = compare_runs(runs) if len(runs) > 1 else None
    report = Report(runs=runs, plots=plots, recommendations=recs, comparison=comparison, html_path=Path(html_path))
    if png_dir is not None:
        report.png_paths = write_pngs(plots, png_dir)
    atomic_write_text(report.html_path, render_html(runs, plots, recs, comparison, budget, threshold))
    return report


def make_report(cfg: ReportConfig) -> Report:
    """Load every results file (each bad one is one clear InputError), then ``build_report``."""
    if cfg.fail_if_slower is not None and len(cfg.results) < 2:
        raise InputError("--fail-if-slower needs at least two results files: the baseline first, then the new run")
    check_output_file(cfg.html, "--html", "report.html")
    check_not_an_input(cfg.html, "--html", cfg.results)
    if cfg.png_dir is not None and cfg.png_dir.exists() and not cfg.png_dir.is_dir():
        raise InputError(f"--png-dir {cfg.png_dir} is a file; expected a folder to write the PNG plots into")
    if cfg.png_dir is not None:  # the plots are written as PNG_DIR/*.png
        check_not_an_input(cfg.png_dir, "--png-dir", [p.parent for p in cfg.results if p.suffix.lower() == ".png"])
    return build_report(load_runs(cfg.results), cfg.html, cfg.accuracy_budget, cfg.png_dir, cfg.fail_if_slower)


def write_bench_html(results: BenchResults, json_path: Path) -> Path:
    """results.html beside a freshly written results.json (what `bench` calls)."""
    json_path = Path(json_path)
    run = Run(label=json_path.stem, path=json_path, results=results)
    return build_report([run], json_path.with_suffix(".html")).html_path
