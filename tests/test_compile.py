import copy
import io
import operator
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analyses import ParamOwnership, ShapeInfo
from fxcompress.config import check_real
from fxcompress.errors import ConfigError, UnknownOpError, UnknownOpWarning, VerificationError
from fxcompress.layers import find_layers, insert_on_weight
from fxcompress.pass_base import Pass, PassResult
from fxcompress.zoo import LeNet300100


@dataclass(frozen=True, kw_only=True)
class ScaleWeights(Pass):
    """Multiplies every linear / conv weight by `factor` through a mul node on its weight chain."""

    factor: float = 1.0
    preserves: ClassVar = (ShapeInfo,)

    def __post_init__(self):
        check_real("ScaleWeights", "factor", self.factor, 0.0, None)

    def run(self, gm, ctx):
        ctx.get(ShapeInfo)
        layers = find_layers(gm)
        for layer in layers:
            insert_on_weight(gm, layer, lambda g, w: g.call_function(operator.mul, (w, self.factor)))
        return PassResult(changed=bool(layers), params_touched=tuple(l.weight for l in layers),
                          stats={"layers": len(layers)})


@dataclass(frozen=True, kw_only=True)
class NeedsShapes(Pass):
    def run(self, gm, ctx):
        ctx.get(ShapeInfo)
        return PassResult(changed=False)


@dataclass(frozen=True, kw_only=True)
class NeedsOwnership(Pass):
    def run(self, gm, ctx):
        ctx.get(ParamOwnership)
        return PassResult(changed=False)


@dataclass(frozen=True, kw_only=True)
class Breaker(Pass):
    """Breaks the graph in a chosen way, to test verification."""

    how: str = "forward"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0]
        with gm.graph.inserting_before(out):
            if self.how == "forward":  # a matmul with a wrong shape fails at run time
                bad = gm.graph.call_function(torch.matmul, (value, torch.ones(3, 3)))
            elif self.how == "shape":  # output shape changes without the pass declaring it
                bad = gm.graph.call_function(torch.flatten, (value,))
            elif self.how == "widen":  # a new node of a new shape that the output does not see
                bad = gm.graph.call_function(torch.cat, ((value, value), 1))
                gm.graph.call_function(torch.sum, (bad,))
                return PassResult(changed=True)
            elif self.how == "silent_ok":  # looks at the graph, changes nothing
                return PassResult(changed=False)
            elif self.how == "raise":
                raise RuntimeError("boom")
            elif self.how == "silent":  # rewrites the graph but claims nothing changed
                bad = gm.graph.call_function(operator.add, (value, 0.0))
                out.replace_input_with(value, bad)
                return PassResult(changed=False)
        out.replace_input_with(value, bad)
        return PassResult(changed=True)


def test_no_passes_is_identity_on_zoo(zoo_model):
    name, model, inputs = zoo_model
    gm = fxcompress.compile(model, [], example_inputs=inputs)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(gm(*inputs), model(*inputs)), name


def test_pass_changes_graph_and_history_records_it():
    model, x = LeNet300100().eval(), torch.randn(4, 784)
    gm = fxcompress.compile(model, [ScaleWeights(factor=2.0)], example_inputs=(x,))
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul]
    assert len(muls) == 3
    (record,) = fxcompress.history(gm)
    assert record.name == "ScaleWeights" and record.config == {"factor": 2.0} and record.changed
    assert set(n.name for n in muls) <= set(record.nodes_created)
    assert len(record.nodes_erased) == 3  # the three call_module nodes became functional calls
    assert record.params_touched == ("fc1.weight", "fc2.weight", "fc3.weight")
    assert record.stats == {"layers": 3}
    assert "ScaleWeights(factor=2.0)" in fxcompress.format_history(gm)


def test_caller_model_is_not_mutated_unless_inplace():
    model, x = LeNet300100().eval(), torch.randn(4, 784)
    before = copy.deepcopy(model.state_dict())
    gm = fxcompress.compile(model, [ScaleWeights(factor=2.0)], example_inputs=(x,))
    gm.fc1.weight.data.zero_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shared = fxcompress.compile(model, [], example_inputs=(x,), inplace=True)
    assert shared.fc1.weight is model.fc1.weight


