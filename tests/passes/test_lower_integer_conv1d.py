"""LowerToInteger on HF's Conv1D (torch.addmm with an [in, out] weight): the layer lowers as the integer
linear layer of its transposed weight on both backends and both front ends, so the integer chain
around it stays on codes and agrees with the fake-quant model."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.kernels import native
from fxcompress.kernels.native import NativeLayer
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger
from fxcompress.quant.integer import IntegerLayer


class AddmmChain(nn.Module):
    """Linear -> ReLU -> addmm (a Conv1D weight stored [in, out]) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(24, 8)
        self.weight = nn.Parameter(torch.randn(32, 24) * 0.2)   # [in, out]
        self.bias = nn.Parameter(torch.randn(24) * 0.1)

    def forward(self, x):
        return self.fc2(torch.addmm(self.bias, torch.relu(self.fc1(x)), self.weight))


BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason="this torch build has no oneDNN int8 kernels"))]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_addmm_layer_lowers_as_an_integer_linear_layer(backend, frontend):
    torch.manual_seed(0)
    model, x = AddmmChain().eval(), torch.randn(64, 16)   # symmetric weights: codes native int8 runs
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True,
                                                           activations=ActivationConfig())],
                            (x[:4],), calibration_data=[x[:32], x[32:]], frontend=frontend)
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend, repeats=2)], (x[:4],))
    stats = fxcompress.history(gm)[-1].stats
    assert (stats["backend"], stats["integer_layers"], stats["requantized"]) == (backend, 3, 2)
    assert stats["dequantized"] == ["fc2"]   # only the last layer leaves the integer chain
    assert not any(n.target is torch.addmm for n in gm.graph.nodes)
    runtime = IntegerLayer if backend == "reference" else NativeLayer
    layers = [m for m in gm.modules() if isinstance(m, runtime)]
    assert len(layers) == 3 and {m.kind for m in layers} == {"linear"}
    with torch.no_grad():
        expected, got = fq(x), gm(x)
        step = expected.abs().max().item() / 127
        assert (expected - got).abs().max().item() < 4 * step   # bias and requantization rounding only
        assert torch.equal(from_bytes(to_bytes(gm))(x), got)


class ScaledAddmm(AddmmChain):
    def forward(self, x):
        return self.fc2(torch.addmm(self.bias, torch.relu(self.fc1(x)), self.weight, beta=0.5, alpha=2.0))


def test_an_addmm_that_scales_its_bias_or_product_is_refused_by_name():
    torch.manual_seed(0)
    model, x = ScaledAddmm().eval(), torch.randn(16, 16)
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True,
                                                    activations=ActivationConfig())], (x,), calibration_data=[x])
    with pytest.raises(PreconditionError, match=r"layer 'weight'.*\{'beta': 0.5, 'alpha': 2.0\}"):
        fxcompress.compile(fq, [LowerToInteger(backend="reference")], (x,))
