"""One validator for the numbers every front end takes (CLI flags, node inputs, Python API)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import MoleError

MAX_ABS = 1e3  # no mixture weight, strength or scale a user means lies beyond this


def check_number(value: object, name: str, *, lo: float = -MAX_ABS, hi: float = MAX_ABS) -> float:
    """``value`` as a float; a one-line MoleError naming ``name`` unless it is a finite number in ``[lo, hi]``."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MoleError(f"{name}: a number is expected, got {value!r}") from None
    if not math.isfinite(v):
        raise MoleError(f"{name}: a finite number is expected, got {value!r}")
    if not lo <= v <= hi:
        raise MoleError(f"{name}: a number in [{lo:g}, {hi:g}] is expected, got {v:g}")
    return v


def check_numbers(values: Iterable[object], name: str, *, lo: float = -MAX_ABS, hi: float = MAX_ABS) -> list[float]:
    """:func:`check_number` on every value (the message names the position)."""
    return [check_number(v, f"{name}[{i + 1}]" if name else f"value {i + 1}", lo=lo, hi=hi)
            for i, v in enumerate(values)]
