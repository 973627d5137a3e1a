"""IntegerLayer's kind: read from a file, so checked where it is built; each kind runs its own op."""
import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError
from fxcompress.quant.integer import INTEGER_KINDS, IntegerLayer


@pytest.mark.parametrize("kind", ["conv_transpose2d", "embedding", "Conv2d", ""])
def test_a_kind_the_integer_runtime_does_not_run_is_refused(kind):
    with pytest.raises(ConfigError, match="IntegerLayer.kind"):
        IntegerLayer(kind, [4, 3, 3, 3], requantize=False)


@pytest.mark.parametrize("kind, shape, x", [("linear", [4, 6], (2, 6)), ("conv1d", [4, 3, 3], (2, 3, 9)),
                                            ("conv2d", [4, 3, 3, 3], (2, 3, 7, 7)),
                                            ("conv3d", [4, 3, 2, 2, 2], (2, 3, 4, 4, 4))])
def test_each_kind_accumulates_with_its_own_op(kind, shape, x):
    assert kind in INTEGER_KINDS
    dims = len(shape) - 2
    layer = IntegerLayer(kind, shape, requantize=False, stride=[1] * dims, padding=[1] * dims,
                         dilation=[1] * dims, weight_dtype="int8")
    layer.weight.copy_(torch.randint(-8, 8, shape, dtype=torch.int8))
    layer.bias.copy_(torch.randint(-100, 100, (shape[0],), dtype=torch.int32))
    codes = torch.randint(0, 16, x).double()
    w = layer.weight.double()
    if kind == "linear":
        expected = F.linear(codes, w)
    else:
        expected = getattr(F, kind)(codes, w, None, 1, 1, 1, 1)
    bias = layer.bias.reshape(-1, *([1] * dims)) if dims else layer.bias
    assert torch.equal(layer.accumulate(codes), expected.round().long() + bias)
