"""Does reconstruction pay? LeNet-5 on real data, 50% of conv channels removed without fine-tuning.

Runs examples/prune_channels_cnn.py's model and pruning for l1, greedy (ThiNet) and lasso (He et al.)
selection, each without and with least-squares reconstruction, and prints the README table.

    python benchmarks/bench_reconstruction.py [--dataset auto|digits|fashion-mnist] [--epochs 3]
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path


import torch

from fxcompress.datasets import load_dataset
from fxcompress.training import evaluate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "prune_channels_cnn.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    example = runpy.run_path(str(EXAMPLE))
    data = load_dataset(args.dataset)
    model = example["trained_cnn"](data, args.epochs)
    dense = evaluate(model, data.test_x, data.test_y)
    params = sum(p.numel() for p in model.parameters())
    print(f"{data.name}, LeNet-5 trained {args.epochs} epochs: dense accuracy {dense:.4f}, {params} parameters; "
          f"50% of conv channels removed, no fine-tuning, {example['CALIBRATION']} calibration images")
    print("| selection | no reconstruction | with reconstruction | parameters | pass time (s, without / with) |")
    print("|---|---|---|---|---|")
    for method in ("l1", "greedy", "lasso"):
        plain, rebuilt = (example["prune"](model, data, method, r) for r in (False, True))
        print(f"| {method} | {plain['accuracy']:.4f} ({plain['accuracy'] - dense:+.4f}) | "
              f"{rebuilt['accuracy']:.4f} ({rebuilt['accuracy'] - dense:+.4f}) | {rebuilt['params']} | "
              f"{plain['seconds']:.2f} / {rebuilt['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
