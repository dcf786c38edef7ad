"""One validator for the numbers every front end takes (CLI flags, node inputs, Python API)."""

from __future__ import annotations

import math
import re
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


# --- the list grammar every front end reads (CLI flags, node text inputs): "0.5, 1 0.25;2" ---
_SEP = re.compile(r"[,\s;]+")
SWITCHES = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


def _items(text: str) -> list[str]:
    return [t for t in _SEP.split((text or "").strip()) if t]


def _count(values: list, name: str, n: int | None, names: list[str] | None) -> None:
    if n is not None and len(values) != n:
        listed = f" ({', '.join(names)})" if names else ""
        raise MoleError(f"{name} has {len(values)} values but there are {n} experts{listed}")


def parse_numbers(text: str, name: str, n: int | None = None, names: list[str] | None = None, *,
                  check: bool = True) -> list[float]:
    """``"0.5, 1, 0.25"`` (commas, spaces or semicolons) → floats, checked like :func:`check_number` (``check``
    False: the grammar only, the caller checks the values); with ``n``, exactly ``n`` of them (the message
    lists ``names``)."""
    items = _items(text)
    values = []
    for t in items:
        try:
            values.append(float(t))
        except ValueError:
            raise MoleError(f"{name}: {t!r} is not a number (write e.g. \"0.5, 1, 0.25\")") from None
    _count(values, name, n, names)
    return check_numbers(values, name) if check else values


def parse_switches(text: str, name: str, n: int | None = None, names: list[str] | None = None) -> list[bool]:
    """``"1, 0, 1"`` or ``"on off on"`` (also true/false, yes/no) → which experts are on; at least one must be."""
    items = [t.lower() for t in _items(text)]
    bad = [t for t in items if t not in SWITCHES]
    if bad:
        raise MoleError(f"{name}: {bad[0]!r} is not 1/0 or on/off")
    _count(items, name, n, names)
    on = [SWITCHES[t] for t in items]
    if on and not any(on):
        raise MoleError(f"{name} switches every expert off; keep at least one on")
    return on
