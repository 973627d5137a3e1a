"""Trained quantization of pruned LeNet-300-100 and LeNet-5 (Deep Compression, section 3) with InsertFakeQuant.

The pruned models come from examples/prune_lenet.py (iterative global magnitude pruning). Each
quantization method is then inserted as fake-quant nodes and fine-tuned briefly: k-means trains
only the shared centroids (the codes stay fixed, pruned weights stay zero), linear and fixed-point
train the float weights through the straight-through estimator. The table compares every result
with the pruned float model it started from.

    python examples/quantize_lenet.py                     # both models, Fashion-MNIST when installed
    python examples/quantize_lenet.py --model lenet300 --dataset digits
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import fxcompress
from fxcompress.datasets import Dataset, load_dataset
from fxcompress.passes import InsertFakeQuant
from fxcompress.training import evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_lenet import RECIPES, prune_iteratively  # noqa: E402  (stage 1 of the pipeline: pruning)

# Deep Compression's bit widths: conv layers 8 bits, fully connected 5 (AlexNet) or 6 (LeNet-300-100 here)
CONV8_FC5 = [("conv\\d\\.weight", "kmeans", 8), ("fc\\d\\.weight", "kmeans", 5)]


@dataclass(frozen=True)
class Variant:
    method: str
    bits: str
    quant: InsertFakeQuant | None  # None: the float reference, fine-tuned with the same budget


FLOAT = Variant("float reference (same fine-tuning)", "32", None)

VARIANTS = {
    "lenet300": [
        FLOAT,
        Variant("kmeans (linear init)", "6", InsertFakeQuant(bits=6)),
        Variant("kmeans (linear init)", "5", InsertFakeQuant(bits=5)),
        Variant("kmeans (linear init)", "4", InsertFakeQuant(bits=4)),
        Variant("kmeans (density init)", "4", InsertFakeQuant(bits=4, init="density")),
        Variant("kmeans (kmeans++ init)", "4", InsertFakeQuant(bits=4, init="kmeans++")),
        Variant("linear asymmetric", "6", InsertFakeQuant(bits=6, method="linear")),
        Variant("linear per channel", "4", InsertFakeQuant(bits=4, method="linear", per_channel=True)),
        Variant("fixed point", "8", InsertFakeQuant(bits=8, method="fixed_point")),
    ],
    "lenet5": [
        FLOAT,
        Variant("kmeans (linear init)", "conv 8 / fc 5", InsertFakeQuant(rules=CONV8_FC5)),
        Variant("kmeans (linear init)", "4", InsertFakeQuant(bits=4)),
        Variant("linear asymmetric", "conv 8 / fc 5",
                InsertFakeQuant(method="linear", rules=[(p, "linear", b) for p, _, b in CONV8_FC5])),
        Variant("fixed point", "8", InsertFakeQuant(bits=8, method="fixed_point")),
    ],
}


def quantize(pruned: torch.nn.Module, data: Dataset, variant: Variant, epochs: int, lr: float) -> dict:
    """Insert the variant's fake-quant into a copy of the pruned model, evaluate, fine-tune, evaluate."""
    start = time.perf_counter()
    passes = [variant.quant] if variant.quant is not None else []
    gm = fxcompress.compile(pruned, passes, example_inputs=(data.train_x[:2],))
    before = evaluate(gm, data.test_x, data.test_y)
    train(gm, data, epochs, lr=lr, seed=7)
    return {"method": variant.method, "bits": variant.bits, "quantized": 100 * before,
            "tuned": 100 * evaluate(gm, data.test_x, data.test_y), "seconds": time.perf_counter() - start}


def format_rows(model: str, pruned: dict, rows: list[dict]) -> str:
    lines = [f"{model} on {pruned['data']}: dense {pruned['dense']:.2f} %, pruned to {pruned['sparsity']:.1f} % "
             f"sparsity: {pruned['pruned']:.2f} %",
             "",
             "| method | bits | quantized acc % | after fine-tuning % | vs pruned float | vs float reference | s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    reference = next(r["tuned"] for r in rows if r["bits"] == "32")
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {r['quantized']:.2f} | {r['tuned']:.2f} | "
                     f"{r['tuned'] - pruned['pruned']:+.2f} | {r['tuned'] - reference:+.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run(model: str, data: Dataset, *, tune_epochs: int = 2, lr: float = 1e-4, quick: bool = False) -> dict:
    recipe = RECIPES[model]
    if quick:  # a smoke run: fewer epochs, the float reference and the first variant
        recipe = replace(recipe, dense_epochs=2, stage_epochs=1)
    pruned = prune_iteratively(model, data, recipe)
    variants = VARIANTS[model][:2] if quick else VARIANTS[model]
    rows = [quantize(pruned["gm"], data, v, tune_epochs, lr) for v in variants]
    print(format_rows(model, pruned, rows), flush=True)
    return {"pruned": pruned, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--tune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    names = list(VARIANTS) if args.model == "all" else [args.model]
    return {name: run(name, data, tune_epochs=args.tune_epochs, lr=args.lr, quick=args.quick) for name in names}


if __name__ == "__main__":
    main()
