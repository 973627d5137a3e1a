"""Validation of pass configuration: each failure raises ConfigError naming `Owner.field`.

Passes declare their fields' constraints as data (`Interval`, `Options`, `Boolean`, `Regex`, `TypeOf`,
`TupleOf`, `MappingOf`, ...) and check them with `validate`; the `check_*` helpers serve one-off values.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .errors import ConfigError


def check(owner: str, field: str, value: Any, *alternatives: Any) -> None:
    """`value` must satisfy one of `alternatives` (constraints below, or None for the value None);
    the ConfigError names `Owner.field`. The check_* helpers are its common cases."""
    if not satisfies(value, alternatives):
        raise ConfigError(explain(f"{owner}.{field}", value, alternatives))


def check_real(owner: str, field: str, value: Any, lo: float | None = None, hi: float | None = None,
               *, lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` must be a real number within [lo, hi] (ends open when asked)."""
    check(owner, field, value, Interval(float, lo, hi, lo_open, hi_open))


def check_int(owner: str, field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """`value` must be an integer within [lo, hi]."""
    check(owner, field, value, Interval(int, lo, hi))


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    """`value` must be one of `choices`."""
    check(owner, field, value, Options(*choices))


def check_regex(owner: str, field: str, value: Any) -> None:
    """`value` must be a regular expression string that compiles."""
    check(owner, field, value, Regex())


def check_bool(owner: str, field: str, value: Any) -> None:
    """`value` must be True or False itself: 1, 0.0, "yes" or None are refused rather than read as truthy."""
    check(owner, field, value, Boolean())


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


# ---- declared constraints -------------------------------------------------------------------------
# A configuration class declares, as data, what each of its fields accepts (as scikit-learn's
# `_parameter_constraints`): `constraints = {"bits": (Interval(int, 1, 16),), "select": (Regex(), None)}`.
# A value is valid when it satisfies one of its field's alternatives (None stands for the value None);
# `validate(config)` checks every field from `__post_init__`, and the contract tests generate the values
# each constraint refuses (`invalid_values()`) to prove every field is checked.


class Constraint:
    """One kind of value a field accepts."""

    def satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        """What the constraint accepts, as the end of "must be ..." ("an integer in [1, 16]")."""
        raise NotImplementedError

    def claims(self, value: Any) -> bool:
        """Whether `value` is of the kind this constraint is about (an int for an integer interval), so
        that its `explain` says better what is wrong than the list of every alternative does."""
        return False

    def explain(self, name: str, value: Any) -> str:
        return f"{name} must be {self.describe()}, got {value!r}"

    def example(self) -> Any:
        """A value that satisfies the constraint (to build containers around invalid values)."""
        raise NotImplementedError

    def invalid_values(self) -> tuple[Any, ...]:
        """Values this constraint refuses: wrong types, out-of-range numbers, bad choices."""
        raise NotImplementedError

    def __repr__(self) -> str:
        # constraints without fields read as their class name (dataclass ones override this with their
        # fields), the same in every process: test ids and error texts never show an object address
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of `kind` (int or float; never a bool) within [lo, hi], ends open when asked."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def _right_type(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, Integral if self.kind is int else Real)

    def _in_range(self, value: Any) -> bool:
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return not (below or above or value != value)  # NaN is in no interval

    def satisfied_by(self, value: Any) -> bool:
        return self._right_type(value) and self._in_range(value)

    def claims(self, value: Any) -> bool:
        return self._right_type(value)

    def _range(self) -> str:
        lo = "-inf" if self.lo is None else self.lo
        hi = "inf" if self.hi is None else self.hi
        return (f"{'(' if self.lo_open or self.lo is None else '['}{lo}, "
                f"{hi}{')' if self.hi_open or self.hi is None else ']'}")

    def describe(self) -> str:
        return f"{'an integer' if self.kind is int else 'a number'} in {self._range()}"

    def explain(self, name: str, value: Any) -> str:
        if self._right_type(value):
            return f"{name} must be in {self._range()}, got {value!r}"
        return f"{name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"

    def example(self) -> Any:
        lo = self.lo if self.lo is not None else (self.hi if self.hi is not None else 0)
        hi = self.hi if self.hi is not None else lo + 2
        middle = (lo + hi) / 2
        return int(middle) if self.kind is int and self.satisfied_by(int(middle)) else middle

    def invalid_values(self) -> tuple[Any, ...]:
        values: list[Any] = ["1", True, None]
        if self.kind is int:
            values.append(1.5)
        else:
            values.append(float("nan"))
        step = 1 if self.kind is int else 0.125
        if self.lo is not None:
            values.append(self.lo if self.lo_open else self.lo - step)
        if self.hi is not None:
            values.append(self.hi if self.hi_open else self.hi + step)
        return tuple(values)


@dataclass(frozen=True, init=False)
class Options(Constraint):
    """One of a fixed set of values (names, or classes compared by identity)."""

    choices: tuple[Any, ...]

    def __init__(self, *choices: Any) -> None:
        object.__setattr__(self, "choices", choices)

    def satisfied_by(self, value: Any) -> bool:
        return any(value is choice or (type(value) is type(choice) and value == choice) for choice in self.choices)

    def claims(self, value: Any) -> bool:
        return isinstance(value, str)

    def describe(self) -> str:
        return "one of " + ", ".join(getattr(c, "__name__", None) or repr(c) for c in self.choices)

    def explain(self, name: str, value: Any) -> str:
        return f"{name} must be {self.describe()}; got {value!r}"

    def example(self) -> Any:
        return self.choices[0]

    def invalid_values(self) -> tuple[Any, ...]:
        return ("not-an-option", 3)


class Boolean(Constraint):
    """True or False itself: 1, 0.0, "yes" or None are refused rather than read as truthy."""

    def satisfied_by(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "True or False"

    def example(self) -> Any:
        return False

    def invalid_values(self) -> tuple[Any, ...]:
        return (1, 0.0, "yes", None)


class Regex(Constraint):
    """A regular expression string that compiles."""

    def satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and _compile_error(value) is None

    def claims(self, value: Any) -> bool:
        return isinstance(value, str)

    def describe(self) -> str:
        return "a regular expression"

    def explain(self, name: str, value: Any) -> str:
        if isinstance(value, str):
            return f"{name}: {value!r} is not a valid regular expression ({_compile_error(value)})"
        return super().explain(name, value)

    def example(self) -> Any:
        return ".*"

    def invalid_values(self) -> tuple[Any, ...]:
        return ("fc((", "[", 3)


def _compile_error(pattern: str) -> re.error | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return exc
    return None


@dataclass(frozen=True, init=False)
class TypeOf(Constraint):
    """An instance of one of `types`; `what` says it in words ("an AGP(...) schedule")."""

    types: tuple[type, ...]
    what: str

    def __init__(self, *types: type, what: str | None = None) -> None:
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "what", what or " or ".join(f"a {t.__name__}" for t in types))

    def satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.types)

    def describe(self) -> str:
        return self.what

    def example(self) -> Any:
        raise TypeError(f"TypeOf({self.what}) has no generic example")

    def invalid_values(self) -> tuple[Any, ...]:
        return (object(), 3)


