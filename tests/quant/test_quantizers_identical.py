"""The fast min-max and fake-quant paths give bit for bit what the plain formulas give.

`_min_max` takes amin and amax (aminmax along a dim is not vectorized on CPU), a grouped grid is
applied to a (rows, groups, group_size) view instead of repeated scales, and a forward with nothing
to differentiate snaps in place without the autograd function. The references below are those
plain formulas; every output is compared with `torch.equal` and its sign bits (a -0.0 where a +0.0
was would be a different byte in a file).
"""
import pytest
import torch

from fxcompress.errors import PreconditionError
from fxcompress.quant.quantizers import Grid, _min_max, check_finite, fake_quantize, fixed_point_grid, from_rows, linear_grid


class _ReferenceRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def reference_min_max(weight, axis, group_size=None):
    rows = (weight.detach().reshape(1, -1) if axis is None
            else weight.detach().movedim(axis, 0).reshape(weight.shape[axis], -1)).float()
    if group_size is not None:
        rows = rows.reshape(rows.shape[0], -1, group_size)
    low, high = rows.aminmax(dim=-1)
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    return (low[0], high[0]) if axis is None else (low, high)


def reference_fake_quantize(x, grid, axis=None):
    if grid.group_size is not None:
        scale, zero_point = (from_rows(t.repeat_interleave(grid.group_size, dim=1), x.shape, axis)
                             for t in (grid.scale, grid.zero_point))
    elif axis is None:
        scale, zero_point = grid.scale, grid.zero_point
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = grid.scale.reshape(shape), grid.zero_point.reshape(shape)
    q = torch.clamp(_ReferenceRound.apply(x / scale) + zero_point, grid.qmin, grid.qmax)
    return (q - zero_point) * scale


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    w[torch.rand(shape, generator=g) < 0.3] = 0.0
    w[torch.rand(shape, generator=g) < 0.1] = -0.0  # zeros of both signs: which one min and max return matters
    w[-1] = -0.0  # a row of negative zeros only
    return w


# (shape, axis, group_size): per tensor, per output channel along dim 0 and 1 (transposed conv), 4-D, groups
LAYOUTS = [((12, 40), None, None), ((12, 40), 0, None), ((12, 40), 1, None), ((8, 3, 3, 3), 0, None),
           ((16, 64), 0, 8), ((16, 64), 1, 4), ((40, 257), 0, None)]


@pytest.mark.parametrize("shape,axis,group_size", LAYOUTS)
def test_min_max_and_every_grid_equal_the_reference(shape, axis, group_size):
    w = weight(shape, seed=len(shape) + (axis or 0))
    for got, want in zip(_min_max(w, axis, group_size), reference_min_max(w, axis, group_size)):
        assert same_bits(got, want)
    for bits in (1, 2, 4, 8):
        for symmetric in (False, True)[: 1 + (bits > 1)]:
            for scale_dtype in ("float32", "float16"):
                grid = linear_grid(w, bits, symmetric, axis, group_size, scale_dtype)
                check_fake_quantize(w, grid, axis)
    if group_size is None:
        for int_bits in (None, 2):
            check_fake_quantize(w, fixed_point_grid(w, 6, int_bits, axis), axis)


def check_fake_quantize(w, grid, axis):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = w.to(dtype)
        want = reference_fake_quantize(x, grid, axis)
        with torch.no_grad():
            assert same_bits(fake_quantize(x, grid, axis), want), (dtype, grid)
        assert same_bits(fake_quantize(x, grid, axis), want)  # grad enabled, nothing requires it
        leaf = x.clone().requires_grad_()
        got = fake_quantize(leaf, grid, axis)
        assert got.requires_grad and same_bits(got.detach(), want)
        torch.autograd.backward(got, torch.linspace(-1, 1, got.numel()).reshape(got.shape).to(dtype))
        reference_leaf = x.clone().requires_grad_()
        reference_fake_quantize(reference_leaf, grid, axis).backward(
            torch.linspace(-1, 1, got.numel()).reshape(got.shape).to(dtype))
        assert same_bits(leaf.grad, reference_leaf.grad)  # straight through, zero where saturated


def test_a_zero_point_of_a_wider_type_widens_the_output_as_the_formula_does():
    x = torch.randn(6, 5)
    grid = Grid(torch.full((6,), 0.25), torch.full((6,), 3.0, dtype=torch.float64), 0, 15)
    with torch.no_grad():
        got = fake_quantize(x, grid, 0)
    assert got.dtype == torch.float64 and same_bits(got, reference_fake_quantize(x, grid, 0))


def test_a_saturating_grid_clamps_the_same_values():
    x = torch.linspace(-5, 5, 101).reshape(1, -1)
    grid = Grid(torch.tensor(0.1), torch.tensor(7.0), 0, 15)  # most values saturate on either side
    with torch.no_grad():
        assert same_bits(fake_quantize(x, grid), reference_fake_quantize(x, grid, None))


def test_check_finite_counts_every_non_finite_value_and_passes_huge_finite_ones():
    w = torch.randn(1000)
    check_finite(w, "w")
    check_finite(torch.full((4,), 1e308, dtype=torch.float64), "huge")  # a float64 sum overflows; no value is bad
    check_finite(torch.full((70000,), 6e4, dtype=torch.float16), "half")  # past float16's range summed
    for bad, count in ((float("nan"), 3), (float("inf"), 2), (-float("inf"), 1)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = w.to(dtype, copy=True)
            x[:count] = bad
            with pytest.raises(PreconditionError, match=rf"layer: {count} of 1000 values are NaN/Inf"):
                check_finite(x, "layer")
    mixed = w.clone()
    mixed[[1, 5]] = torch.tensor([float("inf"), -float("inf")])  # their sum is NaN; both are counted
    with pytest.raises(PreconditionError, match="2 of 1000"):
        check_finite(mixed, "layer")
