"""Iterative magnitude pruning of LeNet-300-100 and LeNet-5 (Han et al. 2015) with InsertMasks.

Train dense, then four stages of: raise the global magnitude sparsity, retrain a little with the
masks frozen. The dense baseline gets the same training budget and schedule (the dense epochs,
then as many epochs at the retraining learning rate as all stages together), so the accuracy
drop is measured fairly.

    python examples/prune_lenet.py                      # both models, Fashion-MNIST when installed
    python examples/prune_lenet.py --model lenet5 --dataset digits
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

import fxcompress
from fxcompress.datasets import Dataset, load_dataset
from fxcompress.passes import InsertMasks
from fxcompress.pruning import get_mask, masked_layers
from fxcompress.training import evaluate, train
from fxcompress.zoo import LeNet5, LeNet300100


@dataclass(frozen=True)
class Recipe:
    stages: tuple[float, ...]   # global weight sparsity after each stage
    dense_epochs: int
    stage_epochs: int           # retraining epochs after each stage
    lr: float = 1e-3
    retrain_lr: float = 5e-4


RECIPES = {
    "lenet300": Recipe(stages=(0.8, 0.9, 0.93, 0.95), dense_epochs=10, stage_epochs=4, retrain_lr=2e-3),
    "lenet5": Recipe(stages=(0.5, 0.75, 0.87, 0.92), dense_epochs=3, stage_epochs=1),
}


def build(name: str, data: Dataset) -> torch.nn.Module:
    if name == "lenet300":
        return LeNet300100(data.channels * data.image_size ** 2, data.num_classes)
    return LeNet5(data.channels, data.image_size, data.num_classes)


def prune_iteratively(name: str, data: Dataset, recipe: Recipe, seed: int = 0) -> dict:
    """Dense training, then the pruning stages; returns one result row (accuracies in %)."""
    torch.manual_seed(seed)
    model = build(name, data)
    start = time.perf_counter()
    train(model, data, recipe.dense_epochs, lr=recipe.lr, seed=seed)
    dense_seconds = time.perf_counter() - start

    baseline = copy.deepcopy(model)  # the same budget, spent on the dense model
    train(baseline, data, recipe.stage_epochs * len(recipe.stages), lr=recipe.retrain_lr, seed=seed + 1)

    start = time.perf_counter()
    gm, example = model, data.train_x[:2]
    for stage in range(len(recipe.stages)):
        gm = fxcompress.compile(gm, [InsertMasks(sparsity=recipe.stages, stage=stage, scope="global")],
                                example_inputs=(example,))
        train(gm, data, recipe.stage_epochs, lr=recipe.retrain_lr, seed=seed + 1 + stage)
    masks = {layer.name: get_mask(gm, layer) for layer in masked_layers(gm)}
    kept = sum(m.count_nonzero().item() for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "model": name, "data": data.name,
        "dense": 100 * evaluate(baseline, data.test_x, data.test_y),
        "pruned": 100 * evaluate(gm, data.test_x, data.test_y),
        "sparsity": 100 * (1 - kept / total),
        "layers": {n: 100 * (1 - m.count_nonzero().item() / m.numel()) for n, m in masks.items()},
        "seconds": dense_seconds + time.perf_counter() - start,
        "gm": gm,
    }


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of result rows."""
    lines = ["| model | data | dense acc % | pruned acc % | drop (points) | weight sparsity % | per layer % | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layers = ", ".join(f"{n} {s:.1f}" for n, s in r["layers"].items())
        lines.append(f"| {r['model']} | {r['data']} | {r['dense']:.2f} | {r['pruned']:.2f} | "
                     f"{r['dense'] - r['pruned']:+.2f} | {r['sparsity']:.2f} | {layers} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    names = list(RECIPES) if args.model == "all" else [args.model]
    rows = [prune_iteratively(name, data, RECIPES[name]) for name in names]
    print(format_rows(rows))
    print(fxcompress.format_history(rows[-1]["gm"]))


if __name__ == "__main__":
    main()
