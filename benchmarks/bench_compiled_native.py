"""Where torch.compile's time goes on a native integer model (issue 13): compiled against eager native and fp32.

    python benchmarks/bench_compiled_native.py [--models lenet300 lenet5] [--batches 1 32] [--rounds 7]

One thread, the calling thread's CPU time (a loaded machine's preemption does not inflate it), interleaved
rounds in rotating order, medians (`bench_deploy.time_forms`). For each model and batch size, in one run:
fp32 eager; ours native (eager, each layer's kernel chosen at that batch size); ours native through
torch.compile with dynamo alone (backend "eager": guards and the frame wrapper, no AOT, no inductor),
the same with guard evaluation skipped (`set_stance(skip_guard_eval_unsafe=True)`, unsafe: only to measure
the guards' share), through inductor with freezing (what bench_deploy's compiled row runs), and through
inductor without its per-call size asserts; and the fp32 model through that same inductor call (bench_deploy's
"fp32 compiled"), which pays torch.compile's per-call cost too. Ratios are against eager native, fp32 eager and
fp32 compiled of the same run (above 1: faster).

Then the parts of the compiled call, measured on their own: torch.compile's floor (a one-op module compiled
with backend "eager" and with inductor against its eager call), and one native layer (c_int8) called
directly against the same layer through torch's dispatcher (`torch.ops.fxcompress.q8_linear.default`, what
the compiled graph calls) and against a dispatched no-op with the same 15-argument schema.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_deploy as deploy  # noqa: E402 - the models, fake-quant and timing of the deployment benchmark

import fxcompress  # noqa: E402
from fxcompress.kernels import q8  # noqa: E402
from fxcompress.kernels.timing import CLOCKS, remeasure  # noqa: E402
from fxcompress.passes import LowerToInteger  # noqa: E402

_NOOP = torch.library.Library("fxcompress_bench", "DEF")
_NOOP.define("noop(Tensor x, Tensor weight, Tensor bias, Tensor? mult, Tensor? shift, Tensor? scale, "
             "int in_features, int x_zero, int y_zero, int low, int high, bool relu, bool raw, float x_scale, "
             "int x_qmax) -> Tensor")
_NOOP.impl("noop", lambda x, *rest: x, "CPU")  # the dispatcher's boxing of q8_linear's schema, no kernel


def native_forms(name: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    make, shape = deploy.models(32)[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(2, *shape)
    calibration = [torch.rand(8, *shape) for _ in range(4)]
    fq = deploy.fake_quant(model, x, calibration, 8, deploy.activation_bits())
    return model, fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,)), shape


def _guards_skipped(compiled_module: nn.Module):
    """The compiled module with dynamo's guard evaluation skipped (unsafe: only to measure the guards' share)."""
    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return compiled_module(x)
    return call


def compiled(native: nn.Module) -> dict[str, nn.Module]:
    torch._inductor.config.freezing = True  # as bench_deploy: packed weights become constants
    dynamo_only = torch.compile(native, backend="eager", dynamic=False)
    return {"native dynamo only": dynamo_only, "native dynamo only, guards skipped": _guards_skipped(dynamo_only),
            "native inductor": torch.compile(native, backend="inductor", dynamic=False),
            "native inductor no asserts": deploy.compiled(native)}


def model_rows(name: str, batches: list[int], rounds: int, clock) -> None:
    model, native, shape = native_forms(name)
    for batch in batches:
        x = torch.rand(batch, *shape)
        remeasure(native, (x,))  # each layer's kernel chosen at this batch size, as bench_deploy does
        torch._dynamo.reset()  # compiled after the choice: the graph calls the chosen kernels
        forms = {"fp32 eager": model, "native eager": native, **compiled(native),
                 "fp32 inductor no asserts": deploy.compiled(model)}
        times = deploy.time_forms({k: (f, x) for k, f in forms.items()}, rounds, clock)
        for form, seconds in times.items():
            print(f"| {name} | {batch} | {form} | {1e6 * seconds:.1f} | {times['native eager'] / seconds:.2f}x | "
                  f"{times['fp32 eager'] / seconds:.2f}x | {times['fp32 inductor no asserts'] / seconds:.2f}x |",
                  flush=True)


class _OneOp(nn.Module):
    def forward(self, x):
        return x + 1


def floor_rows(rounds: int, clock) -> None:
    torch._dynamo.reset()
    one, x = _OneOp(), torch.rand(1, 784)
    forms = {"one op eager": (one, x), "one op dynamo only": (torch.compile(one, backend="eager"), x),
             "one op inductor": (torch.compile(one, backend="inductor", dynamic=False), x)}
    _, native, _ = native_forms("lenet300")
    codes = torch.randint(0, 128, (1, 300), dtype=torch.uint8)
    native(torch.rand(1, 1, 28, 28))
    layer = native.fc2.native._c or native.fc2.native.c_packed()
    args = (layer.weight, layer.bias, layer.mult, layer.shift, layer.scale, layer.in_features, layer.x_zero,
            layer.y_zero, layer.low, layer.high, layer.relu, layer.raw, layer.x_scale, layer.x_qmax)
    op, noop = torch.ops.fxcompress.q8_linear.default, torch.ops.fxcompress_bench.noop.default
    forms |= {"300->100 layer direct": (layer.call, codes),
              "300->100 layer dispatched": (lambda c: op(c, *args), codes),
              "dispatched no-op, same schema": (lambda c: noop(c, *args), codes)}
    times = deploy.time_forms(forms, rounds, clock)
    for form, seconds in times.items():
        print(f"| {form} | {1e6 * seconds:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, one thread, {args.clock} clock, medians of {args.rounds} interleaved rounds")
    print("\n| model | batch | form | us a call | vs eager native | vs fp32 | vs fp32 compiled |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.models:
        model_rows(name, args.batches, args.rounds, clock)
    print("\n| part of a compiled call | us a call |\n|---|---|")
    floor_rows(args.rounds, clock)


if __name__ == "__main__":
    main()
