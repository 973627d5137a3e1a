"""onnx.row_groups: slices and splits of rows at numbers read from tensors, kept as tensors, compute what the
graph computed."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.onnx.row_groups import keep_row_counts_as_tensors, rows_between, split_rows


@pytest.mark.parametrize("start, end", [(None, 3), (2, None), (0, 0), (1, 4), (4, 1), (-3, None), (None, -2),
                                        (-9, 9), (5, 7), (6, 6)])
def test_rows_between_tensor_bounds_equals_a_slice(start, end):
    x = torch.arange(18.0).reshape(6, 3)
    as_tensor = [None if b is None else torch.tensor(b) for b in (start, end)]
    assert torch.equal(rows_between(x, *as_tensor), x[start:end])
    assert torch.equal(rows_between(x, start, end), x[start:end])


@pytest.mark.parametrize("sizes", [[2, 0, 3, 1], [0, 6], [6], [1, 1, 1, 1, 1, 1]])
def test_split_rows_at_tensor_sizes_equals_torch_split(sizes):
    x = torch.arange(24.0).reshape(6, 4)
    got = split_rows(x, [torch.tensor(s) for s in sizes])
    expected = torch.split(x, sizes)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


class _Offsets(nn.Module):
    """Rows sorted by expert and sliced at the cumulative counts' `tolist`, as our front end splits grouped experts."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = nn.Linear(4, 3), nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x):
        expert = self.router(x).argmax(-1)
        order = torch.argsort(expert, stable=True)
        rows, offsets = x[order], torch.cumsum(torch.bincount(expert, minlength=3), 0).tolist()
        parts = [self.experts[0](rows[:offsets[0]]), self.experts[1](rows[offsets[0]:offsets[1]]),
                 self.experts[2](rows[offsets[1]:offsets[2]])]
        return torch.cat(parts)[torch.argsort(order)]


class _Counts(nn.Module):
    """Rows split at `.item()` counts, as JetMoE splits them."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        low = self.router(x)[:, 0] < 0
        order = torch.argsort(low.int(), descending=True, stable=True)
        first, second = torch.split(x[order], [low.sum().item(), (~low).sum().item()])
        return torch.cat([self.a(first), self.b(second)])[torch.argsort(order)]


@pytest.mark.parametrize("model, rewrites", [(_Offsets, 3), (_Counts, 1)])
def test_rows_sliced_at_read_numbers_compute_as_before_from_the_tensors(model, rewrites):
    torch.manual_seed(0)
    gm = fxcompress.compile(model().eval(), [], example_inputs=(torch.randn(8, 4),))
    rewritten = fxcompress.compile(model().eval(), [], example_inputs=(torch.randn(8, 4),))
    rewritten.load_state_dict(gm.state_dict())
    assert keep_row_counts_as_tensors(rewritten) == rewrites
    assert not [n for n in rewritten.graph.nodes if n.op == "call_method" and n.target in ("item", "tolist")]
    for rows in (8, 1, 13, 40):  # other counts per group, empty groups among them
        x = torch.randn(rows, 4) * 3
        assert torch.equal(rewritten(x), gm(x))


def test_a_read_number_with_another_use_leaves_the_graph_unchanged():
    class SizedByData(nn.Module):
        def forward(self, x):
            count = (x[:, 0] > 0).sum().item()
            return torch.cat([x[:count], x.new_zeros(count, x.shape[1])])
    gm = fxcompress.compile(SizedByData(), [], example_inputs=(torch.randn(6, 3),))
    before = gm.code
    assert keep_row_counts_as_tensors(gm) == 0
    assert gm.code == before and any(n.target == "item" for n in gm.graph.nodes)
