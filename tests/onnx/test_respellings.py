"""onnx.respellings: each twin the ONNX export writes instead of a torch call computes what torch's op computes."""
import operator

import pytest
import torch

from fxcompress.onnx import respellings


@pytest.mark.parametrize("n, dim, ends", [(1, -1, (None, None)), (2, 0, (None, None)), (1, 1, ("prepend", None)),
                                          (1, -1, ("prepend", "append")), (3, 1, (None, "append"))])
def test_diff_respelled_with_slices_equals_torch(n, dim, ends):
    torch.manual_seed(0)
    x = torch.randint(-5, 5, (4, 7))
    options = {end: torch.randint(-5, 5, (4, 2) if dim in (1, -1) else (2, 7)) for end in ends if end}
    assert torch.equal(respellings.diff_as_slices(x, n, dim, **options), torch.diff(x, n, dim, **options))


@pytest.mark.parametrize("repeats, dim", [(2, -1), (3, 0), (1, 1), (2, None), (torch.tensor([1, 0, 2]), 1)])
def test_repeat_interleave_respelled_as_a_broadcast_equals_torch(repeats, dim):
    x = torch.arange(24).reshape(2, 3, 4) if isinstance(repeats, int) else torch.arange(6).reshape(2, 3)
    assert torch.equal(respellings.repeat_interleave_as_expand(x, repeats, dim), torch.repeat_interleave(x, repeats, dim))


@pytest.mark.parametrize("x, dtype", [(torch.tensor([[True, False, True], [False, False, True]]), None),
                                      (torch.tensor([[True, False, True]]), torch.int32),
                                      (torch.tensor([[0.5, -1.0, 2.0]]), None)])
def test_cumsum_respelled_counts_bools_as_torch_does(x, dtype):
    got, expected = respellings.cumsum_counting(x, 1, dtype), torch.cumsum(x, 1, dtype=dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("values, bins, low, high", [
    ((torch.arange(64) * 5 % 8).float(), 8, 0, 7),  # expert ids, as a mixture of experts counts its tokens
    (torch.randn(500, generator=torch.Generator().manual_seed(0)), 10, -1.5, 2.0),  # elements outside the range
    (torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, -0.1, 1.1]), 4, 0.0, 1.0),
    (torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), 7, -0.5, 0.5)])
def test_histc_respelled_as_counted_bins_equals_torch(values, bins, low, high):
    got, expected = respellings.histc_counting(values, bins, low, high), torch.histc(values, bins, low, high)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert expected.sum() > 0


@pytest.mark.parametrize("dim, shape", [(0, (6, 5)), (1, (3, 6, 2)), (-1, (4, 6))])
def test_index_add_respelled_as_scatter_add_sums_repeated_indices_as_torch_does(dim, shape):
    torch.manual_seed(0)
    source = torch.randint(-8, 8, shape).float()  # integers: sums are exact in any order
    index = torch.tensor([0, 2, 2, 1, 0, 2])  # repeated: each of those rows is a sum
    input_shape = list(shape)
    input_shape[dim] = 3
    input = torch.randint(-8, 8, input_shape).float()
    expected = torch.index_add(input, dim, index, source, alpha=2)
    assert torch.equal(respellings.index_add_scattering(input, dim, index, source, alpha=2), expected)
    in_place = input.clone()
    assert respellings.index_add_scattering_(in_place, dim, index, source, alpha=2) is in_place
    assert torch.equal(in_place, expected)


def _written_into_slices() -> torch.fx.GraphModule:
    """torch.export's form of `keys = a.new_zeros(...); keys[..., :8] = a; keys[..., 8:] = b`: copies into views."""
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    keys = graph.call_method("new_zeros", (a, [2, 3, 16]))
    for source, bounds in ((a, slice(0, 8)), (b, slice(8, None))):
        view = graph.call_function(operator.getitem, (keys, (slice(None), slice(None), bounds)))
        graph.call_method("copy_", (view, source))
    graph.output(graph.call_function(operator.mul, (keys, 2)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_writes_into_views_become_item_assignments_the_exporter_keeps(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    expected = torch.cat([a, b], -1) * 2
    gm = _written_into_slices()
    assert torch.equal(gm(a, b), expected)
    torch.onnx.export(gm, (a, b), tmp_path / "copies.onnx", dynamo=False, input_names=["a", "b"])
    session = ort.InferenceSession(str(tmp_path / "copies.onnx"))
    assert [i.name for i in session.get_inputs()] == []  # both writes were lost: the file returns zeros
    assert not session.run(None, {})[0].any()
    assert respellings.writes_into_views_as_setitem(gm)
    gm.recompile()
    assert [n.target for n in gm.graph.nodes].count(operator.setitem) == 2 and torch.equal(gm(a, b), expected)
    torch.onnx.export(gm, (a, b), tmp_path / "assigned.onnx", dynamo=False, input_names=["a", "b"])
    session = ort.InferenceSession(str(tmp_path / "assigned.onnx"))
    got = session.run(None, {"a": a.numpy(), "b": b.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), expected)


def test_a_copy_into_a_tuple_element_is_no_item_assignment():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    parts = graph.call_function(torch.split, (x, 2))
    first = graph.call_function(operator.getitem, (parts, 0))
    graph.call_method("copy_", (first, graph.call_function(torch.ones_like, (first,))))
    graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert not respellings.writes_into_views_as_setitem(gm)
    assert torch.equal(gm(torch.zeros(4))[:2], torch.ones(2))


@pytest.mark.parametrize("indices, dim", [([2], 1), ([1, 3], -1), ([0, 5, 9], 1), ([-2], 0), (3, 1), ([4, 2], 1)])
def test_tensor_split_respelled_as_slices_equals_torch(indices, dim):
    x = torch.arange(3 * 7).reshape(3, 7)
    got, expected = respellings.tensor_split_as_slices(x, indices, dim), torch.tensor_split(x, indices, dim)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("dims, kernel, dilation", [(1, 3, 2), (1, 4, 3), (2, 3, (2, 1)), (2, (4, 3), 3), (3, 2, 3),
                                                    (2, 3, 1)])
def test_same_padded_convolution_twins_equal_torch(dims, kernel, dilation):
    """padding="same" as explicit pads: equal halves as the convolution's padding, odd totals (even kernel, odd
    dilation) as a zero pad of the input, more after than before as torch pads."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, *[7] * dims)
    weight = torch.randn(6, 2, *(kernel if isinstance(kernel, tuple) else (kernel,) * dims))
    conv = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[dims]
    twin = respellings.ONNX_RESPELLINGS[conv]
    bias = torch.randn(6)
    expected = conv(x, weight, bias, 1, "same", dilation, 2)
    assert torch.allclose(twin(x, weight, bias, 1, "same", dilation, 2), expected, atol=1e-5)
    assert torch.allclose(twin(x, weight, bias, padding="same", dilation=dilation, groups=2), expected, atol=1e-5)
    assert torch.equal(twin(x, weight, None, 2, 5, dilation, 2), conv(x, weight, None, 2, 5, dilation, 2))  # as it is
    assert torch.equal(twin(x, weight.narrow(1, 0, 1).repeat(1, 4, *[1] * dims)),  # torch's defaults: padding 0
                       conv(x, weight.narrow(1, 0, 1).repeat(1, 4, *[1] * dims)))
