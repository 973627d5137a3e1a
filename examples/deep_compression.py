"""The main job of `make demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes.

The stages (staged pruning, k-means, encoding and the file; then channel pruning and integer-only
inference from the same dense model) are described and run by `fxcompress.cli.demo.deep_compression`,
which `fxcompress demo` runs too.

    python examples/deep_compression.py [--data digits|fashion-mnist|auto] [--epochs N] [--out DIR]

It leaves lenet300.fxc, summary.md and the report (report.html with its pictures, report.md) in
--out (default fxcompress-demo/).
"""
from __future__ import annotations

import argparse

from fxcompress.cli.demo import add_arguments, demo
from fxcompress.zoo import LeNet300100


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", default="fxcompress-demo", help="folder for the file and the report")
    args = parser.parse_args(argv)
    return demo(args, LeNet300100, out=args.out)


if __name__ == "__main__":
    main()
