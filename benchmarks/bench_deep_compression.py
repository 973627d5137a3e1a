"""The Deep Compression pipeline end to end: InsertMasks -> InsertFakeQuant -> LowerToEncoded.

LeNet-300-100 and LeNet-5 on Fashion-MNIST when installed (scikit-learn digits otherwise): dense
training, four stages of global magnitude pruning with retraining (the dense baseline gets the
same epochs), linear-init k-means weight sharing
with centroid fine-tuning, then lowering into encoded weights and saving. The ratio is fp32
parameter bytes over the bytes of the saved file on disk; the same model is saved with bit-packed
codes only (`fixed`), with Huffman, and with the per-layer smallest coding (`auto`), so the entropy
coders' gain shows separately. Accuracies are measured on
the model loaded back from the file.

    python benchmarks/bench_deep_compression.py [--dataset auto|digits|fashion-mnist] [--model lenet300]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path


import torch

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.training import evaluate, train
from fxcompress.zoo import LeNet5, LeNet300100

BITS = {"lenet300": {"linear": 5}, "lenet5": {"conv2d": 8, "linear": 5}}  # Deep Compression's choices
FINETUNE = {"lenet300": (3, 1e-4), "lenet5": (2, 1e-4)}                 # epochs, learning rate
# (dense epochs, retraining epochs per stage, retraining lr, the InsertMasks pass of stage k)
PRUNING = {
    # the recipe of examples/prune_lenet.py: a global magnitude threshold, retrained at 2e-3
    "lenet300": (10, 4, 2e-3, lambda k: InsertMasks(sparsity=(0.8, 0.9, 0.93, 0.95), scope="global", stage=k)),
    "lenet5": (4, 2, 5e-4, lambda k: InsertMasks(sparsity=(0.6, 0.8, 0.9, 0.95), scope="global", stage=k)),
}


def build(name: str, data) -> torch.nn.Module:
    if name == "lenet300":
        return LeNet300100(data.channels * data.image_size ** 2, data.num_classes)
    return LeNet5(data.channels, data.image_size, data.num_classes)


def prune(name: str, data, seed: int = 0) -> tuple[torch.nn.Module, float, float]:
    """(pruned GraphModule, accuracy of the dense model given the same epochs, weight sparsity %)."""
    dense_epochs, stage_epochs, lr, stage_pass = PRUNING[name]
    torch.manual_seed(seed)
    model = build(name, data)
    train(model, data, dense_epochs, seed=seed)
    baseline = copy.deepcopy(model)
    train(baseline, data, 4 * stage_epochs, lr=lr, seed=seed + 1)
    for stage in range(4):
        model = fxcompress.compile(model, [stage_pass(stage)], example_inputs=(data.train_x[:2],))
        train(model, data, stage_epochs, lr=lr, seed=seed + 2 + stage)
    weights = [effective_weight(model, layer) for layer in find_layers(model)]
    sparsity = 1 - sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    return model, 100 * evaluate(baseline, data.test_x, data.test_y), 100 * sparsity


def quantize(gm, name, data):
    passes = [InsertFakeQuant(bits=bits, method="kmeans", init="linear", types=(kind,))
              for kind, bits in BITS[name].items()]
    example = (data.train_x[:2],)
    quantized = fxcompress.compile(gm, passes, example_inputs=example)
    epochs, lr = FINETUNE[name]
    train(quantized, data, epochs, lr=lr, seed=7)  # only the shared centroids (and biases) learn
    return quantized


def file_sizes(quantized, data, folder: Path) -> tuple[dict[str, int], torch.nn.Module]:
    sizes, example = {}, (data.train_x[:2],)
    for coding in ("fixed", "huffman", "auto"):
        lowered = fxcompress.compile(quantized, [LowerToEncoded(coding=coding, bias="float16")],
                                     example_inputs=example)
        sizes[coding] = fxcompress.save(lowered, folder / f"{coding}.fxc")
    loaded = fxcompress.load(folder / "auto.fxc")
    return sizes, loaded


def run(name: str, data, folder: Path) -> dict:
    pruned, dense, sparsity = prune(name, data)
    pruned_acc = 100 * evaluate(pruned, data.test_x, data.test_y)
    quantized = quantize(pruned, name, data)
    sizes, loaded = file_sizes(quantized, data, folder)
    fp32 = 4 * sum(p.numel() for p in build(name, data).parameters())
    same = all(torch.equal(effective_weight(loaded, a), effective_weight(quantized, b))
               for a, b in zip(find_layers(loaded), find_layers(quantized)))
    return {"model": name, "data": data.name, "dense": dense, "pruned": pruned_acc, "sparsity": sparsity,
            "quantized": 100 * evaluate(quantized, data.test_x, data.test_y),
            "loaded": 100 * evaluate(loaded, data.test_x, data.test_y), "identical": same,
            "fp32": fp32, "sizes": sizes}


def table(rows: list[dict]) -> str:
    lines = ["| model | data | sparsity % | dense acc % | pruned % | quantized % | from file % | drop (points) | "
             "fp32 bytes | file: bit-packed | file: Huffman | file: auto | ratio (auto) | Huffman / auto gain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["sizes"]
        lines.append(
            f"| {r['model']} | {r['data']} | {r['sparsity']:.1f} | {r['dense']:.2f} | {r['pruned']:.2f} | "
            f"{r['quantized']:.2f} | {r['loaded']:.2f} | {r['dense'] - r['loaded']:+.2f} | {r['fp32']:,} | "
            f"{s['fixed']:,} ({r['fp32'] / s['fixed']:.1f}x) | {s['huffman']:,} ({r['fp32'] / s['huffman']:.1f}x) | "
            f"{s['auto']:,} | **{r['fp32'] / s['auto']:.1f}x** | {100 * (1 - s['huffman'] / s['fixed']):.1f}% / "
            f"{100 * (1 - s['auto'] / s['fixed']):.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto")
    parser.add_argument("--model", choices=["lenet300", "lenet5", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    names = ["lenet300", "lenet5"] if args.model == "all" else [args.model]
    with tempfile.TemporaryDirectory() as folder:
        rows = [run(name, data, Path(folder)) for name in names]
    print(table(rows))
    for r in rows:
        print(f"\n{r['model']}: weights loaded from the file bit-identical to the fake-quant model's: {r['identical']}")


if __name__ == "__main__":
    main()
