"""The text of command-line flags, parsed the same way by every config that takes it (BenchConfig, TuneConfig,
ProfileConfig, convert's ConvertFlags, the CLI): comma lists, positive integer lists and closed choices, each
refused in one line naming the flag. ``names_field`` and ``ints_field`` are those parsers as pydantic
before-validators (``field_validator("backends", mode="before")(names_field)``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationInfo

from core.errors import InputError


def flag_name(field: str) -> str:
    """``batch_sizes`` -> ``--batch-sizes``."""
    return "--" + field.replace("_", "-")


def csv_items(text: str, what: str) -> list[str]:
    """``a, b`` -> ["a", "b"]; nothing in it, or an empty item, is one clear line naming ``what`` (the flag)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InputError(f"{what} is empty")
    if len(items) < text.count(",") + 1:  # 1,,2 or 1,2,: a value left out by mistake, not a list of two
        raise InputError(f"{what} {text!r} has an empty item; separate the values with single commas")
    return items


def int_items(text: str, what: str) -> list[int]:
    """``1,8`` -> [1, 8]: positive integers, or one clear line naming ``what``."""
    try:
        values = [int(x) for x in csv_items(text, what)]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise InputError(f"{what} must be >= 1, got {text!r}")
    return values


def names_field(value: Any, info: ValidationInfo) -> Any:
    """A config's before-validator for a list of names given as its flag's text (``--backends ort,openvino``), the
    flag named after the field; ``variants`` given as "" means every variant, as when not given."""
    if info.field_name == "variants" and value == "":
        return None
    return csv_items(value, flag_name(info.field_name or "")) if isinstance(value, str) else value


def ints_field(value: Any, info: ValidationInfo) -> Any:
    """A config's before-validator for positive integers given as its flag's text (``--batch-sizes 1,8``)."""
    return int_items(value, flag_name(info.field_name or "")) if isinstance(value, str) else value


def check_choice(value: object, choices: Iterable[str], what: str) -> object:
    """``value`` itself when it is a string among ``choices`` (or not a string: pydantic checks its type), else
    one line: ``unknown --device 'x'; choose cpu or cuda``."""
    names = list(choices)
    if isinstance(value, str) and value not in names:
        raise InputError(f"unknown {what} {value!r}; choose {', '.join(names[:-1])} or {names[-1]}"
                         if len(names) > 1 else f"unknown {what} {value!r}; choose {names[0]}")
    return value
