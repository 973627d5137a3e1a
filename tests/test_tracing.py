import dataclasses

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import TraceError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a traced value: torch.fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), DataDependent())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, double):
        y = self.fc(x)
        return y * 2 if double else y


def test_untraceable_model_names_module_path_op_and_hint():
    with pytest.raises(TraceError) as info:
        fxcompress.compile(Net(), [], example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "'body.1' (DataDependent)" in message
    assert "if x.sum() > 0" in message  # the user's line that could not be traced
    assert "leaf_modules=['body.1']" in message and "concrete_args" in message
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("leaf", ["body.1", DataDependent])
def test_leaf_modules_by_path_or_type_make_it_traceable(leaf):
    model, x = Net().eval(), torch.randn(2, 4)
    gm = fxcompress.compile(model, [], example_inputs=x, leaf_modules=[leaf])
    assert any(n.op == "call_module" and n.target == "body.1" for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))


def test_concrete_args_fix_a_branching_flag():
    model, x = Flagged().eval(), torch.randn(2, 4)
    with pytest.raises(TraceError, match="<root>"):
        fxcompress.compile(model, [], example_inputs=(x, True))
    gm = fxcompress.compile(model, [], example_inputs=(x, True), concrete_args={"double": True})
    assert torch.equal(gm(x, True), model(x, True))


def test_a_failure_in_the_root_forward_suggests_concrete_args_not_the_root_as_a_leaf():
    """The root module cannot be a leaf: the hint used to say leaf_modules=['']."""
    with pytest.raises(TraceError) as info:
        fxcompress.compile(Flagged().eval(), [], example_inputs=(torch.randn(2, 4), True), frontend="fx")
    assert "leaf_modules" not in str(info.value)
    assert "hint: pass concrete_args for inputs that the forward branches on" in str(info.value)


def test_compiled_graph_module_survives_torch_save(tmp_path):
    from fxcompress.passes import InsertMasks
    model, x = Net().eval(), torch.randn(2, 4)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=x, leaf_modules=["body.1"])
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)  # our own file, for users who want torch.save
    assert torch.equal(loaded(x), gm(x))
    assert fxcompress.history(loaded) == fxcompress.history(gm)


class PausesWhileTraced(nn.Module):
    """Halts its own trace until another thread has run a forward, so the two always overlap."""

    def __init__(self, while_traced):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.while_traced = while_traced

    def forward(self, x):
        self.while_traced()
        return self.fc(x)


def test_a_forward_in_another_thread_during_a_trace_runs_untouched():
    import threading

    from fxcompress.tracing import trace

    other, x = Net().eval(), torch.randn(2, 4)
    with torch.no_grad():
        expected = other(x)
    results = {}

    def run_other_model():
        with torch.no_grad():
            results["output"] = other(x)  # nn.Module.__call__ is patched by the trace meanwhile

    def while_traced():
        worker = threading.Thread(target=run_other_model)
        worker.start()
        worker.join()

    gm = trace(PausesWhileTraced(while_traced))
    assert torch.equal(results["output"], expected)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_every_traced_call_node_carries_the_users_line_and_both_front_ends_agree():
    import copy
    from pathlib import Path

    from fxcompress import zoo
    from fxcompress.zoo import GPTBlock

    from fxcompress.frontends import export_module
    from fxcompress.tracing import origin, source_line, trace

    model, x = GPTBlock().eval(), torch.randn(2, 8, 16)
    gm = copy.deepcopy(trace(model))  # compile works on a copy: the lines must survive it
    calls = [n for n in gm.graph.nodes if n.op.startswith("call_")]
    assert calls and all(source_line(n) and source_line(n).startswith("zoo.py:") for n in calls)
    assert not any(source_line(n) for n in gm.graph.nodes if n.op in ("placeholder", "output"))
    q = next(n for n in calls if n.target == "attn.q")
    text = "q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)"
    line = next(i for i, code in enumerate(Path(zoo.__file__).read_text().splitlines(), 1) if code.strip() == text)
    assert origin(q) == f"module 'attn.q' (Linear) at zoo.py:{line}: {text}"
    exported = export_module(model, (x,))
    linears = {n.args[1].target.rpartition(".")[0]: origin(n) for n in exported.graph.nodes
               if n.target is torch.nn.functional.linear}
    assert linears["attn.q"] == origin(q)


def test_source_lines_skip_torch_and_fxcompress_frames():
    from fxcompress.tracing import source_line

    node = torch.fx.Graph().placeholder("x")
    node.stack_trace = ('File "/site/model.py", line 7, in forward\n    y = self.fc(x)\n'
                        f'  File "{torch.__file__}", line 3, in forward\n    return F.linear(input, w)')
    assert source_line(node) == "model.py:7: y = self.fc(x)"
    node.stack_trace = f'File "{torch.__file__}", line 3, in forward\n    return F.linear(input, w)'
    assert source_line(node) is None


# ---- the model's own output classes --------------------------------------------------------------

@dataclasses.dataclass
class Record(dict):
    """A dict whose dataclass fields fill it, as Hugging Face's ModelOutput is (without needing transformers)."""

    logits: torch.Tensor
    hidden: torch.Tensor

    def __post_init__(self):
        self.update((field.name, getattr(self, field.name)) for field in dataclasses.fields(self))


class ReturnsRecords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        # a record, a record nested in a plain list and dict, and a plain tuple torch.fx keeps as it is
        return Record(logits=h * 2, hidden=h), [x, {"inner": Record(logits=h + 1, hidden=x)}], (h, x)


def test_the_fx_front_end_returns_the_models_output_classes(tmp_path):
    """torch.fx stores any dict as a plain one in the output node; the compiled forward (and an Interpreter run)
    returns the forward's own record classes, nested ones too, and keeps them through a pass and torch.save."""
    from fxcompress.passes import InsertMasks
    model, x = ReturnsRecords().eval(), torch.randn(2, 4)
    expected = model(x)

    def same(out):
        assert type(out) is tuple and type(out[0]) is Record and type(out[1]) is list and type(out[1][1]) is dict
        inner = out[1][1]["inner"]
        assert type(inner) is Record and list(inner) == ["logits", "hidden"] and list(out[0]) == ["logits", "hidden"]
        assert torch.equal(out[0].logits, expected[0].logits) and torch.equal(out[0]["hidden"], expected[0].hidden)
        assert torch.equal(inner.logits, expected[1][1]["inner"].logits) and torch.equal(out[1][0], x)
        assert type(out[2]) is tuple and torch.equal(out[2][0], expected[2][0])

    gm = fxcompress.compile(model, [], example_inputs=x)
    same(gm(x))
    same(torch.fx.Interpreter(gm).run(x))
    # the graph itself keeps plain dicts: the passes and the file format read the output node as fx writes it
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert type(output.args[0][0]) is not Record and isinstance(output.args[0][0], dict)

    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], example_inputs=x)
    assert fxcompress.history(masked)[-1].changed
    assert type(masked(x)[0]) is Record and type(masked(x)[1][1]["inner"]) is Record
    torch.save(masked, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert type(loaded(x)[0]) is Record and torch.equal(loaded(x)[0].logits, masked(x)[0].logits)


def test_a_forward_returning_plain_containers_keeps_the_plain_codegen():
    class Plain(nn.Module):
        def forward(self, x):
            return {"a": x * 2}, [x]

    gm = fxcompress.compile(Plain(), [], example_inputs=torch.randn(2))
    assert type(gm.graph._codegen) is torch.fx.CodeGen
    assert type(gm(torch.randn(2))[0]) is dict
