"""ParamOwnership: owners and readers of every parameter, under every name of a tied tensor."""
from torch import nn

from fxcompress.analyses import ParamOwnership
from fxcompress.pass_base import PassContext
from fxcompress.tracing import trace


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x)) + self.a.weight.sum()


def _ownership(model: nn.Module) -> ParamOwnership:
    gm = trace(model)
    return ParamOwnership.compute(gm, PassContext(example_inputs=None, gm=gm))


def test_a_tied_tensor_is_known_under_each_name_with_the_readers_of_all():
    own = _ownership(_Tied())
    # named_parameters() drops the second name of a tied tensor by default: b.weight and its reader went missing
    assert own.owner["a.weight"] == "a" and own.owner["b.weight"] == "b"
    get_attr = next(node.name for node in trace(_Tied()).graph.nodes if node.op == "get_attr")
    assert sorted(own.readers["a.weight"]) == sorted(own.readers["b.weight"]) == sorted(["a", "b", get_attr])
    assert own.readers["a.bias"] == ("a",) and own.readers["b.bias"] == ("b",)  # untied: their own module only


def test_untied_parameters_and_buffers_have_their_own_readers():
    own = _ownership(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3)).eval())
    assert own.readers["0.weight"] == ("_0",) and own.readers["2.weight"] == ("_2",)
    assert own.owner["1.running_mean"] == "1" and own.readers["1.running_mean"] == ("_1",)
