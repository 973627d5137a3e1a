"""The torchvision classification zoo through both front ends: PruneChannels(amount=0.5) after symbolic
tracing and after torch.export must give the same model.

    python benchmarks/torchvision_export.py [--models resnet18 vit_b_16 ...] [--max-params 150]

For every classification model (random init, nothing downloads) the script compiles with
frontend="fx" and frontend="export", each with PruneChannels(amount=0.5), and prints per model: the
dense and pruned parameter counts of each, whether they agree, the largest difference between the two
pruned models' outputs (the same channels go, so the outputs agree up to float rounding), the aten ops
the export front end left unspelled, and the seconds each compile took. A model fx cannot trace is
listed with its reason; the comparison is for the models it can. Needs the vision extra.
"""
import argparse
import collections
import re
import sys
import time
import warnings

import torch

import fxcompress
from fxcompress.passes import PruneChannels

# models whose default input is too small or too large for a quick run: name -> (builder kwargs, side)
SIZES = {"inception_v3": ({"init_weights": False}, 96), "googlenet": ({"init_weights": False}, 64),
         "maxvit_t": ({}, 224)}
VIT = {"vit_b_16": 32, "vit_b_32": 32, "vit_l_16": 32, "vit_l_32": 32, "vit_h_14": 28}


def build(models, name: str) -> tuple[torch.nn.Module, tuple]:
    kwargs, side = SIZES.get(name, ({}, 64))
    if name in VIT:
        kwargs, side = {"image_size": VIT[name]}, VIT[name]
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, **kwargs).eval()
    return model, (torch.randn(2, 3, side, side),)


def outputs(gm, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = gm(*inputs)
    return out.logits if hasattr(out, "logits") else out


def prune(model, inputs, frontend: str) -> tuple[torch.fx.GraphModule, float, collections.Counter]:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5)], inputs, frontend=frontend)
    unspelled = collections.Counter(op for w in caught if "no torch-level spelling" in str(w.message)
                                    for op in re.findall(r"(aten\.\w+\.\w+) at module", str(w.message)))
    return gm, time.perf_counter() - start, unspelled


def compare(models, name: str) -> dict:
    model, inputs = build(models, name)
    row = {"model": name, "dense": sum(p.numel() for p in model.parameters())}
    try:
        fx_gm, row["fx_s"], _ = prune(model, inputs, "fx")
    except Exception as exc:  # noqa: BLE001 - the row reports it
        row["fx_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    row["fx"] = sum(p.numel() for p in fx_gm.parameters())
    try:
        ex_gm, row["export_s"], row["unspelled"] = prune(model, inputs, "export")
    except Exception as exc:  # noqa: BLE001
        row["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    row["export"] = sum(p.numel() for p in ex_gm.parameters())
    a, b = outputs(fx_gm, inputs), outputs(ex_gm, inputs)
    row["max_diff"] = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
    return row


def line(row: dict) -> str:
    m = lambda n: f"{n / 1e6:.3f}"  # noqa: E731
    if "fx_error" in row:
        return f"| {row['model']} | {m(row['dense'])} | fx cannot trace: {row['fx_error']} | | | | | |"
    if "export_error" in row:
        return f"| {row['model']} | {m(row['dense'])} | {m(row['fx'])} | export failed: {row['export_error']} | | | | |"
    same = "yes" if row["fx"] == row["export"] else "**no**"
    return (f"| {row['model']} | {m(row['dense'])} | {m(row['fx'])} | {m(row['export'])} | {same} | "
            f"{row['max_diff']:.1e} | {', '.join(f'{op} x{n}' for op, n in row['unspelled'].items()) or '-'} | {row['fx_s']:.1f} / {row['export_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="torchvision names (default: every classification model)")
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this many million parameters")
    args = parser.parse_args()
    try:
        import torchvision
        from torchvision import models
    except ImportError:
        sys.exit("torchvision is not installed (pip install fxcompress[vision])")
    torch.set_num_threads(1)
    names = args.models or models.list_models(module=models)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; PruneChannels(amount=0.5), one thread")
    print("| model | dense (M) | fx pruned (M) | export pruned (M) | same count | output diff (rel.) | aten left | fx / export s |")
    print("|---|---:|---:|---:|---|---:|---|---|")
    counts = {"same": 0, "differ": 0, "fx cannot trace": 0, "export failed": 0, "skipped": 0}
    for name in names:
        if args.max_params is not None:
            size = sum(p.numel() for p in models.get_model(name, weights=None).parameters()) / 1e6
            if size > args.max_params:
                print(f"| {name} | {size:.1f} | skipped (--max-params {args.max_params:g}) | | | | | |", flush=True)
                counts["skipped"] += 1
                continue
        row = compare(models, name)
        counts["fx cannot trace" if "fx_error" in row else "export failed" if "export_error" in row
               else "same" if row["fx"] == row["export"] else "differ"] += 1
        print(line(row), flush=True)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
