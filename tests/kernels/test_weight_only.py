"""WeightOnlyLinear: integer codes with group scales, every kernel against the fake-quant layer."""
import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.kernels.weight_only import (KERNELS, WeightOnlyLinear, choose, fit_grid, pack_nibbles, refusals,
                                            unpack_nibbles)
from fxcompress.quant import GridWeight

CONFIGS = [(4, 32, False), (4, 64, True), (4, 128, False), (8, None, True), (8, None, False), (3, 32, True)]


def layer(bits, group_size, symmetric, out=48, columns=256, seed=0):
    torch.manual_seed(seed)
    weight, bias = torch.randn(out, columns) * 0.05, torch.randn(out)
    grid = GridWeight(bits, "linear", symmetric, axis=0, group_size=group_size)
    return WeightOnlyLinear.from_grouped(grid.grouped(weight), bias), grid(weight), bias


@pytest.mark.parametrize("bits, group_size, symmetric", CONFIGS)
def test_every_kernel_that_fits_computes_the_fake_quant_layer(bits, group_size, symmetric):
    module, fake, bias = layer(bits, group_size, symmetric)
    assert torch.equal(module.dequantize(), fake)  # the codes hold the fake-quant weight exactly
    x = torch.randn(5, 256)
    expected = F.linear(x, fake, bias)
    fitting = [name for name in KERNELS if KERNELS[name].refusal(module) is None]
    assert {"float", "fbgemm_fp16"} <= set(fitting) or "fbgemm" not in \
        torch.backends.quantized.supported_engines
    for name in fitting:
        out = KERNELS[name].build(module)(x)
        # summation order only: float32 rounding of 256 products of |x w| ~ 0.05, far below one weight step
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_kernels_refuse_what_they_cannot_compute():
    grouped, _, _ = layer(4, 32, False)
    assert "groups" in refusals(grouped)["int8pack"]
    wide, _, _ = layer(8, None, False)
    assert "int8" in refusals(wide)["int8pack"] and "16 levels" in refusals(wide)["int4pack"]
    odd_rows, _, _ = layer(4, 32, False, out=40)
    assert "multiple of 16" in refusals(odd_rows)["int4pack"]
    narrow_groups, _, _ = layer(4, 16, False)
    assert "group_size 16" in refusals(narrow_groups)["int4pack"]


def test_four_bit_codes_are_two_per_byte():
    module, _, _ = layer(4, 32, False)
    assert module.codes.shape == (48, 128) and module.codes.dtype == torch.uint8
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    # codes (half a byte each), float32 scales and uint8 zero-points per group of 32, float32 bias
    assert module.held_bytes() == 48 * 128 + 48 * 8 * 4 + 48 * 8 + 48 * 4


def test_choose_times_float_and_the_fitting_kernels_and_keeps_the_result():
    module, fake, bias = layer(4, 128, True)
    x = torch.randn(1, 256)
    choice = choose(module, x, repeats=1)
    assert set(choice.times_ms) == {"fp32", *[k for k in KERNELS if KERNELS[k].refusal(module) is None]}
    assert choice.kernel != "fp32"  # the float layer is timed as the reference, never chosen
    assert module.kernel == choice.kernel and module.times_ms == dict(choice.times_ms)
    torch.testing.assert_close(module(x), F.linear(x, fake, bias), rtol=1e-5, atol=1e-5)
    assert module(x.reshape(1, 1, 256)).shape == (1, 1, 48)


def test_a_codebook_on_a_uniform_grid_fits_exactly_and_one_off_it_does_not():
    torch.manual_seed(0)
    step = torch.tensor(0.0123)
    codes = torch.randint(-5, 9, (6, 32)).float()
    on_grid = codes * step
    grouped = fit_grid(on_grid, per_row=False)
    assert not isinstance(grouped, str) and torch.equal(grouped.dequantize(), on_grid)
    assert grouped.qmax == 15  # 14 levels: 4-bit storage
    per_row = fit_grid(codes * (step * torch.arange(1, 7).float()).unsqueeze(1), per_row=True)
    assert not isinstance(per_row, str) and per_row.scale.shape == (6, 1)
    off = on_grid.clone()
    off[2, 3] += step / 3.7
    reason = fit_grid(off, per_row=True)
    assert isinstance(reason, str) and reason.startswith("row 2:")
    assert isinstance(fit_grid(torch.randn(4, 8), per_row=False), str)  # trained centroids: no grid
    positive = fit_grid(torch.tensor([[3.0, 5.0, 10.0]]) * step, per_row=False)  # the grid reaches down to 0
    assert positive.zero_point.item() == 0 and int(positive.codes.max()) == 10


def test_bad_configurations_and_loaded_tensors_are_refused():
    with pytest.raises(ConfigError, match="group_size"):
        WeightOnlyLinear(256, 48, 4, 100)
    with pytest.raises(ConfigError, match="kernel"):
        WeightOnlyLinear(256, 48, 4, 32, kernel="magic")
    module, _, _ = layer(4, 32, False)
    module.scale = torch.ones(48, 8, dtype=torch.float64)
    with pytest.raises(FormatError, match="tensor 'scale'"):
        module.check_loaded("fc1.weight_only")


def test_a_kernel_this_machine_cannot_run_is_named_at_the_first_forward():
    module, _, _ = layer(4, 32, False, out=40)  # 40 output channels: int4pack cannot tile them
    module.kernel = "int4pack"
    with pytest.raises(PreconditionError, match="kernel 'int4pack' cannot run here.*multiple of 16"):
        module(torch.randn(1, 256))


def test_cold_timing_subtracts_the_eviction_and_still_picks_a_candidate():
    module, fake, bias = layer(8, None, True)
    x = torch.randn(1, 256)
    choice = choose(module, x, repeats=1, cold=True)
    assert "evict" not in choice.times_ms and "float" in choice.times_ms
    assert all(t > 0 for t in choice.times_ms.values())
    torch.testing.assert_close(module(x), F.linear(x, fake, bias), rtol=1e-5, atol=1e-5)
