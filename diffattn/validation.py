"""The one validation layer: every config, the request, the CLI, job files and the UI check their inputs here.

Each check returns the value (normalised: a list of strings becomes a tuple) or raises ValueError whose message
names the field, the value and what is allowed, in one form for every face:

    steps=1000000000000 is not allowed: expected an int in [1, 1000]

Rules shared by all: numbers are finite (NaN and infinities are refused by every range), bools are exactly True or
False (not 0/1, not "no"), ints are not bools, a string is never taken for a sequence of strings (nor a dict or a
set for a sequence), choices come from one tuple defined beside what uses them, seeds lie in [0, 2^63).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes an int64 seed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    """A list or tuple (not a string, bytes, dict, set or other iterable whose order or items would surprise)."""
    return isinstance(value, (list, tuple))


def refuse(field: str, value: Any, allowed: str) -> ValueError:
    """The one message form: `field=value is not allowed: expected ...` (long values shortened)."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ValueError(f"{field}={shown} is not allowed: expected {allowed}")


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise refuse(field, value, "True or False")
    return value


def check_int_range(field: str, value: Any, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise refuse(field, value, f"an int {bound}")
    return value


def check_number(
    field: str, value: Any, low: float, high: float, allow_none: bool = False, low_open: bool = False
) -> float | None:
    """A finite int or float in [low, high] ((low, high] with `low_open`); NaN and infinities never pass."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise refuse(field, value, f"a number in {span}" + (" or None" if allow_none else ""))
    return value


def check_choice(field: str, value: Any, allowed: Sequence[Any]) -> Any:
    # bools compare equal to 0/1, so `True in (1, 2)` would pass: compare types too
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise refuse(field, value, f"one of {', '.join(map(repr, allowed))}")
    return value


def check_str(field: str, value: Any, *, allow_empty: bool = False, max_length: int = 10_000) -> str:
    if (
        not isinstance(value, str)
        or (not allow_empty and not value.strip())
        or len(value) > max_length
        or "\x00" in value
    ):
        what = "a string" if allow_empty else "a non-empty string"
        raise refuse(field, value, f"{what} of at most {max_length} characters")
    return value


def check_str_list(field: str, value: Any, *, max_items: int = 64, allow_empty: bool = False) -> tuple[str, ...]:
    """A list/tuple of non-empty strings (a bare string, a dict or a set is refused, not split or iterated)."""
    allowed = f"a list of {0 if allow_empty else 1} to {max_items} non-empty strings"
    if not _is_sequence(value) or (not value and not allow_empty) or len(value) > max_items:
        raise refuse(field, value, allowed)
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > 10_000:
            raise refuse(field, value, allowed)
    return tuple(value)


def check_seed(field: str, value: Any) -> int:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise refuse(field, value, "an int seed in [0, 2^63)")
    return value


def check_seed_list(field: str, value: Any, *, max_items: int = 10_000) -> tuple[int, ...]:
    if not _is_sequence(value) or not value or len(value) > max_items:
        raise refuse(field, value, f"a non-empty list of at most {max_items} distinct int seeds in [0, 2^63)")
    for seed in value:
        check_seed(field, seed)
    if len(set(value)) != len(value):
        raise refuse(field, value, "distinct seeds")
    return tuple(value)


def check_interval(field: str, value: Any, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """An ordered pair (start, stop) of finite numbers with low <= start < stop <= high."""
    allowed = f"a pair [start, stop] of numbers with {low} <= start < stop <= {high}"
    if not _is_sequence(value) or len(value) != 2:
        raise refuse(field, value, allowed)
    start, stop = value
    if not (_is_number(start) and _is_number(stop) and math.isfinite(start) and math.isfinite(stop)):
        raise refuse(field, value, allowed)
    if not low <= start < stop <= high:
        raise refuse(field, value, allowed)
    return float(start), float(stop)


def check_positive_int_or_pair(field: str, value: Any) -> int | tuple[int, int]:
    if _is_int(value) and value > 0:
        return value
    if _is_sequence(value) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (value[0], value[1])
    raise refuse(field, value, "a positive int or a pair (h, w) of positive ints")


def check_token_indices(field: str, value: Any) -> tuple[int, ...]:
    if not _is_sequence(value) or not value:
        raise refuse(field, value, "a non-empty list of token positions (ints >= 0)")
    if not all(_is_int(v) and v >= 0 for v in value):
        raise refuse(field, value, "a list of token positions, each an int >= 0")
    return tuple(value)


def check_int_choices(field: str, value: Any, allowed: Sequence[int]) -> tuple[int, ...]:
    """One int from `allowed` or a non-empty list of them."""
    items = (value,) if _is_int(value) else value
    if not _is_sequence(items) or not items or not all(_is_int(v) and v in allowed for v in items):
        raise refuse(field, value, f"one or a list of {', '.join(map(str, allowed))}")
    return tuple(items)


def check_config_fields(field: str, value: Any, config_class: type) -> dict[str, Any]:
    """`value` as the fields of a config dataclass (a JSON object of a request or a job line): a dict whose keys are
    `config_class`'s fields; an unknown one is refused by name with the allowed ones (not Python's 'unexpected
    keyword argument')."""
    if not isinstance(value, dict):
        raise refuse(field, value, f"an object of {config_class.__name__} fields")
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(set(value) - set(names), key=str)
    if unknown:
        raise ValueError(
            f"{field}: unknown field {unknown[0]!r} of {config_class.__name__}; allowed: {', '.join(names)}"
        )
    return value
