"""Matplotlib plots of one or more results files, as PNG bytes (Agg; no display, no pyplot state).

Colour tells the series (backend:variant precision) apart, line style the results file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.fsutil import atomic_write_bytes, ensure_writable_dir
from reports.compare import Run, record_label
from reports.generation import GenerationResult
from reports.models import BenchRecord
from reports.pareto import accuracy_metric, pareto_front

LINESTYLES = ["-", "--", ":", "-."]
DPI = 110


@dataclass
class Plot:
    name: str  # file stem and HTML id, e.g. "latency_vs_batch"
    title: str
    png: bytes


def _figure(width: float = 8.0, height: float = 4.6) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _series(runs: Sequence[Run]) -> list[tuple[str, int, str, list[BenchRecord]]]:
    """(name, run index, colour key, records sorted by batch) per run x (model, backend, variant, precision, device)."""
    out = []
    many_models = len({r.model for run in runs for r in run.results.records}) > 1
    many_devices = len({r.device for run in runs for r in run.results.records}) > 1
    for i, run in enumerate(runs):
        groups: dict[tuple[str, ...], list[BenchRecord]] = {}
        for r in run.results.records:
            groups.setdefault((r.model, r.backend, r.variant, r.precision, r.device), []).append(r)
        for (model, _b, _v, _p, device), recs in groups.items():
            key = record_label(recs[0])
            key = (f"{model} " if many_models else "") + key + (f" {device}" if many_devices else "")
            name = key if len(runs) == 1 else f"{key} [{run.label}]"
            out.append((name, i, key, sorted(recs, key=lambda r: r.batch_size)))
    return out


def _colours(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    uniq = list(dict.fromkeys(keys))
    cmap = colormaps["tab10" if len(uniq) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(uniq)}


def _batch_axis(ax: Any, batches: Sequence[int]) -> None:
    uniq = sorted(set(batches))
    if len(uniq) > 1 and uniq[-1] / uniq[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(uniq)
    ax.set_xticklabels([str(b) for b in uniq])
    ax.set_xlabel("batch size")


def _legend(ax: Any, n: int) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              ncols=1 if n <= 14 else 2)


def _per_batch_plot(runs: Sequence[Run], value: Callable[[BenchRecord], float], ylabel: str, title: str,
                    band: Callable[[BenchRecord], tuple[float, float]] | None = None) -> Any:
    series = _series(runs)
    colours = _colours([s[2] for s in series])
    fig = _figure()
    ax = fig.add_subplot()
    for name, run_i, key, recs in series:
        xs = [r.batch_size for r in recs]
        ax.plot(xs, [value(r) for r in recs], marker="o", ms=4, lw=1.6, color=colours[key],
                ls=LINESTYLES[run_i % len(LINESTYLES)], label=name)
        if band is not None:
            lo, hi = zip(*(band(r) for r in recs), strict=True)
            ax.fill_between(xs, lo, hi, color=colours[key], alpha=0.12, lw=0)
    _batch_axis(ax, [r.batch_size for s in series for r in s[3]])
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series))
    return fig


def latency_plot(runs: Sequence[Run]) -> Plot:
    fig = _per_batch_plot(runs, lambda r: r.latency_ms.p50, "latency per call, ms (p50; band to p90)",
                          "Latency vs batch size", band=lambda r: (r.latency_ms.p50, r.latency_ms.p90))
    return Plot("latency_vs_batch", "Latency vs batch size", _png(fig))


def throughput_plot(runs: Sequence[Run]) -> Plot:
    fig = _per_batch_plot(runs, lambda r: r.throughput, "throughput, samples/s", "Throughput vs batch size")
    return Plot("throughput_vs_batch", "Throughput vs batch size", _png(fig))


def accuracy_plot(runs: Sequence[Run]) -> Plot:
    """Accuracy vs p50 latency at each series' smallest batch; the Pareto front joined and ringed."""
    series = _series(runs)
    metric = accuracy_metric([r for s in series for r in s[3]])
    colours = _colours([s[2] for s in series])
    points: list[tuple[float, float]] = []
    names: list[str] = []
    batches = {s[3][0].batch_size for s in series}
    fig = _figure()
    ax = fig.add_subplot()
    for name, run_i, key, recs in series:
        r = recs[0]
        acc = metric.value(r)
        if acc is None:
            continue
        points.append((r.latency_ms.p50, acc))
        names.append(name)
        ax.scatter([r.latency_ms.p50], [acc], s=46, color=colours[key], zorder=3, marker="os^D"[run_i % 4],
                   label=name if len(batches) == 1 else f"{name} (batch {r.batch_size})")
    front = pareto_front(points)
    if front:
        fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
        ax.step(fx, fy, where="post", color="crimson", lw=1.4, alpha=0.8, zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=170, facecolors="none", edgecolors="crimson", lw=1.6, zorder=4)
        for i in front:
            ax.annotate(names[i], points[i], xytext=(8, -12), textcoords="offset points", fontsize=8,
                        color="crimson")
    if points:
        lo = min(p[1] for p in points)
        ax.set_ylim(min(lo - 0.02, 0.95 * lo), 1.005 if metric.key != "top1_acc" else min(1.005, max(
            p[1] for p in points) + 0.05))
        ax.set_xlim(left=0, right=max(p[0] for p in points) * 1.1)
    else:
        ax.text(0.5, 0.5, "no accuracy measured", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("latency per call, ms (p50" + (f", batch {min(batches)})" if len(batches) == 1 else
                                                  ", smallest batch measured)"))
    ax.set_ylabel(metric.label)
    ax.set_title("Accuracy vs latency (Pareto front ringed in red)")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(points) + 1)
    return Plot("accuracy_vs_latency", "Accuracy vs latency (Pareto front)", _png(fig))


