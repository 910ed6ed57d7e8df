"""The generation benchmark's typed records (``runtimes.generation`` fills them) and their tables.

A KV-cache decoder is measured as a generation loop, not one call: per (backend, variant, prompt length, batch) one
:class:`GenerationResult` (time to first token = the prefill step, time per output token = the decode steps,
tokens/s, memory), the no-cache path (every new token a full forward over the whole sequence) as rows with
``kv_cache=False``, and per (backend, variant) one :class:`GenerationAccuracy` (greedy agreement with the reference,
logits cosine per step, the KV-cache path's tokens against the no-cache path's, perplexity on real text when given).
They live in ``BenchResults.generation``; JSON holds them, CSV/Markdown/HTML/rich show the tables below.
"""

from __future__ import annotations

import csv
import html
import io
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.metrics import LatencyStats


class GenerationResult(BaseModel):
    """One (backend, variant, prompt length, batch, path) generation timing: prefill, then decode steps."""

    model_config = ConfigDict(extra="forbid")

    model: str
    backend: str
    variant: str = Field(description="Manifest artifact name ('fp32', 'int8_dynamic', ...; 'torch' for PyTorch)")
    precision: str
    batch_size: int = Field(ge=1)
    prompt_length: int = Field(ge=1)
    new_tokens: int = Field(ge=2, description="Tokens generated per sequence: one from the prefill, the rest from "
                                              "decode steps")
    kv_cache: bool = Field(default=True, description="False: the no-cache path, each new token a full forward over "
                                                     "prompt + tokens so far")
    ttft_ms: LatencyStats = Field(description="Time to first token: the prefill step (no cache: the first forward)")
    tpot_ms: LatencyStats = Field(description="Time per output token: the decode steps' time / (new_tokens - 1)")
    total_ms: LatencyStats = Field(description="The whole unit: session opened, prefill, every decode step")
    decode_tokens_per_s: float = Field(description="batch x (new_tokens - 1) / the decode steps' p50 time")
    tokens_per_s: float = Field(description="End to end: batch x new_tokens / the whole unit's p50 time")
    peak_rss_delta_mb: float | None = Field(default=None, description="Peak process RSS during one untimed unit "
                                                                      "minus the RSS before it: activations and the KV "
                                                                      "cache this point allocated beyond what the "
                                                                      "runtime already held (MB)")
    kv_cache_mb: float | None = Field(default=None, description="The KV cache's bytes at the end of the unit (MB)")
    model_size_mb: float | None = None
    input_digest: str = Field(description="sha256 prefix of the prompt: equal across backends")
    notes: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


