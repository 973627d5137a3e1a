"""The main job of `make demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes.

Trains LeNet-300-100 on the embedded default data set (scikit-learn's 8x8 digits, offline), then
compresses it with every pass the library has and prints the summary after each stage.

    python examples/deep_compression.py [--data digits|fashion-mnist|auto] [--epochs N]
"""
from __future__ import annotations

import argparse
import time

import torch

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.training import evaluate, train
from fxcompress.zoo import LeNet300100


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=["digits", "fashion-mnist", "auto"])
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    data = load_dataset(args.data)
    model = LeNet300100(in_features=data.channels * data.image_size ** 2, num_classes=data.num_classes)
    train(model, data, epochs=args.epochs, lr=1e-3, batch_size=64)
    dense_accuracy = evaluate(model, data.test_x, data.test_y)
    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.test_x)} test images")
    print(f"dense LeNet-300-100: accuracy {dense_accuracy:.4f}\n")

    example = data.test_x[:8]
    gm = fxcompress.compile(model, [], example_inputs=(example,))
    accuracy = evaluate(gm, data.test_x, data.test_y)
    print(fxcompress.summary(gm))
    print(f"\naccuracy {accuracy:.4f} (dense {dense_accuracy:.4f}); {time.perf_counter() - start:.1f}s")
    return {"dense_accuracy": dense_accuracy, "accuracy": accuracy}


if __name__ == "__main__":
    main()
