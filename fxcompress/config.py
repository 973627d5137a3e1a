"""Small validators for pass configuration: each raises ConfigError naming `Owner.field`."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from numbers import Integral, Real
from typing import Any

from .errors import ConfigError


def check_real(owner: str, field: str, value: Any, lo: float | None = None, hi: float | None = None,
               *, lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` must be a real number within [lo, hi] (ends open when asked)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{owner}.{field} must be a number, got {value!r}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above or value != value:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{owner}.{field} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_int(owner: str, field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """`value` must be an integer within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{owner}.{field} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{owner}.{field} must be in [{lo}, {hi}], got {value!r}")


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    """`value` must be one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{owner}.{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_regex(owner: str, field: str, value: Any) -> None:
    """`value` must be a regular expression string that compiles."""
    if not isinstance(value, str):
        raise ConfigError(f"{owner}.{field} must be a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{owner}.{field}: {value!r} is not a valid regular expression ({exc})") from None


def check_bool(owner: str, field: str, value: Any) -> None:
    """`value` must be True or False itself: 1, 0.0, "yes" or None are refused rather than read as truthy."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{field} must be True or False, got {value!r}")


def check_applicable(owner: str, config: Any, applies_to: Mapping[str, Collection[str]], in_use: Collection[str],
                     what: str) -> None:
    """A field set away from its default must apply to one of the variants `in_use` (methods, observers...).

    `config` is a dataclass; `applies_to` maps a field to the variants that read it. A field no
    variant in use reads would be ignored silently, so it is refused naming the field.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for field, variants in applies_to.items():
        if getattr(config, field) != defaults[field] and not set(variants) & set(in_use):
            raise ConfigError(f"{owner}.{field}={getattr(config, field)!r} does not apply to {what} "
                              f"{', '.join(map(repr, sorted(in_use)))}: it is read only by "
                              f"{', '.join(map(repr, variants))}")
