"""The Deep Compression pipeline end to end: InsertMasks -> InsertFakeQuant -> LowerToEncoded.

LeNet-300-100 and LeNet-5 on Fashion-MNIST when installed (scikit-learn digits otherwise): dense
training and four stages of global magnitude pruning with retraining (examples/prune_lenet.py's
recipe, with longer retraining), linear-init k-means weight sharing with centroid fine-tuning, then lowering into encoded
weights and saving. The ratio is fp32 parameter bytes over the bytes of the saved file on disk;
the same model is saved with bit-packed codes only (`fixed`), with Huffman, and with the per-layer
smallest coding (`auto`), so the entropy coders' gain shows separately. Accuracies are measured on
the model loaded back from the file.

    python benchmarks/bench_deep_compression.py [--dataset auto|digits|fashion-mnist] [--model lenet300]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant, LowerToEncoded
from fxcompress.training import evaluate, train

BITS = {"lenet300": {"linear": 5}, "lenet5": {"conv2d": 8, "linear": 5}}  # Deep Compression's choices
FINETUNE = {"lenet300": (3, 1e-4), "lenet5": (2, 1e-4)}                 # epochs, learning rate


def recipes(example) -> dict:
    """Pruning to 95% in four stages, with the longer retraining the reference script used."""
    return {"lenet300": example.Recipe(stages=(0.6, 0.8, 0.9, 0.95), dense_epochs=12, stage_epochs=3),
            "lenet5": example.Recipe(stages=(0.6, 0.8, 0.9, 0.95), dense_epochs=4, stage_epochs=2)}


def load_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "prune_lenet.py"
    spec = importlib.util.spec_from_file_location("prune_lenet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def run(name: str, data, example, folder: Path) -> dict:
    pruned = example.prune_iteratively(name, data, recipes(example)[name])
    quantized = quantize(pruned["gm"], name, data)
    sizes, loaded = file_sizes(quantized, data, folder)
    fp32 = 4 * sum(p.numel() for p in example.build(name, data).parameters())
    same = all(torch.equal(effective_weight(loaded, a), effective_weight(quantized, b))
               for a, b in zip(find_layers(loaded), find_layers(quantized)))
    return {"model": name, "data": data.name, "dense": pruned["dense"], "pruned": pruned["pruned"],
            "sparsity": pruned["sparsity"], "quantized": 100 * evaluate(quantized, data.test_x, data.test_y),
            "loaded": 100 * evaluate(loaded, data.test_x, data.test_y), "identical": same,
            "fp32": fp32, "sizes": sizes, "summary": fxcompress.summary(fxcompress.decode(loaded))}


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
    example, data = load_example(), load_dataset(args.dataset)
    names = ["lenet300", "lenet5"] if args.model == "all" else [args.model]
    with tempfile.TemporaryDirectory() as folder:
        rows = [run(name, data, example, Path(folder)) for name in names]
    print(table(rows))
    for r in rows:
        print(f"\n{r['model']}: weights loaded from the file bit-identical to the fake-quant model's: {r['identical']}")


if __name__ == "__main__":
    main()
