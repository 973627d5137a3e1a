"""Every pass of fxcompress.passes on exported graphs: it changes what it changes on the fx trace of the
same model, touches the same parameters, computes the same outputs, and the file reproduces them.

Three small models carry the table: a CNN with BatchNorm, an MLP behind a LayerNorm, and a GPT-2 block
as transformers writes it (HF's Conv1D layers, token and position tables, an LM head tied to the
token table).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import passes
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.passes import (ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerDynamicInt8,
                               LowerToEncoded, LowerToInteger, LowerToSparse, LowerWeightOnly, PruneChannels,
                               ScaleChannels, SparseGPT)
from fxcompress.quant.modules import ActivationQuant
from fxcompress.zoo import GPT2Block, gpt2_tokens


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _cnn():
    model = SmallCNN().eval()
    with torch.no_grad():  # statistics that are not the identity, so folding them is checked
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, 8, 8)


def _mlp():
    return nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), torch.randn(4, 16)


def _gpt2():
    return GPT2Block().eval(), gpt2_tokens()


MODELS = {"cnn": _cnn, "mlp": _mlp, "gpt2": _gpt2}
CONV1D = ("linear", "addmm")  # HF's Conv1D is the addmm kind: passes with a types field take it as linear

# pass -> (model, the compiles leading to it and it, whether its result is the same function on both
# front ends: kernel-choosing lowerings time candidates, so two runs may keep different ones)
PASSES = {
    FoldBatchNorm: ("cnn", [[FoldBatchNorm()]], True),
    InsertMasks: ("gpt2", [[InsertMasks(sparsity=0.5)]], True),
    InsertFakeQuant: ("gpt2", [[InsertFakeQuant(bits=4, method="kmeans")]], True),
    LowerToEncoded: ("gpt2", [[InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                              [LowerToEncoded()]], True),
    LowerToSparse: ("cnn", [[InsertMasks(sparsity=0.9)], [LowerToSparse(min_sparsity=0.0, repeats=2)]], False),
    LowerToInteger: ("cnn", [[FoldBatchNorm(), InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig())],
                             [LowerToInteger(backend="reference")]], True),
    LowerDynamicInt8: ("gpt2", [[LowerDynamicInt8(repeats=2)]], False),
    LowerWeightOnly: ("gpt2", [[InsertFakeQuant(method="linear", bits=4, group_size=16, types=CONV1D)],
                               [LowerWeightOnly(repeats=2)]], False),
    PruneChannels: ("gpt2", [[PruneChannels(amount=0.5)]], True),
    ScaleChannels: ("mlp", [[ScaleChannels(method="smoothquant")]], True),
    SparseGPT: ("gpt2", [[SparseGPT(sparsity=0.5, types=CONV1D)]], True),
}


def test_the_table_holds_every_pass():
    every = {getattr(passes, name) for name in passes.__all__} - {ActivationConfig}
    assert every == set(PASSES)


@functools.cache
def _program(name: str):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    return model, torch.export.export(model, (x,)), x


@functools.cache
def _graphs(name: str):
    """(fx trace, exported graph): the model through each front end once (the program unlifted and
    respelled at torch level), shared by the tests that run passes on them; compile copies a
    GraphModule, so each test starts from the same graph."""
    model, program, x = _program(name)
    return fxcompress.compile(model, [], (x,), frontend="fx"), fxcompress.compile(program, [], (x,))


def _run(source, steps, x):
    gm = source
    for step in steps:
        gm = fxcompress.compile(gm, step, (x,), calibration_data=[x, x])
    return gm


@pytest.mark.parametrize("pass_type", list(PASSES), ids=lambda t: t.__name__)
def test_every_pass_does_on_an_exported_graph_what_it_does_on_the_trace(pass_type):
    name, steps, same_function = PASSES[pass_type]
    _, _, x = _program(name)
    traced_graph, exported_graph = _graphs(name)
    traced = _run(traced_graph, steps, x)
    exported = _run(exported_graph, steps, x)
    assert exported.meta["frontend"] == "export"
    record, expected = fxcompress.history(exported)[-1], fxcompress.history(traced)[-1]
    assert record.name == pass_type.__name__ and record.changed and expected.changed
    assert sorted(record.params_touched) == sorted(expected.params_touched)
    for reasons in ("frozen", "skipped"):  # named by the user's module paths on both front ends
        assert record.stats.get(reasons) == expected.stats.get(reasons)
    with torch.no_grad():
        out = exported(x)
        if same_function:
            torch.testing.assert_close(out, traced(x), rtol=1e-4, atol=1e-3)  # op order differs a little
        assert torch.equal(from_bytes(to_bytes(exported))(x), out)


def test_an_exported_batch_norm_is_folded_like_a_traced_one_and_trains_like_the_models():
    model, program, x = _program("cnn")
    gm = fxcompress.compile(program, [], (x,))
    norms = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert norms == {"bn1": nn.BatchNorm2d, "bn2": nn.BatchNorm2d}
    assert gm.bn1.running_var is not model.bn1.running_var and torch.equal(gm.bn1.running_var, model.bn1.running_var)
    folded = fxcompress.compile(program, [FoldBatchNorm()], (x,))
    assert fxcompress.history(folded)[-1].stats["folded"] == {"conv1": "bn1", "conv2": "bn2"}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    trained, reference = gm.train(), fxcompress.compile(model, [], (x,), frontend="fx").train()
    torch.testing.assert_close(trained(x), reference(x), rtol=1e-5, atol=1e-5)  # batch statistics, as the model
    torch.testing.assert_close(trained.bn1.running_mean, reference.bn1.running_mean, rtol=0, atol=0)
    assert not torch.equal(trained.bn1.running_mean, model.bn1.running_mean)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_activation_grids_of_conv1d_layers_sit_on_their_input_not_on_their_bias(frontend):
    _, _, x = _program("gpt2")
    traced_graph, exported_graph = _graphs("gpt2")  # the model through each front end, shared
    gm = fxcompress.compile(traced_graph if frontend == "fx" else exported_graph,
                            [InsertFakeQuant(method="linear", bits=8, types=CONV1D, activations=ActivationConfig())],
                            (x,), calibration_data=[x])
    addmms = [n for n in gm.graph.nodes if n.target is torch.addmm]
    assert len(addmms) == 4
    for node in addmms:
        bias, inputs = node.args[0], node.args[1]
        assert bias.op == "get_attr" and bias.target.endswith(".bias"), node.format_node()
        assert inputs.op == "call_module" and isinstance(gm.get_submodule(inputs.target), ActivationQuant)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_tied_head_keeps_its_module_path_after_passes_share_its_weight(frontend):
    _, _, x = _program("gpt2")
    traced_graph, exported_graph = _graphs("gpt2")  # the model through each front end, shared
    gm = fxcompress.compile(traced_graph if frontend == "fx" else exported_graph, [InsertMasks(sparsity=0.5)], (x,))
    rows = [row["layer"] for row in fxcompress.summary(gm).rows]
    assert "lm_head (tied to wte)" in rows, rows


CONV1D_WEIGHTS = {"attn.c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "c_proj.weight"}
# each pass that works on linear layers, with what it needs first: HF's Conv1D layers must be among its layers
CONV1D_PASSES = {
    "masks": [[InsertMasks(sparsity=0.5)]],
    "kmeans": [[InsertFakeQuant(bits=4, method="kmeans")]],
    "gptq": [[InsertFakeQuant(method="linear", bits=4, group_size=16, rounding="gptq", types=CONV1D)]],
    "sparsegpt": [[SparseGPT(sparsity=0.5, types=CONV1D)]],
    "encoded": [[InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")], [LowerToEncoded()]],
    "sparse": [[InsertMasks(sparsity=0.9)], [LowerToSparse(min_sparsity=0.0, repeats=2)]],
    "weight_only": [[InsertFakeQuant(method="linear", bits=4, group_size=16, types=CONV1D)], [LowerWeightOnly(repeats=2)]],
    "dynamic_int8": [[LowerDynamicInt8(repeats=2)]],
    "channels": [[PruneChannels(amount=0.5)]],
    "integer": [[InsertFakeQuant(method="linear", bits=8, symmetric=True, types=CONV1D,
                                 activations=ActivationConfig())],
                [LowerToInteger(backend="reference")]],   # as integer linear layers of the transposed weights
}


@pytest.mark.parametrize("steps", list(CONV1D_PASSES.values()), ids=list(CONV1D_PASSES))
def test_conv1d_layers_are_linear_layers_for_every_layer_pass(steps):
    _, _, x = _program("gpt2")
    before = _run(_graphs("gpt2")[1], steps[:-1], x)
    gm = _run(before, steps[-1:], x)
    assert CONV1D_WEIGHTS <= set(fxcompress.history(gm)[-1].params_touched)
    with torch.no_grad():
        # each lowering claims the weights it lowered: the lowered model computes what it was given
        if steps[-1][0].__class__ in (LowerToSparse, LowerToEncoded, LowerToInteger):
            torch.testing.assert_close(gm(x), before(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(from_bytes(to_bytes(gm))(x), gm(x))


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_scale_channels_folds_norms_into_conv1d_layers_exactly(method):
    """ScaleChannels takes Conv1D layers as linear ones: ln_1 -> c_attn and ln_2 -> c_fc fold; AWQ also folds
    attn.c_proj's scales into the value piece of c_attn (SmoothQuant folds into norms only); c_proj reads c_fc's
    output through gelu, which no scale passes, so it is reported."""
    model, _, x = _program("gpt2")
    awq = {"group_size": 16, "clip": False}   # the fold alone: AWQ's clip changes weights on purpose
    gm = _run(_graphs("gpt2")[1], [[ScaleChannels(method=method, **(awq if method == "awq" else {}))]], x)
    record = fxcompress.history(gm)[-1]
    layers = record.stats["layers"]
    assert {"attn.c_attn.weight", "c_fc.weight"} <= set(record.params_touched)
    assert set(layers) == {name.rpartition(".")[0] for name in CONV1D_WEIGHTS}
    assert "skipped" in layers["c_proj"]
    if method == "awq":
        assert record.stats["layers_scaled"] == 3 and layers["attn.c_proj"]["producer"] == "attn.c_attn"
    else:
        assert record.stats["layers_scaled"] == 2 and "folds only into norms" in layers["attn.c_proj"]["skipped"]
    with torch.no_grad():
        assert not torch.equal(gm.get_parameter("c_fc.weight"), model.c_fc.weight)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)   # the rewrite is exact in float
