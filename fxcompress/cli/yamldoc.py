"""A YAML document read into plain data, with the line of every key and item, so a bad value is reported
at its place in the file ("recipe.yaml:12: steps[1].config.bits must be ...")."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError

try:
    import yaml
except ImportError:  # the yaml extra; recipes need it, the other commands do not
    yaml = None

Path_ = tuple  # a place in the document: keys and list indices from the root

# YAML 1.1 (PyYAML) reads `1e-3` as a string, as it requires a dot in a float; recipes write learning
# rates that way, so the loader also resolves the dotless exponent form as a float.
_DOTLESS_FLOAT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def _loader() -> type:
    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _DOTLESS_FLOAT, list("-+0123456789"))
    return RecipeLoader


@dataclass(frozen=True)
class Document:
    """`data` as yaml.safe_load gives it; `lines[path]` the 1-based line of each key or item."""

    name: str
    data: Any
    lines: dict[Path_, int]

    def line(self, path: Path_) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.name}:{self.line(path)}: {message}")


def dotted(path: Path_) -> str:
    """`steps[1].config.bits` for ("steps", 1, "config", "bits")."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the recipe"


def read(path: str | Path) -> Document:
    """Parse a YAML file; a syntax error or a repeated key is a ConfigError naming file and line."""
    if yaml is None:
        raise MissingDependencyError("recipes are YAML and need PyYAML: pip install 'fxcompress[yaml]'")
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc})") from None
    loader = _loader()(text)
    try:  # parsed once: the node tree gives the lines, and is then built into data as yaml.load builds it
        tree = loader.get_single_node()
        data = None if tree is None else loader.construct_document(tree)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark is not None else path.name
        context = getattr(exc, "context_mark", None)  # where the unfinished list or mapping began
        began = f"; {exc.context} at line {context.line + 1}" if context is not None and exc.context else ""
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}{began})") from None
    finally:
        loader.dispose()
    lines: dict[Path_, int] = {}
    if tree is not None:
        _walk(tree, (), lines, path.name)
    return Document(path.name, data, lines)


def _walk(node: Any, path: Path_, lines: dict[Path_, int], name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            where = path + (key.value,)
            if key.value in seen:  # PyYAML would keep the last silently
                raise ConfigError(f"{name}:{key.start_mark.line + 1}: {dotted(where)} is given twice")
            seen.add(key.value)
            lines[where] = key.start_mark.line + 1
            _walk(value, where, lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines, name)
