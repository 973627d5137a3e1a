"""Per-parameter rules: a full-match regex over names plus typed values, in four interchangeable forms.

A pass declares its field schema once and then accepts the same rules as

* a Python list of tuples ``[("fc1.weight", "element", [0.3, 0.5, 0.7]), ...]`` or of mappings;
* a text file, one rule a line, whitespace-separated fields as the origin documents' rule files
  (``fc1.weight  element  0.3,0.5,0.7``; ``#`` starts a comment; a list is comma-separated);
* a YAML or JSON file holding a list of lists or a list of mappings (``{pattern: ..., field: ...}``).

    schema = RuleSchema("InsertMasks.rules", [Field("granularity", choice("element", "kernel")),
                                              Field("sparsity", real_list(0.0, 1.0)),
                                              Field("importance", choice("abs", "l1"), default="abs")])
    rules = schema.load("prune.rule")       # ConfigError "prune.rule:3: ..." on a bad line
    assigned = rules.assign(["fc1.weight", "fc2.weight"])   # first matching rule wins

Trailing fields with a default may be left out. A rule whose pattern matches no name, a rule every name
of which an earlier rule takes (it could never apply), and a source holding no rule at all are errors.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TypeOf
from .errors import ConfigError, MissingDependencyError

_REQUIRED = object()

# A parser turns a raw value (a text token or a Python / YAML / JSON value) into a typed value,
# raising ValueError with a short reason when it cannot.
Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Field:
    """One typed value of a rule. Fields with a default may be omitted at the end of a rule."""

    name: str
    parse: Parser
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _number(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if isinstance(raw, (int, float)):
        return float(raw)
    raise ValueError(f"expected a number, got {raw!r}")


def real(lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> Parser:
    """A number in [lo, hi] (or [lo, hi) with hi_open)."""
    def parse(raw: Any) -> float:
        value = _number(raw)
        if value != value or (lo is not None and value < lo) or \
                (hi is not None and (value >= hi if hi_open else value > hi)):
            raise ValueError(f"{value!r} is outside [{lo}, {hi}{')' if hi_open else ']'}")
        return value
    return parse


def integer(lo: int | None = None, hi: int | None = None) -> Parser:
    """An integer in [lo, hi]."""
    def parse(raw: Any) -> int:
        value = _number(raw)
        # inf / nan first: int() of them raises OverflowError / ValueError, which would lose the rule's place
        if not math.isfinite(value) or value != int(value) or \
                (isinstance(raw, str) and not raw.strip().lstrip("+-").isdigit()):
            raise ValueError(f"expected an integer, got {raw!r}")
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{value} is outside [{lo}, {hi}]")
        return value
    return parse


def choice(*options: str, allow_callable: bool = False) -> Parser:
    """One of `options` (or, from Python rules, a callable when `allow_callable`)."""
    def parse(raw: Any) -> Any:
        if allow_callable and callable(raw):
            return raw
        if raw not in options:
            extra = " or a callable" if allow_callable else ""
            raise ValueError(f"expected one of {', '.join(options)}{extra}; got {raw!r}")
        return raw
    return parse


def listed(item: Parser) -> Parser:
    """A tuple of items: a list, a single value, or comma-separated text ("0.3,0.5,0.7")."""
    def parse(raw: Any) -> tuple:
        if isinstance(raw, str):
            raw = [token for token in raw.split(",") if token.strip()]
        elif not isinstance(raw, (list, tuple)):
            raw = [raw]
        if not raw:
            raise ValueError("expected at least one value")
        return tuple(item(v.strip() if isinstance(v, str) else v) for v in raw)
    return parse


def real_list(lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> Parser:
    """One number or several (one per stage), each in [lo, hi]."""
    return listed(real(lo, hi, hi_open=hi_open))


@dataclass(frozen=True)
class Rule:
    """A compiled rule: `pattern` must match a whole name; `values` maps field names to typed values."""

    pattern: str
    values: Mapping[str, Any]
    origin: str  # where it came from, for error messages: "prune.rule:3", "rules[2]"

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    def __getitem__(self, field: str) -> Any:
        return self.values[field]

    def __hash__(self) -> int:
        return hash((self.pattern, self.origin))


@dataclass(frozen=True)
class RuleSet:
    """Rules in priority order: for each name the first rule that matches it applies."""

    rules: tuple[Rule, ...]
    owner: str

    def match(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(name)), None)

    def assign(self, names: Iterable[str]) -> dict[str, Rule]:
        """`{name: rule}` for every name some rule matches; ConfigError if a rule matches nothing, or
        only names an earlier rule takes (first match wins, so it would silently never apply)."""
        names = list(names)
        assigned = {name: rule for name in names if (rule := self.match(name)) is not None}
        for rule in self.rules:
            matched = [name for name in names if rule.matches(name)]
            if not matched:
                sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ConfigError(f"{rule.origin}: {self.owner} pattern {rule.pattern!r} matches no name "
                                  f"(names look like: {sample or 'none'})")
            if all(assigned[name] is not rule for name in matched):
                earlier = ", ".join(dict.fromkeys(assigned[name].origin for name in matched))
                raise ConfigError(f"{rule.origin}: {self.owner} pattern {rule.pattern!r} never applies: every name "
                                  f"it matches ({', '.join(matched[:4])}{', ...' if len(matched) > 4 else ''}) is "
                                  f"taken by the earlier rule at {earlier} (the first matching rule wins; put the "
                                  "more specific rule first)")
        return assigned

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({[(r.pattern, *r.values.values()) for r in self.rules]!r})"


@dataclass(frozen=True)
class RuleSchema:
    """The fields a rule carries after its pattern; parses every rule form into a RuleSet."""

    owner: str            # the config field rules are given in, e.g. "InsertMasks.rules"
    fields: Sequence[Field]

    def load(self, source: Any) -> RuleSet:
        """Parse rules from a list (tuples / mappings / Rules), a RuleSet, or a path to a rule file.
        A source with no rule is an error: rules select what a pass changes, so none would change nothing."""
        if isinstance(source, RuleSet):
            rules, empty = source, f"{self.owner}: the RuleSet holds no rule"
        elif isinstance(source, (str, os.PathLike)):
            rules = self._load_file(Path(source))
            empty = (f"{Path(source).name}: {self.owner} rule file holds no rule (blank lines and comments only, "
                     "or an empty list)")
        elif isinstance(source, (list, tuple)):
            rules = RuleSet(tuple(self.rule(item, f"{self.owner}[{i}]") for i, item in enumerate(source)), self.owner)
            empty = f"{self.owner} is an empty list"
        else:
            raise ConfigError(f"{self.owner} must be a list of rules or a path to a rule file, got {source!r}")
        if not rules.rules:
            raise ConfigError(f"{empty}, so it would select nothing; give at least one rule, or rules=None")
        return rules

    def rule(self, item: Any, origin: str) -> Rule:
        """One rule from a sequence (pattern first, then the fields in order) or a mapping."""
        if isinstance(item, Rule):
            return item
        if isinstance(item, Mapping):
            return self._from_mapping(item, origin)
        if isinstance(item, (list, tuple)):
            return self._from_sequence(list(item), origin)
        raise ConfigError(f"{origin}: a rule must be a tuple, a list or a mapping, got {item!r}")

    def _from_sequence(self, items: list, origin: str) -> Rule:
        names = ["pattern", *(f.name for f in self.fields)]
        least = 1 + sum(f.required for f in self.fields)
        if not least <= len(items) <= len(names):
            raise ConfigError(f"{origin}: expected {least} to {len(names)} fields ({' '.join(names)}), "
                              f"got {len(items)}: {items!r}")
        return self._from_mapping(dict(zip(names, items)), origin)

    def _from_mapping(self, item: Mapping, origin: str) -> Rule:
        known = {"pattern", *(f.name for f in self.fields)}
        unknown = sorted(set(map(str, item)) - known)
        if unknown:
            raise ConfigError(f"{origin}: unknown field(s) {', '.join(unknown)}; a rule has {', '.join(sorted(known))}")
        pattern = _pattern(item.get("pattern"), origin)
        values = {}
        for f in self.fields:
            if f.name not in item:
                if f.required:
                    raise ConfigError(f"{origin}: missing field {f.name!r}")
                values[f.name] = f.default
                continue
            try:
                values[f.name] = f.parse(item[f.name])
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{origin}: field {f.name!r}: {exc}") from None
        return Rule(pattern, values, origin)

    def _load_file(self, path: Path) -> RuleSet:
        if not path.is_file():
            raise ConfigError(f"{self.owner}: rule file {str(path)!r} does not exist")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix == ".json":
            return self._load_json(text, path.name)
        if suffix in (".yaml", ".yml"):
            return self._load_yaml(text, path.name)
        return self._load_text(text, path.name)

    def _load_text(self, text: str, name: str) -> RuleSet:
        rules = []
        for number, line in enumerate(text.splitlines(), start=1):
            tokens = line.split("#", 1)[0].split()
            if tokens:
                rules.append(self._from_sequence(tokens, f"{name}:{number}"))
        return RuleSet(tuple(rules), self.owner)

    def _load_json(self, text: str, name: str) -> RuleSet:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return self._load_list(data, [f"{name}: rule {i + 1}" for i in range(_length(data))], name)

    def _load_yaml(self, text: str, name: str) -> RuleSet:
        try:
            import yaml
        except ImportError as exc:
            raise MissingDependencyError("YAML rule files need PyYAML: pip install 'fxcompress[yaml]'") from exc
        try:
            data, tree = yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f"{name}:{line + 1}" if line is not None else name
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        items = tree.value if tree is not None and isinstance(tree.value, list) else []
        return self._load_list(data, [f"{name}:{node.start_mark.line + 1}" for node in items], name)

    def _load_list(self, data: Any, origins: list[str], name: str) -> RuleSet:
        if not isinstance(data, list):
            raise ConfigError(f"{name}: expected a list of rules (lists or mappings), got {type(data).__name__}")
        return RuleSet(tuple(self.rule(item, origin) for item, origin in zip(data, origins)), self.owner)


def _length(data: Any) -> int:
    return len(data) if isinstance(data, list) else 0


def _pattern(raw: Any, origin: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{origin}: the pattern must be a non-empty string, got {raw!r}")
    try:
        re.compile(raw)
    except re.error as exc:
        raise ConfigError(f"{origin}: pattern {raw!r} is not a valid regular expression ({exc})") from None
    return raw


# The declared constraint of a pass's `rules` field (RuleSchema.load checks the rules themselves).
RULES_FIELD = (TypeOf(str, os.PathLike, list, tuple, RuleSet, what="a list of rules or a path to a rule file"),
               None)
