"""Where native resnet18's batch-1 time goes outside and inside its convolutions, beside torch.ao's.

One thread, batch 1, interleaved medians (`bench_deploy.time_forms`), on the native resnet18 of
`bench_deploy.py` (quantized and lowered as there, through its saved file). Each pair times one step two
ways on the inputs the model gives it:

- the input boundary: float -> NCHW codes, or channels-last codes in the same pass (`channels_last=True`);
- the stem convolution reading NCHW codes (oneDNN reorders them inside the call) or channels-last ones;
- the dequantizing last residual add: our one C pass (`q8.add_values`) or the torch ops it replaced;
- the 20 convolutions in order, each on oneDNN's int8 kernel, through `onednn::qconv2d_pointwise` (ours) or
  torch.ao's `quantized::conv2d` on the same codes and scales (deprecated quantized tensors; output codes
  checked within one of each other, and the differing ones counted);
- the whole model, and the same model with its uint8 residual adds skipped (their cost in place).

    python benchmarks/bench_native_edges.py [--rounds 15] [--clock wall|thread]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import torch
from bench_deploy import time_forms
from deploy_memory import lowered_file

import fxcompress
from fxcompress.kernels import q8
from fxcompress.kernels.native import NativeAdd, NativeLayer, QuantizeToCodes
from fxcompress.kernels.timing import CLOCKS, layer_inputs, run_reaching


def torch_ao_conv(layer: NativeLayer, x: torch.Tensor):
    """The layer as torch.ao's quantized conv on its codes and scales: a callable of no argument, and the
    quantized input it reads."""
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    weight = torch._make_per_channel_quantized_tensor(layer.weight, layer.weight_scale.double(),
                                                      torch.zeros(layer.weight.shape[0], dtype=torch.long), 0)
    packed = torch.ops.quantized.conv2d_prepack(weight, layer.float_bias(), layer.stride, layer.padding,
                                                layer.dilation, layer.groups)
    qx = torch._make_per_tensor_quantized_tensor(x, layer.input_scale, layer.input_zero_point)
    op = torch.ops.quantized.conv2d_relu if layer.post_op == "relu" else torch.ops.quantized.conv2d
    return lambda _: op(qx, packed, layer.output_scale, layer.output_zero_point)


def on_int8(layer: NativeLayer) -> NativeLayer:
    """A copy of the layer on oneDNN's int8 kernel, whatever its measured choice (the conv pair compares kernels)."""
    copy_ = NativeLayer(**{**layer.config(), "kernel": "int8", "times_ms": None})
    copy_.load_state_dict(layer.state_dict())
    return copy_


class _FirstOperand(torch.nn.Module):
    def forward(self, a, b):
        return a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model = fxcompress.load(lowered_file("resnet18", Path(folder))[0])
    x = torch.rand(1, 3, 224, 224)
    modules = dict(model.named_modules())
    inputs = layer_inputs(model, {p: m for p, m in modules.items() if isinstance(m, NativeLayer)}, (x,))
    adds = {p: m for p, m in modules.items() if isinstance(m, NativeAdd)}
    operands: dict[str, tuple] = {}
    run_reaching(model, adds, lambda _m, args, path: operands.setdefault(path, args), (x,))
    boundary = next(m for m in model.modules() if isinstance(m, QuantizeToCodes))
    assert boundary.channels_last, "the input boundary writes the layout its convolution reads"
    nchw = QuantizeToCodes(boundary.scale, boundary.zero_point, boundary.qmax)
    stem = next(m for m in modules.values() if isinstance(m, NativeLayer))
    last_path, last_add = list(adds.items())[-1]
    a, b = operands[last_path]
    assert last_add.output is None, "the last residual add dequantizes into the average pool"

    def torch_ops_add(_):
        real = torch.add(a * last_add.ka, b, alpha=last_add.kb).add_(last_add.offset)
        return real.clamp_min_(0.0) if last_add.relu else real

    convs = {p: on_int8(m) for p, m in modules.items() if isinstance(m, NativeLayer) and m.kind == "conv2d"}
    ao_convs = [torch_ao_conv(m, inputs[p]) for p, m in convs.items()]
    differing, total = 0, 0
    for (p, m), ao in zip(convs.items(), ao_convs):  # the same oneDNN kernel, its rounding at most a code apart
        diff = (ao(None).int_repr().int() - m(inputs[p]).int()).abs()
        assert int(diff.max()) <= 1, p
        differing, total = differing + int(diff.count_nonzero()), total + diff.numel()
    print(f"the convolutions' output codes: {differing} of {total} differ (by one) between the two calls")
    skipped = copy.deepcopy(model)
    for path, m in list(skipped.named_modules()):
        if isinstance(m, NativeAdd) and m.output is not None:
            skipped.add_submodule(path, _FirstOperand())
    pairs = {
        "input boundary": {"NCHW codes": (nchw, x), "channels-last codes": (boundary, x)},
        "stem conv": {"from NCHW codes": (stem, nchw(x)), "from channels-last codes": (stem, boundary(x))},
        "last add, dequantizing": {"torch ops": (torch_ops_add, None),
                                   "q8.add_values": (lambda _: q8.add_values(a, b, last_add.ka, last_add.kb,
                                                                             last_add.offset, last_add.relu), None)},
        f"{len(convs)} convolutions in order": {
            "torch.ao quantized::conv2d": (lambda _: [ao(None) for ao in ao_convs], None),
            "ours onednn::qconv2d_pointwise": (lambda _: [m(inputs[p]) for p, m in convs.items()], None)},
        "whole model": {"uint8 adds skipped": (skipped, x), "as lowered": (model, x)},
    }
    print(f"native resnet18, batch 1, one thread, {args.clock} clock, medians of {args.rounds} interleaved rounds")
    print("| step | form | us per call |\n|---|---|---:|")
    for step, forms in pairs.items():
        for form, seconds in time_forms(forms, args.rounds, CLOCKS[args.clock]).items():
            print(f"| {step} | {form} | {1e6 * seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
