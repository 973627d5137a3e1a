"""WeightOnlyLinear: integer codes with group scales, every kernel against the fake-quant layer."""
import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.kernels import weight_only
from fxcompress.kernels.weight_only import (KERNELS, WeightOnlyLinear, c_library, choose, fit_grid, pack_blocks,
                                            pack_nibbles, refusals, unpack_blocks, unpack_nibbles)
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


# ---- our C kernel ------------------------------------------------------------------------------------

needs_c = pytest.mark.skipif(c_library() is None, reason="no C compiler on this machine to build csrc/wo_gemv.c")
EPS32 = torch.finfo(torch.float32).eps


def c_layer(bits, group_size, columns, out, with_bias, seed):
    """A layer on an asymmetric grid (zero-points far from 0), straight from random codes."""
    torch.manual_seed(seed)
    levels = 2 ** bits
    groups = columns // group_size
    module = WeightOnlyLinear(columns, out, bits, group_size, has_bias=with_bias, packing="blocks")
    codes = torch.randint(0, levels, (out, columns), dtype=torch.uint8)
    module.codes.copy_(pack_blocks(codes) if bits == 4 else codes)
    module.scale.copy_(torch.rand(out, groups) * 0.02 + 0.001)
    module.zero.copy_(torch.randint(0, levels, (out, groups), dtype=torch.uint8))
    if with_bias:
        module.bias.copy_(torch.randn(out))
    return module, codes


