"""Saving what transformer forwards traced with torch.fx contain: masks built in the forward,
casts, torch.full / triu / tril / where / masked_fill, torch.finfo fields; and a GPT-2-style model
(embeddings, Conv1D addmm layers) through masks, k-means and encoding."""
import operator

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.errors import FormatError
from fxcompress.fileformat.allowlist import CREATED_SLACK
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.tracing import trace
from fxcompress.zoo import GPT2Block, gpt2_tokens


class MaskedScores(nn.Module):
    """The mask arithmetic of BERT / GPT-2 / Llama forwards, as fx records it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x, attention_mask):
        scores = self.proj(x) @ x.transpose(-1, -2)
        length = x.size(1)
        causal = torch.tril(scores.new_ones(length, length)).bool() | scores.new_zeros(length, length).bool()
        future = torch.triu(torch.full_like(scores, -1e4), diagonal=1)
        padding = (1.0 - attention_mask[:, None, :].float()) * -1e4
        scores = scores + future + padding.type_as(scores)
        scores = torch.where(causal, scores, torch.full_like(scores, -1e4))
        scores = scores.masked_fill(attention_mask[:, None, :].long().int() == 0, -1e4)
        return scores.softmax(-1)


def _round_trip(gm):
    return from_bytes(to_bytes(gm))


def test_masks_built_in_the_forward_and_casts_save_and_load_exactly():
    model = MaskedScores().eval()
    x, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gm = trace(model)
    targets = {n.target for n in gm.graph.nodes}
    assert {torch.tril, torch.triu, torch.full_like, torch.where, "bool", "long", "int", "type_as",
            "masked_fill", "new_zeros", "new_ones"} <= targets
    loaded = _round_trip(gm)
    assert torch.equal(loaded(x, mask), model(x, mask))


def _finfo_graph(field: str) -> fx.GraphModule:
    """x.masked_fill(x < 0, torch.finfo(x.dtype).<field>) as fx records it with HF's tracer."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    limits = graph.call_function(torch.finfo, (graph.call_function(getattr, (x, "dtype")),))
    value = graph.call_function(getattr, (limits, field))
    graph.output(graph.call_method("masked_fill", (x, graph.call_function(operator.lt, (x, 0)), value)))
    return fx.GraphModule(nn.Module(), graph)


def test_a_mask_built_by_setitem_on_a_fresh_tensor_saves_and_loads():
    """m = x.new_zeros(...); m[:, 0] = 1 (fx records operator.setitem; HF's tracer emits it)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    mask = graph.call_method("new_zeros", (x, 4, 3))
    graph.call_function(operator.setitem, (mask, (slice(None), 0), 1.0))
    graph.output(graph.call_function(operator.mul, (x, mask)))
    gm = fx.GraphModule(nn.Module(), graph)
    x = torch.randn(4, 3)
    loaded = _round_trip(gm)
    assert torch.equal(loaded(x), gm(x)) and torch.equal(loaded(x)[:, 0], x[:, 0]) and not loaded(x)[:, 1:].any()


def test_finfo_fields_save_and_load():
    x = torch.randn(4, 3)
    gm = _finfo_graph("min")
    loaded = _round_trip(gm)
    assert torch.equal(loaded(x), gm(x)) and (loaded(x) == torch.finfo(torch.float32).min).any()


def test_a_finfo_attribute_outside_its_fields_is_refused_by_name():
    with pytest.raises(FormatError, match="getattr is stored only for tensor properties"):
        to_bytes(_finfo_graph("__class__"))


def test_gpt2_block_masks_kmeans_encode_save_load_exact():
    torch.manual_seed(0)
    x = gpt2_tokens()
    gm = fxcompress.compile(GPT2Block().eval(), [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,))
    expected = gm(x)
    layers = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    assert {layers[name]["op"] for name in ("wte", "wpe", "c_fc", "attn.c_attn")} == {"embedding", "addmm"}
    encoded = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    loaded = _round_trip(encoded)
    assert torch.equal(encoded(x), expected) and torch.equal(loaded(x), expected)
    assert all(row["exact"] for row in fxcompress.summary(encoded).rows if row["layer"] in ("wte", "c_fc"))


def test_rotary_sin_cos_methods_and_device_fields_save_and_load():
    """Llama's rotary embedding as Hugging Face's fx tracer records it: emb.cos() / emb.sin() methods,
    and `x.device.type` read for autocast (a dead comparison fx keeps)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    device_type = graph.call_function(getattr, (graph.call_function(getattr, (x, "device")), "type"))
    graph.call_function(operator.eq, (device_type, "cuda"))
    positions = graph.call_function(torch.arange, (graph.call_method("size", (x, 1)),), {"dtype": torch.float32})
    graph.output(graph.call_function(operator.add, (graph.call_method("cos", (positions,)),
                                                    graph.call_method("sin", (x,)))))
    gm = fx.GraphModule(nn.Module(), graph)
    x = torch.randn(2, 8)
    loaded = _round_trip(gm)
    assert torch.equal(loaded(x), gm(x)) and torch.equal(loaded(x), torch.arange(8.0).cos() + x.sin())


def _creating(target, args) -> fx.GraphModule:
    """A one-parameter model whose forward adds a tensor made by `target(*args)` (a method on x if a name)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    made = (graph.call_method(target, (x, *args)) if isinstance(target, str)
            else graph.call_function(target, args))
    graph.output(graph.call_function(operator.add, (graph.get_attr("weight"), made)))
    root = nn.Module()
    root.weight = nn.Parameter(torch.zeros(()))
    return fx.GraphModule(root, graph)


# name -> (function or method, its size arguments for n elements)
SIZED_CALLS = {
    "arange": (torch.arange, lambda n: (n,)), "arange_start": (torch.arange, lambda n: (5, n + 5)),
    "ones": (torch.ones, lambda n: (n,)), "zeros": (torch.zeros, lambda n: (1, n)),
    "full": (torch.full, lambda n: ((n,), 0.5)), "new_zeros": ("new_zeros", lambda n: ((n, 1),)),
    "new_ones": ("new_ones", lambda n: (n,)), "new_full": ("new_full", lambda n: ((n,), 1.0)),
    "expand": ("expand", lambda n: (n, 1)), "repeat": ("repeat", lambda n: (n, 1)),
}


@pytest.mark.parametrize("name", sorted(SIZED_CALLS))
def test_a_size_the_file_states_is_bounded_by_the_files_tensors(name):
    """The bound is exact: the model's one element plus CREATED_SLACK loads; one more is refused by name,
    before any forward could allocate it (a crafted file's torch.arange(10**12) never runs)."""
    target, size = SIZED_CALLS[name]
    budget = 1 + CREATED_SLACK
    _round_trip(_creating(target, size(budget)))
    for n in (budget + 1, 10 ** 12):
        with pytest.raises(FormatError, match=r"graph node '\w+'.* would create \d+ elements from sizes the file states"):
            _round_trip(_creating(target, size(n)))


def test_positions_from_the_inputs_size_load_whatever_the_length():
    """torch.arange(x.size(1)): the file states no size, the input does."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.arange, (graph.call_method("size", (x, 1)),)))
    loaded = _round_trip(fx.GraphModule(nn.Module(), graph))
    assert torch.equal(loaded(torch.empty(1, 3000)), torch.arange(3000))
