"""The torch.export front end: exported models compile, every pass works on them, names stay the user's."""
from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from zeroing import pick_half, zero_classes
from fxcompress.channels import ChannelGraph
from fxcompress.errors import ConfigError, TraceError
from fxcompress.fileformat.allowlist import FUNCTION_NAMES, METHODS
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.frontends.export import SPELLINGS
from fxcompress.inspection import channel_graph
from fxcompress.layers import find_layers, layer_kind
from fxcompress.pass_base import PassContext
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded, PruneChannels
from fxcompress.tracing import trace

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(y + self.bn(self.conv(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Attention(nn.Module):
    """q / k / v projections viewed into heads, attention, output projection, then an MLP."""

    def __init__(self, sdpa: bool = True, width: int = 32, heads: int = 4):
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def _split(self, t):
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(x.shape)
        y = x + self.out(a)
        return self.down(F.relu(self.up(y)))


class ShapeBranching(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.even, self.odd = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        if x.shape[0] % 2 == 0:  # the line fx fails on
            return self.even(x)
        return self.odd(x)


class EmbedSliceSplit(nn.Module):
    """An embedding table, slices and a select, a split and a cat: the aten spellings of indexing."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 12)

    def forward(self, tokens):
        y = self.fc(self.embed(tokens))[:, 1:]           # aten.slice with its step left out
        first, rest = torch.split(y, [4, 8], dim=-1)
        return torch.cat([rest, first * y[:, :, 0:1]], dim=-1)[..., ::2] + y[:, 0].unsqueeze(1)[..., :6]


MODELS = {
    "embedding_slicing": (EmbedSliceSplit, lambda: torch.randint(0, 20, (3, 5))),
    "mlp": (MLP, lambda: torch.randn(4, 16)),
    "cnn": (ResidualCNN, lambda: torch.randn(2, 3, 8, 8)),
    "attention_sdpa": (Attention, lambda: torch.randn(2, 5, 32)),
    "attention_softmax": (lambda: Attention(sdpa=False), lambda: torch.randn(2, 5, 32)),
    "shape_branching": (ShapeBranching, lambda: torch.randn(4, 16)),
}


def _model(name: str):
    torch.manual_seed(0)
    make, inputs = MODELS[name]
    model = make().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so slicing them is checked
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model, (inputs(),)


@functools.cache
def _exported(name: str):
    """(model, inputs, the model through compile's export front end): exported once per model for the
    tests that start from its graph; compile copies a GraphModule, so each starts from the same one."""
    model, inputs = _model(name)
    return model, inputs, fxcompress.compile(model, [], inputs, frontend="export")


@functools.cache
def _program(name: str):
    """(model, inputs, torch.export's program of the model), for the tests that hand compile a program."""
    model, inputs = _model(name)
    return model, inputs, torch.export.export(model, inputs)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _aten_ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_graph_is_torch_level_with_the_users_names(name):
    model, inputs, gm = _exported(name)
    assert gm.meta["frontend"] == "export"
    assert _aten_ops(gm) == []  # every op of these models has a torch-level spelling
    exported = {layer.name: layer.kind for layer in find_layers(gm)}
    used = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    assert set(exported) == {path for path, m in model.named_modules() if layer_kind(m) and path in used}
    assert all(exported[path] == layer_kind(model.get_submodule(path)) for path in exported)
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


class Miscellany(nn.Module):
    """HF's Conv1D (addmm with a transposed weight), RMSNorm, rotary-style sin / cos, a mask by
    comparison, a group norm: the spellings of the table that the other test models do not reach."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
        self.norm, self.group = nn.RMSNorm(6), nn.GroupNorm(2, 6)

    def forward(self, x):
        y = torch.addmm(self.bias, x, self.weight.t().t())
        y = self.group(self.norm(y)) * torch.cos(y) + torch.sin(y)
        return torch.where(y > 0, y, y.masked_fill(y < -1, 0.0)) + (y == 0) + (y != 1) + (y <= 2) + (y >= 3)


def test_the_rest_of_the_table_is_spelled_at_torch_level():
    model, x = Miscellany().eval(), torch.randn(3, 8)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert _aten_ops(gm) == []
    used = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.addmm, torch.t, F.rms_norm, F.group_norm, torch.cos, torch.sin, torch.where, torch.masked_fill,
            operator.gt, operator.lt, operator.eq, operator.ne, operator.le, operator.ge} <= used
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)



class ArchitectureSpellings(nn.Module):
    """What more Hugging Face architectures write: Falcon's `x @ weight.T` (a linear layer), GPT-J's and Cohere's interleaved
    rotary tables (repeat_interleave by an int), a mixture-of-experts router's topk and sort, EfficientNet's
    padding="same" / "valid" convolutions (one "same" with an even kernel, which pads one side more)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))
        self.same, self.valid = nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding="valid")
        self.uneven = nn.Conv2d(4, 4, 2, padding="same")

    def forward(self, x, image):
        y = x @ self.weight.T
        y = y + torch.repeat_interleave(y[:, ::2], 2, -1)
        top, _ = torch.topk(y, 2, dim=-1)
        ordered, _ = torch.sort(y, dim=-1)
        z = self.uneven(self.valid(self.same(image)))
        z = F.interpolate(z, size=(14, 14), mode="bilinear") + F.interpolate(z, scale_factor=2.0, mode="nearest")
        return y.sum(-1) + top.sum(-1) + ordered[:, -1] + z.mean((1, 2, 3))


def test_more_architectures_ops_are_spelled_at_torch_level_and_save():
    model, x, image = ArchitectureSpellings().eval(), torch.randn(2, 8), torch.randn(2, 3, 9, 9)
    program = torch.export.export(model, (x, image))
    written = {n.target for n in program.graph.nodes}
    assert {aten.numpy_T.default, aten.repeat_interleave.self_int, aten.topk.default, aten.sort.default,
            aten.conv2d.padding, aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.vec} <= written
    gm = fxcompress.compile(program, [], (x, image))
    assert _aten_ops(gm) == []
    # x @ weight.T is read as the linear layer it is (Falcon's FalconLinear): the layer tables then see it
    assert not any(n.target is torch.matmul for n in gm.graph.nodes)
    assert [(layer.kind, layer.weight) for layer in find_layers(gm) if layer.kind == "linear"] == [("linear", "weight")]
    paddings = {n.args[1].target.split(".")[0]: n.args[4] for n in gm.graph.nodes if n.target is F.conv2d}
    assert paddings == {"same": [1, 1], "valid": [0, 0], "uneven": "same"}  # explicit where it is one
    torch.testing.assert_close(gm(x, image), model(x, image), rtol=0, atol=0)
    torch.testing.assert_close(from_bytes(to_bytes(gm, example_inputs=(x, image)))(x, image), model(x, image),
                               rtol=0, atol=0)

class IssueSpellings(nn.Module):
    """One of each op family the front end must spell at torch level: linear, conv, embedding, the
    norms, attention, view, slice, split, cat, expand."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.conv = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Conv1d(8, 8, 1)
        self.layer, self.group, self.rms = nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.RMSNorm(8)

    def forward(self, tokens):
        x = self.layer(self.fc(self.embed(tokens)))                        # (2, 6, 8)
        x = self.rms(self.group(self.conv(x.transpose(1, 2))).transpose(1, 2))
        q = x.view(2, 6, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 6, 8)
        left, right = torch.split(a[:, 1:], [3, 5], dim=-1)
        return torch.cat([right, left], dim=-1) + a[:, :1, :].expand(2, 5, 8)


ISSUE_SPELLINGS = {  # aten overload export writes -> the torch-level target it becomes
    aten.embedding.default: F.embedding, aten.linear.default: F.linear, aten.conv1d.default: F.conv1d,
    aten.layer_norm.default: F.layer_norm, aten.group_norm.default: F.group_norm, aten.rms_norm.default: F.rms_norm,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention, aten.view.default: "view",
    aten.slice.Tensor: operator.getitem, aten.split_with_sizes.default: torch.split, aten.cat.default: torch.cat,
    aten.expand.default: "expand",
}


def test_the_issues_op_families_are_spelled_at_torch_level():
    model, tokens = IssueSpellings().eval(), torch.randint(0, 20, (2, 6))
    program = torch.export.export(model, (tokens,))
    assert set(ISSUE_SPELLINGS) <= {n.target for n in program.graph.nodes}  # what export wrote, before unlifting
    gm = fxcompress.compile(program, [], (tokens,))
    assert _aten_ops(gm) == []
    assert set(ISSUE_SPELLINGS.values()) <= {n.target for n in gm.graph.nodes}
    assert {layer.name for layer in find_layers(gm)} == {"embed", "fc", "conv"}
    torch.testing.assert_close(gm(tokens), model(tokens), rtol=0, atol=0)


def test_program_its_module_and_the_model_give_the_same_graph():
    model, inputs, program = _program("attention_sdpa")
    from_model = _exported("attention_sdpa")[2]  # compile(model, [], inputs, frontend="export")
    from_program = fxcompress.compile(program, [], inputs)
    from_module = fxcompress.compile(program.module(), [], inputs)  # unlifted with its input guards' module
    assert from_program.code == from_module.code
    # compile exports a model with each input's first dimension free, as this program does
    free = torch.export.export(model, inputs, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert from_model.code == fxcompress.compile(free, [], inputs).code != from_program.code
    assert "self.query.weight" in from_program.code and "scaled_dot_product_attention" in from_program.code
    before = program.state_dict["query.weight"].clone()
    fxcompress.compile(program, [InsertMasks(sparsity=0.5)], inputs)
    assert torch.equal(program.state_dict["query.weight"], before)  # the caller's program is untouched


def test_fx_failure_falls_back_to_export_and_names_the_users_line():
    model, inputs = _model("shape_branching")
    with pytest.raises(TraceError) as caught:
        fxcompress.compile(model, [], inputs, frontend="fx")
    message = str(caught.value)
    assert "test_export_frontend.py" in message and "if x.shape[0] % 2 == 0" in message
    assert "tracing.py" not in message
    gm = fxcompress.compile(model, [], inputs)  # frontend="auto"
    assert gm.meta["frontend"] == "export"
    assert [layer.name for layer in find_layers(gm)] == ["even"]  # the branch export specialized to
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


def test_trace_error_raised_inside_torch_before_any_user_line_points_at_the_forward(monkeypatch):
    """torch.fx can fail while reading the forward's signature, before running a user line (as on
    some decorated forwards): the error then names the forward, never fxcompress's own files."""
    monkeypatch.setattr(torch.fx.Tracer, "create_args_for_root", torch.relu)  # a C function: no Python frame
    with pytest.raises(TraceError) as caught:
        trace(MLP())
    message = str(caught.value)
    assert "tracing.py" not in message
    assert "test_export_frontend.py" in message and "def forward(self, x):" in message


def test_bad_frontend_and_inputs_by_keyword_are_refused_by_name():
    model, inputs = _model("mlp")
    with pytest.raises(ConfigError, match="compile.frontend"):
        fxcompress.compile(model, [], inputs, frontend="onnx")
    program = torch.export.export(model, (), {"x": inputs[0]})
    with pytest.raises(ConfigError, match="positional tensors"):
        fxcompress.compile(program, [], inputs)

    class Scaled(nn.Module):
        def forward(self, x, double):
            return x * 2 if double else x

    program = torch.export.export(Scaled(), (inputs[0], True))
    with pytest.raises(ConfigError, match="exported input 'double' is not a tensor"):
        fxcompress.compile(program, [], (inputs[0], True))  # export fixed it: a later False would be ignored


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masks_kmeans_encoding_save_and_load_reproduce_the_outputs(name, tmp_path):
    _, inputs, exported = _exported(name)
    gm = fxcompress.compile(exported, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")], inputs)
    fake_quant = gm(*inputs)
    gm = fxcompress.compile(gm, [LowerToEncoded()], inputs)
    fxcompress.save(gm, tmp_path / "model.fxc")
    loaded = fxcompress.load(tmp_path / "model.fxc")
    torch.testing.assert_close(loaded(*inputs), fake_quant, rtol=1e-6, atol=1e-6)
    layers = [layer.name for layer in find_layers(loaded)]
    rows = fxcompress.summary(loaded).rows
    assert layers and set(layers) <= {row["layer"] for row in rows}
    drawing = fxcompress.draw(loaded, tmp_path / "model.dot").read_text()
    assert all(name.replace(".", "_") in drawing for name in layers)


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_sdpa", "attention_softmax"])
def test_pruning_zeroed_channels_shrinks_and_leaves_outputs_equal(name):
    _, inputs, exported = _exported(name)
    gm = fxcompress.compile(exported, [], inputs)  # a copy: the shared graph is not zeroed
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph)
    zero_classes(gm, cg, pick_half(cg))
    expected = gm(*inputs)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method="l1")], inputs)
    assert _params(pruned) < 0.75 * _params(gm)
    torch.testing.assert_close(pruned(*inputs), expected, atol=1e-5, rtol=1e-5)


