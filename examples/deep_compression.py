"""The main job of `make demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes.

Trains LeNet-300-100 on the embedded default data set (scikit-learn's 8x8 digits, offline), then
    1. prunes it in stages (InsertMasks, global magnitude) with retraining, the masks in the graph;
    2. shares weights by k-means (InsertFakeQuant) and fine-tunes the centroids;
    3. lowers it to packed, entropy-coded weights (LowerToEncoded), saves the file, loads it back
       and checks the loaded model computes exactly what the fake-quant model computes;
and prints the summary after each stage. Two other roads from the same dense model follow:
    4. structured pruning that really shrinks the layers (PruneChannels, least-squares
       reconstruction of the next layer on calibration data);
    5. integer-only inference (8-bit weights, 7-bit calibrated activations, LowerToInteger).

The pipeline is `fxcompress.cli.demo.deep_compression`, which `fxcompress demo` runs too.

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
