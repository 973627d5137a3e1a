"""The int8 QDQ ONNX export of a MobileNet-style net (conv -> folded BN -> ReLU6, depthwise, inverted
residual adds) on ONNX Runtime, one thread: this export against the export at an earlier revision
(`--before`, read from git), beside ORT's fp32 model of the same net.

For each activation grid (asymmetric 8 bits, the default; asymmetric 7 bits; symmetric 8 bits) it prints
how many convolutions ORT's optimized model runs on QLinearConv, the largest difference from our QDQ
model (the same values as the fake-quant model but for biases rounded to int32) in 8-bit logit steps, and
the median CPU seconds per batch over interleaved rounds
(ORT runs on the calling thread with one intra-op thread, so process CPU time is its time, and a
loaded machine's preemption does not inflate it). Weights: 8 bits with VNNI, 7 without (ORT's
u8 x s8 kernels saturate at 8 / 8 bits there). Random weights, BatchNorm statistics and calibration
from random inputs: a latency needs no training.

    python benchmarks/bench_onnx_clamps.py [--before REV] [--batches 1 32] [--rounds 15] [--size 32]
                                           [--model blocks | mobilenet_v2] [--grids ...]

`--model mobilenet_v2` times bench_deploy's whole mobilenet_v2 (52 convolutions, 35 ReLU6) instead of the
stem and four blocks.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxcompress
from fxcompress import export
from fxcompress.kernels import native
from fxcompress.onnx.qdq import quantize_dequantize
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant

sys.path.insert(0, str(Path(__file__).parent))
from bench_deploy import InvertedResidual, MobileNetV2, _conv_bn, settle_batchnorm, time_forms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "3740b2e"  # the export before clamps were kept integer
GRIDS = {"asymmetric 8-bit": (8, False), "asymmetric 7-bit": (7, False), "symmetric 8-bit": (8, True)}


class MobileNetBlocks(nn.Module):
    """A stem and four of MobileNetV2's inverted residual blocks (two with the residual add), a linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_bn(3, 16, 3, 2), InvertedResidual(16, 16, 1, 6),
                                      InvertedResidual(16, 24, 2, 6), InvertedResidual(24, 24, 1, 6),
                                      InvertedResidual(24, 32, 2, 6))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def export_at(revision: str):
    """fxcompress/export.py as it was at `revision`, loaded as a module of the installed package."""
    source = subprocess.run(["git", "show", f"{revision}:fxcompress/export.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"fxcompress.export_{revision}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fxcompress"
    exec(compile(source, f"{revision}:fxcompress/export.py", "exec"), module.__dict__)  # noqa: S102
    return module


def session(path: Path, optimized: Path | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def int8_convs(path: Path, folder: Path) -> int:
    """How many convolutions ORT's optimized model runs on QLinearConv."""
    import onnx
    session(path, folder / f"{path.stem}.opt.onnx")
    return Counter(n.op_type for n in onnx.load(str(folder / f"{path.stem}.opt.onnx")).graph.node)["QLinearConv"]


def grid_rows(model: nn.Module, grid: str, exports: dict, args, folder: Path) -> None:
    bits, symmetric = GRIDS[grid]
    size = (3, args.size, args.size)
    calibration = [torch.rand(16, *size) for _ in range(4)]
    quantize = InsertFakeQuant(method="linear", bits=8 if native.vnni() else 7, symmetric=True, per_channel=True,
                               activations=ActivationConfig(bits=bits, symmetric=symmetric, joins=True))
    fq = fxcompress.compile(model, [FoldBatchNorm(), quantize], example_inputs=(calibration[0][:2],),
                            calibration_data=calibration)
    sessions, convs = {}, sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.rand(64, *size)
    with torch.no_grad():
        ours = quantize_dequantize(fq)(x).numpy()
    for name, module in exports.items():
        path = folder / f"{name.split()[0]}.onnx"
        module.to_onnx_int8(fq, path, (x[:2],), input_names=["x"])
        sessions[f"ORT int8, {name}"] = session(path)
        got = sessions[f"ORT int8, {name}"].run(None, {"x": x.numpy()})[0]
        steps = np.abs(got - ours).max() / ((ours.max() - ours.min()) / 255)
        same = (got.argmax(1) == ours.argmax(1)).mean()
        print(f"  {grid}, {name}: {int8_convs(path, folder)} of {convs} convolutions on QLinearConv; "
              f"{steps:.2f} steps from our QDQ model at most, predictions {100 * same:.1f}% equal", flush=True)
    export.to_onnx(fxcompress.compile(model, [], example_inputs=(x[:2],)), folder / "fp32.onnx", (x[:2],),
                   input_names=["x"])
    sessions["ORT fp32"] = session(folder / "fp32.onnx")
    for batch in args.batches:
        feed = {"x": torch.rand(batch, *size).numpy()}
        forms = {name: (lambda f, s=s: s.run(None, f)[0], feed) for name, s in sessions.items()}
        times = time_forms(forms, args.rounds, time.process_time)
        for name, seconds in times.items():
            print(f"| {grid} | {batch} | {name} | {1e3 * seconds:.3f} | {times['ORT fp32'] / seconds:.2f}x |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="the git revision whose export is the baseline")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--model", choices=["blocks", "mobilenet_v2"], default="blocks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MobileNetBlocks() if args.model == "blocks" else MobileNetV2()
    settle_batchnorm(model, [torch.rand(16, 3, args.size, args.size) for _ in range(4)])
    exports = {f"before ({args.before})": export_at(args.before), "this export": export}
    print(f"VNNI {native.vnni()}, weights {8 if native.vnni() else 7} bits, one thread, process CPU time")
    print("| activations | batch | form | ms / batch | speed-up vs ORT fp32 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for grid in args.grids:
            grid_rows(model, grid, exports, args, Path(folder))


if __name__ == "__main__":
    main()
