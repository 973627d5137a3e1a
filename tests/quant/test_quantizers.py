import numpy as np
import pytest
import torch

from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.quant.kmeans1d import kmeans1d
from fxcompress.quant.quantizers import (as_rows, check_finite, fake_quantize, fixed_point_grid, from_rows,
                                         kmeans_codebook, linear_grid, quantize)

BITS = [1, 2, 3, 4, 6, 8, 12, 16]


def weights(shape=(16, 40), sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    w[torch.rand(shape, generator=g) < sparsity] = 0.0
    return w


def levels(t):
    return torch.unique(t).numel()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_linear_error_is_at_most_half_a_step(bits, symmetric):
    if symmetric and bits == 1:
        pytest.raises(ConfigError, linear_grid, weights(), 1, True)
        return
    w = weights()
    grid = linear_grid(w, bits, symmetric)
    q = fake_quantize(w, grid)
    assert (q - w).abs().max() <= grid.scale / 2 * (1 + 1e-5)
    assert levels(q) <= 2 ** bits - int(symmetric)
    assert torch.all(q[w == 0] == 0)  # zero is on every grid
    codes = quantize(w, grid)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert torch.equal((codes - grid.zero_point) * grid.scale, q)  # the dequantized codes are the output
    if symmetric:
        assert grid.zero_point == 0 and grid.qmin == -grid.qmax


def test_asymmetric_grid_uses_an_integer_zero_point_and_its_whole_range():
    w = torch.linspace(-1.0, 3.0, 101)
    grid = linear_grid(w, 4)
    assert (grid.qmin, grid.qmax) == (0, 15)
    assert grid.scale == pytest.approx(4.0 / 15)
    assert grid.zero_point == round(1.0 / (4.0 / 15))
    codes = quantize(w, grid)
    assert codes.min() == 0 and codes.max() == 15


@pytest.mark.parametrize("method", ["linear", "fixed_point"])
def test_per_channel_scales_follow_each_row(method):
    w = weights(sparsity=0.0)
    grid = linear_grid(w, 6, axis=0) if method == "linear" else fixed_point_grid(w, 6, axis=0)
    assert grid.scale.shape == (16,)
    q = fake_quantize(w, grid, axis=0)
    step = grid.scale.reshape(-1, 1)
    assert torch.all((q - w).abs() <= step / 2 * (1 + 1e-5))
    assert grid.scale[0] < grid.scale[-1] / 10  # rows of small weights get finer steps
    whole = fake_quantize(w, linear_grid(w, 6) if method == "linear" else fixed_point_grid(w, 6))
    assert (q - w).pow(2).sum() < (whole - w).pow(2).sum()


def test_per_channel_along_another_axis_as_conv_transpose_weights():
    w = weights((8, 3, 2, 2), sparsity=0.0).transpose(0, 1).contiguous()  # (in, out, kh, kw): channels on dim 1
    grid = linear_grid(w, 4, axis=1)
    assert grid.scale.shape == (8,)
    q = fake_quantize(w, grid, axis=1)
    assert torch.all((q - w).abs() <= grid.scale.reshape(1, -1, 1, 1) / 2 * (1 + 1e-5))
    assert torch.equal(from_rows(as_rows(w, 1), w.shape, 1), w)


@pytest.mark.parametrize("bits", BITS)
def test_fixed_point_saturates_at_exactly_the_twos_complement_range(bits):
    int_bits = max(1, bits // 2)
    frac = bits - int_bits
    w = torch.linspace(-1000.0, 1000.0, 4001)
    grid = fixed_point_grid(w, bits, int_bits)
    q = fake_quantize(w, grid)
    assert float(grid.scale) == 2.0 ** -frac
    assert q.min() == -(2 ** (bits - 1)) * 2.0 ** -frac  # the seed clamped one code below the range
    assert q.max() == (2 ** (bits - 1) - 1) * 2.0 ** -frac
    codes = quantize(w, grid)
    assert codes.min() == -(2 ** (bits - 1)) and codes.max() == 2 ** (bits - 1) - 1


def test_fixed_point_rounds_to_nearest_not_down():
    grid = fixed_point_grid(torch.zeros(1), 8, int_bits=7)  # one fraction bit: a step of 0.5
    w = torch.tensor([-0.2, -0.3, 0.2, 0.3, 0.74, 0.76, -0.76])
    expected = torch.tensor([0.0, -0.5, 0.0, 0.5, 0.5, 1.0, -1.0])
    assert torch.equal(fake_quantize(w, grid), expected)  # floor would give -0.5 for -0.2 and 0.0 for 0.3


@pytest.mark.parametrize("bits", BITS)
def test_fixed_point_chosen_format_does_not_saturate(bits):
    w = weights(sparsity=0.3) * 7
    grid = fixed_point_grid(w, bits)
    q = fake_quantize(w, grid)
    assert (q - w).abs().max() <= grid.scale / 2
    assert torch.all(q[w == 0] == 0)
    assert torch.log2(grid.scale) == torch.round(torch.log2(grid.scale))  # a power of two
    if bits >= 2:  # one more fraction bit would saturate the largest weight
        finer = fixed_point_grid(w, bits, int_bits=bits + int(torch.log2(grid.scale)) - 1)
        assert (fake_quantize(w, finer) - w).abs().max() > finer.scale / 2


@pytest.mark.parametrize("tensor", [torch.zeros(5, 7), torch.full((5, 7), 0.3), torch.full((5, 7), -2.0)])
@pytest.mark.parametrize("bits", [1, 8, 16])
def test_constant_and_all_zero_tensors(tensor, bits):
    for grid in (linear_grid(tensor, bits), fixed_point_grid(tensor, bits), linear_grid(tensor, max(bits, 2), True)):
        q = fake_quantize(tensor, grid)
        assert torch.isfinite(grid.scale).all() and grid.scale > 0
        assert (q - tensor).abs().max() <= grid.scale / 2 * (1 + 1e-5)
    assert torch.equal(decoded(kmeans_codebook(tensor, bits)), tensor)


@pytest.mark.parametrize("make", [lambda w: linear_grid(w, 8, True, axis=0), lambda w: linear_grid(w, 4, False, axis=0),
                                  lambda w: linear_grid(w, 4, True, axis=0, group_size=8),
                                  lambda w: fixed_point_grid(w, 8, axis=0)])
def test_a_group_of_zero_weights_takes_the_largest_step_of_the_others(make):
    """Its zeros stay exact whatever the step; an integer lowering rounds its channel's bias to input step times
    this one, so it is the coarsest of the others, not 1 (which rounded that bias to a whole input step)."""
    w = weights((6, 16), sparsity=0.0)
    w[2] = 0.0
    grid = make(w)
    rows = grid.scale.reshape(6, -1)
    assert bool((rows[2] == rows[[0, 1, 3, 4, 5]].max()).all()) and float(rows.max()) < 1
    assert bool((fake_quantize(w, grid, 0)[2] == 0).all())


def test_straight_through_gradient_is_one_inside_and_zero_where_saturated():
    w = torch.tensor([-5.0, -0.3, 0.1, 0.6, 5.0], requires_grad=True)
    grid = fixed_point_grid(w, 4, int_bits=2)  # range [-2, 1.75]
    fake_quantize(w, grid).sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def decoded(book):
    """The weight a codebook stands for, decoded independently of KMeansWeight."""
    table = torch.nn.functional.pad(book.centroids, (1, 0)) if book.fixed_zero else book.centroids
    axis = None if table.shape[0] == 1 else 0
    return from_rows(table.gather(1, as_rows(book.codes, axis).long()), book.codes.shape, axis)


@pytest.mark.parametrize("bits", BITS[:6])
def test_kmeans_codebook_nearest_centroid_and_zeros_kept(bits):
    w = weights()
    book = kmeans_codebook(w, bits)
    assert book.fixed_zero and book.centroids.shape == (1, 2 ** bits - 1)
    q = decoded(book)
    assert levels(q) <= 2 ** bits
    assert torch.all(q[w == 0] == 0) and torch.all(book.codes[w == 0] == 0)
    nonzero = w[w != 0]
    distance = (nonzero[:, None] - book.centroids[0][None, :]).abs()
    assert torch.all((q[w != 0] - nonzero).abs() <= distance.min(dim=1).values + 1e-7)  # nearest centroid


@pytest.mark.parametrize("bits, dtype", [(4, torch.uint8), (8, torch.uint8), (12, torch.int16), (16, torch.int32)])
def test_kmeans_codes_are_written_in_the_narrowest_type_and_are_the_labels_after_the_fixed_zero(bits, dtype):
    w = weights((64, 40), sparsity=0.3)  # 1792 distinct nonzeros: every one of 255 codes is used at 8 bits
    book = kmeans_codebook(w, bits)
    assert book.codes.dtype == dtype
    nonzero = w != 0
    labels = torch.from_numpy(kmeans1d(w[nonzero], 2 ** bits - 1).labels.astype(np.int64))
    assert torch.equal(book.codes[nonzero].long(), labels + 1) and torch.all(book.codes[~nonzero] == 0)
    if bits <= 8:  # the highest code, 2^bits - 1, fits the narrow type
        assert int(book.codes.max()) == 2 ** bits - 1
    unfixed = kmeans_codebook(w, bits, fix_zeros=False)
    assert unfixed.codes.dtype == dtype
    assert torch.equal(unfixed.codes.long().flatten(), torch.from_numpy(kmeans1d(w, 2 ** bits).labels.astype(np.int64)))


def test_kmeans_without_fix_zeros_clusters_the_zeros_too():
    w = weights(sparsity=0.5)
    book = kmeans_codebook(w, 2, fix_zeros=False)
    assert not book.fixed_zero and book.centroids.shape == (1, 4)
    assert levels(decoded(book)) <= 4


def test_kmeans_per_channel_codebooks():
    w = weights()
    book = kmeans_codebook(w, 3, axis=0, init="density")
    assert book.centroids.shape == (16, 7)
    q = decoded(book)
    for row, original in zip(q, w):
        assert levels(row) <= 8
        assert torch.all(row[original == 0] == 0)
    assert (q - w).pow(2).sum() < (decoded(kmeans_codebook(w, 3)) - w).pow(2).sum()


def test_kmeans_16_bits_is_lossless_on_a_small_tensor():
    w = weights()
    assert torch.equal(decoded(kmeans_codebook(w, 16)), w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(bad):
    w = weights()
    w[3, 4] = bad
    with pytest.raises(PreconditionError, match="layer fc2: 1 of 640 values are NaN/Inf"):
        check_finite(w, "layer fc2")
    with pytest.raises(PreconditionError):
        kmeans_codebook(w, 4)


def test_codes_of_integer_grids_are_exact_integers():
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    grid = linear_grid(w, 8)
    assert quantize(w, grid).dtype == torch.int32