def test_graph_module_can_be_compiled_again_and_history_accumulates():
    x = torch.randn(4, 784)
    gm = fxcompress.compile(LeNet300100().eval(), [ScaleWeights(factor=2.0)], example_inputs=(x,))
    gm2 = fxcompress.compile(gm, [ScaleWeights(factor=0.5)], example_inputs=(x,))
    assert [r.config["factor"] for r in fxcompress.history(gm2)] == [2.0, 0.5]
    assert len(fxcompress.history(gm)) == 1  # the first GraphModule was copied, not changed
    with torch.no_grad():
        ref = LeNet300100().eval()
        ref.load_state_dict(gm2.state_dict())
        assert torch.allclose(gm2(x), ref(x), atol=1e-6)  # x2 then x0.5 is the identity


def test_analyses_are_shared_and_invalidated(monkeypatch):
    x = torch.randn(4, 784)
    model = LeNet300100().eval()
    calls = []
    original = ParamOwnership.compute.__func__

    def counting(cls, gm, ctx):
        calls.append(1)
        return original(cls, gm, ctx)

    monkeypatch.setattr(ParamOwnership, "compute", classmethod(counting))
    fxcompress.compile(model, [NeedsOwnership(), NeedsOwnership()], example_inputs=(x,))
    assert len(calls) == 1  # unchanged graph: computed once, shared by both passes
    calls.clear()
    fxcompress.compile(model, [NeedsOwnership(), ScaleWeights(factor=2.0), NeedsOwnership()], example_inputs=(x,))
    assert len(calls) == 2  # ScaleWeights changed the graph and preserves only ShapeInfo: recomputed after it
    calls.clear()
    fxcompress.compile(model, [NeedsOwnership(), Breaker(how="silent_ok"), NeedsOwnership()], example_inputs=(x,))
    assert len(calls) == 1  # a pass that changed nothing preserves everything


def test_shapes_are_computed_by_compile_after_each_change_not_by_passes(monkeypatch):
    x = torch.randn(4, 784)
    calls = []
    original = ShapeInfo.compute.__func__

    def counting(cls, gm, ctx):
        calls.append(1)
        return original(cls, gm, ctx)

    monkeypatch.setattr(ShapeInfo, "compute", classmethod(counting))
    gm = fxcompress.compile(LeNet300100().eval(), [NeedsShapes(), Breaker(how="widen"), NeedsShapes()],
                            example_inputs=(x,))
    assert calls == []  # compile's shape step serves both: before the first pass and after Breaker's change
    widened = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert tuple(widened.meta["tensor_meta"].shape) == (4, 20)  # a node the pass added has its shape


