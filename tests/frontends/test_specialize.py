"""compile(..., specialize_shapes=True): sizes computed from the inputs' shapes become constants."""
from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from zeroing import pick_half, zero_classes
from fxcompress.zoo import GPT2Block, gpt2_tokens
from fxcompress.channels import ChannelGraph
from fxcompress.errors import ConfigError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.frontends import specialize_shapes
from fxcompress.frontends.specialize import reads_shape
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.tracing import trace


class SizeArithmetic(nn.Module):
    """Every way of computing a size that the issue lists, Hugging Face's head split among them."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.up = nn.Conv1d(width, 2 * width, 1)
        self.down = nn.Linear(2 * width, 6)

    def _split(self, t):
        return t.view(t.size()[:-1] + (self.heads, self.head_dim)).transpose(1, 2)  # HF's spelling

    def forward(self, x):
        parts = self.qkv(x).split(x.shape[-1], dim=-1)
        q, k, v = self._split(parts[0]), self._split(parts[1]), self._split(parts[2])
        scale = k.size(-1) ** -0.5
        attention = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        merged = attention.transpose(1, 2).reshape(x.shape[:-1] + (-1,))
        y = self.out(merged) + x
        positions = torch.arange(y.size(1), device=y.device).float()  # a tensor built from a size stays
        y = y + positions.view(1, -1, 1) / getattr(x, "shape")[1]
        z = F.relu(self.up(y.transpose(1, 2)))  # (batch, 2 * width, length)
        pooled = z.sum(dim=z.dim() - 1) / z.size(2)
        return self.down(pooled.view(x.size(0), -1)) * x.ndim


def _size_nodes(gm):
    return [n for n in gm.graph.nodes if reads_shape(n)]


@functools.cache
def _dynamic_program():
    """(model, example input, its program exported with a dynamic batch and length): exported once for
    the tests that read it; compile copies a program, so none changes it."""
    model, x = SizeArithmetic().eval(), torch.randn(2, 8, 32)
    dims = {0: torch.export.Dim("batch", min=2, max=16), 1: torch.export.Dim("length", min=2, max=16)}
    return model, x, torch.export.export(model, (x,), dynamic_shapes=(dims,))


def test_every_size_is_folded_outputs_identical_and_heads_split_by_constants():
    model, x = SizeArithmetic().eval(), torch.randn(2, 8, 32)
    traced = trace(model)
    assert len(_size_nodes(traced)) >= 8  # size(), size(i), shape, getattr(x, "shape"), dim(), ndim
    gm = fxcompress.compile(model, [], (x,), specialize_shapes=True)
    assert _size_nodes(gm) == []
    assert not any(n.target in (operator.add, operator.floordiv, operator.pow) and not n.all_input_nodes
                   for n in gm.graph.nodes)
    views = [n.args[1] for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views.count((2, 8, 4, 8)) == 3  # x.size()[:-1] + (heads, head_dim), one per q, k, v
    assert any(n.target is torch.arange and n.args == (8,) for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unspecialized_sizes_are_rewritten_or_frozen_with_a_reason_never_a_type_error(frontend):
    """Without specialize_shapes the channel analysis reads the same arithmetic: HF's head split is
    rewritten, a width used as a number or a dim computed from z.dim() freezes what it touches,
    named; removing zeroed channels leaves the outputs equal."""
    model, x, program = _dynamic_program()
    source = model if frontend == "fx" else program
    gm = fxcompress.compile(source, [], (x,), frontend="fx")  # a program is exported already
    assert _size_nodes(gm)  # the sizes are read at run time: the export's dynamic ones too
    cg = PassContext(example_inputs=(x,), gm=gm).get(ChannelGraph)
    held = [g for g in cg.groups if len(g.prunable) < len(g.classes)]
    assert held and all(isinstance(g.frozen, str) and g.frozen.strip() for g in held)
    if frontend == "fx":  # export writes z.dim() - 1 as the constant it is
        assert any("reads a dim computed in the graph" in g.frozen for g in held), [g.frozen for g in held]
    zero_classes(gm, cg, pick_half(cg))
    with torch.no_grad():
        expected = gm(x)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], (x,))
    stats = fxcompress.history(pruned)[-1].stats
    assert stats["params_after"] < 0.8 * stats["params_before"]
    other = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)  # any batch and length


class TokenAttention(nn.Module):
    """Heads split by the input's own sizes, tokens flattened: an input of another shape but as many elements
    runs through a folded `view(2, 8, 4, 4)`, its rows mixed."""

    def __init__(self, width: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b * t, d))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("shape", [(4, 4, 16), (1, 16, 16), (3, 5, 16), (2, 8)], ids=str)
def test_the_specialized_model_refuses_any_other_shape_by_name(frontend, shape):
    torch.manual_seed(0)
    model, x = TokenAttention().eval(), torch.randn(2, 8, 16)
    gm = fxcompress.compile(model, [], (x,), specialize_shapes=True, frontend=frontend)
    general = fxcompress.compile(model, [], (x,), frontend=frontend)
    other = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        if len(shape) == 3 and frontend == "fx":  # export fixes the length of this model (a free batch only)
            torch.testing.assert_close(general(other), model(other))  # unspecialized: any batch and length
        with pytest.raises(ConfigError, match=r"input 'x' has .*this graph was compiled with specialize_shapes=True"):
            gm(other)


def test_the_specialized_model_accepts_only_the_example_shapes():
    model, x = SizeArithmetic().eval(), torch.randn(2, 8, 32)
    gm = fxcompress.compile(model, [], (x,), specialize_shapes=True)
    general = fxcompress.compile(model, [], (x,))
    other = torch.randn(3, 5, 32)
    assert general(other).shape == (3, 6)
    with pytest.raises(ConfigError, match=r"input 'x' has size 3 along axis 0 \(shape \(3, 5, 32\)\); this graph "
                                          r"was compiled with specialize_shapes=True, which folded its sizes to the "
                                          r"example inputs' \(size 2 there\)"):
        gm(other)
    loaded = from_bytes(to_bytes(gm, example_inputs=(x,)))  # the file keeps the check and its cause
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    with pytest.raises(ConfigError, match="compiled with specialize_shapes=True"):
        loaded(torch.randn(4, 4, 32))


def test_prune_channels_prunes_through_specialized_sizes_and_zeroed_channels_stay_equal():
    model, x = SizeArithmetic().eval(), torch.randn(2, 8, 32)
    gm = fxcompress.compile(model, [], (x,), specialize_shapes=True)
    cg = PassContext(example_inputs=(x,), gm=gm).get(ChannelGraph)
    zero_classes(gm, cg, pick_half(cg))
    with torch.no_grad():
        expected = gm(x)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], (x,))
    stats = fxcompress.history(pruned)[-1].stats
    assert stats["channels_removed"] > 0 and stats["params_after"] < 0.8 * stats["params_before"]
    assert "qkv" in str(fxcompress.history(pruned)[-1].params_touched)  # the heads' projection shrank too
    assert _size_nodes(pruned) == []
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_block_specialized_prunes_as_much_as_unspecialized_and_stays_exact():
    model, tokens = GPT2Block().eval(), gpt2_tokens()
    gm = fxcompress.compile(model, [], (tokens,), specialize_shapes=True)
    assert _size_nodes(gm) == []
    cg = PassContext(example_inputs=(tokens,), gm=gm).get(ChannelGraph)
    zero_classes(gm, cg, pick_half(cg))
    with torch.no_grad():
        expected = gm(tokens)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], (tokens,))
    plain = fxcompress.compile(model, [PruneChannels(amount=0.5)], (tokens,))
    removed = fxcompress.history(pruned)[-1].stats["channels_removed"]
    assert removed > 0 and removed >= fxcompress.history(plain)[-1].stats["channels_removed"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), expected, atol=1e-5, rtol=1e-5)


def test_sizes_of_an_exported_program_with_dynamic_dims_are_folded():
    model, x, program = _dynamic_program()
    general = fxcompress.compile(program, [], (x,))
    assert _size_nodes(general)  # the dynamic sizes are read at run time
    gm = fxcompress.compile(program, [], (x,), specialize_shapes=True)
    assert _size_nodes(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        kept = x[x > 0]  # how many depends on the values
        return self.fc(x) * kept.size(0) + x.size(1)


def test_a_size_that_depends_on_the_data_is_kept_and_named():
    model, x = DataDependent().eval(), torch.randn(3, 4)
    gm = trace(model)
    with pytest.warns(UserWarning, match=r"depend on the data.*size.*test_specialize\.py:\d+: return self\.fc\(x\) "
                                         r"\* kept\.size\(0\)"):
        folded = specialize_shapes(gm, (x,))
    assert list(folded.values()) == [4]  # x.size(1) only
    other = -x  # the same shape, another count of positive values
    with torch.no_grad():
        assert torch.equal(gm(other), model(other))


def test_a_graph_without_sizes_is_left_alone():
    gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    code = gm.code
    assert specialize_shapes(gm, (torch.randn(2, 4),)) == {}
    assert gm.code == code


def test_specialize_shapes_takes_only_booleans():
    with pytest.raises(fxcompress.errors.ConfigError, match="compile.specialize_shapes must be True or False"):
        fxcompress.compile(nn.Linear(4, 4), [], torch.randn(2, 4), specialize_shapes="yes")


def test_sizes_returned_as_outputs_keep_their_types():
    class ReturnsSizes(nn.Module):
        def forward(self, x):
            return x * 2, x.size(), x.size(1) + 1

    model, x = ReturnsSizes(), torch.randn(2, 3)
    gm = fxcompress.compile(model, [], x, specialize_shapes=True)
    assert _size_nodes(gm) == []
    doubled, size, width = gm(x)
    assert type(size) is torch.Size and size == (2, 3) and width == 4 and torch.equal(doubled, x * 2)