@dataclass(frozen=True)
class SubclassOf(Constraint):
    """A class deriving from `base` (a module type such as nn.Conv2d)."""

    base: type

    def satisfied_by(self, value: Any) -> bool:
        return isinstance(value, type) and issubclass(value, self.base)

    def claims(self, value: Any) -> bool:
        return isinstance(value, type)

    def describe(self) -> str:
        return f"a subclass of {self.base.__name__}"

    def example(self) -> Any:
        return self.base

    def invalid_values(self) -> tuple[Any, ...]:
        return (int, 3)


class Callables(Constraint):
    """Any callable (a user-supplied scoring function)."""

    def satisfied_by(self, value: Any) -> bool:
        return callable(value)

    def describe(self) -> str:
        return "a callable"

    def example(self) -> Any:
        return len

    def invalid_values(self) -> tuple[Any, ...]:
        return (3,)


@dataclass(frozen=True, init=False)
class TupleOf(Constraint):
    """A tuple or list whose every item satisfies one of `items`, with at least `min_len` items."""

    items: tuple[Any, ...]
    min_len: int

    def __init__(self, *items: Any, min_len: int = 0) -> None:
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "min_len", min_len)

    def satisfied_by(self, value: Any) -> bool:
        return (isinstance(value, (tuple, list)) and len(value) >= self.min_len
                and all(satisfies(item, self.items) for item in value))

    def claims(self, value: Any) -> bool:
        return isinstance(value, (tuple, list))

    def describe(self) -> str:
        return f"a tuple of {' or '.join(_describe(c) for c in self.items)}"

    def explain(self, name: str, value: Any) -> str:
        if isinstance(value, (tuple, list)):
            for item in value:
                if not satisfies(item, self.items):
                    return explain(name, item, self.items)
            return f"{name} must hold at least {self.min_len} item(s), got {value!r}"
        return super().explain(name, value)

    def example(self) -> Any:
        return (_example(self.items[0]),)

    def invalid_values(self) -> tuple[Any, ...]:
        bad_items = [v for c in self.items for v in _invalid(c) if not satisfies(v, self.items)]
        return (object(), *((),) * (self.min_len > 0), *((v,) for v in bad_items))


