"""`fxcompress demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes — the job of
`make demo`, shared with examples/deep_compression.py (`deep_compression` below is the pipeline).

Trains LeNet-300-100 on the embedded default data set (scikit-learn's 8x8 digits, offline), then
    1. prunes it in stages (InsertMasks, global magnitude) with retraining, the masks in the graph;
    2. shares weights by k-means (InsertFakeQuant) and fine-tunes the centroids;
    3. lowers it to packed, entropy-coded weights (LowerToEncoded), saves the file, loads it back
       and checks the loaded model computes exactly what the fake-quant model computes;
and prints the summary after each stage. Two other roads from the same dense model follow:
    4. structured pruning that really shrinks the layers (PruneChannels, least-squares
       reconstruction of the next layer on calibration data);
    5. integer-only inference (8-bit weights, 7-bit calibrated activations, LowerToInteger).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..compile import compile as compile_model
from ..datasets import Dataset, load_dataset
from ..fileformat import load, save
from ..history import history
from ..report import write_report
from ..sensitivity import sensitivity
from ..passes import ActivationConfig, InsertFakeQuant, InsertMasks, LowerToEncoded, LowerToInteger, PruneChannels
from ..summary import summary
from ..training import evaluate, torch_threads, train
from ..zoo import LeNet300100
from .arguments import at_least

STAGES = (0.6, 0.8, 0.9)  # global weight sparsity after each pruning stage
QUICK = {"epochs": 4, "retrain_epochs": 1}  # --quick: a minute's run that still shows every stage
SENSITIVITY = (0.5, 0.7, 0.8, 0.9, 0.95)  # the report's sensitivity curves of the dense model


def deep_compression(model: nn.Module, data: Dataset, *, epochs: int = 30, retrain_epochs: int = 8, bits: int = 5,
                     out: str | os.PathLike | None = None) -> dict[str, float]:
    """Train `model` on `data`, compress it in three stages and try the two other roads; prints as it goes.

    The compressed file (and, with `out`, the summary as Markdown and the HTML report with its
    Markdown) is written to `out`, else to a temporary folder. Returns the accuracies, the compression ratio and whether the file is exact.
    """
    start = time.perf_counter()
    train(model, data, epochs=epochs, lr=1e-3, batch_size=64, progress=True)
    dense = evaluate(model, data.test_x, data.test_y)
    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.test_x)} test images")
    print(f"dense LeNet-300-100: accuracy {dense:.4f}")
    example = (data.test_x[:1],)
    gm = _prune_and_share(model, data, example, retrain_epochs, bits)
    encoded = compile_model(gm, [LowerToEncoded(coding="auto")], example_inputs=example, progress=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(out if out is not None else folder) / "lenet300.fxc"
        path.parent.mkdir(parents=True, exist_ok=True)
        save(encoded, path)
        file_bytes = os.path.getsize(path)
        loaded = load(path)
    with torch.no_grad():
        exact = torch.equal(loaded.eval()(data.test_x), gm.eval()(data.test_x))
    final = evaluate(loaded, data.test_x, data.test_y)
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    table = summary(encoded)
    print()
    print(table)
    print(f"\nfile on disk: {file_bytes} bytes; fp32 model: {dense_bytes} bytes; "
          f"{dense_bytes / file_bytes:.1f}x smaller")
    print(f"loaded model outputs identical to the fake-quant model: {exact}")
    print(f"accuracy: dense {dense:.4f} -> compressed {final:.4f} ({100 * (final - dense):+.2f} points)")
    if out is not None:
        Path(out, "summary.md").write_text(f"# Deep Compression of LeNet-300-100 on {data.name}\n\n"
                                           f"{table.to_markdown()}\n\n```\n{table.history}\n```\n")
        facts = {"data": f"{data.name}, {len(data.train_x)} train / {len(data.test_x)} test images",
                 "accuracy": f"dense {dense:.4f} -> compressed {final:.4f}",
                 "file": f"lenet300.fxc, {file_bytes} bytes ({dense_bytes / file_bytes:.1f}x smaller than fp32)",
                 "outputs identical to the fake-quant model": str(exact)}
        _report(encoded, gm, model, data, Path(out) / "report.html", facts)
    calibration = [data.train_x[i:i + 128] for i in range(0, 512, 128)]
    structured = other_roads(model, data, example, calibration)
    print(f"\n{time.perf_counter() - start:.1f}s")
    return {"dense_accuracy": dense, "accuracy": final, "ratio": dense_bytes / file_bytes, "exact": exact,
            **structured}


def _report(encoded, fake_quant, dense_model, data: Dataset, path: Path, facts: dict) -> None:
    """The HTML report (and its Markdown) of the encoded model: its weights before quantization come
    from the fake-quant model; the sensitivity curves from the dense one."""
    table = sensitivity(dense_model, lambda m: evaluate(m, data.test_x, data.test_y), SENSITIVITY,
                        metric="test accuracy")
    files = write_report(encoded, path, title=f"Deep Compression of LeNet-300-100 on {data.name}",
                         reference=fake_quant, sensitivity=table, facts=facts,
                         example_inputs=(data.test_x[:1],))
    print(f"report: {files.html} ({files.pictures} pictures) and {files.markdown}")


def _prune_and_share(model: nn.Module, data: Dataset, example: tuple, retrain_epochs: int, bits: int):
    """Stages 1 and 2: pruning with retraining, then k-means weight sharing with centroid fine-tuning."""
    def retrain(gm, epochs, lr):
        train(gm, data, epochs=epochs, lr=lr, batch_size=64, seed=1, progress=True)
        return evaluate(gm, data.test_x, data.test_y)

    # 1. pruning: the same pass compiled again advances the masks; pruned weights stay zero
    gm = model
    for sparsity in STAGES:
        gm = compile_model(gm, [InsertMasks(sparsity=sparsity, scope="global")], example_inputs=example, progress=True)
        pruned = retrain(gm, retrain_epochs, 5e-4)
        print(f"pruned to {sparsity:.0%} (global magnitude), retrained: accuracy {pruned:.4f}")
    print(summary(gm).to_text(with_history=False))

    # 2. weight sharing: k-means codebooks whose centroids train; zeros stay out of the clustering
    gm = compile_model(gm, [InsertFakeQuant(bits=bits, method="kmeans", init="linear")], example_inputs=example,
                       progress=True)
    shared = evaluate(gm, data.test_x, data.test_y)
    quantized = retrain(gm, retrain_epochs, 1e-4)
    print(f"\n{bits}-bit k-means weight sharing: accuracy {shared:.4f}, {quantized:.4f} after centroid fine-tuning")
    return gm


def other_roads(model, data, example, calibration) -> dict[str, float]:
    """Channel pruning with reconstruction, and integer-only lowering, of the dense model."""
    results = {}
    for reconstruct in (False, True):
        slim = compile_model(model, [PruneChannels(amount=0.5, method="l1", reconstruct=reconstruct)],
                             example_inputs=example, calibration_data=calibration)
        results[f"channels_{'reconstructed' if reconstruct else 'plain'}"] = evaluate(slim, data.test_x, data.test_y)
    totals = summary(slim).totals
    print(f"\nhalf the hidden units removed (PruneChannels, l1): {totals['params']} parameters "
          f"(dense {sum(p.numel() for p in model.parameters())}), {totals['macs']} MACs a sample; accuracy "
          f"{results['channels_plain']:.4f} without and {results['channels_reconstructed']:.4f} with "
          "least-squares reconstruction, no fine-tuning")

    # symmetric int8 weights and 7-bit activations: what oneDNN's int8 kernels run exactly on any x86
    # CPU, VNNI or not (LowerToInteger's native backend; elsewhere it keeps the exact reference one)
    quantized = compile_model(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                      activations=ActivationConfig(bits=7))],
                              example_inputs=example, calibration_data=calibration)
    integer = compile_model(quantized, [LowerToInteger()], example_inputs=example)
    results["fake_quant_8bit"] = evaluate(quantized, data.test_x, data.test_y)
    results["integer_8bit"] = evaluate(integer, data.test_x, data.test_y)
    stats = history(integer)[-1].stats
    print(f"integer-only inference, 8-bit weights / 7-bit activations (LowerToInteger, {stats['backend']} "
          f"backend, {stats['integer_layers']} layers): accuracy {results['integer_8bit']:.4f} "
          f"(fake-quant {results['fake_quant_8bit']:.4f})")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by `fxcompress demo` and examples/deep_compression.py."""
    parser.add_argument("--data", default="digits", choices=["digits", "fashion-mnist", "auto"],
                        help="digits: scikit-learn's 8x8 digits, offline; fashion-mnist: its files on disk")
    parser.add_argument("--epochs", type=at_least(0), default=30, help="dense training epochs")
    parser.add_argument("--retrain-epochs", type=at_least(0), default=8, help="epochs after each stage")
    parser.add_argument("--bits", type=int, default=5, help="k-means bits per weight")
    parser.add_argument("--threads", type=at_least(1), default=2)


def demo(args: argparse.Namespace, model_class: type[nn.Module], out: str | None = None) -> dict[str, float]:
    """Seed, load the data, build LeNet-300-100 and run the pipeline with the parsed options."""
    with torch_threads(args.threads):  # restored after: a caller's process keeps its own thread count
        torch.manual_seed(0)
        data = load_dataset(args.data)
        model = model_class(in_features=data.channels * data.image_size ** 2, num_classes=data.num_classes)
        return deep_compression(model, data, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
                                bits=args.bits, out=out)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="Deep Compression of LeNet-300-100 end to end (make demo)",
                                 description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['epochs']} dense epochs and {QUICK['retrain_epochs']} after each stage")
    parser.add_argument("--out", default="fxcompress-demo",
                        help="folder for lenet300.fxc, summary.md and report.html (with report.md)")
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    if args.quick:
        args.epochs, args.retrain_epochs = QUICK["epochs"], QUICK["retrain_epochs"]
    demo(args, LeNet300100, out=args.out)
    return 0
