"""A rich table of a manifest's artifacts, printed after `convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.manifest import Manifest


def manifest_table(manifest: Manifest, folder: Path) -> Any:
    from rich.table import Table

    table = Table(title=f"{manifest.source.model} -> {folder}")
    for col in ("artifact", "file", "precision", "step", "size MB", "status", "check"):
        table.add_column(col)
    for a in manifest.artifacts.values():
        worst = max((v.max_abs_err for v in a.metrics.parity.values()), default=None)
        check = f"max abs err {worst:.2e}" if worst is not None else a.metrics.summary or ""
        if a.metrics.summary and a.metrics.summary.startswith("reference"):
            check = "reference (the input file)"
        files = f"{a.file.path} (+{len(a.components) - 1} components)" if len(a.components) > 1 else a.file.path
        size = sum(f.size_bytes for f in a.files())
        table.add_row(a.name, files, a.precision, a.step, f"{size / 2**20:.1f}", a.status, check)
    return table
