"""Validation helpers for config fields: each error names the field, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int_or_pair(field: str, value: Any) -> int | tuple[int, int]:
    if _is_int(value) and value > 0:
        return value
    if isinstance(value, Sequence) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (value[0], value[1])
    raise ValueError(f"{field}={value!r} is not allowed: expected a positive int or a pair (h, w) of positive ints")


def check_token_indices(field: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{field}={value!r} is not allowed: expected a non-empty list of token positions (ints >= 0)")
    if not all(_is_int(v) and v >= 0 for v in value):
        raise ValueError(f"{field}={value!r} is not allowed: every token position must be an int >= 0")
    return tuple(value)


def check_choice(field: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed: expected one of {', '.join(map(repr, allowed))}")
    return value


def check_int_range(field: str, value: Any, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{field}={value!r} is not allowed: expected an int {bound}")
    return value


def check_number(field: str, value: Any, low: float, high: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high  # NaN fails too
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(f"{field}={value!r} is not allowed: expected a number in [{low}, {high}]{none}")
