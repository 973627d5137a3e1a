"""The analysis manager: keys with parameters, preserved sets from pass results, the checking mode."""
import operator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

import fxcompress
from fxcompress.analyses import ParamOwnership, ShapeInfo
from fxcompress.analyses.shapes import _tensor_metadata, propagate_shapes
from fxcompress.execution import evaluating
from fxcompress.analysis import Analysis, analysis_key
from fxcompress.errors import ConfigError, VerificationError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.passes import InsertMasks, LowerToEncoded
from fxcompress.tracing import trace
from fxcompress.zoo import ZOO, LeNet300100


@dataclass(frozen=True)
class NodeCount(Analysis):
    """Nodes of one op kind (a parameter), counted."""

    op: str
    count: int

    @classmethod
    def compute(cls, gm, ctx, op="call_function"):
        return cls(op, sum(n.op == op for n in gm.graph.nodes))


class Relu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)).sum()


@dataclass(frozen=True, kw_only=True)
class Widen(Pass):
    """Doubles the width the relu sees (the summed output keeps its shape); `claim` is what it reports."""

    claim: tuple = ()

    def run(self, gm, ctx):
        ctx.get(ShapeInfo), ctx.get(ParamOwnership), ctx.get(NodeCount)
        relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
        with gm.graph.inserting_before(relu):
            wide = gm.graph.call_function(torch.cat, ((relu.args[0], relu.args[0]), 1))
        relu.replace_input_with(relu.args[0], wide)
        return PassResult(changed=True, preserved=self.claim)


@dataclass(frozen=True, kw_only=True)
class Count(Pass):
    """Reads NodeCount(op) and ParamOwnership; changes the graph (an identity add) when `change`."""

    change: bool = False
    preserves: ClassVar = (ParamOwnership,)
    claim: object = None

    def run(self, gm, ctx):
        ctx.get(NodeCount, op="call_module"), ctx.get(ParamOwnership)
        if self.change:
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                same = gm.graph.call_function(operator.add, (out.args[0], 0.0))
            out.replace_input_with(out.args[0], same)
        return PassResult(changed=self.change, preserved=self.claim)


def _context():
    gm = trace(LeNet300100())
    return PassContext(example_inputs=(torch.randn(2, 784),), gm=gm)


def test_one_class_serves_every_parameter_value():
    ctx = _context()
    functions, modules = ctx.get(NodeCount, op="call_function"), ctx.get(NodeCount, op="call_module")
    assert (functions.count, modules.count) == (3, 3)  # flatten, relu, relu ; fc1, fc2, fc3
    assert ctx.get(NodeCount) is functions  # the default parameter value is part of the key
    assert ctx.get(NodeCount, op="call_module") is modules
    assert ctx.analyses.computed == ["NodeCount(op='call_function')", "NodeCount(op='call_module')"]
    ctx.analyses.invalidate(keep=(analysis_key(NodeCount, op="call_module"),))
    assert ctx.analyses.cached(NodeCount, op="call_module") and not ctx.analyses.cached(NodeCount)
    ctx.get(NodeCount)
    ctx.analyses.invalidate(keep=(NodeCount,))  # a class keeps every key of it
    assert ctx.analyses.cached(NodeCount) and ctx.analyses.cached(NodeCount, op="call_module")
    ctx.analyses.invalidate()
    assert not ctx.analyses.keys()


def test_bad_parameters_name_the_analysis():
    ctx = _context()
    with pytest.raises(ConfigError, match="NodeCount.*colour"):
        ctx.get(NodeCount, colour="red")
    with pytest.raises(ConfigError, match=r"NodeCount\.op must be hashable"):
        ctx.get(NodeCount, op=["call_module"])
    with pytest.raises(ConfigError, match="ShapeInfo.*op"):
        ctx.get(ShapeInfo, op="x")  # an analysis without parameters takes none
    with pytest.raises(ConfigError, match="Analysis subclass"):
        ctx.get(int)


def _computed(passes, **kwargs):
    ctx_holder = []

    @dataclass(frozen=True, kw_only=True)
    class Spy(Pass):
        def run(self, gm, ctx):
            ctx_holder.append(ctx)
            return PassResult(changed=False)

    fxcompress.compile(LeNet300100().eval(), [*passes, Spy()], example_inputs=(torch.randn(2, 784),), **kwargs)
    return ctx_holder[0].analyses.computed


def test_the_result_preserved_set_wins_over_the_class_default():
    twice = ["NodeCount(op='call_module')", "ParamOwnership"] * 2
    assert _computed([Count(), Count()]) == twice[:2]  # nothing changed: everything kept
    assert _computed([Count(change=True), Count()]) == [*twice[:2], "NodeCount(op='call_module')"]
    assert _computed([Count(change=True, claim=()), Count()]) == twice  # this run kept nothing
    kept = (analysis_key(NodeCount, op="call_module"),)
    assert _computed([Count(change=True, claim=kept), Count()]) == [*twice[:2], "ParamOwnership"]