def test_channel_graph_of_an_exported_program_prints_its_groups():
    _, inputs, program = _program("attention_sdpa")
    text = str(channel_graph(program, inputs))
    assert "query" in text and "up" in text


def test_an_aten_op_with_no_spelling_stays_warned_and_frozen():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.logcumsumexp(self.fc1(x), dim=-1))  # no entry in the spelling table

    model, x = Cumulative().eval(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"aten\.logcumsumexp\.default at module '<root>'.*test_export_frontend\.py"):
        gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert _aten_ops(gm) == [torch.ops.aten.logcumsumexp.default]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    cg = channel_graph(gm, (x,))
    assert "logcumsumexp" in str(cg)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], (x,))
    assert _params(pruned) == _params(model)  # fc1's channels meet an op nobody knows: frozen


class BatchOfOneBranch(nn.Module):
    """A forward that takes another path for a batch of one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if x.shape[0] == 1 else y


def _constant_views(gm) -> list:
    return [n.args[1:] for n in gm.graph.nodes if n.target in ("view", "reshape")
            and all(isinstance(a, int) for a in n.args[1:])]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_is_exported_with_a_free_batch_so_calibration_and_later_calls_may_differ(batch):
    model, (x,) = _model("attention_sdpa")
    gm = fxcompress.compile(model, [], (x[:batch],), frontend="export")
    assert _constant_views(gm) == []  # the heads' views read the batch from the input
    other = torch.randn(7, 5, 32)
    torch.testing.assert_close(gm(other), model(other), rtol=1e-5, atol=1e-6)
    # reconstruction reads the calibration batches as one batch of 6: the example's batch written into
    # the views made that batch's features into wrong widths (a RuntimeError at the output projection)
    calibration = [torch.randn(3, 5, 32), torch.randn(3, 5, 32)]
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method="greedy", reconstruct=True)], (x[:batch],),
                                calibration_data=calibration)
    assert _params(pruned) < _params(model)
    assert pruned(other).shape == other.shape


def test_a_slice_over_a_free_batch_from_start_to_end_is_dropped():
    class FirstToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x[:, 0])  # export slices the free batch [0:] before selecting the token

    model, x = FirstToken().eval(), torch.randn(2, 5, 8)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert [n.args[1] for n in gm.graph.find_nodes(op="call_function", target=operator.getitem)] == [(slice(None), 0)]
    other = torch.randn(4, 5, 8)
    assert torch.equal(gm(other), model(other))


def test_a_forward_that_branches_on_a_batch_of_one_keeps_its_example_batch():
    model, x = BatchOfOneBranch().eval(), torch.randn(1, 16)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert torch.equal(gm(x), model(x))  # exported at a batch of 2, the graph would have taken the other path
    with pytest.raises(ConfigError, match=r"input 'x' has size 2 along axis 0 .*for size 1 there"):
        gm(torch.randn(2, 16))  # the graph of the example's batch of one would double it (silently, before)
    # exported at a batch of 3, the graph takes the batches of 2 and more it computes right, and refuses one
    wide = fxcompress.compile(model, [], (torch.randn(3, 16),), frontend="export")
    for batch in (2, 5, 7):
        other = torch.randn(batch, 16)
        assert torch.equal(wide(other), model(other))
    with pytest.raises(ConfigError, match="input 'x' has size 1 along axis 0"):
        wide(torch.randn(1, 16))


def test_dynamic_batch_and_length_survive_pruning_masks_and_the_file(tmp_path):
    model, (x,) = _model("attention_sdpa")
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("length", min=2, max=64)}
    program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    # the front end unlifts a program without the module that re-checks its input guards (the ranges
    # here): the same graph as from the program's .module(), which holds that module
    module = program.module()
    assert "_guards_fn" in dict(module.named_children())
    assert fxcompress.compile(module, [], (x,)).code == fxcompress.compile(program, [], (x,)).code
    gm = fxcompress.compile(program, [InsertMasks(sparsity=0.5), PruneChannels(amount=0.5)], (x,))
    assert _params(gm) < 0.75 * _params(model)
    other = torch.randn(7, 9, x.shape[2])
    assert gm(other).shape == other.shape
    torch.testing.assert_close(gm(other)[:2], gm(other[:2]), rtol=1e-5, atol=1e-5)
    fxcompress.save(gm, tmp_path / "dynamic.fxc")
    torch.testing.assert_close(fxcompress.load(tmp_path / "dynamic.fxc")(other), gm(other), rtol=0, atol=0)


# ---- the spellings transformer forwards need ---------------------------------------------------

# aten overload -> a forward that export writes with it, from x (float [2, 6, 8]) and t (tokens [2, 6]):
# positions, token-type lookups, masks, casts and rotary tables of BERT / GPT-2 / Llama / ViT / T5, and the
# in-place activations of torchvision models
TRANSFORMER_OPS = {
    aten.gather.default: lambda x, t: torch.gather(x, 2, t[:, :, None] % 8),
    aten.cumsum.default: lambda x, t: torch.cumsum(x, dim=-1),
    aten.diff.default: lambda x, t: torch.diff(x, dim=1),
    aten.log.default: lambda x, t: torch.log(x.abs() + 1),
    aten.erf.default: lambda x, t: torch.erf(x),
    aten.arange.default: lambda x, t: torch.arange(t.shape[1]),
    aten.arange.start: lambda x, t: torch.arange(1, t.shape[1]),
    aten.arange.start_step: lambda x, t: torch.arange(0, t.shape[1], 2, dtype=torch.float32),
    aten.full.default: lambda x, t: torch.full((2, 3), 0.5),
    aten.zeros.default: lambda x, t: torch.zeros(2, 3),
    aten.ones.default: lambda x, t: torch.ones(2, 3, dtype=torch.long),
    aten.full_like.default: lambda x, t: torch.full_like(x, 7),
    aten.zeros_like.default: lambda x, t: torch.zeros_like(t),
    aten.ones_like.default: lambda x, t: torch.ones_like(x),
    aten.new_ones.default: lambda x, t: x.new_ones((2, 2), dtype=torch.bool),
    aten.new_zeros.default: lambda x, t: x.new_zeros(3),
    aten.new_full.default: lambda x, t: x.new_full((2, 2), 3.0),
    aten.to.dtype: lambda x, t: x.to(torch.float64),
    aten.to.device: lambda x, t: t.to(x.device, torch.float32),
    aten.to.dtype_layout: lambda x, t: t.to(device=x.device),
    aten.type_as.default: lambda x, t: t.type_as(x),
    aten.alias.default: lambda x, t: x[...] * 2,  # the same tensor: readers read x
    aten.detach_.default: lambda x, t: x + torch.tensor([1.0, 2.0] * 4),  # a constant: lift_fresh_copy, detach_
    aten.lift_fresh_copy.default: lambda x, t: x + torch.tensor([1.0, 2.0] * 4),
    aten.where.ScalarOther: lambda x, t: torch.where(x > 0, x, -1.0),
    aten.where.ScalarSelf: lambda x, t: torch.where(x > 0, 2.0, x),
    aten.where.Scalar: lambda x, t: torch.where(x > 0, 2.0, -2.0),
    aten.masked_fill.Tensor: lambda x, t: x.masked_fill(x < 0, x[0, 0, 0]),
    aten.tril.default: lambda x, t: torch.tril(x, diagonal=1),
    aten.triu.default: lambda x, t: torch.triu(x),
    aten.min.other: lambda x, t: torch.min(x, x.flip(-1)),
    aten.max.other: lambda x, t: torch.max(x, x.flip(-1)),
    aten.clamp.default: lambda x, t: torch.clamp(x, -0.5, 0.5),
    aten.le.Tensor: lambda x, t: x <= x.flip(0),
    aten.ge.Tensor: lambda x, t: x >= x.flip(0),
    aten.ne.Tensor: lambda x, t: t != t.flip(0),
    aten.__and__.Tensor: lambda x, t: (x > 0) & (x < 1),
    aten.__or__.Tensor: lambda x, t: (x > 0) | (x < -1),
    aten.bitwise_not.default: lambda x, t: ~(x > 0),
    aten.rsub.Scalar: lambda x, t: torch.rsub(x, 1.0),  # 1.0 - mask, as transformers 4.x writes it
    aten.rsub.Tensor: lambda x, t: torch.rsub(x, x.flip(0)),
    aten.floor_divide.default: lambda x, t: t // (t.flip(0) + 1),
    aten.remainder.Scalar: lambda x, t: t % 3,
    aten.remainder.Tensor: lambda x, t: t % (t.flip(0) + 1),
    aten.mean.default: lambda x, t: x.mean(),
    aten.sum.default: lambda x, t: x.sum(),
    aten.squeeze.default: lambda x, t: x[:1].squeeze(),
    aten.stack.default: lambda x, t: torch.stack([x, x * 2], dim=1),
    aten.mm.default: lambda x, t: torch.mm(x[0], x[1].t()),
    aten.baddbmm.default: lambda x, t: torch.baddbmm(x[:, :, :6], x, x.transpose(1, 2)),
    aten.index_select.default: lambda x, t: torch.index_select(x, 1, t[0] % 6),
    aten.flip.default: lambda x, t: x.flip(-1),
    aten.roll.default: lambda x, t: torch.roll(x, 2, 1),
    aten.narrow.default: lambda x, t: torch.narrow(x, 2, 1, 3),
    aten.unflatten.int: lambda x, t: x.unflatten(2, (2, 4)),
    aten.expand_as.default: lambda x, t: x[:, :1].expand_as(x),
    aten.view_as.default: lambda x, t: x.view_as(x),
    aten.repeat.default: lambda x, t: x.repeat(1, 2, 1),
    aten.index.Tensor: lambda x, t: x[t % 2, :, t[0] % 8],
    aten.hardswish_.default: lambda x, t: F.hardswish(x.clone(), inplace=True),  # nn.Hardswish(inplace=True)
    aten.hardsigmoid_.default: lambda x, t: F.hardsigmoid(x.clone(), inplace=True),
    aten.silu_.default: lambda x, t: F.silu(x.clone(), inplace=True),
    aten.hardtanh_.default: lambda x, t: F.hardtanh(x.clone(), -0.5, 0.5, inplace=True),
    aten.leaky_relu_.default: lambda x, t: F.leaky_relu(x.clone(), 0.2, inplace=True),
    aten.dropout_.default: lambda x, t: F.dropout(x.clone(), 0.5, training=False, inplace=True),
    aten.add_.Tensor: lambda x, t: x.clone().add_(x),
    aten.sub_.Tensor: lambda x, t: x.clone().sub_(1.0 + x),
    aten.mul_.Tensor: lambda x, t: x.clone().mul_(x),
    aten.div_.Tensor: lambda x, t: x.clone().div_(x.abs() + 1),
    aten.masked_fill_.Scalar: lambda x, t: x.clone().masked_fill_(x > 0, 0.0),
    aten.fill_.Scalar: lambda x, t: x.clone()[0].fill_(2.0),
    aten.fill_.Tensor: lambda x, t: x.clone()[0].fill_(x[1, 1, 1]),  # swin's shifted-window mask
    aten.pad.default: lambda x, t: F.pad(x, (1, 2, 0, 3)),
    aten.einsum.default: lambda x, t: torch.einsum("bij,bkj->bik", x, x),
    aten.swapaxes.default: lambda x, t: torch.swapaxes(x, 1, 2),
    aten.clamp_min.default: lambda x, t: torch.clamp_min(x, 0.1),
    aten.zero_.default: lambda x, t: x.clone()[:, 0].zero_(),
}


class TransformerOps(nn.Module):
    def forward(self, x, t):
        return tuple(make(x, t) for make in TRANSFORMER_OPS.values())


def test_transformer_ops_are_spelled_at_torch_level_and_save_exactly():
    x, t = torch.randn(2, 6, 8), torch.randint(0, 20, (2, 6))
    program = torch.export.export(TransformerOps(), (x, t))
    written = {n.target for n in program.graph.nodes if n.op == "call_function"}  # as export wrote them
    assert set(TRANSFORMER_OPS) <= written  # each case reaches its overload
    assert aten._assert_tensor_metadata.default in written  # a check export adds to each cast
    gm = fxcompress.compile(program, [], (x, t))
    assert _aten_ops(gm) == []
    expected = TransformerOps()(x, t)
    for outputs in (gm(x, t), from_bytes(to_bytes(gm))(x, t)):
        for op, want, got in zip(TRANSFORMER_OPS, expected, outputs):
            assert got.dtype == want.dtype and torch.equal(got, want), op


def test_every_torch_level_spelling_can_be_saved():
    """A spelling the file format cannot name would turn an exported model unsaveable: each function is in its
    allow-list, each method among its methods."""
    for op, spelling in SPELLINGS.items():
        if isinstance(spelling.target, str):
            assert spelling.target in METHODS, (op, spelling.target)
        else:
            assert spelling.target in FUNCTION_NAMES, (op, spelling.target)


def test_a_cache_in_the_output_is_refused_with_what_to_change():
    class Cache:  # no pytree: torch.export cannot return it (transformers' DynamicCache)
        def __init__(self, keys):
            self.keys = keys

    class CachingModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(use_cache=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return (y, Cache(y)) if self.config.use_cache else y

    model, x = CachingModel().eval(), torch.randn(2, 8)
    with pytest.raises(TraceError, match=r"returns a .*Cache, which torch\.export cannot output.*"
                                         r"set model\.config\.use_cache = False"):
        fxcompress.compile(model, [], (x,), frontend="export")
    model.config.use_cache = False
    torch.testing.assert_close(fxcompress.compile(model, [], (x,), frontend="export")(x), model(x), rtol=0, atol=0)


class Regions(nn.Module):
    """A gate computed without gradients, a table computed with autocast off (Llama's rotary embedding
    in transformers 4.x): export wraps each region in a higher-order op around a subgraph."""

    def __init__(self):
        super().__init__()
        self.gate, self.fc = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("inv_freq", torch.rand(4))

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.gate(x))
            with torch.autocast("cpu", enabled=False):
                angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * self.inv_freq[None, :]
                table = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.fc(x) * gate + table


def test_no_grad_and_autocast_regions_are_inlined_with_the_models_gradients(tmp_path):
    model, x = Regions().train(), torch.randn(8, 8)
    program = torch.export.export(model, (x,))
    hops = {n.target for n in program.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)}
    assert hops == {torch.ops.higher_order.wrap_with_set_grad_enabled}  # autocast's is nested in its subgraph
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left unspelled
        gm = fxcompress.compile(program, [], (x,))
    assert _aten_ops(gm) == [] and not any(isinstance(n.target, torch._ops.HigherOrderOperator)
                                           for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))
    gm(x).sum().backward()
    assert gm.gate.weight.grad is None and gm.fc.weight.grad is not None  # no gradient flows into the gate
    fxcompress.save(gm, tmp_path / "regions.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "regions.fxc")(x), model(x))


def test_a_tied_table_is_read_under_each_layers_own_name_and_encoded_once(tmp_path):
    """Export reads an LM head tied to its token embedding under one name for both ops; the embedding
    reads `wte.weight` again, as in an fx trace, so Deep Compression leaves no float copy of the table."""
    from fxcompress.zoo import GPT2Block, gpt2_tokens

    torch.manual_seed(0)
    model, x = GPT2Block().eval(), gpt2_tokens()
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    reads = {n.target: [u.target for u in n.users] for n in gm.graph.nodes if n.op == "get_attr"}
    assert reads["wte.weight"] == [F.embedding] and reads["lm_head.weight"] == [F.linear]
    assert gm.wte.weight is gm.lm_head.weight
    gm = fxcompress.compile(gm, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")], (x,))
    fake_quant = gm(x)
    gm = fxcompress.compile(gm, [LowerToEncoded()], (x,))
    assert not {"wte.weight", "lm_head.weight"} & {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    fxcompress.save(gm, tmp_path / "tied.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "tied.fxc")(x), fake_quant)


def test_tensors_the_forward_never_reads_are_dropped_as_fx_drops_them():
    class WithAuxHead(nn.Module):  # GoogLeNet / Inception: an auxiliary classifier only training runs
        def __init__(self):
            super().__init__()
            self.body, self.aux = nn.Linear(8, 4), nn.Linear(8, 100)

        def forward(self, x):
            return (self.body(x), self.aux(x)) if self.training else self.body(x)

    model, x = WithAuxHead().eval(), torch.randn(2, 8)
    exported = fxcompress.compile(model, [], (x,), frontend="export")
    assert _params(exported) == _params(fxcompress.compile(model, [], (x,), frontend="fx")) == 8 * 4 + 4


@pytest.mark.parametrize("field", ["max", "min"])
def test_iinfo_fields_and_tensor_properties_save_and_load(field):
    """t.masked_fill(t < 0, torch.iinfo(t.dtype).<field>) and t.new_zeros(t.shape, device=t.device), as
    Hugging Face's fx tracer records them on token ids."""
    graph = torch.fx.Graph()
    t = graph.placeholder("t")
    limits = graph.call_function(torch.iinfo, (graph.call_function(getattr, (t, "dtype")),))
    filled = graph.call_method("masked_fill", (t, graph.call_function(operator.lt, (t, 0)),
                                               graph.call_function(getattr, (limits, field))))
    zeros = graph.call_method("new_zeros", (t, graph.call_function(getattr, (t, "shape"))),
                              {"device": graph.call_function(getattr, (t, "device"))})
    graph.output(graph.call_function(operator.add, (filled, zeros)))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    tokens = torch.tensor([[3, -1, 2], [-5, 4, 0]])
    loaded = from_bytes(to_bytes(gm))
    assert torch.equal(loaded(tokens), gm(tokens))
    assert (loaded(tokens) == getattr(torch.iinfo(torch.int64), field)).sum() == 2


