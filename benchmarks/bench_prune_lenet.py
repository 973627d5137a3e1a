"""Iterative global magnitude pruning of LeNet-300-100 and LeNet-5 on real data (one CPU thread).

Runs examples/prune_lenet.py's recipe for both models and prints the README table: dense and
pruned test accuracy (the dense model trained with the same epoch budget), weight sparsity overall
and per layer, and wall time of the pruned run (dense training + all stages).

    python benchmarks/bench_prune_lenet.py [--dataset auto|digits|fashion-mnist]
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path


import torch

from fxcompress.datasets import load_dataset

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prune_lenet.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    example = runpy.run_path(str(EXAMPLE))
    data = load_dataset(args.dataset)
    rows = []
    for name, recipe in example["RECIPES"].items():
        rows.append(example["prune_iteratively"](name, data, recipe))
        print(f"{name}: {recipe}", flush=True)
    print(example["format_rows"](rows))


if __name__ == "__main__":
    main()
