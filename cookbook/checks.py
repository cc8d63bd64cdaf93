"""Checks of values a user gives (flags, TOML configs, config.json files) that end in one ``CookbookError`` line.

``check_types`` holds a config dataclass to its declared field types (a TOML file or a Hugging Face config.json can
put a string where a number belongs); ``check_number`` holds a number to a range. Numbers are always finite: NaN and
infinity are refused wherever a number is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

from cookbook.errors import CookbookError


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` is a finite number within [low, high] (``low_open``/``high_open``: the bound itself is excluded);
    None passes. ``name`` is what the user wrote: a flag (--lr) or a config key."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CookbookError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise CookbookError(f"{name} must be a finite number, not {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        if low is not None and high is None:
            want = f"{'greater than' if low_open else 'at least'} {low:g}"
        elif high is not None and low is None:
            want = f"{'less than' if high_open else 'at most'} {high:g}"
        else:
            want = f"in {lo}, {hi}"
        raise CookbookError(f"{name} must be {want}, not {value}")


@functools.cache
def _field_types(cls) -> dict[str, tuple[type, ...]]:
    """Field name -> the Python types its annotation allows (int also allows nothing else; float allows int)."""
    hints = typing.get_type_hints(cls)
    allowed = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = []
        for option in options:
            origin = typing.get_origin(option) or option
            if option is type(None):
                kinds.append(type(None))
            elif origin is float:
                kinds += [float, int]
            elif isinstance(origin, type):
                kinds.append(origin)
        allowed[f.name] = tuple(kinds)
    return allowed


def _kind(types_: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        tuple: "a list",
        dict: "a table",
    }
    said = [names[t] for t in types_ if t in names]
    if float in types_:
        said = [s for s in said if s != "an integer"]
    return " or ".join(dict.fromkeys(said)) or "/".join(t.__name__ for t in types_)


def check_types(obj, where: str) -> None:
    """Every field of the dataclass ``obj`` holds a value of its declared type, and every number is finite:
    ``[model] num_heads = "four"`` fails with one line naming ``where`` and the field."""
    for name, allowed in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if not allowed:
            continue
        is_bool = isinstance(value, bool)
        ok = isinstance(value, allowed) and (not is_bool or bool in allowed)
        if not ok:
            raise CookbookError(f"{where} {name} must be {_kind(allowed)}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CookbookError(f"{where} {name} must be a finite number, not {value}")
