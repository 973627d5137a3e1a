"""onnx.respellings: each twin the ONNX export writes instead of a torch call computes what torch's op computes."""
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
