"""frontends.experts.grouped_mm: the grouped product of mixture-of-experts layers, on torch's kernel and on its own
loop."""
import pytest
import torch

from fxcompress.frontends.experts import grouped_mm


def _by_hand(x, w, offs):
    out, start = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype), 0
    for expert, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[expert]
        start = end
    return out


@pytest.mark.parametrize("inner, outer", [(16, 8), (6, 5)])  # torch's kernel takes the first, the loop the second
def test_each_expert_multiplies_its_rows(inner, outer):
    torch.manual_seed(0)
    x, w = torch.randn(12, inner), torch.randn(4, inner, outer)
    offs = torch.tensor([3, 3, 10, 12], dtype=torch.int32)  # expert 1 takes no row
    assert torch.equal(grouped_mm(x, w, offs), _by_hand(x, w, offs))


def test_a_transposed_view_of_stacked_matrices():
    torch.manual_seed(0)
    x, stored = torch.randn(9, 8), torch.randn(3, 12, 8)  # (experts, out, in), as transformers stores them
    offs = torch.tensor([2, 7, 9], dtype=torch.int32)
    weight = stored.transpose(-2, -1)
    product = grouped_mm(x, weight, offs)
    assert torch.equal(product, _by_hand(x, weight, offs))
    # the view read as the matrices it shows, not as its storage; the BLAS may sum a copied layout in
    # another order (on some CPUs one float32 step apart), so the copy is compared within rounding
    torch.testing.assert_close(product, _by_hand(x, weight.contiguous(), offs), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(product, _by_hand(x, stored.reshape(3, 8, 12), offs), atol=1e-3)


def test_gradients_of_both_operands():
    torch.manual_seed(0)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    x = torch.randn(10, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 6, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offs), (x, w))


def test_traced_graphs_hold_it_as_one_op():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2, 8, 4))

        def forward(self, x, offs):
            return grouped_mm(x, self.weight, offs)

    model, x = Experts(), torch.randn(6, 8)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    program = torch.export.export(model, (x, offs), strict=False)
    assert [n.target for n in program.graph.nodes if n.op == "call_function"] == [torch.ops.fxcompress.grouped_mm.default]
    assert torch.equal(program.module()(x, offs), model(x, offs))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, offs), model(x, offs))
    meta = grouped_mm(x.to("meta"), model.weight.detach().to("meta"), offs.to("meta"))
    assert meta.shape == (6, 4)
