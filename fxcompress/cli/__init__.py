"""The `fxcompress` command (also `python -m fxcompress`): demo, run, inspect, report, decode, export, sensitivity.

    fxcompress demo [--data digits|fashion-mnist|auto] [--quick]
    fxcompress run deep_compression_lenet300 [--quick] [--check] [--out DIR]   # a shipped recipe, or a file
    fxcompress report model.fxc [--sensitivity [TABLE.json]]
    fxcompress inspect model.fxc

`main(argv)` returns the exit status. An error fxcompress raises on purpose (a bad recipe value, a
corrupt file, a missing optional dependency) prints one line to stderr and returns 1; a usage error
returns 2. One module per command group registers its sub-commands.
"""
from __future__ import annotations

import argparse
import gc
import sys

from ..errors import FxCompressError
from . import demo, files, run, sweep

COMMANDS = (demo, run, files, sweep)  # each has register(subparsers)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage itself is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="fxcompress", description="Deep Compression as torch.fx graph passes: run recipes, "
                                                "inspect, decode and export compressed models.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for module in COMMANDS:
        module.register(commands)
    return top


def _message(exc: BaseException) -> str:
    """The error as one line; an OSError as "what: path" rather than "[Errno 2] ..."."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}"
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 success, 1 an fxcompress error, 2 a usage error).
    Without `argv` (the console script, `python -m fxcompress`) this is the process's command line: what it
    imported lives until it exits, and the cyclic collector stops scanning it (`gc.freeze`)."""
    if argv is None:
        # torch and fxcompress leave about 175,000 tracked objects (none of them garbage once imported);
        # each full collection walks them all (0.12 s here) and a command triggers several: inspect
        # 4.5 -> 3.9 s of CPU, run --check 4.9 -> 4.3. A caller passing argv keeps its collector as it was.
        gc.freeze()
    try:
        args = parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 1
    except (FxCompressError, OSError) as exc:
        print(f"fxcompress: error: {_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxcompress: interrupted", file=sys.stderr)
        return 130