class Counter(nn.Module):
    """A leaf that counts the runs of the graph: compile's checks call it once per run."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_one_run_of_the_graph_checks_the_inputs_verifies_and_writes_shapes():
    model, x = nn.Sequential(nn.Linear(8, 8), Counter(), nn.Linear(8, 2)).eval(), torch.randn(4, 8)
    gm = fxcompress.compile(model, [ScaleWeights(factor=2.0), NeedsShapes()], example_inputs=(x,),
                            leaf_modules=(Counter,))
    # before the first pass, after ScaleWeights' change, after NeedsShapes (no change: verification only)
    assert gm.get_submodule("1").calls == 3
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    mul = next(n for n in gm.graph.nodes if n.target is operator.mul)  # a node the pass added
    assert tuple(mul.meta["tensor_meta"].shape) == (8, 8)
    first, last = model[0], model[2]
    with torch.no_grad():
        want = nn.functional.linear(nn.functional.linear(x, 2 * first.weight, first.bias), 2 * last.weight, last.bias)
        assert torch.allclose(gm(x), want, atol=1e-6)


def test_a_forward_hook_on_the_graph_module_runs_in_every_check():
    """A hook may change what calling the module returns: with one, the checks call the module itself."""
    x = torch.randn(4, 784)
    gm = fxcompress.compile(LeNet300100().eval(), [], example_inputs=(x,))
    seen = []
    gm.register_forward_hook(lambda module, args, out: seen.append(out.shape) or (out, out))
    compiled = fxcompress.compile(gm, [ScaleWeights(factor=2.0), NeedsShapes()], example_inputs=(x,), inplace=True)
    assert compiled is gm and seen == [(4, 10)] * 3  # the input check, after the change, after NeedsShapes
    with pytest.raises(VerificationError, match=r"pass #0 Breaker\(how='shape'\): outputs changed"):
        fxcompress.compile(gm, [Breaker(how="shape")], example_inputs=(x,), inplace=True)


def test_config_error_names_the_field():
    with pytest.raises(ConfigError, match=r"ScaleWeights\.factor"):
        ScaleWeights(factor=-1.0)
    with pytest.raises(ConfigError, match=r"ScaleWeights\.factor"):
        ScaleWeights(factor="big")
    with pytest.raises(ConfigError, match=r"passes\[0\]"):
        fxcompress.compile(LeNet300100(), ["prune"], example_inputs=(torch.randn(1, 784),))
    with pytest.raises(ConfigError, match="example_inputs"):
        fxcompress.compile(LeNet300100(), [])
    with pytest.raises(ConfigError, match="model"):
        fxcompress.compile("resnet", [], example_inputs=(torch.randn(1, 784),))


@pytest.mark.parametrize("passes, match", [
    (ScaleWeights(factor=2.0), r"compile.passes must be a list or tuple of Pass instances, got ScaleWeights "
                               r"ScaleWeights\(factor=2.0\) \(a single Pass: wrap it in a list"),
    (5, r"compile.passes must be a list or tuple of Pass instances, got int 5$"),
    ("prune", r"compile.passes must be a list or tuple of Pass instances, got str 'prune'$"),
])
def test_passes_not_a_list_is_refused_by_name(passes, match):
    with pytest.raises(ConfigError, match=match):
        fxcompress.compile(LeNet300100(), passes, example_inputs=(torch.randn(1, 784),))


@pytest.mark.parametrize("how, match", [
    ("forward", r"pass #1 Breaker\(how='forward'\): forward pass failed at node .*matmul"),
    ("shape", r"pass #1 Breaker\(how='shape'\): outputs changed"),
    ("raise", r"pass #1 Breaker\(how='raise'\) raised RuntimeError while handling node return fc3.*: boom"),
    ("silent", r"reported changed=False but rewrote nodes"),
])
def test_a_pass_that_breaks_the_graph_raises_verification_error(how, match):
    x = torch.randn(4, 784)
    with pytest.raises(VerificationError, match=match) as info:
        fxcompress.compile(LeNet300100().eval(), [ScaleWeights(factor=1.0), Breaker(how=how)], example_inputs=(x,))
    if how in ("forward", "raise"):
        assert info.value.__cause__ is not None


def test_lint_failure_is_reported():
    @dataclass(frozen=True, kw_only=True)
    class Unordered(Pass):
        def run(self, gm, ctx):
            nodes = list(gm.graph.nodes)
            out = nodes[-1]
            with gm.graph.inserting_before(nodes[1]):  # uses the output value before it is computed
                gm.graph.call_function(torch.relu, (out.args[0],))
            return PassResult(changed=True)

    with pytest.raises(VerificationError, match=r"pass #0 .*Unordered\(\): the graph does not lint: Argument 'fc3' of Node 'relu_2'"):
        fxcompress.compile(LeNet300100().eval(), [Unordered()], example_inputs=(torch.randn(2, 784),))


def test_training_flags_and_bn_statistics_survive_compile():
    from fxcompress.zoo import VGGBN
    model = VGGBN().train()
    gm = fxcompress.compile(model, [], example_inputs=(torch.randn(2, 3, 32, 32),))
    assert gm.training and all(m.training for m in gm.modules())
    assert torch.equal(gm.get_submodule("features.1").running_mean, model.features[1].running_mean)
    assert int(gm.get_submodule("features.1").num_batches_tracked) == 0


def test_output_structures_are_checked_for_tuple_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    gm = fxcompress.compile(TwoHeads(), [ScaleWeights(factor=3.0)], example_inputs=torch.randn(2, 4))
    assert set(gm(torch.randn(2, 4))) == {"a", "b"}


class TwoInputs(nn.Module):
    """A model whose second input goes through a submodule, functionally, for input-error messages."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(8, 4)
        self.side = nn.Sequential(nn.ReLU(), Project())

    def forward(self, x, y):
        return self.image(x) + self.side(y)


