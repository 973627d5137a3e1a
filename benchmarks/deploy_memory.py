"""Resident memory of native integer models: what a process holds to run one, against its weight bytes.

Each model of `bench_deploy.py` is quantized (8-bit weights per channel, 8-bit activations, 7 without
VNNI), lowered with `LowerToInteger()` (each layer's kernel chosen on the example batch) and saved; a
fresh process then loads the file, runs one batch-1 forward and reports the growth of its resident set
(libraries and kernels loaded and warmed first on another copy of the model, freed heap handed back to
the system before each reading, as a long-running server would). "held" is what the layers hold between
calls by `NativeLayer.held_bytes` (the weight in the form its kernel reads: oneDNN's packed int8 layout,
the float kernel's float32 weight, our C kernel's padded codes; scales and biases) plus the model's other
tensors; the issue's target is a growth of at most 1.2x that. "python_objects" is what Python's allocator
holds for another copy of the loaded model, kept alive while it is read (tracemalloc: its graph, modules
and history; not its tensors, whose bytes numpy allocates on a plain load and reports to tracemalloc
under a domain of its own: they are in "held"), which dominates the growth of the smallest models.
"codes kept" is the same process after `hold_buffers()` on every layer: each layer's int8 codes registered again beside its kernel's form, what
every native layer held before layers dropped them (both copies).

    python benchmarks/deploy_memory.py [--models resnet18 mobilenet_v2 lenet5 lenet300]

`benchmarks/bench_deploy.py` prints this table after its own (`resident_rows`).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import numpy as np
import torch
from deploy_sparse import format_rows, release_heap, rss_bytes

import fxcompress
from fxcompress.kernels.native import NativeLayer
from fxcompress.passes import LowerToInteger

MODELS = ("lenet5", "lenet300", "resnet18", "mobilenet_v2")


def lowered_file(name: str, folder: Path) -> tuple[Path, tuple[int, ...]]:
    """The native model of `name` (bench_deploy's definition and quantization), saved under `folder`."""
    import bench_deploy  # the models and their quantization, defined once there

    make, shape = bench_deploy.models(224)[name]
    torch.manual_seed(0)
    model = make()
    x, calibration = torch.rand(2, *shape), [torch.rand(8, *shape) for _ in range(4)]
    bench_deploy.settle_batchnorm(model, calibration)
    fq = bench_deploy.fake_quant(model, x, calibration, 8, bench_deploy.activation_bits())
    native = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))
    path = folder / f"{name}.fxc"
    fxcompress.save(native, path)
    return path, shape


def held_bytes(model: torch.nn.Module) -> int:
    """What the native layers hold between calls, and the model's other tensors."""
    layers = [m for m in model.modules() if isinstance(m, NativeLayer)]
    inside = {id(t) for layer in layers for t in layer._buffers.values() if t is not None}
    others = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in inside}
    return sum(layer.held_bytes() for layer in layers) + sum(t.numel() * t.element_size() for t in others.values())


def python_object_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """The traced bytes of Python's allocator alone: numpy reports its array data (a plain load's tensor
    bytes, counted in "held") to tracemalloc under its own domain."""
    own = snapshot.filter_traces([tracemalloc.DomainFilter(inclusive=False, domain=np.lib.tracemalloc_domain)])
    return sum(stat.size for stat in own.statistics("filename"))


def measure(path: Path, shape: tuple[int, ...]) -> dict:
    """In this (fresh) process: the resident growth of the model in `path` run at batch 1."""
    torch.set_num_threads(1)
    x = torch.rand(1, *shape)
    with torch.no_grad():
        warm = fxcompress.load(path)  # loads every library, builds and caches oneDNN's kernels for these shapes
        warm(x)
        del warm
        release_heap()
        before = rss_bytes()
        model = fxcompress.load(path)
        model(x)
        release_heap()
        grown, held = rss_bytes() - before, held_bytes(model)
        for layer in model.modules():
            if isinstance(layer, NativeLayer):
                layer.hold_buffers()
        release_heap()
        kept = rss_bytes() - before
        tracemalloc.start()  # another copy: what Python's own objects of a loaded model take (graph, modules)
        copy = fxcompress.load(path)
        copy(x)
        gc.collect()  # the load's garbage cycles are not the model's (the resident readings collect them too)
        python = python_object_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        del copy
    return {"file_bytes": path.stat().st_size, "held_bytes": held, "resident_bytes": grown,
            "ratio": grown / held, "python_objects": python, "ratio without them": (grown - python) / held,
            "codes kept: resident_bytes": kept, "codes kept: ratio": kept / held}


def resident_rows(names: tuple[str, ...] = MODELS) -> list[dict]:
    """Each model saved here, then loaded and measured in a fresh process (resident memory is per process)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            path, shape = lowered_file(name, Path(folder))
            out = subprocess.run([sys.executable, __file__, "--child", str(path), *map(str, shape)],
                                 capture_output=True, text=True, check=True)
            rows.append({"model": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # FILE SHAPE...: the measuring process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), tuple(int(d) for d in args.child[1:]))))
        return
    print(format_rows(resident_rows(tuple(args.models))))


if __name__ == "__main__":
    main()
