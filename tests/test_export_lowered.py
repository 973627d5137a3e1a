"""torch.export and torch.compile of every lowered form: each runs and computes what the lowered
GraphModule computes.

LOWERINGS is the table: (name, passes) applied to one tiny residual CNN (conv, BatchNorm, a residual
add, global max pooling, linear) with calibration data; add an entry for every new lowering pass. Each form
is exported once (`torch.export.export`, then its `.module()` run) and compiled once with aot_eager
(dynamo's capture and AOT autograd's tracing, where a lowered module breaks if it breaks), and the
native integer form also with inductor, where a C++ compiler works: it is the form whose compiled
kernels matter for speed. Inductor lowers oneDNN's int8 kernels only with their packed weights as
constants, so that compile uses freezing (`torch._inductor.config.freezing`, PT2E's x86 inference
setting; without it inductor fails an assertion in its qlinear lowering). Freezing is no general
answer: it hands the reference backend's float64 convolutions to oneDNN, which refuses double.
Outputs must equal the lowered model's to 1e-5 (logits of order 1; compiled kernels may sum in
another order).
Cost: the inductor compile is the file's largest (C++ builds, cached by inductor across runs, cold
as CI starts); the model is shaped so that it builds only the kernels that matter. Inductor compiles
two C++ kernels for it: the input's quantization and the residual add's requantization, around
oneDNN's int8 convolutions, quantized max pooling and int8 linear. The model is 16 channels wide, not
8: inductor inlines constants of up to 8 elements into generated C++, which cost three more kernel
builds. The pooling is global (8 x 8 maps to 1 x 1): a 4 x 4 channels-last pooled map cost a third
kernel, a copy to flatten it for `fc`. Inductor's check that the CPU's vector instructions build
and load (two more C++ programs and a process) is skipped with `cpp.vec_isa_ok`: the CPU's own flags
choose the instruction set, and the generated kernels are the same; the check probes the machine,
not the model. The two kernels compile in the test's own process (`compile_threads=1`): inductor's
default on a machine with several cores starts a pool of worker processes, each importing torch, to
compile them (about 3 s of CPU, cold cache, for the same kernels).
"""
import functools
import shutil

# inductor's C++ builds import setuptools; in some worker orders of the whole suite (pytest -n 2 --dist load)
# that first import, late in the worker, failed setuptools' own distutils check (an AssertionError naming the
# standard library's distutils/core.py). Imported here, at collection, it does not.
import setuptools  # noqa: F401

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.passes import (ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToEncoded,
                               LowerToInteger, LowerToSparse)
from fxcompress.kernels import native
from fxcompress.kernels.native import NativeLayer
from fxcompress.zoo import BasicBlock

ATOL = 1e-5
HAS_CXX = bool(shutil.which("g++") or shutil.which("c++"))  # inductor's CPU code generation needs one


def _quantize() -> list:
    """8-bit symmetric per-channel weights and 8-bit activations (7 without VNNI: native stays exact)."""
    bits = 8 if native.vnni() else 7
    return [FoldBatchNorm(), InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                             activations=ActivationConfig(bits=bits, joins=True))]


LOWERINGS = [
    ("integer reference", [*_quantize(), LowerToInteger(backend="reference")]),
    ("integer native", [*_quantize(), LowerToInteger(backend="native", kernels=("int8",))]),
    ("integer native, float kernels", [*_quantize(), LowerToInteger(backend="native", kernels=("float",))]),
    ("integer native, mixed kernels", [*_quantize(), LowerToInteger(backend="native", kernels=("int8",),
                                                                    float_select="block.conv2|fc")]),
    ("encoded", [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans"), LowerToEncoded()]),
    ("masked", [InsertMasks(sparsity=0.9, scope="global")]),
    ("masked, BatchNorm folded", [FoldBatchNorm(), InsertMasks(sparsity=0.9, scope="global")]),
    ("sparse", [FoldBatchNorm(), InsertMasks(sparsity=0.9, scope="global"),
                LowerToSparse(min_sparsity=0.0, repeats=2)]),
]
NEEDS = {name: (native.available(), "this torch build has no oneDNN int8 kernels")
         for name, _ in LOWERINGS if name.startswith("integer native")}


# Inductor inlines a constant of at most 8 elements into generated C++ (one more kernel to compile per
# layer for its scales and bias); 16 channels keep them frozen constants, as real layers' are.
WIDTH = 16
# Global pooling: the pooled map is 1 x 1, so flattening its channels-last layout is a view, not a
# copy kernel that inductor would build for a larger map.
SIDE = 8


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, WIDTH, 3, padding=1), nn.ReLU())
        self.block = BasicBlock(WIDTH, WIDTH)
        self.fc = nn.Linear(WIDTH, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.block(self.stem(x)), SIDE), 1))


@functools.cache
def _lowered(name: str):
    available, reason = NEEDS.get(name, (True, ""))
    if not available:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = TinyResNet().eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(32, 1, SIDE, SIDE)
    passes = dict(LOWERINGS)[name]
    gm = fxcompress.compile(model, passes, example_inputs=(x[:4],), calibration_data=[x])
    assert fxcompress.history(gm)[-1].name == type(passes[-1]).__name__  # the form really is lowered
    with torch.no_grad():
        expected = gm(x[:4])
    return gm, x[:4], expected


@pytest.mark.parametrize("name", [name for name, _ in LOWERINGS])
def test_torch_export_runs_and_matches(name):
    gm, x, expected = _lowered(name)
    program = torch.export.export(gm, (x,))
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", [name for name, _ in LOWERINGS])
def test_torch_compile_runs_and_matches(name):
    gm, x, expected = _lowered(name)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler")
def test_inductor_compiles_the_native_integer_model_with_frozen_packed_weights():
    gm, x, expected = _lowered("integer native")
    assert any(isinstance(m, NativeLayer) for m in gm.modules())
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="inductor", fullgraph=True)
    # vec_isa_ok: trust the CPU's flags instead of building and loading probe programs; compile_threads=1:
    # no pool of worker processes for two kernels (see above).
    config = {"freezing": True, "cpp.vec_isa_ok": True, "compile_threads": 1}
    with torch.no_grad(), torch._inductor.config.patch(config):
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
