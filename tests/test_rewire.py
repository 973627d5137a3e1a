"""rewire.drop_unread: computations nothing reads go, anything with another effect stays."""
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule

import fxcompress
from fxcompress.frontends.guards import check_input_shape
from fxcompress.rewire import drop_unread, writes_in_place


class UnreadViews(nn.Module):
    """Views computed and never read, as a transformer's mask construction leaves them in an export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        positions = torch.arange(x.shape[1])
        positions.unsqueeze(0).unsqueeze(2)  # read by nothing
        x.unsqueeze(1)
        return self.fc(x)


def _targets(gm: GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_the_export_front_end_drops_views_nothing_reads():
    model = UnreadViews().eval()
    x = torch.randn(2, 4)
    program = torch.export.export(model, (x,), strict=False)
    exported_unsqueezes = sum("unsqueeze" in str(n.target) for n in program.graph.nodes)
    assert exported_unsqueezes == 3  # export keeps them: what the front end has to drop
    gm = fxcompress.compile(model, passes=[], example_inputs=(x,), frontend="export")
    assert [n.target for n in gm.graph.nodes if not n.users and n.op not in ("output", "placeholder")] == [
        check_input_shape]  # the input's traced shape, checked at each call: the one node read by nothing
    assert torch.unsqueeze not in _targets(gm) and torch.arange not in _targets(gm)
    assert "unsqueeze" not in gm.code  # the code is generated again: it computed them still, and torch.compile,
    y = torch.randn(5, 4)              # reading the graph's nodes by the code's lines, failed (IndexError)
    torch.testing.assert_close(gm(y), model(y))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(gm, backend="eager")(y), model(y))


def _graph_with_unread(make) -> GraphModule:
    """x -> make(graph, x) (its value unread) ; output x * 2."""
    graph = Graph()
    x = graph.placeholder("x")
    make(graph, x)
    graph.output(graph.call_function(operator.mul, (x, 2)))
    return GraphModule(nn.Module(), graph)


def test_calls_with_an_effect_stay_and_pure_ones_go():
    kept = {
        "in-place method": lambda g, x: g.call_method("add_", (x, 1)),
        "in-place function": lambda g, x: g.call_function(torch.relu_, (x,)),
        "inplace keyword": lambda g, x: g.call_function(F.relu, (x,), {"inplace": True}),
        "item assignment": lambda g, x: g.call_function(operator.setitem, (x, 0, 1.0)),
        "out tensor": lambda g, x: g.call_function(torch.add, (x, 1), {"out": x}),
        "random draw": lambda g, x: g.call_function(torch.rand_like, (x,)),
        "dropout": lambda g, x: g.call_function(F.dropout, (x, 0.5, True)),
        "assert": lambda g, x: g.call_function(torch._assert, (True, "checked")),
    }
    for what, make in kept.items():
        gm = _graph_with_unread(make)
        assert drop_unread(gm) == 0, what
    pure = _graph_with_unread(lambda g, x: g.call_method("unsqueeze", (g.call_function(torch.relu, (x,)), 0)))
    assert drop_unread(pure) == 2
    assert _targets(pure) == [operator.mul]


def test_an_in_place_write_someone_reads_through_its_input_runs():
    # x.add_(1) is unread as a value, but the output reads x after it: dropping it would change the result
    gm = _graph_with_unread(lambda g, x: g.call_method("add_", (x, 1)))
    drop_unread(gm)
    gm.recompile()
    assert torch.equal(gm(torch.zeros(3)), torch.full((3,), 2.0))


def test_writes_in_place_reads_names_keywords_and_setitem():
    assert writes_in_place("call_method", "mul_", {})
    assert writes_in_place("call_function", torch.sigmoid_, {})
    assert writes_in_place("call_function", F.hardtanh, {"inplace": True})
    assert writes_in_place("call_function", operator.setitem, {})
    assert writes_in_place("call_function", torch.mul, {"out": torch.zeros(1)})
    assert not writes_in_place("call_method", "mul", {})
    assert not writes_in_place("call_function", operator.__add__, {})  # a dunder is no in-place op
    assert not writes_in_place("call_function", F.relu, {"inplace": False})
