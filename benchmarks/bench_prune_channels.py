"""Channel pruning speed: pass time and CPU latency of 50% pruning, against Torch-Pruning in the same run.

For each torchvision model (random init, weights=None, nothing downloads) at 1x3x224x224, one thread:
- pass time: ours = tracing + the PruneChannels pass (shape propagation, the channel dependency graph,
  L1 scoring and the surgery, as timed in the pass history; compile's own verification is off); Torch-Pruning =
  MagnitudePruner(...) (its dependency graph) + step(), L1 importance, the classifier ignored as ours
  leaves the output alone. Runs alternate between the two; the median is reported.
- parameters, MACs (conv / linear, counted with forward hooks) and batch-1 latency (medians of
  interleaved runs) of the dense model, ours and Torch-Pruning's, each run two ways: eager as built,
  and deployed (BatchNorm folded into the convs by FoldBatchNorm, channels-last memory, as oneDNN
  prefers) — the same treatment for all three models.

    python benchmarks/bench_prune_channels.py [--models resnet50 densenet201] [--repeats 3] [--rounds 15]
Needs the vision and bench extras (torchvision, torch-pruning).
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from torch import nn

import fxcompress
from fxcompress.errors import MissingDependencyError
from fxcompress.passes import FoldBatchNorm, PruneChannels
from fxcompress.tracing import trace


def _imports():
    try:
        import torch_pruning
        import torchvision
    except ImportError as exc:
        raise MissingDependencyError("this benchmark needs torchvision and torch-pruning "
                                     "(pip install 'fxcompress[vision,bench]')") from exc
    return torchvision, torch_pruning


def ours(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    """Tracing plus the pass itself (its analyses and the surgery), as the pass history times it."""
    start = time.perf_counter()
    gm = trace(model)
    traced = time.perf_counter() - start
    gm = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=(x,), inplace=True, verify=False)
    return gm, traced + fxcompress.history(gm)[-1].seconds


def torch_pruning_50(tp, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return model, time.perf_counter() - start


def macs(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def count(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def deployed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """How a CPU deployment runs the model: BatchNorm folded into the convs, channels-last memory."""
    gm = fxcompress.compile(trace(model), [FoldBatchNorm()], example_inputs=(x,), verify=False)
    return gm.to(memory_format=torch.channels_last)


def latencies(models: dict[str, tuple[nn.Module, torch.Tensor]], rounds: int) -> dict[str, float]:
    times = {name: [] for name in models}
    with torch.no_grad():
        for m, x in models.values():
            m(x)  # warm-up
        order = list(models)
        for _ in range(rounds):
            random.shuffle(order)  # interleaved in a new order each round: drift and cache state hit every side alike
            for name in order:
                m, x = models[name]
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench(torchvision, tp, name: str, repeats: int, rounds: int) -> dict:
    torch.manual_seed(0)
    dense = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    ours_times, tp_times = [], []
    for _ in range(repeats):
        mine, t = ours(copy.deepcopy(dense), x)
        ours_times.append(t)
        theirs, t = torch_pruning_50(tp, copy.deepcopy(dense), x)
        tp_times.append(t)
    variants = {"dense": dense, "ours": mine, "tp": theirs}
    row = {"model": name, "ours_s": statistics.median(ours_times), "tp_s": statistics.median(tp_times)}
    for key, m in variants.items():
        row[f"{key}_params"] = sum(p.numel() for p in m.parameters())
        row[f"{key}_macs"] = macs(m, x)
    x_last = x.contiguous(memory_format=torch.channels_last)
    runs = {f"eager_{k}": (m, x) for k, m in variants.items()}
    runs.update({f"deployed_{k}": (deployed(m, x), x_last) for k, m in variants.items()})
    row.update({f"{k}_ms": v for k, v in latencies(runs, rounds).items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet201"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torchvision, tp = _imports()
    torch.set_num_threads(1)
    random.seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning {tp.__version__}; "
          f"1 thread, batch 1, 224x224, 50% of channels, L1")
    rows = [bench(torchvision, tp, name, args.repeats, args.rounds) for name in args.models]
    print("\n| model | pass time ours (s) | Torch-Pruning (s) | ours / TP | params dense → ours / TP (M) "
          "| MACs dense → ours / TP (G) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ours_s']:.2f} | {r['tp_s']:.2f} | {r['ours_s'] / r['tp_s']:.2f} | "
              f"{r['dense_params'] / 1e6:.1f} → {r['ours_params'] / 1e6:.1f} / {r['tp_params'] / 1e6:.1f} | "
              f"{r['dense_macs'] / 1e9:.2f} → {r['ours_macs'] / 1e9:.2f} / {r['tp_macs'] / 1e9:.2f} |")
    print("\n| model | run | latency dense → ours / TP (ms) | speedup ours / TP | "
          "speedup ÷ MACs reduction ours / TP |")
    print("|---|---|---|---|---|")
    for r in rows:
        for run in ("eager", "deployed"):
            ms = {k: r[f"{run}_{k}_ms"] for k in ("dense", "ours", "tp")}
            speed = {k: ms["dense"] / ms[k] for k in ("ours", "tp")}
            ratio = {k: speed[k] * r[f"{k}_macs"] / r["dense_macs"] for k in ("ours", "tp")}
            print(f"| {r['model']} | {run} | {ms['dense']:.0f} → {ms['ours']:.0f} / {ms['tp']:.0f} | "
                  f"{speed['ours']:.2f}x / {speed['tp']:.2f}x | {ratio['ours']:.2f} / {ratio['tp']:.2f} |")


if __name__ == "__main__":
    main()
