"""Sparse execution: pruned fully-connected layers on dense and sparse kernels, one thread.

Three tables, each row measured in one run (interleaved rounds: each round calls every form once;
medians of the calling thread's CPU time, see CLOCK; ratios against dense fp32 of the same run):

- Deep Compression's layer table (Han et al. 2016, Table 4 shapes): AlexNet's fc6 / fc7 / fc8
  (9216 -> 4096, 4096 -> 4096, 4096 -> 1000) at 91 / 91 / 75% sparsity and VGG-16's (25088 -> 4096,
  4096 -> 4096, 4096 -> 1000) at 96 / 96 / 77%, batch 1: dense fp32 ms, each sparse kernel's ms
  (torch's and scipy's CSR / CSC, and c_relative: our C kernel over Deep Compression's storage, uint8
  relative indices and float32 values or uint8 codes), the kernel `choose_form` keeps (dense unless a
  sparse form is 5% faster), its speed-up, c_relative's, and the bytes the kept form holds beside the
  dense weight's. Each layer twice: float32 weights, and the same weights shared through 32 values
  (5 bits, as Deep Compression's fully-connected layers: c_relative then holds one byte per code).
- Whole models through `LowerToSparse`: LeNet-300-100 at 90 / 95% (global magnitude pruning), once
  with every layer kept dense (min_sparsity above its sparsity: the lowered layer's own cost), and
  the AlexNet / VGG-16 classifier stacks at the layer table's sparsities, lowered vs the fp32 model
  as built (eager nn.Linear modules) holding the same pruned weights, and vs that model traced
  (`fxcompress.compile` with no pass: the GraphModule every compiled model runs as).
- Resident memory: each lowered model built in a fresh process; the growth of its resident set
  (after the dense and masked copies are dropped) against the bytes its lowered layers hold.

Weights are random, pruned by magnitude (a random mask: what the kernels see is the same); nothing
downloads. `benchmarks/bench_deploy.py` imports `layer_rows`, `model_rows` and `resident_rows`.

    python benchmarks/deploy_sparse.py [--rounds 15] [--batch 1] [--no-vgg] [--models lenet,alexnet]
        [--no-layers] [--no-models] [--no-resident] [--relu-inputs]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator


import torch
from torch import nn
from torch.fx import GraphModule

import fxcompress
from fxcompress.kernels import SparseLayer, choose_kernel
from fxcompress.kernels.sparse import SPARSE_KERNELS, candidate_kernels
from fxcompress.kernels.timing import CLOCKS
from fxcompress.layers import find_layers
from fxcompress.passes import InsertMasks, LowerToSparse
from fxcompress.pruning.masks import get_mask, masked_layers, set_mask
from fxcompress.zoo import LeNet300100

# (name, in_features, out_features, sparsity): Deep Compression's pruned fully-connected layers
DEEP_COMPRESSION = (
    ("AlexNet fc6", 9216, 4096, 0.91), ("AlexNet fc7", 4096, 4096, 0.91), ("AlexNet fc8", 4096, 1000, 0.75),
    ("VGG-16 fc6", 25088, 4096, 0.96), ("VGG-16 fc7", 4096, 4096, 0.96), ("VGG-16 fc8", 4096, 1000, 0.77),
)
CLASSIFIERS = {"AlexNet FC": DEEP_COMPRESSION[:3], "VGG-16 FC": DEEP_COMPRESSION[3:]}
# Every kernel here runs on the calling thread (one torch thread; scipy has one), so its CPU time is its
# cost; on a shared machine wall-clock samples also count the time the process waits for a core.
CLOCK = "thread"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pruned(out_features: int, in_features: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A random weight with its smallest-magnitude `sparsity` share set to zero."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    k = int(round(sparsity * weight.numel()))
    threshold = weight.abs().flatten().kthvalue(k).values if k else -1.0
    return weight * (weight.abs() > threshold)


SHARED_BITS = 5  # Deep Compression's fully-connected layers share 32 values


def shared(weight: torch.Tensor, bits: int = SHARED_BITS) -> torch.Tensor:
    """The nonzeros replaced by the nearest of 2**bits values spread evenly over their range (linear
    initialisation, Deep Compression's choice before k-means), in place; zeros stay zeros."""
    nonzero = weight != 0
    low, high = float(weight[nonzero].min()), float(weight[nonzero].max())
    step = (high - low) / (2 ** bits - 1)
    levels = torch.round((weight - low) / step).clamp_(0, 2 ** bits - 1).mul_(step).add_(low)
    return weight.copy_(torch.where(nonzero, levels, weight))


def layer_rows(batch: int = 1, rounds: int = 15, layers=DEEP_COMPRESSION, relu_inputs: bool = False) -> list[dict]:
    """Two rows per layer (float32, then shared weights): milliseconds of dense and each sparse kernel,
    the kept kernel and its speed-up, c_relative's speed-up, bytes held. Inputs are normal samples,
    or with `relu_inputs` their ReLU (half zeros, as these layers' inputs are in the networks)."""
    rows = []
    with one_thread(), torch.no_grad():
        for name, fan_in, fan_out, sparsity in layers:
            weight, bias = pruned(fan_out, fan_in, sparsity), torch.randn(fan_out)
            x = torch.randn(batch, fan_in)
            x = torch.relu(x) if relu_inputs else x
            for weights in ("float32", f"{SHARED_BITS}-bit shared"):
                if weights != "float32":
                    shared(weight)
                forms = {k: SparseLayer.from_dense("linear", weight, bias, k)
                         for k in candidate_kernels(weight, SPARSE_KERNELS)}
                choice = choose_kernel({k: m.forward for k, m in forms.items()}, (x,), baseline="dense",
                                       repeats=rounds, warmup=3, clock=CLOCK)
                ours = min((t for k, t in choice.times_ms.items() if k.startswith("c_")), default=None)
                rows.append({"layer": name, "shape": f"{fan_in}->{fan_out}", "sparsity": sparsity, "batch": batch,
                             "input": "relu" if relu_inputs else "normal", "weights": weights,
                             **{f"{k}_ms": t for k, t in choice.times_ms.items()},
                             "chosen": choice.kernel, "speedup": choice.speedup_over("dense"),
                             "best_c_speedup": None if ours is None else choice.times_ms["dense"] / ours,
                             "chosen_bytes": forms[choice.kernel].held_bytes(),
                             "dense_bytes": forms["dense"].held_bytes()})
                del forms
            del weight
    return rows


def _stack(layers) -> nn.Module:
    modules = []
    for _, fan_in, fan_out, _ in layers:
        modules += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*modules[:-1]).eval()


