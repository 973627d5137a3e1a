"""DynamicInt8Linear: each kernel against the computation it stands for."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError, FormatError
from fxcompress.kernels.dynamic import KERNELS, DynamicInt8Linear, choose, fbgemm_available

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm")


def layer(out=40, columns=96, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(out, columns) * 0.1
    scale = weight.abs().amax(dim=1) / 127
    codes = torch.round(weight / scale.unsqueeze(1)).to(torch.int8)
    return DynamicInt8Linear.from_codes(codes, scale, torch.randn(out)), torch.randn(3, columns)


@needs_fbgemm
def test_fbgemm_kernel_is_torch_ao_dynamic_linear_on_the_same_weights():
    module, x = layer()
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated: still the reference here
        warnings.simplefilter("ignore")
        reference = torch.ao.nn.quantized.dynamic.Linear(96, 40, dtype=torch.qint8)
        scale = module.weight_scale.double()
        qweight = torch._make_per_channel_quantized_tensor(module.weight, scale, torch.zeros(40, dtype=torch.int64), 0)
        reference.set_weight_bias(qweight, module.bias)
        expected = reference(x)
    assert torch.equal(KERNELS["fbgemm"].build(module)(x), expected)


def test_int_mm_kernel_quantizes_each_row_symmetrically():
    module, x = layer()
    x[1] *= 100.0  # a row of another magnitude gets its own grid
    out = KERNELS["int_mm"].build(module)(x)
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127
    codes = torch.round(x / x_scale)
    expected = (codes.double() @ module.weight.double().t()) * x_scale.double() * module.weight_scale.double() \
        + module.bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_a_one_feature_layer_over_a_permuted_input_is_computed_right(kernel):
    """Linear(1, 16): its transposed weight [1, 16] has strides (1, 1), which torch counts as contiguous and
    torch._int_mm read one element apart per row (outputs 10^4 times off); the rows of a permuted input have
    odd strides too."""
    if kernel == "fbgemm" and not fbgemm_available():
        pytest.skip("this torch build has no fbgemm")
    module, _ = layer(out=16, columns=1)
    x = torch.randn(2, 1, 12, 12).permute(0, 2, 3, 1)  # rows of one feature, strides (144, 12, 1, 144)
    rows = x.reshape(-1, 1).float().contiguous()  # what DynamicInt8Linear.forward hands its kernel
    assert module.weight.t().contiguous().stride() == (1, 1) and rows.stride() == (1, 144)
    exact = F.linear(rows, module.dequantize(), module.bias)
    got = KERNELS[kernel].build(module)(rows)
    # one input feature: its row grid is its own magnitude, so the rounding is at most half a step of 127
    assert (got - exact).abs().max().item() <= 0.01 * exact.abs().max().item()


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_each_kernel_stays_within_the_activation_rounding_bound_of_the_float_layer(kernel):
    if kernel == "fbgemm" and not fbgemm_available():
        pytest.skip("this torch build has no fbgemm")
    module, x = layer()
    exact = F.linear(x, module.dequantize(), module.bias)
    out = KERNELS[kernel].build(module)(x)
    # each input moves by at most half its step (fbgemm: the row's range over 127 levels, reduce_range;
    # int_mm: max |x| / 127), so each output by at most sum_k |w_k| * step / 2
    step = ((x.amax(dim=1, keepdim=True).clamp(min=0) - x.amin(dim=1, keepdim=True).clamp(max=0)) / 127
            if kernel == "fbgemm" else x.abs().amax(dim=1, keepdim=True) / 127)
    bound = module.dequantize().abs().sum(dim=1) * step / 2
    if kernel == "fbgemm":  # one grid per call: the rows share the widest range
        bound = module.dequantize().abs().sum(dim=1) * step.max() / 2
    assert bool(((out - exact).abs() <= bound * 1.01 + 1e-5).all())
    assert not torch.equal(out, exact)  # the activations really were rounded


def test_choose_records_every_candidate():
    module, x = layer()
    choice = choose(module, x[:1], repeats=1)
    assert "float" in choice.times_ms and module.kernel == choice.kernel
    assert module.times_ms == dict(choice.times_ms)
    assert module(x[:1].reshape(1, 1, 96)).shape == (1, 1, 40)


def test_refusals():
    with pytest.raises(ConfigError, match=r"\[-128, 127\]"):
        DynamicInt8Linear.from_codes(torch.full((2, 3), 200), torch.ones(2), None)
    with pytest.raises(ConfigError, match="kernel"):
        DynamicInt8Linear(3, 2, kernel="fast")
    module, _ = layer()
    module.weight_scale = -module.weight_scale
    with pytest.raises(FormatError, match="positive"):
        module.check_loaded("fc.dynamic_int8")


def test_the_float_kernel_dequantizes_on_the_fly_and_holds_no_float_weight():
    module, x = layer()
    run = KERNELS["float"].build(module)
    torch.testing.assert_close(run(x), F.linear(x, module.dequantize(), module.bias), rtol=1e-6, atol=1e-6)
    cells = [c.cell_contents for c in run.__closure__]
    assert not [c for c in cells if isinstance(c, torch.Tensor)]  # the module's int8 buffers only


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_converting_the_layer_keeps_its_float32_scales_and_bias(dtype):
    """`model.double()` converted the scales and bias, which every kernel then refused with torch's own error."""
    module, x = layer()
    for name in [name for name in KERNELS if KERNELS[name].refusal(module) is None]:
        module.kernel, module._run = name, None
        expected = module(x)
        module.to(dtype)
        assert module.weight_scale.dtype == module.bias.dtype == torch.float32
        out = module(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.02 if dtype == torch.float16 else 1e-6,
                                   msg=name)