@dataclass(frozen=True)
class MappingOf(Constraint):
    """A mapping whose keys satisfy `keys` and values satisfy `values`, with at least `min_len` entries."""

    keys: Any
    values: Any
    min_len: int = 0

    def satisfied_by(self, value: Any) -> bool:
        return (isinstance(value, Mapping) and len(value) >= self.min_len
                and all(satisfies(k, (self.keys,)) and satisfies(v, (self.values,)) for k, v in value.items()))

    def claims(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def describe(self) -> str:
        return f"a mapping of {_describe(self.keys)} to {_describe(self.values)}"

    def explain(self, name: str, value: Any) -> str:
        if not isinstance(value, Mapping):
            return super().explain(name, value)
        if len(value) < self.min_len:
            return f"{name} is an empty mapping: it needs at least {self.min_len} entry"
        for key, item in value.items():
            if not satisfies(key, (self.keys,)):
                return explain(f"{name} key", key, (self.keys,))
            if not satisfies(item, (self.values,)):
                return explain(f"{name}[{key!r}]", item, (self.values,))
        raise AssertionError("explain called on a valid mapping")

    def example(self) -> Any:
        return {_example(self.keys): _example(self.values)}

    def invalid_values(self) -> tuple[Any, ...]:
        key, item = _example(self.keys), _example(self.values)
        return (*(({},) if self.min_len > 0 else ()), *({bad: item} for bad in _invalid(self.keys)
                                                          if isinstance(bad, (str, int, float))),
                *({key: bad} for bad in _invalid(self.values)))


def _describe(constraint: Any) -> str:
    return "None" if constraint is None else constraint.describe()


def _example(constraint: Any) -> Any:
    return None if constraint is None else constraint.example()


def _invalid(constraint: Any) -> tuple[Any, ...]:
    return () if constraint is None else constraint.invalid_values()


def satisfies(value: Any, alternatives: Iterable[Any]) -> bool:
    """Whether `value` satisfies one of `alternatives` (constraints, or None for the value None)."""
    return any(value is None if c is None else c.satisfied_by(value) for c in alternatives)


def explain(name: str, value: Any, alternatives: Collection[Any]) -> str:
    """Why `value` satisfies none of `alternatives`: the claiming alternative's reason, else all of them."""
    claiming = [c for c in alternatives if c is not None and c.claims(value)]
    if len(claiming) == 1:
        return claiming[0].explain(name, value)
    real = [c for c in alternatives if c is not None]
    if len(real) == 1 and len(alternatives) == 1:
        return real[0].explain(name, value)
    ordered = [*real, *(None for c in alternatives if c is None)]  # "..., or None" reads best last
    return f"{name} must be {' or '.join(_describe(c) for c in ordered)}, got {value!r}"


def invalid_values(alternatives: Iterable[Any]) -> list[Any]:
    """Values that satisfy none of a field's `alternatives`, generated from the constraints themselves."""
    alternatives = tuple(alternatives)
    return [v for c in alternatives for v in _invalid(c) if not satisfies(v, alternatives)]


def validate(config: Any) -> None:
    """Check every field of a configuration dataclass against its class's `constraints` declaration.

    Raises ConfigError naming `Owner.field` for the first field whose value satisfies none of its
    alternatives; a field without a declaration is a programming error (TypeError), so none slips by.
    """
    owner = type(config).__name__
    declared = type(config).constraints
    for f in dataclasses.fields(config):
        if f.name not in declared:
            raise TypeError(f"{owner}.{f.name} has no declared constraints")
        value = getattr(config, f.name)
        if not satisfies(value, declared[f.name]):
            raise ConfigError(explain(f"{owner}.{f.name}", value, declared[f.name]))
