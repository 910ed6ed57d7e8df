"""The state one conversion's steps share, and the shape of a step.

A step is a plain function ``step(ctx) -> None`` that writes its files into ``ctx.out`` and records
them in ``ctx.manifest``; the pipeline is a list of them. ``ctx.out`` is the run's staging folder: it
replaces ``ctx.final`` only when every step has succeeded, so a path kept in a record names ``ctx.final``. Steps import this module, never the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.config import ConvertConfig
from convert.validate import Reference
from core.iospec import IOSpec
from core.manifest import Manifest
from core.models import LoadedModel


@dataclass
class ConvertContext:
    """State shared by the steps of one conversion."""

    cfg: ConvertConfig
    out: Path
    loaded: LoadedModel
    manifest: Manifest
    reference: Reference | None = None
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)
    examples: dict[str, Any] | None = None  # the export's sample inputs by name (None: seeded random ones)
    final: Path | None = None  # the output folder the staged ``out`` becomes (None: ``out`` itself)
    # the PyTorch modules of the variants made in this run (sparse24, pruned_F), for --recover
    variant_modules: dict[str, Any] = field(default_factory=dict)
    # training progress, after each epoch: (what, epoch, epochs, loss, held-out agreement); None: log lines
    progress: Callable[[str, int, int, float, float], None] | None = None

    @property
    def spec(self) -> IOSpec:
        return self.manifest.iospec

    def path(self, name: str) -> Path:
        return self.out / name

    def final_path(self, name: str) -> Path:
        """Where ``name`` will be once the run is swapped in (for paths recorded in the manifest)."""
        return (self.final or self.out) / name

    def best_fp32(self) -> str:
        """The artifact variants derive from: the optimized model when present."""
        return self.manifest.best_fp32()


Step = Callable[[ConvertContext], Any]


def parity_batches(ctx: ConvertContext) -> list[int]:
    fixed = ctx.spec.fixed_batch()
    return [fixed] if fixed else list(ctx.cfg.export.parity_batches)
