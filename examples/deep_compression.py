"""The main job of `make demo`: Deep Compression of LeNet-300-100, end to end, as fxcompress passes.

Trains LeNet-300-100 on the embedded default data set (scikit-learn's 8x8 digits, offline), then
    1. prunes it in stages (InsertMasks, global magnitude) with retraining, the masks in the graph;
    2. shares weights by k-means (InsertFakeQuant) and fine-tunes the centroids;
    3. lowers it to packed, entropy-coded weights (LowerToEncoded), saves the file, loads it back
       and checks the loaded model computes exactly what the fake-quant model computes;
and prints the summary after each stage. Two other roads from the same dense model follow:
    4. structured pruning that really shrinks the layers (PruneChannels, least-squares
       reconstruction of the next layer on calibration data);
    5. integer-only inference (8-bit linear fake-quant with calibrated activations, LowerToInteger).

    python examples/deep_compression.py [--data digits|fashion-mnist|auto] [--epochs N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.passes import (ActivationConfig, InsertFakeQuant, InsertMasks, LowerToEncoded, LowerToInteger,
                               PruneChannels)
from fxcompress.training import evaluate, train
from zoo import LeNet300100

STAGES = (0.6, 0.8, 0.9)  # global weight sparsity after each pruning stage


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=["digits", "fashion-mnist", "auto"])
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--retrain-epochs", type=int, default=8, help="epochs after each stage")
    parser.add_argument("--bits", type=int, default=5, help="k-means bits per weight")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    data = load_dataset(args.data)
    model = LeNet300100(in_features=data.channels * data.image_size ** 2, num_classes=data.num_classes)
    train(model, data, epochs=args.epochs, lr=1e-3, batch_size=64)
    dense = evaluate(model, data.test_x, data.test_y)
    print(f"data: {data.name}, {len(data.train_x)} train / {len(data.test_x)} test images")
    print(f"dense LeNet-300-100: accuracy {dense:.4f}")
    example = (data.test_x[:1],)

    def retrain(gm, epochs, lr):
        train(gm, data, epochs=epochs, lr=lr, batch_size=64, seed=1)
        return evaluate(gm, data.test_x, data.test_y)

    # 1. pruning: the same pass compiled again advances the masks; pruned weights stay zero
    gm = model
    for sparsity in STAGES:
        gm = fxcompress.compile(gm, [InsertMasks(sparsity=sparsity, scope="global")], example_inputs=example)
        pruned = retrain(gm, args.retrain_epochs, 5e-4)
        print(f"pruned to {sparsity:.0%} (global magnitude), retrained: accuracy {pruned:.4f}")
    print(fxcompress.summary(gm).to_text(with_history=False))

    # 2. weight sharing: k-means codebooks whose centroids train; zeros stay out of the clustering
    gm = fxcompress.compile(gm, [InsertFakeQuant(bits=args.bits, method="kmeans", init="linear")],
                            example_inputs=example)
    shared = evaluate(gm, data.test_x, data.test_y)
    quantized = retrain(gm, args.retrain_epochs, 1e-4)
    print(f"\n{args.bits}-bit k-means weight sharing: accuracy {shared:.4f}, {quantized:.4f} after centroid fine-tuning")

    # 3. lowering: packed relative indices + codebook indices, entropy coded; a safe file
    encoded = fxcompress.compile(gm, [LowerToEncoded(coding="auto")], example_inputs=example)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lenet300.fxc")
        fxcompress.save(encoded, path)
        file_bytes = os.path.getsize(path)
        loaded = fxcompress.load(path)
    with torch.no_grad():
        exact = torch.equal(loaded.eval()(data.test_x), gm.eval()(data.test_x))
    final = evaluate(loaded, data.test_x, data.test_y)
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    print()
    print(fxcompress.summary(encoded))
    print(f"\nfile on disk: {file_bytes} bytes; fp32 model: {dense_bytes} bytes; "
          f"{dense_bytes / file_bytes:.1f}x smaller")
    print(f"loaded model outputs identical to the fake-quant model: {exact}")
    print(f"accuracy: dense {dense:.4f} -> compressed {final:.4f} ({100 * (final - dense):+.2f} points)")

    calibration = [data.train_x[i:i + 128] for i in range(0, 512, 128)]
    structured = other_roads(model, data, example, calibration)
    print(f"\n{time.perf_counter() - start:.1f}s")
    return {"dense_accuracy": dense, "accuracy": final, "ratio": dense_bytes / file_bytes, "exact": exact,
            **structured}


def other_roads(model, data, example, calibration) -> dict[str, float]:
    """Channel pruning with reconstruction, and integer-only lowering, of the dense model."""
    results = {}
    for reconstruct in (False, True):
        slim = fxcompress.compile(model, [PruneChannels(amount=0.5, method="l1", reconstruct=reconstruct)],
                                  example_inputs=example, calibration_data=calibration)
        results[f"channels_{'reconstructed' if reconstruct else 'plain'}"] = evaluate(slim, data.test_x, data.test_y)
    totals = fxcompress.summary(slim).totals
    print(f"\nhalf the hidden units removed (PruneChannels, l1): {totals['params']} parameters "
          f"(dense {sum(p.numel() for p in model.parameters())}), {totals['macs']} MACs a sample; accuracy "
          f"{results['channels_plain']:.4f} without and {results['channels_reconstructed']:.4f} with "
          "least-squares reconstruction, no fine-tuning")

    quantized = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, per_channel=True,
                                                           activations=ActivationConfig(bits=8))],
                                   example_inputs=example, calibration_data=calibration)
    integer = fxcompress.compile(quantized, [LowerToInteger()], example_inputs=example)
    results["fake_quant_8bit"] = evaluate(quantized, data.test_x, data.test_y)
    results["integer_8bit"] = evaluate(integer, data.test_x, data.test_y)
    print(f"8-bit integer-only inference (LowerToInteger): accuracy {results['integer_8bit']:.4f} "
          f"(fake-quant {results['fake_quant_8bit']:.4f}); stages: {fxcompress.history(integer)[-1].stats}")
    return results


if __name__ == "__main__":
    main()
