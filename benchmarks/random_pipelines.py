"""Long-mode property run of whole pipelines over seeded random models: prerequisite passes, a lowering, a file.

    python benchmarks/random_pipelines.py --graphs 300 [--start 0]

Each pipeline compresses a random model (tests/randmodels.py; ResNet blocks grown on even seeds), lowers it,
and checks that the lowered model computes what the model before the lowering computes (within the lowering's
rounding, relative to the output's range) and that it saves and loads to bit-identical outputs. Prints per
pipeline how many graphs ended in each outcome and the first seed of every outcome other than "verified" (to
reproduce: `random_model(seed, residual_blocks=seed % 2 == 0)`), and time. benchmarks/random_models.py runs
each pass alone; these runs found what only a composition shows (a masked channel of zero weights whose bias
an integer lowering rounded to a whole input step).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the generator lives with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's tally and table
from randmodels import INTEGER_TOLERANCE, calibration_batches, random_model  # noqa: E402
from random_models import print_table, tally  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.passes import (  # noqa: E402
    ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerDynamicInt8, LowerToEncoded, LowerToInteger,
    LowerToSparse, LowerWeightOnly, PruneChannels, ScaleChannels, SparseGPT)


def pipelines(seed: int) -> dict[str, tuple[list, object, float]]:
    """name -> (the passes before the lowering, the lowering, its tolerance relative to the output's range)."""
    odd = seed % 2 == 1
    grids = ActivationConfig(bits=8, joins=True, fuse_adds=odd)
    linear = ("linear",)
    return {
        "prune, mask, 8-bit grids -> LowerToInteger native": (
            [FoldBatchNorm(), PruneChannels(amount=0.3), InsertMasks(sparsity=0.5),
             InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True, activations=grids)],
            LowerToInteger(backend="native", repeats=1), INTEGER_TOLERANCE),
        "prune, mask, k-means -> LowerToEncoded": (
            [PruneChannels(amount=0.3), InsertMasks(sparsity=0.6), InsertFakeQuant(method="kmeans", bits=4)],
            LowerToEncoded(), 1e-5),
        "mask 90% -> LowerToSparse": ([FoldBatchNorm(), InsertMasks(sparsity=0.9)], LowerToSparse(repeats=1), 1e-4),
        "mask, 4-bit linear grids -> LowerWeightOnly": (
            [InsertMasks(sparsity=0.6), InsertFakeQuant(method="linear", bits=4, symmetric=odd, per_channel=True,
                                                        types=linear)],
            LowerWeightOnly(repeats=1), 1e-4),
        "mask -> LowerDynamicInt8": ([InsertMasks(sparsity=0.6)], LowerDynamicInt8(repeats=1), INTEGER_TOLERANCE),
        "SparseGPT, GPTQ 4-bit -> LowerWeightOnly": (
            [SparseGPT(sparsity=0.5), InsertFakeQuant(method="linear", bits=4, symmetric=True, per_channel=True,
                                                      rounding="gptq", types=linear)],
            LowerWeightOnly(repeats=1), 1e-4),
        "AWQ, 4-bit linear grids -> LowerToEncoded": (
            [ScaleChannels(method="awq", group_size=None),
             InsertFakeQuant(method="linear", bits=4, symmetric=True, per_channel=True, types=linear)],
            LowerToEncoded(), 1e-5),
    }


def check(model, inputs, seed: int, before: list, lowering, tolerance: float) -> str:
    """The pipeline's outcome on one model; AssertionError where a property breaks."""
    calibration = calibration_batches(inputs, seed)
    base = fxcompress.compile(model, before, example_inputs=inputs, calibration_data=calibration)
    lowered = fxcompress.compile(base, [lowering], example_inputs=inputs)
    with torch.no_grad():
        expected, got = base(*inputs), lowered(*inputs)
        with tempfile.TemporaryDirectory() as folder:
            fxcompress.save(lowered, Path(folder) / "model.fxc")
            again = fxcompress.load(Path(folder) / "model.fxc")(*inputs)
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-3)
    assert error <= tolerance, f"lowered {error:.3g} of the output's range away (tolerance {tolerance:g})"
    assert torch.equal(again, got), "the loaded model computes something else"
    return "verified"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=100)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.start, args.start + args.graphs)
    checks = {name: (lambda name: lambda m, x, s: check(m, x, s, *pipelines(s)[name]))(name) for name in pipelines(0)}
    make = lambda seed: random_model(seed, residual_blocks=seed % 2 == 0)  # noqa: E731
    print_table(f"{args.graphs} random models (ResNet blocks on even seeds)", "pipeline", seeds,
                *tally(seeds, checks, make))


if __name__ == "__main__":
    main()
