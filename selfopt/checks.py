"""Checks of configuration values, shared by every component's ``__post_init__``.

Each check raises ``ValueError`` with one line naming the field, what it allows and what it
got; :mod:`selfopt.config` prefixes the field's section (``lopt.hidden``), so a bad value on
the command line reads as one line that names it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (an error stays one readable line)."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(value: Any, limit: int = 300) -> str:
    """``str(value)`` for an error message: one line, at most ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def require(name: str, ok: bool, allowed: str, value: Any) -> None:
    """Raises ``ValueError`` "``name`` must be ``allowed``, got ``value``" unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {short_repr(value)}")


def check_int(obj: Any, name: str, lo: int, hi: int, note: str = "") -> None:
    """``obj.name`` is an integer in ``[lo, hi]``."""
    value = getattr(obj, name)
    require(name, is_int(value) and lo <= value <= hi, f"an integer in [{lo}, {hi}]{note}",
            value)


def check_number(obj: Any, name: str, lo: float, hi: float, *, open_low: bool = False,
                 open_high: bool = False, note: str = "") -> None:
    """``obj.name`` is a finite number in ``[lo, hi]`` (open at either end if asked)."""
    value = getattr(obj, name)
    ok = is_number(value) and (value > lo if open_low else value >= lo) and (
        value < hi if open_high else value <= hi)
    require(name, ok, f"a number in {'(' if open_low else '['}{lo:g}, "
                      f"{hi:g}{')' if open_high else ']'}{note}", value)


def check_choice(obj: Any, name: str, choices: Iterable[str]) -> None:
    """``obj.name`` is one of ``choices``."""
    choices = list(choices)
    require(name, getattr(obj, name) in choices, f"one of {choices}", getattr(obj, name))


def check_bool(obj: Any, name: str) -> None:
    """``obj.name`` is ``True`` or ``False``."""
    require(name, isinstance(getattr(obj, name), bool), "true or false", getattr(obj, name))


def as_tuple(obj: Any, *names: str) -> None:
    """Turns list values of the frozen dataclass ``obj``'s fields ``names`` into tuples (a JSON
    list is a fine way to give them), so the dataclass stays hashable."""
    for name in names:
        if isinstance(getattr(obj, name), list):
            object.__setattr__(obj, name, tuple(getattr(obj, name)))
