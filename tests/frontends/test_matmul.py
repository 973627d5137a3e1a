"""`x @ weight.T` over a stored weight is read as a linear layer on every front end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.layers import find_layers
from fxcompress.passes import InsertMasks


class Products(nn.Module):
    """Every spelling of a product with a transposed stored weight, and three that are no linear layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Parameter(torch.randn(8, 8)) for _ in range(5))
        self.plain = nn.Parameter(torch.randn(8, 8))  # x @ w: the weight's rows are its inputs, no linear layer
        self.shared = nn.Parameter(torch.randn(8, 8))  # its transpose read twice
        self.stack = nn.Parameter(torch.randn(2, 8, 8))  # not a matrix

    def forward(self, x):
        y = x @ self.a.T
        y = torch.matmul(y, self.b.t())
        y = y.matmul(self.c.transpose(0, 1))
        y = y @ self.d.permute(1, 0)
        y = torch.relu(y @ self.e.mT)
        shared = self.shared.T
        return (y @ self.plain) + (y @ shared) * shared.sum() + (y.unsqueeze(1) @ self.stack.transpose(-1, -2)).sum(1)


@pytest.mark.parametrize("frontend", ["fx", "export", "symbolic_trace"])
def test_products_with_a_transposed_stored_weight_are_linear_layers_with_the_same_outputs(frontend):
    torch.manual_seed(0)
    model, x = Products().eval(), torch.randn(3, 5, 8)
    source = torch.fx.symbolic_trace(model) if frontend == "symbolic_trace" else model
    gm = fxcompress.compile(source, [], (x,), frontend="auto" if frontend == "symbolic_trace" else frontend)
    assert sorted(layer.name for layer in find_layers(gm)) == ["a", "b", "c", "d", "e"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # one matrix product either way, bit for bit
    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], (x,))
    assert {r.split(".")[0] for r in fxcompress.history(masked)[-1].params_touched} >= {"a", "b", "c", "d", "e"}