def _masked(name: str, model: nn.Module, x: torch.Tensor, layers) -> GraphModule:
    """The model with mask nodes: InsertMasks for LeNet; for the classifier stacks, masks set from a
    sampled magnitude quantile (InsertMasks' exact selection over a 100M-weight layer needs gigabytes)."""
    if name.startswith("LeNet"):
        return fxcompress.compile(model, [InsertMasks(sparsity=layers, scope="global")], example_inputs=(x,),
                                  inplace=True)
    gm = fxcompress.compile(model, [], example_inputs=(x,), inplace=True)
    for layer, (*_, sparsity) in zip(find_layers(gm), layers):
        weight = gm.get_parameter(layer.weight)
        sample = weight.detach().flatten()[torch.randint(weight.numel(), (1 << 20,))].abs()
        set_mask(gm, layer, weight.detach().abs() > sample.quantile(sparsity))
    gm.recompile()
    return gm


KEPT_DENSE = "LeNet-300-100 90%, kept dense"  # lowered with min_sparsity above its sparsity: every layer dense
LOWER_REPEATS = 15                            # timed rounds per candidate when LowerToSparse chooses


def models(include_vgg: bool = True) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], object]]:
    """name -> (model factory, input shape without batch, what InsertMasks reads: a sparsity or the layers)."""
    table = {"LeNet-300-100 90%": (lambda: LeNet300100().eval(), (1, 28, 28), 0.9),
             "LeNet-300-100 95%": (lambda: LeNet300100().eval(), (1, 28, 28), 0.95),
             KEPT_DENSE: (lambda: LeNet300100().eval(), (1, 28, 28), 0.9),
             "AlexNet FC": (lambda: _stack(CLASSIFIERS["AlexNet FC"]), (9216,), CLASSIFIERS["AlexNet FC"])}
    if include_vgg:
        table["VGG-16 FC"] = (lambda: _stack(CLASSIFIERS["VGG-16 FC"]), (25088,), CLASSIFIERS["VGG-16 FC"])
    return table


