"""Channel pruning of a CNN trained on real data, with and without least-squares reconstruction.

Trains LeNet-5 (conv20-conv50-fc500-fc10) on Fashion-MNIST (scikit-learn's digits when Fashion-MNIST
is not installed), prints the channel groups the pruning pass sees, then removes half of the
channels of every conv layer *without fine-tuning*, and compares test accuracy with and without
reconstruction of the consumer layers on 512 calibration images.

    python examples/prune_channels_cnn.py [--dataset auto|digits|fashion-mnist] [--epochs 3]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fxcompress
from fxcompress.channels import ChannelGraph
from fxcompress.datasets import Dataset, load_dataset
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.training import evaluate, train
from fxcompress.zoo import LeNet5

CALIBRATION = 512


def trained_cnn(data: Dataset, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = LeNet5(data.channels, data.image_size, data.num_classes)
    train(model, data, epochs, lr=1e-3, seed=0)
    return model.eval()


def print_groups(model: nn.Module, data: Dataset) -> None:
    """The coupled channel groups, before anything changes."""
    gm = fxcompress.compile(model, example_inputs=(data.test_x[:2],))
    print(PassContext(example_inputs=(data.test_x[:2],), gm=gm).get(ChannelGraph))


def prune(model: nn.Module, data: Dataset, method: str, reconstruct: bool) -> dict:
    """Half of the conv channels removed; test accuracy, parameters and pass time."""
    calibration = [data.train_x[i:i + 128] for i in range(0, CALIBRATION, 128)]
    start = time.perf_counter()
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, method=method, reconstruct=reconstruct,
                                                  select=(nn.Conv2d,), max_samples=4096)],
                            example_inputs=(data.test_x[:2],), calibration_data=calibration)
    seconds = time.perf_counter() - start
    return {"method": method, "reconstruct": reconstruct, "accuracy": evaluate(gm, data.test_x, data.test_y),
            "params": sum(p.numel() for p in gm.parameters()), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = load_dataset(args.dataset)
    model = trained_cnn(data, args.epochs)
    dense = evaluate(model, data.test_x, data.test_y)
    print(f"{data.name}: dense LeNet-5 test accuracy {dense:.4f}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print_groups(model, data)
    for reconstruct in (False, True):
        row = prune(model, data, "l1", reconstruct)
        print(f"50% of conv channels, l1, reconstruct={reconstruct}: accuracy {row['accuracy']:.4f} "
              f"({row['params']} parameters, {row['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