def test_a_malformed_preserved_set_names_the_pass():
    with pytest.raises(VerificationError, match=r"pass #0 Count.*preserved='ShapeInfo'"):
        _computed([Count(change=True, claim="ShapeInfo")])
    with pytest.raises(VerificationError, match=r"pass #0 Count.*preserved=\(<class 'int'>,\)"):
        _computed([Count(change=False, claim=(int,))])  # refused even from a run that changed nothing


@pytest.mark.parametrize("claim, lie", [((ShapeInfo,), "ShapeInfo"), ((ParamOwnership,), None),
                                        ((NodeCount,), "NodeCount\\(op='call_function'\\)")])
def test_checking_mode_catches_a_pass_that_lies_about_what_it_preserves(claim, lie):
    x = torch.randn(3, 4)
    compile_widen = lambda check: fxcompress.compile(Relu(), [Widen(claim=claim)], example_inputs=(x,),  # noqa: E731
                                                     check_analyses=check)
    compile_widen(False)  # without the check, the claim is believed
    if lie is None:  # widening adds no parameter and no reader: that claim is true
        compile_widen(True)
        return
    with pytest.raises(VerificationError, match=rf"pass #0 Widen.*declared {lie} preserved"):
        compile_widen(True)


def test_checking_mode_accepts_the_real_passes_claims():
    x = torch.randn(2, 784)
    gm = fxcompress.compile(LeNet300100().eval(), [InsertMasks(sparsity=0.5), Count(change=True)],
                            example_inputs=(x,), check_analyses=True)
    gm = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,), check_analyses=True)
    assert [r.name for r in fxcompress.history(gm)] == ["InsertMasks", "Count", "LowerToEncoded"]
    with pytest.raises(ConfigError, match="compile.check_analyses"):
        fxcompress.compile(LeNet300100(), [], example_inputs=(x,), check_analyses="yes")


def test_every_node_has_its_shape_after_a_pass_that_preserves_shapes():
    x = torch.randn(2, 784)
    seen = []

    @dataclass(frozen=True, kw_only=True)
    class MaskShapes(Pass):
        def run(self, gm, ctx):
            shapes = ctx.get(ShapeInfo)
            masks = [n for n in gm.graph.nodes if "mask" in n.name]
            seen.extend(shapes.shape(n.name) for n in masks + [user for n in masks for user in n.users])
            return PassResult(changed=False)

    assert ShapeInfo in InsertMasks.preserves
    gm = fxcompress.compile(LeNet300100().eval(), [InsertMasks(sparsity=0.5), MaskShapes()], example_inputs=(x,))
    masks = [n for n in gm.graph.nodes if "mask" in n.name]
    added = masks + [user for n in masks for user in n.users]  # the masks and the muls applying them
    assert len(added) == 6
    assert [tuple(n.meta["tensor_meta"].shape) for n in added] == [(300, 784), (100, 300), (10, 100)] * 2
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes)
    assert seen == [(300, 784), (100, 300), (10, 100)] * 2  # the next pass's ShapeInfo knows the new nodes


def _layouts():
    """Tensors in every memory format torch describes, and the edge cases of its contiguity rules."""
    x = torch.randn(2, 3, 4, 5)
    v = torch.randn(2, 3, 4, 5, 6)
    yield from (x, x.contiguous(memory_format=torch.channels_last), x.transpose(1, 2), x[:, :1], x[..., ::2],
                v, v.contiguous(memory_format=torch.channels_last_3d), v.permute(4, 3, 2, 1, 0),
                torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1).contiguous(memory_format=torch.channels_last),
                torch.randn(2, 1, 4, 4).contiguous(memory_format=torch.channels_last), torch.empty(0, 3, 4, 4),
                torch.empty(0, 3, 4, 4).contiguous(memory_format=torch.channels_last), torch.tensor(3.0),
                torch.randn(1), torch.randn(5).expand(3, 5), torch.randn(4, 6).t(), torch.randn(3, 4)[:, 1:],
                nn.Parameter(torch.randn(3, 4)), torch.randn(3, 4, dtype=torch.float64).requires_grad_(),
                torch.randint(0, 9, (2, 3, 2, 2), dtype=torch.int8).permute(0, 2, 3, 1),
                torch.randn(3, 4).to_sparse())


def test_shape_metadata_equals_torch_shape_prop_field_by_field():
    # compile's shape step describes tensors without torch._prims_common's symbolic checks: the same
    # TensorMetadata for every layout torch distinguishes, and the same node.meta on every zoo model
    for t in _layouts():
        assert _tensor_metadata(t) == _extract_tensor_metadata(t), (t.shape, t.stride())
    for name in ("densenet", "gpt_block", "mobilenetv2", "transformer"):
        make_model, make_input = ZOO[name]
        x = make_input()
        ours, theirs = trace(make_model().eval()), trace(make_model().eval())
        propagate_shapes(ours, (x,))
        with evaluating(theirs):  # as propagate_shapes runs it
            ShapeProp(theirs).propagate(x)
        for a, b in zip(ours.graph.nodes, theirs.graph.nodes, strict=True):
            assert (a.meta.get("tensor_meta"), a.meta["type"]) == (b.meta.get("tensor_meta"), b.meta["type"]), a.name