class DecodingBranch(nn.Module):
    """A forward that takes another branch for a single token, as decoders do for their mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, ids):
        h = self.fc(self.embed(ids))
        if ids.shape[1] == 1:
            return h * 0
        return h.view(ids.shape[0], ids.shape[1], 2, 4).flatten(2)


def test_a_length_of_one_the_graph_would_compute_otherwise_is_refused_by_the_graph():
    """compile frees the length of token ids, and export traces free sizes at 2 or more: the graph of a forward
    that branches on one token computed the other branch there, silently. The program is checked at sizes of
    one against the model and, disagreeing, the graph's input check refuses a length of one by name; other
    lengths, and a batch of one, run as the model runs them."""
    torch.manual_seed(0)
    model, ids = DecodingBranch().eval(), torch.randint(0, 20, (2, 6))
    gm = fxcompress.compile(model, [], (ids,), frontend="export")
    for shape in ((3, 6), (2, 9), (1, 4), (1, 2)):
        other = torch.randint(0, 20, shape)
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"input 'ids' has size 1 along axis 1 .*sizes of 2 or more"):
        gm(torch.randint(0, 20, (2, 1)))


class NewerSpellings(nn.Module):
    """What DeepSeek-V3 (keys written into an empty tensor), GLM-4.5 (an in-place scatter of a value) and
    Qwen3-Next (tensor_split, eye, a `to` with a memory format) export to: aten ops with no torch-level spelling
    before, so no file could hold them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        keys = h.new_empty(h.shape[0], h.shape[1], 12)
        keys[..., :8] = h
        keys[..., 8:] = h[..., :4] * 2
        groups = torch.zeros_like(h[..., 0])
        groups.scatter_(1, h[..., 0].topk(2, dim=1).indices, 1)
        first, rest = torch.tensor_split(keys, [5], dim=2)
        columns = h.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return first.sum(-1) + rest.sum(-1) + groups + (h @ torch.eye(8)).sum(-1) + columns.sum(1)


