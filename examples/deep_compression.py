"""The main job of `make demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes.

The stages (staged pruning, k-means, encoding and the file; then channel pruning and integer-only
inference from the same dense model) are described and run by `fxcompress.cli.demo.deep_compression`,
which `fxcompress demo` runs too.

    python examples/deep_compression.py [--data digits|fashion-mnist|auto] [--epochs N]
"""
from __future__ import annotations

import argparse

from fxcompress.cli.demo import add_arguments, demo
from zoo import LeNet300100


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return demo(parser.parse_args(argv), LeNet300100)


if __name__ == "__main__":
    main()