class GenerationAccuracy(BaseModel):
    """One (backend, variant)'s generation accuracy against the reference (eager PyTorch where it runs)."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    variant: str
    precision: str
    reference: str = Field(description="What it is compared with, e.g. 'eager:torch:fp32'")
    prompts: int = Field(description="Prompts (rows) decoded")
    tokens: int = Field(description="Tokens generated per prompt")
    agreement: float = Field(description="Free-running greedy decoding: fraction of generated tokens equal to the "
                                         "reference's, position by position")
    forced_agreement: float = Field(description="Fed the reference's tokens (teacher forcing): fraction of steps "
                                                "whose argmax equals the reference's")
    cosine_min: float = Field(description="Logits cosine with the reference per step under teacher forcing: lowest")
    cosine_mean: float
    kv_matches_no_cache: bool = Field(description="The KV-cache path's greedy tokens equal the no-cache path's "
                                                  "(a full forward per token) on the same prompts")
    perplexity: float | None = Field(default=None, description="exp(mean next-token NLL) on held-out text (bench "
                                                               "--text); None without it (agreement and cosine only)")
    perplexity_basis: str | None = None
    model_size_mb: float | None = None
    notes: list[str] = Field(default_factory=list)


class GenerationResults(BaseModel):
    """The generation benchmark of one artifact: timings, checks, what was skipped and why."""

    model_config = ConfigDict(extra="forbid")

    rows: list[GenerationResult] = Field(default_factory=list)
    checks: list[GenerationAccuracy] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="'backend:variant: why' for each that cannot run it")
    config: dict[str, Any] = Field(default_factory=dict)
    random_init: bool = Field(default=False, description="The manifest knows the weights are random: a perplexity "
                                                         "compares variants, it measures no language")

    def row(self, backend: str, variant: str, *, batch: int, prompt: int, new_tokens: int | None = None,
            kv_cache: bool = True) -> GenerationResult | None:
        for r in self.rows:
            if (r.backend, r.variant, r.batch_size, r.prompt_length, r.kv_cache) == (backend, variant, batch, prompt,
                                                                                     kv_cache) \
                    and (new_tokens is None or r.new_tokens == new_tokens):
                return r
        return None

    def cache_speedups(self) -> list[tuple[GenerationResult, GenerationResult, float]]:
        """(KV-cache row, no-cache row, KV tokens/s over no-cache tokens/s) for every no-cache row."""
        out = []
        for nc in (r for r in self.rows if not r.kv_cache):
            kv = self.row(nc.backend, nc.variant, batch=nc.batch_size, prompt=nc.prompt_length,
                          new_tokens=nc.new_tokens)
            if kv is not None:
                out.append((kv, nc, kv.tokens_per_s / nc.tokens_per_s))
        return out


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _p50(lat: LatencyStats) -> str:
    iv = lat.p50_interval
    return f"{lat.p50:.2f}" + (f" [{iv[0]:.2f}-{iv[1]:.2f}]" if iv else "")


TIMING_HEADER = ["backend", "variant", "precision", "path", "batch", "prompt", "new", "TTFT ms [95%]",
                 "TPOT ms [95%]", "decode tok/s", "tok/s", "RSS delta MB", "KV MB", "size MB"]
CHECK_HEADER = ["backend", "variant", "precision", "reference", "agreement", "forced agreement", "cosine min",
                "cosine mean", "KV = no-cache", "perplexity"]


def timing_cells(r: GenerationResult) -> list[str]:
    return [r.backend, r.variant, r.precision, "kv-cache" if r.kv_cache else "no-cache", str(r.batch_size),
            str(r.prompt_length), str(r.new_tokens), _p50(r.ttft_ms), _p50(r.tpot_ms), _f(r.decode_tokens_per_s, 1),
            _f(r.tokens_per_s, 1), _f(r.peak_rss_delta_mb, 1), _f(r.kv_cache_mb, 3), _f(r.model_size_mb, 2)]


def check_cells(c: GenerationAccuracy) -> list[str]:
    return [c.backend, c.variant, c.precision, c.reference, f"{c.agreement:.1%}", f"{c.forced_agreement:.1%}",
            f"{c.cosine_min:.5f}", f"{c.cosine_mean:.5f}", "yes" if c.kv_matches_no_cache else "NO",
            _f(c.perplexity, 3)]


def perplexity_note(gen: GenerationResults) -> str:
    """What the perplexity column is: its basis, or why it is empty."""
    basis = next((c.perplexity_basis for c in gen.checks if c.perplexity is not None and c.perplexity_basis), None)
    if basis is not None:
        return "Perplexity: " + basis + (" (random-init weights: it compares the variants, it measures no language)"
                                         if gen.random_init and "random-init" not in basis else "") + "."
    return ("No held-out text (bench --text FILE or stdlib): agreement and cosine only"
            + (" (random-init weights)." if gen.random_init else "."))


def generation_markdown(gen: GenerationResults) -> list[str]:
    """Markdown lines: the timing table, the speedups of the KV cache, the checks, what was skipped."""
    lines = ["", "## Generation (KV cache)", "", "| " + " | ".join(TIMING_HEADER) + " |",
             "|" + "---|" * len(TIMING_HEADER)]
    lines += ["| " + " | ".join(timing_cells(r)) + " |" for r in gen.rows]
    if speedups := gen.cache_speedups():
        lines += ["", "KV cache vs no cache (end-to-end tokens/s): " + "; ".join(
            f"{kv.backend}:{kv.variant} batch {kv.batch_size} {kv.new_tokens} tokens: {x:.1f}x"
            for kv, _, x in speedups)]
    if gen.checks:
        lines += ["", "| " + " | ".join(CHECK_HEADER) + " |", "|" + "---|" * len(CHECK_HEADER)]
        lines += ["| " + " | ".join(check_cells(c)) + " |" for c in gen.checks]
    lines += ["", perplexity_note(gen)]
    if gen.skipped:
        lines += ["", "Skipped:", *[f"- {s}" for s in gen.skipped]]
    return lines


def generation_csv(gen: GenerationResults) -> str:
    """One CSV row per timing row (p50s with their intervals); the checks joined by (backend, variant)."""
    checks = {(c.backend, c.variant): c for c in gen.checks}
    cols = ["model", "backend", "variant", "precision", "kv_cache", "batch_size", "prompt_length", "new_tokens",
            "ttft_ms_p50", "ttft_ms_p50_lo", "ttft_ms_p50_hi", "tpot_ms_p50", "tpot_ms_p50_lo", "tpot_ms_p50_hi",
            "decode_tokens_per_s", "tokens_per_s", "peak_rss_delta_mb", "kv_cache_mb", "model_size_mb",
            "agreement", "forced_agreement", "cosine_min", "kv_matches_no_cache", "perplexity", "input_digest"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in gen.rows:
        c = checks.get((r.backend, r.variant))
        row: dict[str, Any] = {
            "model": r.model, "backend": r.backend, "variant": r.variant, "precision": r.precision,
            "kv_cache": r.kv_cache, "batch_size": r.batch_size, "prompt_length": r.prompt_length,
            "new_tokens": r.new_tokens, "ttft_ms_p50": r.ttft_ms.p50, "tpot_ms_p50": r.tpot_ms.p50,
            "ttft_ms_p50_lo": r.ttft_ms.p50_interval[0] if r.ttft_ms.p50_interval else None,
            "ttft_ms_p50_hi": r.ttft_ms.p50_interval[1] if r.ttft_ms.p50_interval else None,
            "tpot_ms_p50_lo": r.tpot_ms.p50_interval[0] if r.tpot_ms.p50_interval else None,
            "tpot_ms_p50_hi": r.tpot_ms.p50_interval[1] if r.tpot_ms.p50_interval else None,
            "decode_tokens_per_s": r.decode_tokens_per_s, "tokens_per_s": r.tokens_per_s,
            "peak_rss_delta_mb": r.peak_rss_delta_mb, "kv_cache_mb": r.kv_cache_mb, "model_size_mb": r.model_size_mb,
            "agreement": c.agreement if c else None, "forced_agreement": c.forced_agreement if c else None,
            "cosine_min": c.cosine_min if c else None, "kv_matches_no_cache": c.kv_matches_no_cache if c else None,
            "perplexity": c.perplexity if c else None, "input_digest": r.input_digest}
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def generation_html(gen: GenerationResults) -> str:
    """An HTML section with the two tables (escaped)."""
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = ["<h2>Generation (KV cache)</h2>", table(TIMING_HEADER, [timing_cells(r) for r in gen.rows])]
    if gen.checks:
        parts.append(table(CHECK_HEADER, [check_cells(c) for c in gen.checks]))
    parts.append(f"<p>{html.escape(perplexity_note(gen))}</p>")
    if gen.skipped:
        parts.append("<ul>" + "".join(f"<li>skipped {html.escape(s)}</li>" for s in gen.skipped) + "</ul>")
    return "\n".join(parts)


def generation_rich_table(gen: GenerationResults, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for h in TIMING_HEADER:
        table.add_column(h, justify="left" if h in ("backend", "variant", "precision", "path") else "right")
    for r in gen.rows:
        table.add_row(*timing_cells(r))
    if not gen.checks:
        return table
    from rich.console import Group

    checks = Table(title="checks against the reference", caption=perplexity_note(gen))
    for h in CHECK_HEADER:
        checks.add_column(h, justify="left" if h in ("backend", "variant", "precision", "reference") else "right")
    for c in gen.checks:
        checks.add_row(*check_cells(c))
    return Group(table, checks)