def test_newer_models_ops_are_spelled_at_torch_level_and_saved(tmp_path):
    torch.manual_seed(0)
    model, x = NewerSpellings().eval(), torch.randn(2, 6, 8)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert _aten_ops(gm) == []
    assert {"new_empty", "copy_", "scatter_", "to"} <= {n.target for n in gm.graph.nodes if n.op == "call_method"}
    assert [n.kwargs for n in gm.graph.nodes if n.target == "to"] == [{"memory_format": torch.contiguous_format}]
    other = torch.randn(3, 6, 8)
    assert torch.equal(gm(other), model(other))
    loaded = from_bytes(to_bytes(gm, example_inputs=(x,)))
    assert torch.equal(loaded(other), model(other))
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], (x,), frontend="export")
    assert torch.equal(from_bytes(to_bytes(masked, example_inputs=(x,)))(other), masked(other))


# ---- the channel tables' shape, scan and reduction ops, as export writes them --------------------------------------
H, W = 4, 6


class Around(nn.Module):
    """A conv's channels (dim 1 of an image) through `op`, then flattened into a linear layer reading every position."""

    def __init__(self, op, width: int = 8) -> None:
        super().__init__()
        self.a, self.op = nn.Conv2d(3, width, 1), op
        with torch.no_grad():
            features = op(torch.zeros(2, width, H, W)).flatten(1).shape[1]
        self.o = nn.Linear(features, 3)

    def forward(self, x):
        return self.o(self.op(self.a(x)).flatten(1))