@needs_c
@pytest.mark.parametrize("bits, group_size, columns, out", [(4, 32, 256, 40), (4, 64, 192, 33), (4, 128, 384, 16),
                                                            (4, 256, 256, 8), (8, 32, 96, 24), (8, 160, 160, 17)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_c_kernel_is_the_dequantized_product_up_to_float32_summation(bits, group_size, columns, out, rows):
    module, codes = c_layer(bits, group_size, columns, out, with_bias=rows % 2 == 1, seed=rows)
    assert torch.equal(module.unsigned_codes(), codes)
    x = torch.randn(rows, columns)
    got = KERNELS["c_gemv"].build(module)(x)
    weight = module.dequantize().double()
    exact = x.double() @ weight.t() + (0 if module.bias is None else module.bias.double())
    # Rigorous float32 bound for how the kernel sums: per group, sum(u x) over at most `group_size`
    # products and z * sum(x) (each |.| <= s (u + z) |x| summed), then the groups and the lanes.
    scale = module.scale.repeat_interleave(group_size, dim=1).double()
    zero = module.zero.repeat_interleave(group_size, dim=1).double()
    magnitude = x.double().abs() @ (scale * (codes.double() + zero)).t()
    bound = (group_size + columns // group_size + 16) * EPS32 * magnitude + 1e-6
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert float(bound.max()) < 0.01 * float(exact.abs().max())  # a real constraint, not a free pass
    torch.testing.assert_close(module(x.reshape(rows, 1, columns)).reshape(rows, out),
                               KERNELS["float"].build(module)(x), rtol=1e-4, atol=1e-4)


def test_blocks_packing_puts_column_j_and_j_plus_16_in_one_byte():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_blocks(codes)
    assert packed.shape == (3, 32)
    assert int(packed[1, 16 + 5]) == int(codes[1, 32 + 5]) | (int(codes[1, 32 + 21]) << 4)
    assert torch.equal(unpack_blocks(packed), codes)
    assert WeightOnlyLinear.from_grouped(GridWeight(4, "linear", axis=0).grouped(torch.randn(4, 64)), None).packing \
        == "blocks"
    assert WeightOnlyLinear.from_grouped(GridWeight(4, "linear", axis=0).grouped(torch.randn(4, 48)), None).packing \
        == "pairs"  # 48 columns: no whole blocks of 32


def test_pairs_packing_from_older_files_runs_on_float_and_the_c_kernel_says_why_not():
    blocks, fake, bias = layer(4, 32, False)
    pairs = WeightOnlyLinear(256, 48, 4, 32, packing="pairs")
    pairs.codes.copy_(pack_nibbles(blocks.unsigned_codes()))
    pairs.scale.copy_(blocks.scale), pairs.zero.copy_(blocks.zero), pairs.bias.copy_(blocks.bias)
    assert torch.equal(pairs.dequantize(), fake)
    assert "packed in pairs" in pairs.refusals(["c_gemv"])["c_gemv"]
    x = torch.randn(2, 256)
    torch.testing.assert_close(pairs(x), F.linear(x, fake, bias), rtol=1e-5, atol=1e-5)


def _held_tensors(value, seen=None):
    """Every tensor a built kernel keeps alive: through closures, attributes, containers and modules."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return list(value.buffers()) + list(value.parameters())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _held_tensors(item, seen)]
    found = []
    for cell in getattr(value, "__closure__", None) or ():
        found += _held_tensors(cell.cell_contents, seen)
    for item in getattr(value, "__dict__", {}).values():
        found += _held_tensors(item, seen)
    return found


@pytest.mark.parametrize("kernel", ["float", "c_gemv"])
def test_the_float_and_c_kernels_hold_no_float_weight(kernel):
    module, fake, bias = layer(4, 32, False)
    if module.refusals([kernel]):
        pytest.skip(module.refusals([kernel])[kernel])
    module.kernel = kernel
    x = torch.randn(3, 256)
    torch.testing.assert_close(module(x), F.linear(x, fake, bias), rtol=1e-5, atol=1e-5)
    held = _held_tensors(module._run)
    assert held and all(t.numel() < fake.numel() for t in held if t.is_floating_point())
    assert {t.data_ptr() for t in held} <= {t.data_ptr() for t in module.buffers()}  # the buffers, no copies


def test_choose_keeps_only_the_chosen_kernel_and_the_float_layer_only_as_a_reference():
    module, fake, bias = layer(4, 64, True)
    choice = choose(module, torch.randn(1, 256), repeats=1)
    assert choice.kernel != "fp32" and "fp32" in choice.times_ms
    if choice.kernel in ("float", "c_gemv"):
        assert all(t.numel() < fake.numel() for t in _held_tensors(module._run) if t.is_floating_point())


def test_without_a_compiler_the_c_kernel_is_refused_and_torch_kernels_remain(monkeypatch):
    monkeypatch.setattr(weight_only, "c_library", lambda: None)
    module, fake, bias = layer(4, 32, False)
    assert "no C compiler" in refusals(module)["c_gemv"]
    choice = choose(module, torch.randn(1, 256), repeats=1)
    assert "c_gemv" not in choice.times_ms and "float" in choice.times_ms
    module.kernel, module._run = "c_gemv", None
    with pytest.raises(PreconditionError, match="kernel 'c_gemv' cannot run here.*remeasure"):
        module(torch.randn(1, 256))


def test_a_file_naming_the_former_dequantize_kernel_loads_on_the_float_kernel():
    module = WeightOnlyLinear(256, 48, 4, 32, kernel="dequantize", times_ms={"float": 1.0, "dequantize": 2.0})
    assert module.kernel == "float" and module.kernel_choice.ms == 1.0 and module.packing == "pairs"


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (8, None, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_converting_the_layer_keeps_the_float32_scales_every_kernel_reads(bits, group_size, symmetric, dtype):
    """`model.double()` / `.half()` converted the scales and bias, which the C kernel then read as float32
    (outputs of 1e21, silently) and torch's kernels refused with their own errors. The layer takes inputs of
    every float dtype and returns theirs, so nothing in it needs converting."""
    module, fake, bias = layer(bits, group_size, symmetric)
    x = torch.randn(5, 256)
    for name in [name for name in KERNELS if KERNELS[name].refusal(module) is None]:
        module.kernel, module._run = name, None
        converted = module.to(dtype)
        assert converted is module and all(t.dtype in (torch.uint8, torch.float32) for t in module.buffers())
        out = module(x.to(dtype))
        assert out.dtype == dtype
        # computed in float32 from the input converted: the output rounded once to its dtype
        exact = 1e-5 if dtype == torch.float64 else 1e-2
        torch.testing.assert_close(out.float(), F.linear(x.to(dtype).float(), fake, bias), rtol=exact, atol=exact,
                                   msg=name)


def test_the_fp16_kernel_takes_an_empty_batch():
    module, fake, bias = layer(4, 32, False)  # groups: the kernel splits the input block-diagonally
    module.kernel, module._run = "fbgemm_fp16", None
    if module.refusals(["fbgemm_fp16"]):
        pytest.skip(module.refusals(["fbgemm_fp16"])["fbgemm_fp16"])
    for empty in (torch.randn(0, 256), torch.randn(2, 0, 256)):
        assert module(empty).shape == (*empty.shape[:-1], 48)  # was a bare reshape error
