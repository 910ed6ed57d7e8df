"""The sweep's combined output: ``OUT/results.json`` (source of truth), ``OUT/report.md``, and
``OUT/bench/results.json`` (+ .csv, .md): the done rows as one bench results file that ``cli.py report`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.fsutil import atomic_write_text
from core.manifest import library_versions, utc_now
from core.transaction import staged_files
from reports.models import BenchRecord, BenchResults
from reports.writers import write_results
from sweep.cells import BenchCell, CellState, CellStatus, ConvertCell, cpu_model

SWEEP_SCHEMA_VERSION = 1


def driver_machine() -> dict[str, Any]:
    """The machine that ran the sweep's driver, without importing torch (reports.models.machine_info does, for
    its GPU name: seconds a re-run that finds every cell done should not spend). Each CUDA row names its GPU."""
    import platform

    import psutil

    return {"cpu_model": cpu_model(), "hostname": platform.node(), "processor": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1)}


class ConvertRow(BaseModel):
    """One convert cell."""

    model_config = ConfigDict(extra="forbid")

    cell: str
    model: str
    conversion: str
    status: CellStatus
    error: str | None = None
    notes: list[str] = Field(default_factory=list)
    node: str = ""
    cpu_model: str = ""
    wall_s: float = 0.0
    reused: bool = Field(description="Finished in an earlier run: found done and not run again")
    artifact_dir: str | None = None


class SweepRow(BaseModel):
    """One bench cell: where it ran, how it ended, and (when done) the record ``bench`` wrote."""

    model_config = ConfigDict(extra="forbid")

    cell: str = Field(description="The cell's content key (OUT/cells/KEY)")
    convert_cell: str
    model: str
    conversion: str
    backend: str
    variant: str
    device: str
    batch_size: int
    threads: int
    status: CellStatus
    error: str | None = Field(default=None, description="One line: why it failed or was skipped")
    notes: list[str] = Field(default_factory=list)
    node: str = Field(default="", description="Hostname (and Ray node id) it ran on")
    cpu_model: str = ""
    gpu: str | None = Field(default=None, description="GPU name for CUDA cells, else None")
    started_at: str = ""
    wall_s: float = Field(default=0.0, description="The cell's own wall time (s)")
    reused: bool = Field(description="Finished in an earlier run: found done and not run again")
    record: BenchRecord | None = None


class SweepResults(BaseModel):
    """``OUT/results.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SWEEP_SCHEMA_VERSION
    kind: Literal["sweep"] = "sweep"
    created_at: str = Field(default_factory=utc_now)
    executor: str = Field(description="local (this process, one cell after another) or ray ADDRESS")
    plan: dict[str, Any]
    machine: dict[str, Any] = Field(default_factory=lambda: driver_machine())
    versions: dict[str, str] = Field(default_factory=library_versions)
    wall_s: float = Field(description="This run's wall time, reused cells included (s)")
    summary: dict[str, int] = Field(default_factory=dict)
    converts: list[ConvertRow] = Field(default_factory=list)
    rows: list[SweepRow] = Field(default_factory=list)

    def failures(self) -> list[str]:
        """One line per failed cell: which, and why."""
        lines = [f"{c.model} ({c.conversion}) convert: {c.error}" for c in self.converts if c.status == "failed"]
        return lines + [f"{r.model} ({r.conversion}) {r.backend}/{r.variant} {r.device} batch {r.batch_size}: "
                        f"{r.error}" for r in self.rows if r.status == "failed"]