class Project(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, y):
        return torch.nn.functional.linear(y, self.weight)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("inputs, match", [
    ((torch.randn(4, 3, 28, 28),), r"example_inputs\[0\] \(shape \(4, 3, 28, 28\), dtype torch.float32\) reaches "
                                   r"module 'fc1' \(Linear\) at zoo.py:\d+: return self.fc3\(F.relu\(self.fc2\(F.relu\(self.fc1\(x\)"
                                   r"\)\)\)\), which failed at %fc1 .*RuntimeError: mat1 and mat2 shapes"),
    ((torch.randn(4, 784, dtype=torch.float64),), r"example_inputs\[0\] \(shape \(4, 784\), dtype torch.float64\) "
                                                  r"reaches module 'fc1' \(Linear\) at zoo.py.*must have the same dtype"),
    ((torch.randn(4, 784), torch.randn(4, 784)), r"2 inputs given, the model's forward takes \['x'\]"),
])
def test_example_inputs_the_model_cannot_run_are_a_config_error_naming_them(inputs, match, verify):
    with pytest.raises(ConfigError, match=r"compile.example_inputs do not fit the model \(no pass has run yet\): "
                                          + match):
        fxcompress.compile(LeNet300100().eval(), [ScaleWeights(factor=2.0)], example_inputs=inputs, verify=verify)


def test_a_bad_input_among_several_is_named_with_the_module_it_reaches():
    good, bad = torch.randn(2, 8), torch.randn(2, 5)
    with pytest.raises(ConfigError, match=r"example_inputs\[1\] \(shape \(2, 5\), dtype torch.float32\) reaches "
                                          r"module 'side.1' \(Project\) at test_compile.py:\d+: return torch.nn.functional.linear"
                                          r"\(y, self.weight\), which failed at %linear"):
        fxcompress.compile(TwoInputs(), [], example_inputs=(good, bad))
    assert fxcompress.compile(TwoInputs(), [], example_inputs=(good, torch.randn(2, 6))) is not None


@pytest.mark.parametrize("inplace", [False, True])
def test_history_survives_torch_save_and_load_into_the_next_compile(inplace, tmp_path):
    x = torch.randn(4, 784)
    gm = fxcompress.compile(LeNet300100().eval(), [ScaleWeights(factor=2.0)], example_inputs=(x,))
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    again = fxcompress.compile(loaded, [ScaleWeights(factor=0.5)], example_inputs=(x,), inplace=inplace)
    assert [(r.name, r.config["factor"]) for r in fxcompress.history(again)] == [("ScaleWeights", 2.0),
                                                                                 ("ScaleWeights", 0.5)]
    assert [r.config["factor"] for r in fxcompress.history(copy.deepcopy(again))] == [2.0, 0.5]


def test_concurrent_compiles_of_different_models_all_succeed_and_match_single_threaded():
    """torch.fx tracing patches nn.Module.__call__ process-wide: a forward in another thread must wait."""
    from concurrent.futures import ThreadPoolExecutor

    from fxcompress.zoo import ZOO

    names = ["gpt_block", "lenet300", "lenet5", "senet", "transformer"]  # the quickest zoo models, of every kind
    models = {name: (ZOO[name][0]().eval(), ZOO[name][1]()) for name in names}

    def compiled_output(name):
        model, x = models[name]
        gm = fxcompress.compile(model, [], example_inputs=(x,))  # trace, verify, shapes: all a compile races on
        with torch.no_grad():
            return gm(x)

    expected = {name: compiled_output(name) for name in names}
    jobs = [names[i % len(names)] for i in range(40)]  # 4 threads x 10 compiles
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(compiled_output, jobs))
    assert all(torch.equal(out, expected[name]) for name, out in zip(jobs, outputs))


@pytest.mark.parametrize("flag, value", [("inplace", 1), ("verify", "no"), ("progress", None)])
def test_boolean_options_take_only_booleans(flag, value):
    with pytest.raises(ConfigError, match=rf"compile.{flag} must be True or False, got {value!r}"):
        fxcompress.compile(LeNet300100(), [], example_inputs=torch.randn(2, 784), **{flag: value})


