"""Checks of command-line values shared by the commands: whole numbers with a lower bound (an argparse
type, so a bad value is a usage error naming the option) and output paths that must not be an input."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError


def at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= lo (`--threads 0` would reach torch as a bare RuntimeError)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value
    return parse


def not_the_input(out: Path, source: str | Path, what: str) -> None:
    """Refuse to write `out` when it is the file `source` (the same path, a link to it, another name of
    it): the command would replace the very file it reads."""
    if out.exists() and os.path.samefile(out, source):
        raise ConfigError(f"{what} {out} is the input file {source}: it would be overwritten; "
                          f"give another output path")
