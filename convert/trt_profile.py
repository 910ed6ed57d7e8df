"""TensorRT optimization profiles from the IOSpec: a min/opt/max for every symbolic dim of every input.

The batch comes from ``--min-batch/--opt-batch/--max-batch``; every other dim from ``--dim-range
NAME=MIN:OPT:MAX`` (``EngineConfig.dim_ranges``), else the IOSpec's range, else its bound value throughout.
Pure functions: checked on any machine, passed to Polygraphy's ``Profile().add`` by ``convert.engine``.
"""

from __future__ import annotations

from convert.config import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, EngineConfig
from core.errors import InputError
from core.iospec import BATCH, IOSpec


def profile_batches(cfg: EngineConfig, spec: IOSpec) -> tuple[int, int, int]:
    """(min, opt, max) batch of the one optimization profile; a static-batch spec pins all three."""
    fixed = spec.fixed_batch()
    if fixed is not None:
        asked = {v for v in (cfg.min_batch, cfg.opt_batch, cfg.max_batch) if v is not None}
        if asked - {fixed}:
            raise InputError(f"this model was exported with a fixed batch of {fixed}: --min-batch/--opt-batch/"
                             f"--max-batch must be {fixed} or left out (export with a dynamic batch to vary it)")
        return fixed, fixed, fixed
    lo = cfg.min_batch or 1
    hi = cfg.max_batch or max(DEFAULT_MAX_BATCH, lo)
    opt = cfg.opt_batch or min(max(DEFAULT_OPT_BATCH, lo), hi)
    if not lo <= opt <= hi:
        raise InputError(f"the optimization profile needs --min-batch <= --opt-batch <= --max-batch; "
                         f"got {lo} <= {opt} <= {hi}")
    return lo, opt, hi


def parse_dim_ranges(text: str) -> dict[str, tuple[int, int, int]]:
    """``sequence=1:64:128,height=224:224:512`` -> {dim: (min, opt, max)}, or one clear InputError."""
    out: dict[str, tuple[int, int, int]] = {}
    for part in text.split(","):
        name, sep, values = part.strip().partition("=")
        nums = values.split(":")
        if not sep or not name.strip() or len(nums) != 3 or not all(n.strip().isdigit() for n in nums):
            raise InputError(f"malformed --dim-range {text!r}: expected NAME=MIN:OPT:MAX, e.g. sequence=1:64:128")
        lo, opt, hi = (int(n) for n in nums)
        out[name.strip()] = (lo, opt, hi)
    return out


def compute_profile(cfg: EngineConfig, spec: IOSpec) -> dict[str, dict[str, list[int]]]:
    """Per input: the min/opt/max shapes. The batch from ``profile_batches``; every other symbolic dim from
    ``--dim-range`` (EngineConfig.dim_ranges), else the IOSpec's range, else its bound value throughout."""
    batch = profile_batches(cfg, spec)
    ranges: dict[str, tuple[int, int, int]] = {}
    for d in spec.symbolic_dims():
        if d in cfg.dim_ranges:
            ranges[d] = cfg.dim_ranges[d]
        elif d in spec.ranges or d in spec.dims or d == BATCH:
            r = spec.dim_range(d, batch=batch)
            ranges[d] = (r.min, r.opt, r.max)
        else:
            raise InputError(f"cannot make a TensorRT optimization profile: the dim {d!r} has no value; give its "
                             f"range with --dim-range {d}=MIN:OPT:MAX (or bind it with --input-shape)")
        lo, opt, hi = ranges[d]
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"--dim-range {d}: needs 1 <= min <= opt <= max, got {lo}:{opt}:{hi}")
    if unknown := sorted(set(cfg.dim_ranges) - set(spec.symbolic_dims())):
        raise InputError(f"--dim-range names unknown dim(s) {unknown}; the model's: {spec.symbolic_dims()}")
    return {t.name: {k: [d if isinstance(d, int) else ranges[d][i] for d in t.shape]
                     for i, k in enumerate(("min", "opt", "max"))} for t in spec.inputs}
