from dataclasses import dataclass

import pytest
import torch

import fxcompress
from fxcompress.analyses import ParamOwnership, ShapeInfo, propagate_shapes
from fxcompress.errors import PreconditionError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.passes import ActivationConfig, InsertFakeQuant
from fxcompress.tracing import trace
from fxcompress.zoo import LeNet300100, ResNetSmall


def test_shapes_of_every_node_without_touching_bn_statistics():
    model = ResNetSmall().train()
    gm = trace(model)
    x = torch.randn(2, 3, 32, 32)
    info = ShapeInfo.compute(gm, PassContext(example_inputs=(x,), gm=gm))
    assert info.shape("stem_0") == (2, 16, 32, 32)
    assert info.shape("fc") == (2, 10)
    assert gm.training and gm.get_submodule("stem.1").training  # modes restored
    assert int(gm.get_submodule("stem.1").num_batches_tracked) == 0  # ran in eval mode


def test_ownership_maps_parameters_to_modules_and_readers():
    gm = trace(ResNetSmall())
    own = ParamOwnership.compute(gm, PassContext(example_inputs=None, gm=gm))
    assert own.owner["layer2.0.shortcut.0.weight"] == "layer2.0.shortcut.0"
    assert own.readers["fc.weight"] == ("fc",)
    assert own.readers["stem.1.running_mean"] == ("stem_1",)


def test_propagate_shapes_writes_every_node_and_is_what_shape_info_computes():
    gm = trace(ResNetSmall())
    x = torch.randn(2, 3, 32, 32)
    info = propagate_shapes(gm, (x,))
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes)
    assert dict(info.meta) == {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes}
    assert ShapeInfo.compute(gm, PassContext(example_inputs=(x,), gm=gm)) == info
    with pytest.raises(PreconditionError, match="example_inputs"):
        propagate_shapes(gm, None)


def test_same_as_compares_shapes_and_dtypes_of_the_nodes_it_describes():
    gm = trace(LeNet300100())
    x = torch.randn(2, 784)
    cached = propagate_shapes(gm, (x,))
    fc1 = next(n for n in gm.graph.nodes if n.target == "fc1")
    with gm.graph.inserting_after(fc1):
        extra = gm.graph.call_function(torch.cat, ((fc1, fc1), 1))  # a new node, read by nothing
    gm.recompile()
    assert cached.same_as(propagate_shapes(gm, (x,)))  # new nodes are not compared
    gm.fc1.weight.requires_grad_(False)
    assert cached.same_as(propagate_shapes(gm, (x,)))  # a gradient flag is not a shape
    gm.fc1, gm.fc2 = torch.nn.Linear(784, 200), torch.nn.Linear(200, 100)  # fc1 and relu narrow
    gm.graph.erase_node(extra)
    gm.recompile()
    assert not cached.same_as(propagate_shapes(gm, (x,)))
    assert not cached.same_as(propagate_shapes(trace(LeNet300100()).double(), (x.double(),)))  # dtypes


class _Residual(torch.nn.Module):
    """Two linear layers joined by an add: the join's operands are layer outputs of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_the_first_pass_finds_every_node_shape_in_meta_as_later_passes_do():
    """compile writes shapes before the first pass too: a pass reading node.meta sees the same graph
    facts on a freshly traced model as on one an earlier compile left (joins were left float on the former)."""
    seen = []

    @dataclass(frozen=True, kw_only=True)
    class Spy(Pass):
        def run(self, gm, ctx):
            seen.append(sum("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"))
            return PassResult(changed=False)

    x = torch.randn(4, 8)
    fxcompress.compile(_Residual().eval(), [Spy()], example_inputs=(x,))
    assert seen == [0]
    joins = InsertFakeQuant(method="linear", activations=ActivationConfig(joins=True))
    fresh = fxcompress.compile(_Residual().eval(), [joins], example_inputs=(x,), calibration_data=[(x,)])
    again = fxcompress.compile(fxcompress.compile(_Residual().eval(), [], example_inputs=(x,)), [joins],
                               example_inputs=(x,), calibration_data=[(x,)])
    quantized = [sorted(n for n, _ in gm.named_modules() if n.startswith("add_input")) for gm in (fresh, again)]
    assert quantized[0] == quantized[1] == ["add_input0_quant", "add_input0_quant.observer", "add_input1_quant",
                                            "add_input1_quant.observer"]


class _RowsAboveZero(torch.nn.Module):
    """Keeps the rows whose first value is positive: how many follows the data (as a router's rows per expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        count = (self.fc(x)[:, 0] > 0).sum().item()
        return self.fc(x)[:count] * 2, x + 1


def test_sizes_that_follow_the_data_are_compared_by_rank_only():
    torch.manual_seed(0)
    gm = trace(_RowsAboveZero())
    x = torch.randn(8, 4)
    before = propagate_shapes(gm, (x,))
    sized = before.data_sized
    assert any(n.op == "call_method" and n.target == "item" and n.name in sized for n in gm.graph.nodes)
    assert "mul" in sized and "add" not in sized and "x" not in sized  # x + 1 keeps its size whatever the data
    with torch.no_grad():  # new weights: another count of rows, the same graph
        gm.fc.bias.copy_(-gm.fc.bias.sign() * 10)
    after = propagate_shapes(gm, (x,))
    assert before.shape("mul") != after.shape("mul")
    assert before.same_as(after)
    assert not ShapeInfo(before.meta).same_as(after)  # what the comparison caught before data-sized nodes were known
