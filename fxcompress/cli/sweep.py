"""`fxcompress sensitivity`: prune one layer at a time at each sparsity and print the accuracy table
(fxcompress.sensitivity), for a model named as in recipes (trained first) or a saved .fxc file."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import Regex, explain, satisfies
from ..errors import ConfigError
from ..fileformat import load
from ..sensitivity import SensitivityTable, prunable_layers, sensitivity
from ..training import evaluate, torch_threads, train
from .arguments import at_least, not_the_input
from .data import DATASETS, subset
from .models import build

QUICK = {"train_samples": 512, "test_samples": 360, "epochs": 1}


def _sparsities(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"sensitivity --sparsities must be numbers such as 0.5,0.7,0.9, got {text!r}") from None


def sweep_data(args: argparse.Namespace):
    kind = DATASETS[args.data]
    if kind.needs_root and args.root is None:
        raise ConfigError(f"sensitivity --data {args.data} needs --root (the folder holding "
                          f"{', '.join(kind.files)})")
    ignored = kind.why_not_resized(args.data)
    if args.image_size is not None and ignored:
        raise ConfigError(f"--image-size {args.image_size}: {ignored}")
    side = args.image_size or kind.shape.image_size
    if side is None:
        raise ConfigError(f"sensitivity --data {args.data} needs --image-size")
    data = kind.load(Path(args.root) if args.root else None, side)
    return subset(data, QUICK["train_samples"], QUICK["test_samples"]) if args.quick else data


def _model(args: argparse.Namespace, data):
    if (args.model is None) == (args.file is None):
        raise ConfigError("sensitivity needs exactly one of --model SPEC and --file FILE.fxc")
    if args.file is not None:
        return load(args.file)
    model = build(args.model, {}, (data.channels, data.image_size, data.num_classes))
    _layers(model, args)  # before the training: a pattern that matches no layer fails now
    epochs = min(args.epochs, QUICK["epochs"]) if args.quick else args.epochs
    if epochs:
        train(model, data, epochs, lr=1e-3, batch_size=64, progress=True)
    return model.eval()


def check_layers_pattern(args: argparse.Namespace) -> None:
    """--layers must be a regular expression (checked before any data is read or model trained)."""
    if args.layers is not None and not satisfies(args.layers, (Regex(),)):
        raise ConfigError(explain("--layers", args.layers, (Regex(),)))


def _layers(model, args: argparse.Namespace) -> None:
    """--layers must match a layer of the model; the error names the option."""
    try:
        prunable_layers(model, args.layers)
    except ConfigError as exc:
        raise ConfigError(f"--layers {args.layers!r}: {exc}") from None


def sweep(model, data, args: argparse.Namespace) -> SensitivityTable:
    """The accuracy table of `model` on `data` with the sweep options of `args` (sparsities, granularity,
    layers); a model that cannot run on the data's images is a ConfigError saying so."""
    sparsities = _sparsities(args.sparsities)
    try:
        with torch.no_grad():
            model.eval()(data.test_x[:1])
    except RuntimeError as exc:
        raise ConfigError(f"the model cannot run on {data.name} images of shape "
                          f"{tuple(data.test_x.shape[1:])} ({' '.join(str(exc).split())[:200]})") from None
    return sensitivity(model, lambda m: evaluate(m, data.test_x, data.test_y), sparsities,
                       args.granularity, layers=args.layers, progress=True, metric="test accuracy")


def sensitivity_command(args: argparse.Namespace) -> int:
    _sparsities(args.sparsities)  # a typo fails before any training
    check_layers_pattern(args)
    if args.out and args.file:
        not_the_input(Path(args.out), args.file, "sensitivity --out")
    with torch_threads(args.threads):
        torch.manual_seed(0)
        data = sweep_data(args)
        table = sweep(_model(args, data), data, args)
    print(table.to_text())
    if args.out:
        out = Path(args.out)
        table.save(out) if out.suffix.lower() == ".json" else out.write_text(table.to_markdown() + "\n")
        print(f"written to {args.out}")
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The data set and sweep options, shared by `sensitivity` and `report --sensitivity`."""
    parser.add_argument("--data", default="digits", choices=sorted(DATASETS))
    parser.add_argument("--root", help="the data set's folder (mnist, cifar-10, cifar-100, image-folder)")
    parser.add_argument("--image-size", type=at_least(4), help="image side (image-folder)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--granularity", default="element", choices=["element", "kernel", "filter", "channel"])
    parser.add_argument("--layers", help="full-match regex over layer names (default: every layer)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['train_samples']} training images, "
                                                             f"{QUICK['epochs']} epoch")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sensitivity", help="accuracy with each layer alone pruned to each sparsity",
                                 description=__doc__)
    parser.add_argument("--model", help="zoo:NAME, torchvision:NAME or package.module:factory (trained first)")
    parser.add_argument("--file", help="a .fxc file to sweep instead of --model")
    add_sweep_arguments(parser)
    parser.add_argument("--epochs", type=at_least(0), default=10, help="training epochs of --model before the sweep")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--out", help="also write the table to this file: .json (what report --sensitivity "
                                      "reads) or Markdown")
    parser.set_defaults(handler=sensitivity_command)