def lowered_model(name: str, batch: int = 1, with_dense: bool = True) -> tuple[nn.Module | None, nn.Module, torch.Tensor]:
    """(the fp32 model with the lowered model's pruned weights, the LowerToSparse model, an input)."""
    make, shape, masks = models()[name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    model = make()
    masked = _masked(name, copy.deepcopy(model) if with_dense else model, x, masks)
    if with_dense:  # the fp32 model as built, its weights pruned as the masked model's
        with torch.no_grad():
            for layer in masked_layers(masked):
                model.get_parameter(layer.weight).mul_(get_mask(masked, layer))
    lower = LowerToSparse(clock=CLOCK, repeats=LOWER_REPEATS, min_sparsity=0.99 if name == KEPT_DENSE else 0.5)
    lowered = fxcompress.compile(masked, [lower], example_inputs=(x,), inplace=True)
    return (model if with_dense else None), lowered, x


MIN_SAMPLE_S = 0.01  # a sample of a small model loops its forward until the first form takes this long


def _median_ms(forms: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Interleaved rounds, every form `loops` calls per sample (the same count for all), medians per call."""
    first, now = next(iter(forms.values())), CLOCKS[CLOCK]
    with torch.no_grad():
        start, loops = now(), 0
        while now() - start < MIN_SAMPLE_S:
            first(x)
            loops += 1
        samples = {k: [] for k in forms}
        for round_ in range(rounds + 2):
            for k, form in forms.items():
                start = now()
                for _ in range(loops):
                    form(x)
                if round_ >= 2:
                    samples[k].append((now() - start) * 1e3 / loops)
    return {k: statistics.median(v) for k, v in samples.items()}


def model_rows(batch: int = 1, rounds: int = 15, include_vgg: bool = True, only: str = "") -> list[dict]:
    """One row per model (names starting with one of the comma-separated `only`, or all): dense fp32 ms
    vs LowerToSparse ms (interleaved), kernels chosen, bytes."""
    rows = []
    with one_thread():
        for name in _selected(models(include_vgg), only):
            dense, lowered, x = lowered_model(name, batch)
            # the fp32 model as a GraphModule (what every compiled model runs as): the lowered model's
            # graph with plain nn.Linear layers, so lowered / traced is what the lowering itself costs
            traced = fxcompress.compile(copy.deepcopy(dense), [], example_inputs=(x,))
            times = _median_ms({"dense": dense, "traced": traced, "lowered": lowered}, x, rounds)
            torch.testing.assert_close(lowered(x), dense(x), rtol=1e-4, atol=1e-4)  # a wrong model is no result
            stats = fxcompress.history(lowered)[-1].stats["layers"]
            rows.append({"model": name, "batch": batch, "dense_ms": times["dense"], "traced_ms": times["traced"],
                         "lowered_ms": times["lowered"], "speedup": times["dense"] / times["lowered"],
                         "speedup_vs_traced": times["traced"] / times["lowered"],
                         "kernels": " ".join(s["kernel"] for s in stats.values()),
                         "held_bytes": sum(s["held_bytes"] for s in stats.values()),
                         "dense_bytes": sum(s["dense_bytes"] for s in stats.values())})
            del dense, traced, lowered
            gc.collect()
    return rows


def _selected(names, only: str) -> list[str]:
    prefixes = tuple(p.strip().lower() for p in only.split(",") if p.strip())
    return [name for name in names if not prefixes or name.lower().startswith(prefixes)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages (Linux)


def release_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, as a long-running server would


def measure_resident(name: str) -> dict:
    """In this (fresh) process: the resident-set growth of one lowered model, dense copies dropped."""
    torch.set_num_threads(1)
    small = lowered_model("LeNet-300-100 90%", 1, with_dense=False)[1]  # loads every library and kernel first
    with torch.no_grad():
        small(torch.randn(1, 1, 28, 28))
    del small
    release_heap()
    before = rss_bytes()
    _, lowered, x = lowered_model(name, 1, with_dense=False)
    release_heap()
    with torch.no_grad():
        lowered(x)
    release_heap()
    held = sum(m.held_bytes() for m in lowered.modules() if isinstance(m, SparseLayer))
    return {"model": name, "resident_bytes": rss_bytes() - before, "held_bytes": held}


def resident_rows(include_vgg: bool = True, only: str = "") -> list[dict]:
    """Each model measured in a fresh process (resident memory is per process)."""
    rows = []
    for name in _selected(models(include_vgg), only):
        out = subprocess.run([sys.executable, __file__, "--resident", name], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({**row, "ratio": row["resident_bytes"] / row["held_bytes"]})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of rows (floats to 3 decimals)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
             for row in rows]
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(r) + " |" for r in cells)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-vgg", action="store_true", help="skip the VGG-16 classifier (2 GB while building)")
    parser.add_argument("--models", default="", help="comma-separated name prefixes of the whole models (lenet, alexnet, "
                                                     "vgg); default all")
    parser.add_argument("--no-resident", action="store_true", help="skip the resident-memory table")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer table")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model table")
    parser.add_argument("--relu-inputs", action="store_true", help="the layer table's inputs through a ReLU")
    parser.add_argument("--resident", help=argparse.SUPPRESS)  # the child process of resident_rows
    args = parser.parse_args()
    if args.resident:
        print(json.dumps(measure_resident(args.resident)))
        return
    print(f"torch {torch.__version__}, one thread, batch {args.batch}, {args.rounds} interleaved rounds, medians\n")
    if not args.no_layers:
        print("Deep Compression's layers\n"
              + format_rows(layer_rows(args.batch, args.rounds, relu_inputs=args.relu_inputs)) + "\n", flush=True)
    if not args.no_models:
        print("Whole models through LowerToSparse\n"
              + format_rows(model_rows(args.batch, args.rounds, not args.no_vgg, args.models)) + "\n", flush=True)
    if not args.no_resident:
        print("Resident memory of the lowered models\n" + format_rows(resident_rows(not args.no_vgg, args.models)))


if __name__ == "__main__":
    main()