def size_memory_plot(runs: Sequence[Run]) -> Plot:
    """Model file size per variant; peak process memory per backend:variant (max over batch sizes), split
    into what was resident before loading and what loading and running the variant added."""
    sizes: dict[str, float] = {}
    mem: dict[str, dict[str, float]] = {}
    for run in runs:
        suffix = f" [{run.label}]" if len(runs) > 1 else ""
        for r in run.results.records:
            if r.model_size_mb is not None:
                sizes[f"{r.variant} ({r.precision})"] = r.model_size_mb
            m = mem.setdefault(record_label(r) + (f" {r.device}" if r.device != "cpu" else "") + suffix, {})
            for k, v in (("ram", r.ram_mb), ("delta", r.ram_delta_mb), ("vram", r.vram_mb)):
                if v is not None:
                    m[k] = max(m.get(k, 0.0), v)
    fig = _figure(11.0, max(3.0, 1.2 + 0.34 * max(len(sizes), len(mem))))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.5])
    names = list(sizes)
    ax1.barh(names, [sizes[n] for n in names], color="#4c72b0")
    for y, n in enumerate(names):
        ax1.text(sizes[n], y, f" {sizes[n]:.1f}", va="center", fontsize=8)
    ax1.set_xlabel("model file size, MB")
    ax1.set_title("Model size per variant")
    ax1.invert_yaxis()
    ax1.margins(x=0.2)
    mnames = list(mem)
    ys = list(range(len(mnames)))
    has_vram = any("vram" in mem[n] for n in mnames)
    h = 0.4 if has_vram else 0.7
    y_ram = [y - h / 2 if has_vram else float(y) for y in ys]
    ram = [mem[n].get("ram", 0.0) for n in mnames]
    added = [min(mem[n].get("delta", 0.0), mem[n].get("ram", 0.0)) for n in mnames]
    before = [total - add for total, add in zip(ram, added, strict=True)]
    ax2.barh(y_ram, before, height=h, color="#c8d6c8", label="RSS before loading")
    ax2.barh(y_ram, added, left=before, height=h, color="#55a868", label="added by load + run")
    for yr, total, add in zip(y_ram, ram, added, strict=True):
        ax2.text(total, yr, f" {total:.0f} (+{add:.0f})", va="center", fontsize=8)
    if has_vram:
        ax2.barh([y + h / 2 for y in ys], [mem[n].get("vram", 0.0) for n in mnames], height=h, color="#c44e52",
                 label="peak GPU memory")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, frameon=False)
    ax2.set_yticks(ys)
    ax2.set_yticklabels(mnames, fontsize=8)
    ax2.invert_yaxis()
    ax2.margins(x=0.25)
    ax2.set_xlabel("MB, process peak RSS (max over batch sizes)")
    ax2.set_title("Memory per backend and variant")
    return Plot("size_memory", "Model size and memory", _png(fig))