def combine(plan: dict[str, Any], executor: str, wall_s: float, converts: list[ConvertCell],
            benches: list[BenchCell], states: dict[str, CellState], reused: set[str]) -> SweepResults:
    """Every planned cell, in plan order, with its state."""
    crow = [ConvertRow(cell=c.key, model=c.model.label, conversion=c.conversion_name, status=s.status, error=s.error,
                       notes=s.notes, node=s.node, cpu_model=s.cpu_model, wall_s=s.wall_s, reused=c.key in reused,
                       artifact_dir=s.artifact_dir)
            for c in converts if (s := states[c.key])]
    rows = []
    for b in benches:
        s = states[b.key]
        rows.append(SweepRow(cell=b.key, convert_cell=b.convert_key, model=b.model, conversion=b.conversion,
                             backend=b.backend, variant=b.variant, device=b.device, batch_size=b.batch_size,
                             threads=b.threads, status=s.status, error=s.error, notes=s.notes, node=s.node,
                             cpu_model=s.cpu_model, gpu=s.gpu, started_at=s.started_at, wall_s=s.wall_s,
                             reused=b.key in reused, record=s.records[0] if s.records else None))
    all_states = [states[c.key] for c in converts] + [states[b.key] for b in benches]
    summary = {"cells": len(all_states), "reused": len(reused), "ran": len(all_states) - len(reused)}
    for status in ("done", "failed", "skipped"):
        summary[status] = sum(s.status == status for s in all_states)
    return SweepResults(executor=executor, plan=plan, wall_s=wall_s, summary=summary, converts=crow, rows=rows)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _p50(r: BenchRecord | None) -> str:
    if r is None:
        return "-"
    lat = r.latency_ms
    return _fmt(lat.p50) + (f" [{_fmt(lat.p50_interval[0])}-{_fmt(lat.p50_interval[1])}]" if lat.p50_interval else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(res: SweepResults) -> str:
    s = res.summary
    lines = [f"# Sweep ({res.executor})", "", f"- created: {res.created_at}",
             f"- machine: {res.machine.get('cpu_model', '-')}, {res.machine.get('cpu_count')} cores",
             f"- cells: {s.get('cells')} ({s.get('done')} done, {s.get('failed')} failed, {s.get('skipped')} skipped; "
             f"{s.get('reused')} reused from an earlier run), wall time {res.wall_s:.1f} s", "",
             "## Bench cells", "",
             "| model | conversion | backend | variant | device | batch | status | p50 ms [95%] | top-1 agree | cosine "
             "| node | CPU / GPU | wall s | error |", "|" + "---|" * 14]
    for r in res.rows:
        acc = r.record.accuracy if r.record else None
        lines.append("| " + " | ".join(_cell(x) for x in (
            r.model, r.conversion, r.backend, r.variant, r.device, r.batch_size,
            r.status + (" (reused)" if r.reused else ""), _p50(r.record),
            _fmt(acc.top1_agreement) if acc else "-", _fmt(acc.cosine, 5) if acc else "-", r.node,
            r.cpu_model + (f" / {r.gpu}" if r.gpu else ""), f"{r.wall_s:.2f}", r.error or "")) + " |")
    lines += ["", "## Convert cells", "", "| model | conversion | status | node | wall s | notes / error |",
              "|" + "---|" * 6]
    for c in res.converts:
        lines.append("| " + " | ".join(_cell(x) for x in (
            c.model, c.conversion, c.status + (" (reused)" if c.reused else ""), c.node, f"{c.wall_s:.1f}",
            c.error or "; ".join(c.notes))) + " |")
    return "\n".join(lines) + "\n"


def bench_results(res: SweepResults) -> BenchResults:
    """The done rows as one ``bench`` results file; each record's ``extra`` names its cell and node."""
    records = [r.record.model_copy(update={"extra": {**r.record.extra, "sweep_cell": r.cell, "node": r.node,
                                                     "conversion": r.conversion}})
               for r in res.rows if r.record is not None]
    timing = {k: res.plan.get(k) for k in ("warmup", "iters", "rounds", "threads", "accuracy_samples")}
    return BenchResults(model="sweep", config={**timing, "sweep": res.plan}, records=records, machine=res.machine,
                        warnings=[f"{r.model} {r.backend}/{r.variant} batch {r.batch_size}: {r.status}: {r.error}"
                                  for r in res.rows if r.status != "done"])


def write_sweep(res: SweepResults, out: Path) -> dict[str, Path]:
    """results.json and report.md as one set (results.json last), then bench/results.json and its .csv/.md."""
    out = Path(out)
    with staged_files(out, ["report.md", "results.json"]) as stage:
        atomic_write_text(stage / "report.md", to_markdown(res))
        atomic_write_text(stage / "results.json", res.model_dump_json(indent=2) + "\n")
    paths = {"json": out / "results.json", "md": out / "report.md"}
    if any(r.record is not None for r in res.rows):
        paths["bench"] = write_results(bench_results(res), out / "bench" / "results.json")["json"]
    return paths