class Mixer(nn.Module):
    """A weight applied by matmul: no layer kind, so no layer pass can see it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.relu(x @ self.w)


class MixerWithLayers(Mixer):
    """The same unknown op beside an MLP whose hidden channels can be pruned and weights masked."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) + super().forward(x)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class RunningSum(nn.Module):
    """Two linear layers around an op the channel tables do not know: it freezes their channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.logcumsumexp(self.fc1(x), dim=-1))


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x, dim=-1)


def _pass(name):
    from fxcompress.passes import InsertMasks, PruneChannels
    return {"masks": InsertMasks(sparsity=0.5), "channels": PruneChannels(amount=0.5)}[name]


@pytest.mark.parametrize("model, x, op", [
    (RunningSum, torch.randn(2, 8), r"torch.logcumsumexp at module '<root>' at test_compile.py:\d+: "
                                    r"return self.fc2\(torch.logcumsumexp\(self.fc1\(x\), dim=-1\)\)"),
    (Recurrent, torch.randn(2, 5, 8), r"LSTM 'rnn' at module 'rnn' \(LSTM\) at test_compile.py:\d+: "
                                      r"return self.rnn\(x\)\[0\]"),
])
def test_a_pass_that_changes_nothing_names_the_ops_it_does_not_know(model, x, op):
    with pytest.warns(UnknownOpWarning, match=r"pass #0 PruneChannels\(.*\) changed nothing, and the graph holds 1 "
                                              r"op\(s\) it does not know: " + op):
        gm = fxcompress.compile(model().eval(), [_pass("channels")], x)
    assert fxcompress.history(gm)[0].changed is False
    with pytest.raises(UnknownOpError, match=op):
        fxcompress.compile(model().eval(), [_pass("channels")], x, strict=True)


def test_an_aten_op_the_front_end_left_unspelled_is_named_with_the_users_line():
    program = torch.export.export(Cumulative(), (torch.randn(2, 8),))
    with pytest.warns(UserWarning) as caught:  # the front end warns as well, when it meets the op
        fxcompress.compile(program, [_pass("channels")], torch.randn(2, 8))
    unknown = [str(w.message) for w in caught if w.category is UnknownOpWarning]
    assert len(unknown) == 1 and re.search(r"aten.logcumsumexp.default at module '<root>' \(Cumulative\) at "
                                           r"test_compile.py:\d+: return torch.logcumsumexp\(x, dim=-1\)", unknown[0])


def test_a_layer_pass_that_finds_no_layer_names_the_ops_it_could_not_read():
    with pytest.raises(ConfigError, match=r"InsertMasks selects no layer") as info:
        fxcompress.compile(Recurrent(), [_pass("masks")], torch.randn(2, 5, 8))
    assert re.search(r"pass #0 InsertMasks\(.*\): the graph holds 1 op\(s\) it does not know: LSTM 'rnn' at module "
                     r"'rnn' \(LSTM\) at test_compile.py", info.value.__notes__[0])


@pytest.mark.parametrize("model, passes, changed", [
    (MixerWithLayers, ["masks", "channels"], [True, True]),  # an unknown op is there, but each pass changes something
    (LeNet300100, ["masks", "masks"], [True, False]),  # the second changes nothing, and knows every op (masks too)
])
def test_no_warning_where_a_pass_changes_something_or_knows_every_op(model, passes, changed):
    x = torch.randn(2, 784 if model is LeNet300100 else 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownOpWarning)
        gm = fxcompress.compile(model().eval(), [_pass(name) for name in passes], x, strict=True)
    assert [record.changed for record in fxcompress.history(gm)] == changed


def test_strict_takes_only_booleans():
    with pytest.raises(ConfigError, match="compile.strict must be True or False"):
        fxcompress.compile(LeNet300100(), [], torch.randn(2, 784), strict=1)


class _Terminal(io.StringIO):
    def isatty(self):  # tqdm draws only on a terminal
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_progress_names_each_layer_on_a_terminal_only_when_asked(progress):
    from fxcompress.pass_base import PassContext
    layers = find_layers(fxcompress.compile(LeNet300100(), [], torch.randn(2, 784)))
    screen = _Terminal()
    seen = list(PassContext(example_inputs=(), progress=progress).each(layers, "encoding", file=screen))
    assert seen == layers  # the items pass through unchanged, in order
    drawn = screen.getvalue()
    assert (("encoding" in drawn and all(l.name in drawn for l in layers)) if progress else drawn == "")
    off_terminal = io.StringIO()
    assert list(PassContext(example_inputs=(), progress=progress).each(layers, "x", file=off_terminal)) == layers
    assert off_terminal.getvalue() == ""  # not a terminal: tqdm stays silent


class _ReturnsADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x), "all": [x, self.fc(x)]}


def test_a_pass_that_changes_nothing_on_a_model_returning_a_dict_verifies():
    """The first run reads the outputs through the interpreter (torch.fx's immutable dict and list), a pass that
    changes nothing is verified by calling the module (plain ones): the two used to differ, so FoldBatchNorm on a
    model without BatchNorm, or ScaleChannels with nothing to scale (Hugging Face's ResNet), was refused as
    changing the outputs."""
    from fxcompress.passes import FoldBatchNorm
    x = torch.randn(2, 4)
    gm = fxcompress.compile(_ReturnsADict().eval(), [FoldBatchNorm()], example_inputs=(x,))
    assert fxcompress.history(gm)[-1].changed is False
    out = gm(x)
    assert type(out) is dict and type(out["all"]) is list and torch.equal(out["all"][0], x)


@dataclass(frozen=True, kw_only=True)
class EditsInPlace(Pass):
    """Changes what the model computes without touching a node, and reports changed=False."""

    how: str

    def run(self, gm, ctx):
        with torch.no_grad():
            if self.how == "scale":  # a weight scaled by 1%
                gm.fc1.weight.mul_(1.01)
            elif self.how == "scale_data":  # through .data, which no version counter sees
                gm.fc1.weight.data.mul_(1.01)
            elif self.how == "swap":  # two output channels of the last layer swapped
                gm.fc3.weight[[0, 1]] = gm.fc3.weight[[1, 0]].clone()
            elif self.how == "module":  # a submodule replaced by a fresh one
                gm.fc2 = nn.Linear(300, 100)
            elif self.how == "new_graph_module":  # a new GraphModule with other weights
                new = copy.deepcopy(gm)
                new.fc1.weight.mul_(2)
                return PassResult(changed=False, gm=new)
        return PassResult(changed=False)


@pytest.mark.parametrize("how", ["scale", "scale_data", "swap", "module", "new_graph_module"])
def test_a_pass_that_changes_the_outputs_but_reports_no_change_is_refused(how):
    """The node diff sees only rewritten nodes: a weight edited in place used to pass verification, and history
    recorded a pass that changed nothing."""
    x = torch.randn(4, 784)
    with pytest.raises(VerificationError, match=rf"pass #1 EditsInPlace\(how='{how}'\) reported changed=False, "
                                                r"but the outputs on example_inputs changed: output 0 fc3"):
        fxcompress.compile(LeNet300100().eval(), [ScaleWeights(factor=1.0), EditsInPlace(how=how)],
                           example_inputs=(x,))


class _Buffered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return {"y": self.fc(x) + self.shift, "x": x}


def test_a_buffer_edited_by_a_pass_that_reports_no_change_is_named_by_output():
    @dataclass(frozen=True, kw_only=True)
    class ShiftsBuffer(Pass):
        def run(self, gm, ctx):
            gm.shift.add_(1e-3)
            return PassResult(changed=False)

    with pytest.raises(VerificationError, match=r"output 0 add .*at test_compile.py.*changed=True"):  # y, not x
        fxcompress.compile(_Buffered().eval(), [ShiftsBuffer()], example_inputs=torch.randn(2, 4))


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.randn(3)


def test_a_pass_that_changes_nothing_on_a_model_with_random_draws_verifies():
    """The graph does not reproduce its own outputs there: no conclusion about the pass is drawn."""
    gm = fxcompress.compile(_Noisy().eval(), [Breaker(how="silent_ok")], example_inputs=torch.randn(2, 4))
    assert fxcompress.history(gm)[-1].changed is False


def test_a_pass_that_changes_nothing_verifies_and_one_that_scales_reports_its_change():
    model, x = LeNet300100().eval(), torch.randn(4, 784)
    gm = fxcompress.compile(model, [Breaker(how="silent_ok"), ScaleWeights(factor=1.01)], example_inputs=x)
    assert [r.changed for r in fxcompress.history(gm)] == [False, True]
    assert not torch.allclose(gm(x), model(x))  # a change a pass reports is the pass's to make


@pytest.mark.parametrize("kwargs, match", [
    ({"leaf_modules": ["fc9"]}, r"compile.leaf_modules: LeNet300100 has no module at path 'fc9'"),
    ({"leaf_modules": ["fc1.weight"]}, r"no module at path 'fc1.weight' \(paths near it: \['fc1'\]\)"),
    ({"leaf_modules": "fc1"}, r"compile.leaf_modules must be a list .* got str 'fc1' \(wrap it in a list: \['fc1'\]\)"),
    ({"leaf_modules": [3]}, r"compile.leaf_modules: 3 is neither an nn.Module subclass nor a module path"),
    ({"leaf_modules": [""]}, r"compile.leaf_modules: '' is the root module itself, which cannot be a leaf"),
    ({"concrete_args": {"flag": True}}, r"compile.concrete_args: LeNet300100.forward takes no argument 'flag' "
                                        r"\(it takes \['x'\]\)"),
    ({"concrete_args": [("x", None)]}, r"compile.concrete_args must be a dict .* got list"),
    ({"concrete_args": {"x": None}, "frontend": "export"}, r"concrete_args are options of the fx front end"),
    ({"leaf_modules": ["fc1"], "frontend": "export"}, r"leaf_modules are options of the fx front end"),
])
def test_leaf_modules_and_concrete_args_that_mean_nothing_are_refused_by_name(kwargs, match):
    """torch.fx ignored a leaf path no module has (the module it meant was traced through and compressed) and a
    concrete argument the forward does not take; the export front end ignored both."""
    with pytest.raises(ConfigError, match=match):
        fxcompress.compile(LeNet300100().eval(), [], example_inputs=torch.randn(2, 784), **kwargs)


class _FlagAfterALoop(nn.Module):
    """torch.fx cannot trace the loop over a traced value; torch.export can, but it would fix `double` to its
    default."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, double: bool = False):
        y = self.fc(x)
        if y.shape[0] > 1:  # a size in control flow: fx refuses, export specializes
            y = y + 0
        return y * 2 if double else y


def test_the_export_fallback_is_not_taken_where_it_would_drop_concrete_args():
    model, x = _FlagAfterALoop().eval(), torch.randn(2, 4)
    with pytest.raises(fxcompress.errors.TraceError) as info:
        fxcompress.compile(model, [], example_inputs=x, concrete_args={"double": True})
    assert "the torch.export fallback was not tried: it cannot honour concrete_args" in "\n".join(
        getattr(info.value, "__notes__", []))
    # what the fallback used to return: the forward at the default double=False
    assert torch.equal(fxcompress.compile(model, [], example_inputs=x)(x), model(x, False))


class _OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        y = self.fc(x)
        return y if scale is None else y * scale


def test_an_argument_left_at_its_default_none_is_named_with_the_concrete_args_fix():
    x = torch.randn(2, 4)
    with pytest.raises(ConfigError, match=r"torch.fx traced \['scale'\] as tensors .* concrete_args=\{'scale': value\}"):
        fxcompress.compile(_OptionalScale().eval(), [], example_inputs=x)
    model = _OptionalScale().eval()
    gm = fxcompress.compile(model, [], example_inputs=x, concrete_args={"scale": None})
    assert torch.equal(gm(x), model(x))


def test_the_export_fallback_is_taken_where_the_concrete_args_are_the_defaults_it_runs_with():
    model, x = _FlagAfterALoop().eval(), torch.randn(2, 4)
    gm = fxcompress.compile(model, [], example_inputs=x, concrete_args={"double": False})
    assert torch.equal(gm(x), model(x))