PLOTS: dict[str, Callable[[Sequence[Run]], Plot]] = {
    "latency_vs_batch": latency_plot,
    "throughput_vs_batch": throughput_plot,
    "accuracy_vs_latency": accuracy_plot,
    "size_memory": size_memory_plot,
}


# -- a KV-cache decoder's generation rows (BenchResults.generation) ----------------------------------------------------
def _generation_series(runs: Sequence[Run]) -> list[tuple[str, int, str, list[GenerationResult]]]:
    """(name, run index, colour key, KV-cache rows of the run's main new-token count) per run x backend:variant
    precision; the no-cache comparison's rows (another new-token count) are left out."""
    out = []
    for i, run in enumerate(runs):
        gen = run.results.generation
        if gen is None:
            continue
        groups: dict[str, list[GenerationResult]] = {}
        for r in gen.rows:
            if r.kv_cache and r.new_tokens == gen.config.get("new_tokens", r.new_tokens):
                groups.setdefault(f"{r.backend}:{r.variant} {r.precision}", []).append(r)
        for key, rows in groups.items():
            out.append((key if len(runs) == 1 else f"{key} [{run.label}]", i, key, rows))
    return out


def generation_tokens_plot(runs: Sequence[Run]) -> Plot:
    """Decode tokens/s per backend x variant (bars), one bar group per batch size, at the shortest prompt timed."""
    series = _generation_series(runs)
    colours = _colours([s[2] for s in series])
    batches = sorted({r.batch_size for s in series for r in s[3]})
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for j, (name, _run_i, key, rows) in enumerate(series):
        shortest = min(r.prompt_length for r in rows)
        by_batch = {r.batch_size: r.decode_tokens_per_s for r in rows if r.prompt_length == shortest}
        xs = [k + j * width for k, b in enumerate(batches) if b in by_batch]
        ax.bar(xs, [by_batch[b] for b in batches if b in by_batch], width=width, color=colours[key],
               label=f"{name} (prompt {shortest})")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(batches))])
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (p50 time per output token)")
    ax.set_title("Decode tokens/s per backend and variant")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, len(series))
    return Plot("generation_tokens_per_s", "Decode tokens/s per backend and variant", _png(fig))


def generation_ttft_plot(runs: Sequence[Run]) -> Plot:
    """Time to first token vs prompt length, per backend x variant at its smallest batch (band: the p50 interval)."""
    series = _generation_series(runs)
    colours = _colours([s[2] for s in series])
    fig = _figure()
    ax = fig.add_subplot()
    for name, run_i, key, rows in series:
        batch = min(r.batch_size for r in rows)
        pts = sorted((r for r in rows if r.batch_size == batch), key=lambda r: r.prompt_length)
        xs = [r.prompt_length for r in pts]
        ax.plot(xs, [r.ttft_ms.p50 for r in pts], marker="o", ms=4, lw=1.6, color=colours[key],
                ls=LINESTYLES[run_i % len(LINESTYLES)], label=f"{name} (batch {batch})")
        bands = [r.ttft_ms.p50_interval or (r.ttft_ms.p50, r.ttft_ms.p50) for r in pts]
        ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands], color=colours[key], alpha=0.12, lw=0)
    ax.set_xlabel("prompt length, tokens")
    ax.set_ylabel("time to first token, ms (p50)")
    ax.set_ylim(bottom=0)
    ax.set_title("Time to first token vs prompt length")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series))
    return Plot("generation_ttft_vs_prompt", "Time to first token vs prompt length", _png(fig))


def render_plots(runs: Sequence[Run]) -> list[Plot]:
    """The one-shot plots when a run has one-shot records, the generation plots when a run has generation rows."""
    plots = []
    if any(run.results.records for run in runs):
        plots += [make(runs) for make in PLOTS.values()]
    if _generation_series(runs):
        plots += [generation_tokens_plot(runs), generation_ttft_plot(runs)]
    return plots


def write_pngs(plots: Sequence[Plot], folder: Path) -> list[Path]:
    ensure_writable_dir(Path(folder))
    paths = []
    for p in plots:
        path = Path(folder) / f"{p.name}.png"
        atomic_write_bytes(path, p.png)
        paths.append(path)
    return paths