def _split_at(y, at):
    pieces = torch.tensor_split(y, at, dim=1)
    return torch.cat([pieces[-1], pieces[0] * 2], 1)


# (the op as a user writes it, the aten overload export writes for it, the torch function that becomes, the width)
CHANNEL_TABLE_OPS = {
    "torch.movedim": (lambda y: torch.movedim(y, 1, -1), aten.movedim.int, torch.movedim, 8),
    "x.movedim-tuples": (lambda y: y.movedim((1, -1), (-1, 2)), aten.movedim.intlist, torch.movedim, 8),
    "torch.moveaxis": (lambda y: torch.moveaxis(y, -3, 3), aten.moveaxis.int, torch.moveaxis, 8),
    "torch.tile-short": (lambda y: torch.tile(y, (2, 1, 1)), aten.tile.default, torch.tile, 8),
    "x.tile": (lambda y: y.tile(1, 1, 2), aten.tile.default, torch.tile, 8),
    "torch.tensor_split-sections": (lambda y: _split_at(y, 3), aten.tensor_split.sections,
                                    torch.tensor_split, 8),
    "x.tensor_split-spatial": (lambda y: y.tensor_split(2, -1)[0] * y.tensor_split(2, -1)[1],
                               aten.tensor_split.sections, torch.tensor_split, 8),
    "torch.tensor_split-tensor-sections": (lambda y: _split_at(y, torch.tensor(3)),
                                           aten.tensor_split.tensor_indices_or_sections, torch.tensor_split, 8),
    "torch.tensor_split-tensor-indices": (lambda y: _split_at(y, torch.tensor([2, 5])),
                                          aten.tensor_split.tensor_indices_or_sections, torch.tensor_split, 8),
    "torch.linalg.vector_norm": (lambda y: torch.linalg.vector_norm(y, 3, (-1, -2)), aten.linalg_vector_norm.default,
                                 torch.linalg.vector_norm, 8),
    "torch.norm": (lambda y: torch.norm(y, dim=-1), aten.linalg_vector_norm.default, torch.linalg.vector_norm, 8),
    "x.norm-keepdim": (lambda y: y.norm(1, dim=(2, 3), keepdim=True), aten.linalg_vector_norm.default,
                       torch.linalg.vector_norm, 8),
    "F.normalize": (lambda y: F.normalize(y, dim=-1), aten.linalg_vector_norm.default, torch.linalg.vector_norm, 8),
    "torch.var": (lambda y: torch.var(y, -1), aten.var.dim, torch.var, 8),
    "x.std-keepdim": (lambda y: y.std(dim=(2, 3), keepdim=True), aten.std.dim, torch.std, 8),
    "torch.std-biased": (lambda y: torch.std(y, 3, False, True), aten.std.dim, torch.std, 8),
    "x.var-correction": (lambda y: y.var(-1, correction=0), aten.var.correction, torch.var, 8),
    "torch.std-correction-keepdim": (lambda y: torch.std(y, (2, 3), correction=2, keepdim=True), aten.std.correction,
                                     torch.std, 8),
    "torch.logsumexp": (lambda y: torch.logsumexp(y, -1), aten.logsumexp.default, torch.logsumexp, 8),
    "x.logsumexp-keepdim": (lambda y: y.logsumexp((2, 3), keepdim=True), aten.logsumexp.default, torch.logsumexp, 8),
    "F.pixel_shuffle": (lambda y: F.pixel_shuffle(y, 2), aten.pixel_shuffle.default, F.pixel_shuffle, 16),
    "nn.PixelUnshuffle": (nn.PixelUnshuffle(2), aten.pixel_unshuffle.default, F.pixel_unshuffle, 8),
}


