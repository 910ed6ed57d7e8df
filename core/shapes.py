"""``--input-shape`` on the command line, Polygraphy's way: ``1x3x224x224`` for a one-input model or
``input_ids:1x16,attention_mask:1x16`` by name, parsed and bound to an IOSpec's symbolic dims (a dim shared by
several inputs must get one value; every mismatch is one clear InputError)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from core.errors import InputError
from core.iospec import BATCH, IOSpec

_SHAPE_RE = re.compile(r"^\d+(x\d+)*$")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1x3x224x224`` into a tuple, or raise one clear InputError."""
    cleaned = text.strip().lower().replace(",", "x").replace("*", "x")
    if not _SHAPE_RE.match(cleaned):
        raise InputError(f"malformed --input-shape {text!r}: expected dimensions joined by 'x', e.g. 1x3x224x224")
    dims = tuple(int(p) for p in cleaned.split("x"))
    if any(d < 1 for d in dims):
        raise InputError(f"malformed --input-shape {text!r}: every dimension must be >= 1")
    return dims


def parse_input_shapes(text: str) -> dict[str | None, tuple[int, ...]]:
    """``1x3x224x224`` -> {None: shape} (the only input); ``ids:1x16,mask:1x16`` -> {name: shape} (Polygraphy's
    ``--input-shapes`` without brackets); one clear InputError for anything else."""
    text = text.strip()
    if ":" not in text:
        return {None: parse_shape(text)}
    out: dict[str | None, tuple[int, ...]] = {}
    for part in text.split(","):
        name, sep, shape = part.strip().rpartition(":")
        if not sep or not name.strip():
            raise InputError(f"malformed --input-shape {text!r}: name every input (name:1x16,other:1x16) or give "
                             "one unnamed shape (1x3x224x224)")
        if name.strip() in out:
            raise InputError(f"--input-shape names {name.strip()!r} twice")
        out[name.strip()] = parse_shape(shape)
    return out


def bind_shapes(spec: IOSpec, shapes: Mapping[str | None, tuple[int, ...]]) -> tuple[int | None, dict[str, int]]:
    """(batch, dim values) that ``shapes`` give ``spec``'s symbolic dims; every mismatch is one InputError:
    an unknown input, a rank or fixed-dim mismatch, or one dim given two values."""
    if None in shapes:
        if len(spec.inputs) != 1:
            raise InputError(f"this model has {len(spec.inputs)} inputs ({', '.join(spec.input_names)}): name each "
                             f"one, e.g. --input-shape {','.join(f'{n}:1x16' for n in spec.input_names)}")
        shapes = {spec.input_names[0]: shapes[None]}
    values: dict[str, tuple[int, str]] = {}
    for name, shape in shapes.items():
        t = spec.input(str(name))
        if len(shape) != len(t.shape):
            raise InputError(f"--input-shape {name}: rank {len(shape)} ({'x'.join(map(str, shape))}) but the model's "
                             f"{name!r} has rank {len(t.shape)} ({t.shape})")
        for i, (got, want) in enumerate(zip(shape, t.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(f"--input-shape {name}: dim {i} is fixed to {want} in the model, got {got}")
                continue
            if want in values and values[want][0] != got:
                raise InputError(f"dim {want!r} is bound to two values: {values[want][0]} (in {values[want][1]}) "
                                 f"and {got} (in {name})")
            values[want] = (got, str(name))
    batch = values.pop(BATCH, (None, ""))[0]
    return batch, {d: v for d, (v, _) in values.items()}


def apply_input_shapes(spec: IOSpec, text: str | None) -> tuple[IOSpec, int | None]:
    """``--input-shape`` text applied to ``spec``: (the spec with its symbolic dims bound to the shapes' values,
    the batch the shapes give, None when they give none). No text: the spec as it is."""
    if not text:
        return spec, None
    batch, dims = bind_shapes(spec, parse_input_shapes(text))
    return spec.with_dims(dims), batch
