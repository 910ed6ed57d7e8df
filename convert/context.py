"""The state one conversion's steps share, and the shape of a step.

A step is a plain function ``step(ctx) -> None`` that writes its files into ``ctx.out`` and records
them in ``ctx.manifest``; the pipeline is a list of them. ``ctx.out`` is the run's staging folder: it
replaces ``ctx.final`` only when every step has succeeded, so a path kept in a record names ``ctx.final``. Steps import this module, never the pipeline.

An optional variant (opt, fused, fp16, int8_*, sparse24, pruned_*, *_recovered, distilled) is made through
:func:`attempt_variant`: when it fails, the run goes on without it and the manifest says why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.config import ConvertConfig
from convert.validate import Reference
from core.errors import InputError, ToolkitError, as_user_error, first_line
from core.iospec import IOSpec
from core.manifest import FailedVariant, Manifest
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
    # a model exported as several files: each component's parity reference (its submodel), by component name
    component_references: dict[str, Reference] = field(default_factory=dict)
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


# -- optional variants -------------------------------------------------------------------------------
def failed_variant(ctx: ConvertContext, name: str) -> FailedVariant | None:
    """The record of ``name`` when this run failed (or skipped) it."""
    return next((f for f in ctx.manifest.failed_variants if f.name == name), None)


def skip_variant(ctx: ConvertContext, name: str, step: str, parent: str) -> None:
    """Record ``name`` as skipped: ``parent``, which it derives from, was not made."""
    why = f"not made: {parent}, which it derives from, failed"
    ctx.manifest.failed_variants.append(FailedVariant(name=name, step=step, parent=parent, status="skipped",
                                                      reason=why))
    ctx.log(f"[yellow]{name}: skipped[/] ({why})")


def attempt_variant(ctx: ConvertContext, name: str, step: str, make: Callable[[], Any], *,
                    parent: str | None = None) -> bool:
    """Make the optional variant ``name`` with ``make``; True when it was made.

    When ``make`` raises a ToolkitError, or an exception from the library doing the work, the run goes on: what
    the attempt wrote is removed (files in the staging folder, manifest records, the held-out file, a PyTorch module
    kept for --recover), nothing half-written stays, ``Manifest.failed_variants`` records ``name`` with the one-line
    reason, and the log says so in one line; :func:`convert.gates.check_gates` then exits as for a failed gate once
    everything else is written. A variant whose ``parent`` failed is not attempted (recorded as skipped). What the user
    must fix (an InputError, a full disk, a forbidden path) still ends the run, as does a signal."""
    if parent is not None and failed_variant(ctx, parent) is not None:
        skip_variant(ctx, name, step, parent)
        return False
    before = _Attempt(ctx)
    try:
        make()
    except Exception as exc:
        if isinstance(exc, InputError) or as_user_error(exc) is not None:
            raise
        reason = first_line(exc) if isinstance(exc, ToolkitError) else first_line(exc, with_type=True)
        before.undo(ctx)
        ctx.manifest.failed_variants.append(FailedVariant(name=name, step=step, parent=parent, status="failed",
                                                          reason=reason))
        ctx.log(f"[yellow]{name}: failed, not written:[/] {reason}")
        return False
    return True


class _Attempt:
    """What a variant's attempt may change, as it was before: undone when the attempt fails."""

    def __init__(self, ctx: ConvertContext) -> None:
        self.artifacts = dict(ctx.manifest.artifacts)
        self.held_out = ctx.manifest.held_out
        self.modules = dict(ctx.variant_modules)
        self.paths = _tree(ctx.out)

    def undo(self, ctx: ConvertContext) -> None:
        ctx.manifest.artifacts = self.artifacts
        ctx.manifest.held_out = self.held_out
        ctx.variant_modules = self.modules
        # deepest first: a new folder's files, then the folder
        for rel in sorted(_tree(ctx.out) - self.paths, key=lambda p: p.count("/"), reverse=True):
            p = ctx.out / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _tree(root: Path) -> set[str]:
    """Every file and folder under ``root``, relative to it; a hidden folder (a step's work folder, removed by that
    step when it ends: the quantization steps' pre-processed model lives there for every INT8 variant) is listed,
    its content not."""
    out: set[str] = set()
    for d, dirs, files in os.walk(root):
        rel = Path(d).relative_to(root)
        out.update((rel / n).as_posix() for n in [*dirs, *files])
        dirs[:] = [n for n in dirs if not n.startswith(".")]
    return out