def _written(model: nn.Module, x: torch.Tensor) -> set:
    return {n.target for n in torch.export.export(model, (x,)).graph.nodes if n.op == "call_function"}


def _compiled_without_unknown_ops(model: nn.Module, passes: list, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no torch-level spelling")
        return fxcompress.compile(model, passes, (x,), frontend="export")


@pytest.mark.parametrize("name", sorted(CHANNEL_TABLE_OPS))
def test_channel_table_ops_are_spelled_as_their_torch_functions_and_prune_as_traced(name):
    """Each op reaches its aten overload, which becomes the torch function the channel tables know: the exported model
    computes the model's outputs exactly, and pruned it removes the very channels the fx trace removes."""
    op, overload, function, width = CHANNEL_TABLE_OPS[name]
    torch.manual_seed(0)
    model, x = Around(op, width).eval(), torch.randn(2, 3, H, W)
    assert overload in _written(model, x)
    gm = _compiled_without_unknown_ops(model, [], x)
    assert _aten_ops(gm) == [] and function in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    traced = fxcompress.compile(model, [PruneChannels(amount=0.5)], (x,), frontend="fx")
    exported = _compiled_without_unknown_ops(model, [PruneChannels(amount=0.5)], x)
    assert exported.meta["frontend"] == "export"
    assert traced.a.weight.shape[0] < width  # it pruned
    for layer in ("a.weight", "a.bias", "o.weight", "o.bias"):  # the same channels removed, the same kept
        assert torch.equal(exported.get_parameter(layer), traced.get_parameter(layer)), layer
    other = torch.randn(3, 3, H, W)
    torch.testing.assert_close(exported(other), traced(other), rtol=1e-5, atol=1e-6)


# (the op, the aten overload): each reads every channel along dim 1, so none is removed
CHANNEL_TABLE_FREEZES = {
    "torch.linalg.vector_norm": (lambda y: torch.linalg.vector_norm(y, dim=1), aten.linalg_vector_norm.default),
    "F.normalize-default": (lambda y: F.normalize(y), aten.linalg_vector_norm.default),  # export writes its norm out
    "x.var": (lambda y: y.var(1), aten.var.dim),
    "torch.std-every-dim": (lambda y: y * torch.std(y), aten.std.correction),
    "torch.std-unbiased-flag": (lambda y: y / torch.std(y, False), aten.std.default),
    "x.var-correction": (lambda y: y.var((1, 2), correction=0), aten.var.correction),
    "torch.logsumexp": (lambda y: torch.logsumexp(y, -3), aten.logsumexp.default),
}


@pytest.mark.parametrize("name", sorted(CHANNEL_TABLE_FREEZES))
def test_channel_table_ops_over_the_channels_freeze_them_as_traced(name):
    op, overload = CHANNEL_TABLE_FREEZES[name]
    torch.manual_seed(0)
    model, x = Around(op).eval(), torch.randn(2, 3, H, W)
    assert overload in _written(model, x)
    for frontend in ("fx", "export"):
        pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], (x,), frontend=frontend)
        assert pruned.meta.get("frontend", "fx") == frontend
        assert pruned.a.weight.shape[0] == 8, frontend  # nothing pruned
        # the reduction, or F.normalize's (which fx keeps whole), over a channel dimension
        assert fxcompress.history(pruned)[-1].stats["frozen"]["a"].endswith("over a channel dimension"), frontend
        other = torch.randn(3, 3, H, W)
        torch.testing.assert_close(pruned(other), model(other), rtol=1e-6, atol=1e-6)


