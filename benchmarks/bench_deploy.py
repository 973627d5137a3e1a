"""Deployment speed: what compression buys at inference time, every row beside its peers in one run.

For each model and batch size, one CPU thread, these forms of one model are timed in interleaved
rounds (each round runs every form once, in a rotating order; the median over rounds is reported,
with its ratio to fp32 eager of the same run — above 1 is faster):

- fp32 eager: the model as built;
- fp32 folded: FoldBatchNorm, channels-last for convolutional models;
- torch.ao FX int8: prepare_fx / convert_fx with the x86 backend's default qconfig (deprecated in
  torch but still importable; measured while it is);
- ours, reference: LowerToInteger(backend="reference"), the exact integer oracle;
- ours, native: LowerToInteger() on oneDNN's int8 kernels.

Ours are quantized with InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)
and 8-bit activations, or 7-bit activations on a CPU without VNNI, where uint8 x int8 products
are summed in int16 pairs and 8 / 8 bits could saturate (torch.ao's x86 default reduces activations to
7 bits there too). Residual adds stay integer (ActivationConfig(joins=True)). Models have random
weights (nothing downloads); calibration uses random inputs, which is all a latency needs. The native
model's predictions are compared with the reference's on the timed batch as a sanity check.

    python benchmarks/bench_deploy.py [--models lenet5 lenet300 resnet18] [--batches 1 32] [--rounds 7]
                                      [--resnet-size 224]

resnet18 is torchvision's when torchvision is installed, otherwise a definition of our own with the
same shapes (BasicBlock stages of 64 / 128 / 256 / 512 channels).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the model zoo lives with the examples

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant, LowerToInteger
from fxcompress.quant import native
from zoo import BasicBlock, LeNet5, LeNet300100

MIN_SAMPLE_S = 0.02  # each timed sample loops the forward until it takes at least this long


class ResNet18(nn.Module):
    """torchvision's resnet18 shapes: a 7x7 stem, max pooling, four stages of two BasicBlocks."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def resnet18() -> nn.Module:
    try:
        import torchvision
    except ImportError:
        return ResNet18()
    return torchvision.models.resnet18(weights=None)


def models(resnet_size: int) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {"lenet5": (LeNet5, (1, 28, 28)), "lenet300": (LeNet300100, (1, 28, 28)),
            "resnet18": (resnet18, (3, resnet_size, resnet_size))}


def activation_bits() -> int:
    return 8 if native.vnni() else 7


def fp32_folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    return gm.to(memory_format=torch.channels_last) if x.ndim == 4 and _has_conv(model) else gm


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def torch_ao_int8(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated: measured while it is importable
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


def ours(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> dict[str, nn.Module]:
    quantize = InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                               activations=ActivationConfig(bits=activation_bits(), joins=True))
    fq = fxcompress.compile(model, [FoldBatchNorm(), quantize], example_inputs=(x,), calibration_data=calibration)
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x,))
    fast = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))
    stats = fxcompress.history(fast)[-1].stats
    if stats["backend"] != "native":
        print(f"  native backend refused: {stats['native_refused']}")
    return {"ours reference": reference,
            "ours native" if stats["backend"] == "native" else "ours default (fell back to reference)": fast}


def build(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], batch: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(batch, *shape)
    calibration = [torch.rand(8, *shape) for _ in range(4)]
    forms = {"fp32 eager": model, "fp32 folded": fp32_folded(model, x)}
    try:
        forms["torch.ao FX int8"] = torch_ao_int8(model, x, calibration)
    except Exception as exc:  # noqa: BLE001 - a deprecated peer that may fail: reported, never fatal
        print(f"  torch.ao FX int8 unavailable for {name}: {type(exc).__name__}: {exc}")
    forms.update(ours(model, x, calibration))
    return forms


def _loops(form: nn.Module, x: torch.Tensor) -> int:
    """How many forwards make one sample of at least MIN_SAMPLE_S."""
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < MIN_SAMPLE_S:
        form(x)
        count += 1
    return count


def time_forms(forms: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per forward of each form, over interleaved rounds in rotating order."""
    names = list(forms)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        inputs = {name: x.contiguous(memory_format=torch.channels_last) if name == "fp32 folded" and x.ndim == 4
                  else x for name in names}
        loops = {name: _loops(forms[name], inputs[name]) for name in names}  # also the warm-up
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(loops[name]):
                    forms[name](inputs[name])
                samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def agreement(forms: dict[str, nn.Module], x: torch.Tensor) -> str:
    fast = next((m for n, m in forms.items() if n == "ours native"), None)
    if fast is None:
        return "native not built"
    with torch.no_grad():
        expected, got = forms["ours reference"](x), fast(x)
    same = (expected.argmax(1) == got.argmax(1)).float().mean().item()
    step = (expected.max() - expected.min()).item() / 255
    return f"native vs reference: predictions {100 * same:.1f}% equal, max |diff| {(expected - got).abs().max():.3g} " \
           f"(8-bit step of the logits {step:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet300", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--resnet-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = models(args.resnet_size)
    print(f"torch {torch.__version__}, one thread, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"VNNI {native.vnni()}, ours at 8-bit weights / {activation_bits()}-bit activations")
    print("| model | batch | form | ms / batch | speed-up vs fp32 eager |")
    print("|---|---|---|---|---|")
    for name in args.models:
        make, shape = table[name]
        for batch in args.batches:
            forms = build(name, make, shape, batch)
            x = torch.rand(batch, *shape)
            times = time_forms(forms, x, args.rounds)
            for form, seconds in times.items():
                print(f"| {name} | {batch} | {form} | {1e3 * seconds:.3f} | {times['fp32 eager'] / seconds:.2f}x |")
            print(f"  {name} batch {batch}: {agreement(forms, x)}", flush=True)


if __name__ == "__main__":
    main()
