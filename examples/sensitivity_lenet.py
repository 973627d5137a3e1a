"""Per-layer sparsities from a sensitivity sweep (as Han et al. chose them), then pruning with rules.

Train LeNet-300-100, prune each layer alone at a range of sparsities, keep for each layer the
highest sparsity that costs at most `--tolerance` accuracy, and prune every layer to its own
sparsity with InsertMasks rules; finally retrain briefly with the masks in the graph.

    python examples/sensitivity_lenet.py --dataset digits --plot sensitivity.png
"""
from __future__ import annotations

import argparse

import torch

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.passes import InsertMasks
from fxcompress.training import evaluate, torch_threads, train
from fxcompress.zoo import LeNet300100

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy a layer may cost (0.01 = 1 point)")
    parser.add_argument("--plot", help="write the sensitivity curves to this PNG")
    args = parser.parse_args(argv)
    with torch_threads(1):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    data = load_dataset(args.dataset)
    torch.manual_seed(0)
    model = LeNet300100(data.channels * data.image_size ** 2, data.num_classes)
    train(model, data, args.epochs)

    def accuracy(m: torch.nn.Module) -> float:
        return evaluate(m, data.test_x, data.test_y)

    table = fxcompress.sensitivity(model, accuracy, sparsities=SPARSITIES, progress=True)
    print(table.to_markdown())
    if args.plot:
        print(f"plot: {table.save_plot(args.plot)}")
    chosen = table.max_sparsity(args.tolerance)
    rules = [(f"{layer}\\.weight", "element", sparsity) for layer, sparsity in chosen.items() if sparsity > 0]
    print(f"per-layer sparsities within {args.tolerance:.3f} of the baseline: {chosen}")
    gm = fxcompress.compile(model, [InsertMasks(rules=rules)], example_inputs=(data.train_x[:2],))
    pruned = accuracy(gm)
    train(gm, data, max(1, args.epochs // 4), lr=5e-4, seed=1)
    retrained = accuracy(gm)
    print(f"dense {table.baseline:.4f}, pruned {pruned:.4f}, retrained {retrained:.4f}, "
          f"weight sparsity {fxcompress.history(gm)[-1].stats['sparsity']:.4f}")
    return {"table": table, "chosen": chosen, "gm": gm, "retrained": retrained}


if __name__ == "__main__":
    main()