class FeatureAlphaDropouts(nn.Module):
    """SELU networks' dropouts: each drops whole channels, each channel on its own (SELU, F.selu and nn.SELU in place,
    export writes as aten.selu and aten.selu_)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Conv2d(3, 8, 1), nn.FeatureAlphaDropout(0.2), nn.Conv2d(8, 8, 1)
        self.act, self.o = nn.SELU(inplace=True), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.act(self.b(F.selu(self.drop(self.a(x)))))
        return self.o(F.feature_alpha_dropout(y, 0.3, training=self.training))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_feature_alpha_dropout_keeps_channels_apart(frontend):
    """nn.FeatureAlphaDropout and F.feature_alpha_dropout were unknown to the channel tables (the other dropouts were
    not): they froze every channel they touched. Pruned, the model equals the original with the removed channels
    zeroed, and in training mode it runs at its new widths."""
    torch.manual_seed(0)
    model, x = FeatureAlphaDropouts().eval(), torch.randn(2, 3, H, W)
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], (x,), frontend=frontend)
    assert fxcompress.history(pruned)[-1].stats["frozen"] == {"o": "reaches the model output (output)"}
    assert (pruned.a.weight.shape[0], pruned.b.weight.shape[:2], pruned.o.weight.shape[1]) == (4, (4, 4), 4)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ("a", "b"):
            original, kept = getattr(zeroed, layer), pruned.get_parameter(f"{layer}.bias")
            gone = [i for i, value in enumerate(original.bias) if value not in kept]
            original.weight[gone], original.bias[gone] = 0.0, 0.0
    other = torch.randn(3, 3, H, W)
    torch.testing.assert_close(pruned(other), zeroed(other), rtol=1e-5, atol=1e-5)
    assert pruned.train()(other).shape == (3, 4, H, W)


def test_model_output_classes_are_returned_wherever_the_output_structure_has_them():
    """A dict subclass filled by dataclass fields (Hugging Face's ModelOutput) in the output becomes a plain dict
    in the graph's output node; the compiled forward and the Interpreter's run rebuild it at any depth (in a tuple,
    a dict, a list), where the plain containers around it stay what they were. Passes and the file format read
    the graph's plain structure; a loaded file returns the same tensors in it."""
    model_output = pytest.importorskip("transformers.utils").ModelOutput

    @dataclasses.dataclass
    class Heads(model_output):
        logits: torch.Tensor | None = None
        hidden: torch.Tensor | None = None

    class Model(MLP):
        def forward(self, x):
            h = self.body(x)
            return Heads(logits=self.head(h), hidden=h), {"h": Heads(logits=h)}, [h.sum(-1)]

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(3, 16)
    expected = model(x)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert gm.meta["frontend"] == "export"
    for out in (gm(x), torch.fx.Interpreter(gm).run(x)):
        assert type(out) is tuple and type(out[0]) is Heads and type(out[1]) is dict and type(out[2]) is list
        assert type(out[1]["h"]) is Heads and list(out[1]["h"].keys()) == ["logits"]
        assert torch.equal(out[0].logits, expected[0].logits) and torch.equal(out[0][1], expected[0].hidden)
        assert torch.equal(out[1]["h"][0], expected[1]["h"].logits) and torch.equal(out[2][0], expected[2][0])
    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], (x,))
    assert type(masked(x)[0]) is Heads
    loaded = from_bytes(to_bytes(masked))(x)
    assert torch.equal(loaded[0]["logits"], masked(x)[0].logits) and torch.equal(loaded[1]["h"]["logits"],
                                                                                 masked(x)[1]["h"].logits)


def test_an_output_without_model_output_classes_keeps_the_plain_codegen():
    """Outputs of plain dicts, lists and tuples come back as the model returns them with torch.fx's own codegen."""
    class Model(MLP):
        def forward(self, x):
            return {"y": self.head(self.body(x))}, [x]

    gm = fxcompress.compile(Model().eval(), [], (torch.randn(2, 16),), frontend="export")
    assert type(gm.graph._codegen) is torch.fx.CodeGen
    out = gm(torch.randn(2, 16))
    assert type(out) is tuple and type(out[0]) is dict and type(out[1]) is list
