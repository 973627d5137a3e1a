"""Channel pruning of decoder / encoder attention as Hugging Face writes it: Llama's RMSNorm written out,
rotary position embeddings (rotate_half), grouped-query attention (repeat_kv), T5's relative position
bias passed to F.scaled_dot_product_attention as attn_mask, GPT-2's fused Conv1D qkv split into three.

The modules below reproduce transformers' forwards op for op; where transformers unpacks a shape
(`b, t, _ = x.size()`), they index it (`x.size(0)`), which is the graph transformers' own fx tracer
records (plain torch.fx cannot iterate a proxy)."""
from __future__ import annotations

import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.channels import ChannelGraph
from fxcompress.channels.select import layer_units, lowest, removal_count
from fxcompress.pass_base import PassContext
from fxcompress.passes.prune_channels import PruneChannels
from fxcompress.tracing import trace
from zeroing import pick_half, zero_classes
from fxcompress.zoo import Conv1D


# ---- Llama: RMSNorm, rotary embeddings, grouped-query attention --------------------------------------
class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden_size) + 0.5)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep: int):
    batch, num_key_value_heads = hidden_states.shape[0], hidden_states.shape[1]
    slen, head_dim = hidden_states.shape[2], hidden_states.shape[3]
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, sdpa: bool | str) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.num_key_value_groups, self.scaling, self.sdpa = heads // kv_heads, (hidden // heads) ** -0.5, sdpa
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, cos, sin):
        bsz, q_len = hidden_states.size(0), hidden_states.size(1)
        q = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.sdpa == "gqa":  # transformers' sdpa path without a mask: the kernel repeats the KV heads
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1).contiguous())
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        else:
            weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(out)


class LlamaSmall(nn.Module):
    """Embedding, two decoder layers (pre-norm attention and gated MLP on a residual stream of
    RMSNorms), final norm, LM head. 4 query heads share 2 KV heads; head_dim 8 (4 rotary pairs)."""

    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                 sdpa: bool | str = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.rotary_emb = LlamaRotaryEmbedding(hidden // heads)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "input_layernorm": LlamaRMSNorm(hidden), "self_attn": LlamaAttention(hidden, heads, kv_heads, sdpa),
            "post_attention_layernorm": LlamaRMSNorm(hidden), "gate_proj": nn.Linear(hidden, 64, bias=False),
            "up_proj": nn.Linear(hidden, 64, bias=False), "down_proj": nn.Linear(64, hidden, bias=False),
        }) for _ in range(2))
        self.norm = LlamaRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = h + layer["self_attn"](layer["input_layernorm"](h), cos, sin)
            x = layer["post_attention_layernorm"](h)
            h = h + layer["down_proj"](F.silu(layer["gate_proj"](x)) * layer["up_proj"](x))
        return self.lm_head(self.norm(h))


class _BufferTracer(torch.fx.Tracer):
    """Buffers as get_attr nodes, as transformers' fx tracer records them (`self.inv_freq[None, :, None]
    .expand(position_ids.shape[0], -1, 1)` needs a traced buffer to take a traced size)."""

    proxy_buffer_attributes = True


def _trace_llama(**options) -> torch.fx.GraphModule:
    model = LlamaSmall(**options).eval()
    return torch.fx.GraphModule(model, _BufferTracer().trace(model))


def _tokens(length: int = 8, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(length))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _graph(gm, inputs, attention: str = "head_dims") -> ChannelGraph:
    return PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph, attention=attention)


def _zeroed_then_pruned(gm, inputs, attention: str, seed: int = 0):
    """Zero a random half of every prunable unit, prune at 0.5 (l1 removes exactly the zeros)."""
    cg = _graph(gm, inputs, attention)
    removed = pick_half(cg, seed)
    zero_classes(gm, cg, removed)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention=attention)], example_inputs=inputs)
    return cg, removed, pruned


def _kept_rows(cg: ChannelGraph, removed: np.ndarray, weight: str, dim: int = 0) -> np.ndarray:
    return np.flatnonzero(~removed[cg.labels[cg.slots[(weight, dim)]]])


@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_rotary_head_dims_prune_in_pairs_exactly(sdpa):
    """Default mode: q / k lose the same rotary pairs (j, j + head_dim / 2) in every head and layer, with
    the inverse frequencies; rotate_half's slice bounds `x.shape[-1] // 2` are rewritten; exact."""
    gm = _trace_llama(sdpa=sdpa)
    (x,) = inputs = (_tokens(),)
    cg, removed, pruned = _zeroed_then_pruned(gm, inputs, "head_dims")
    kept_freq = _kept_rows(cg, removed, "rotary_emb.inv_freq")
    assert len(kept_freq) == 2  # 4 rotary pairs, half of them go
    pair_rows = np.concatenate([kept_freq, kept_freq + 4])  # positions j and j + 4 of a head of 8
    for i in range(2):
        for name, heads in (("q_proj", 4), ("k_proj", 2)):
            rows = _kept_rows(cg, removed, f"layers.{i}.self_attn.{name}.weight")
            assert np.array_equal(rows, np.sort(np.concatenate([pair_rows + 8 * h for h in range(heads)])))
            assert pruned.get_submodule(f"layers.{i}.self_attn.{name}").out_features == 4 * heads
    assert torch.equal(pruned.rotary_emb.inv_freq, gm.rotary_emb.inv_freq[kept_freq])
    halves = [n.args[1][-1] for n in pruned.graph.nodes if n.target is operator.getitem
              and isinstance(n.args[1], tuple) and n.args[1][0] is Ellipsis]
    bounds = {(s.start, s.stop, s.step) for s in halves}
    assert len(halves) == 8 and bounds == {(0, 2, None), (2, 4, None)}  # head_dim 8 -> 4: halves of 2
    for other in (x, _tokens(5, 3)):
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa", [False, "gqa"], ids=["repeat_kv", "enable_gqa"])
def test_grouped_query_attention_loses_whole_kv_groups_with_their_query_heads(sdpa):
    """attention="heads": a KV head and the query heads reading it (repeat_kv, or sdpa's enable_gqa)
    are one class; half the groups go with q rows, k / v rows and o_proj columns; the kept heads
    compute what they did."""
    gm = _trace_llama(sdpa=sdpa)
    (x,) = inputs = (_tokens(),)
    cg, removed, pruned = _zeroed_then_pruned(gm, inputs, "heads")
    for i in range(2):
        attn = f"layers.{i}.self_attn"
        q_rows = _kept_rows(cg, removed, f"{attn}.q_proj.weight")
        kv_rows = _kept_rows(cg, removed, f"{attn}.k_proj.weight")
        assert np.array_equal(kv_rows, _kept_rows(cg, removed, f"{attn}.v_proj.weight"))
        kv_heads = np.unique(kv_rows // 8)
        assert len(kv_heads) == 1 and np.array_equal(kv_rows, kv_heads[0] * 8 + np.arange(8))
        # query heads 2g and 2g + 1 read KV head g
        assert np.array_equal(q_rows, kv_heads[0] * 16 + np.arange(16))
        q_weight = gm.get_submodule(f"{attn}.q_proj").weight
        assert torch.equal(pruned.get_submodule(f"{attn}.q_proj").weight, q_weight[q_rows])
        assert torch.equal(pruned.get_submodule(f"{attn}.o_proj").weight,
                           gm.get_submodule(f"{attn}.o_proj").weight[:, q_rows])
    assert tuple(pruned.rotary_emb.inv_freq.shape) == (4,)  # head_dim stays 8
    for other in (x, _tokens(5, 3)):
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


def test_rms_norm_freezes_the_residual_stream_for_exactness_only():
    gm = _trace_llama()
    inputs = (_tokens(),)
    stream = next(g for g in _graph(gm, inputs).groups if "embed_tokens" in g.producers)
    assert "RMS norm" in stream.frozen and len(stream.inexact) == len(stream.classes) == 32
    exact = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    assert exact.embed_tokens.embedding_dim == 32 and exact.norm.weight.shape == (32,)
    cut = fxcompress.compile(gm, [PruneChannels(amount=0.5, prune_normalized=True)], example_inputs=inputs)
    assert cut.embed_tokens.weight.shape == (50, 16) and cut.lm_head.in_features == 16
    assert cut.norm.weight.shape == (16,) and all(cut.get_submodule(f"layers.{i}.{n}").weight.shape == (16,)
               for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))
    assert _params(cut) < 0.4 * _params(gm)


class RMSNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(6, 12), LlamaRMSNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def test_a_pruned_rms_norm_is_the_rms_norm_of_the_kept_channels():
    """prune_normalized=True: the written-out RMSNorm now normalizes over the channels it keeps (its
    mean divides by the new width) — valid, not exact; computed here by hand from the kept slices."""
    gm = trace(RMSNormBlock().eval())
    x = torch.randn(4, 5, 6)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, prune_normalized=True)], example_inputs=(x,))
    kept = torch.as_tensor([int(torch.nonzero((gm.up.weight == row).all(1))[0]) for row in pruned.up.weight])
    assert len(kept) == 6 and torch.equal(pruned.norm.weight, gm.norm.weight[kept])
    h = F.linear(x, gm.up.weight[kept], gm.up.bias[kept])
    h = gm.norm.weight[kept] * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = F.linear(h, gm.down.weight[:, kept], gm.down.bias)
    torch.testing.assert_close(pruned(x), expected, atol=1e-6, rtol=1e-6)


def test_llama_through_the_export_front_end_prunes_rotary_pairs_exactly():
    """torch.export writes rotate_half's bounds as constants: the same pairs go, the same outputs."""
    model = LlamaSmall(sdpa=True).eval()
    inputs = (_tokens(),)
    gm = fxcompress.compile(model, [], example_inputs=inputs, frontend="export")
    cg, removed, pruned = _zeroed_then_pruned(gm, inputs, "head_dims")
    kept_freq = _kept_rows(cg, removed, "rotary_emb.inv_freq")
    rows = _kept_rows(cg, removed, "layers.0.self_attn.k_proj.weight")
    assert np.array_equal(rows, np.sort(np.concatenate([kept_freq + o for o in (0, 4, 8, 12)])))
    torch.testing.assert_close(pruned(*inputs), gm(*inputs), atol=1e-5, rtol=1e-5)


# ---- T5: relative position bias into F.scaled_dot_product_attention's attn_mask ----------------------
class T5Attention(nn.Module):
    """T5's self-attention: no scaling, a relative position bias from an Embedding(num_buckets, n_heads)
    computed by the first layer and passed on, added to the scores as sdpa's attn_mask."""

    def __init__(self, d_model: int = 32, heads: int = 4, d_kv: int = 8, has_bias: bool = True,
                 num_buckets: int = 8, max_distance: int = 16) -> None:
        super().__init__()
        self.n_heads, self.key_value_proj_dim, self.inner_dim = heads, d_kv, heads * d_kv
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q, self.k, self.v = (nn.Linear(d_model, self.inner_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(self.inner_dim, d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads) if has_bias else None

    @staticmethod
    def _relative_position_bucket(relative_position, num_buckets: int, max_distance: int):
        num_buckets //= 2  # bidirectional
        relative_buckets = (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                             * (num_buckets - max_exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, num_buckets - 1))
        return relative_buckets + torch.where(is_small, relative_position, large)

    def compute_bias(self, query_length, key_length, device):
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        bucket = self._relative_position_bucket(memory_position - context_position, self.num_buckets,
                                                self.max_distance)
        values = self.relative_attention_bias(bucket)  # (query_length, key_length, n_heads)
        return values.permute([2, 0, 1]).unsqueeze(0)  # (1, n_heads, query_length, key_length)

    def forward(self, hidden_states, position_bias=None):
        batch_size, seq_length = hidden_states.size(0), hidden_states.size(1)
        q, k, v = (p(hidden_states).view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        if position_bias is None:
            position_bias = self.compute_bias(seq_length, seq_length, hidden_states.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)
        out = out.transpose(1, 2).contiguous().view(batch_size, -1, self.inner_dim)
        return self.o(out), position_bias


class T5Small(nn.Module):
    """Two T5 encoder layers sharing the first layer's position bias (so their heads are coupled), each
    with an MLP; a classifier head on the last position keeps the residual stream off the output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.ModuleList([T5Attention(has_bias=True), T5Attention(has_bias=False)])
        self.wi = nn.ModuleList(nn.Linear(32, 64, bias=False) for _ in range(2))
        self.wo = nn.ModuleList(nn.Linear(64, 32, bias=False) for _ in range(2))
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids):
        h, bias = self.embed(input_ids), None
        for i in range(2):
            a, bias = self.attn[i](h, bias)
            h = h + a
            h = h + self.wo[i](F.relu(self.wi[i](h)))
        return self.head(h[:, -1])


def test_t5_position_bias_loses_the_heads_that_go():
    """attention="heads": the bias embedding's columns are the attn_mask's head dim, so they go with the
    heads of both layers (one shared bias couples them); exact."""
    gm = trace(T5Small().eval())
    (x,) = inputs = (_tokens(),)
    cg, removed, pruned = _zeroed_then_pruned(gm, inputs, "heads")
    heads = _kept_rows(cg, removed, "attn.0.relative_attention_bias.weight", dim=1)
    assert len(heads) == 2 and pruned.get_submodule("attn.0.relative_attention_bias").embedding_dim == 2
    rows = np.concatenate([np.arange(8) + 8 * h for h in heads])
    for i in range(2):
        for name in ("q", "k", "v"):
            assert np.array_equal(_kept_rows(cg, removed, f"attn.{i}.{name}.weight"), rows)
    assert torch.equal(pruned.get_submodule("attn.0.relative_attention_bias").weight,
                       gm.get_submodule("attn.0.relative_attention_bias").weight[:, heads])
    for other in (x, _tokens(5, 3)):
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


def test_t5_position_bias_freezes_its_heads_when_head_dims_are_pruned():
    gm = trace(T5Small().eval())
    (x,) = inputs = (_tokens(),)
    cg, removed, pruned = _zeroed_then_pruned(gm, inputs, "head_dims")
    bias = next(g for g in cg.groups if "attn.0.relative_attention_bias" in g.producers)
    assert len(bias.prunable) == 0 and "scaled_dot_product_attention" in bias.frozen
    assert pruned.get_submodule("attn.0.relative_attention_bias").embedding_dim == 4
    assert pruned.get_submodule("attn.1.q").out_features == 16  # 4 heads of 4
    torch.testing.assert_close(pruned(x), gm(x), atol=1e-5, rtol=1e-5)


# ---- GPT-2: fused Conv1D qkv split into three -------------------------------------------------------
class GPT2ExportedAttention(nn.Module):
    """GPT-2's eager attention as torch.export leaves it: the fused c_attn split into q / k / v, heads
    split by constants, the scale `value.size(-1) ** 0.5` a constant, heads merged by reshape then
    flattened by Conv1D's view, with no `.contiguous()` (export drops it: a no-op when traced)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        qkv = torch.addmm(self.c_attn.bias, x.view(-1, self.dim), self.c_attn.weight).view(b, t, 3 * self.dim)
        q, k, v = qkv.split(self.dim, dim=2)
        q = q.view(b, t, -1, self.dim // self.heads).transpose(1, 2)
        k = k.view(b, t, -1, self.dim // self.heads).transpose(1, 2)
        v = v.view(b, t, -1, self.dim // self.heads).transpose(1, 2)
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8 ** 0.5, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, -1)
        return torch.addmm(self.c_proj.bias, out.view(-1, self.dim), self.c_proj.weight).view(b, t, self.dim)


def _zero_heads_of_fused_qkv(gm, heads: list[int], dim: int = 32, head_dim: int = 8) -> torch.Tensor:
    """Zero whole heads of c_attn's q, k and v columns; the kept columns of c_attn."""
    gone = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) + part * dim for h in heads for part in range(3)])
    with torch.no_grad():
        gm.c_attn.weight[:, gone] = 0.0
        gm.c_attn.bias[gone] = 0.0
    return torch.as_tensor(np.setdiff1d(np.arange(3 * dim), gone.numpy()))


def test_gpt2_fused_qkv_loses_whole_heads_in_all_three_parts():
    gm = trace(GPT2ExportedAttention().eval())
    x = torch.randn(2, 6, 32)
    kept = _zero_heads_of_fused_qkv(gm, [0, 3])
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads")], example_inputs=(x,))
    assert torch.equal(pruned.c_attn.weight, gm.c_attn.weight[:, kept])
    assert torch.equal(pruned.c_proj.weight, gm.c_proj.weight[8:24])  # its input rows: heads 1 and 2
    splits = [n.args[1] for n in pruned.graph.nodes if n.target in ("split", torch.split)]
    assert splits == [[16, 16, 16]]
    torch.testing.assert_close(pruned(x), gm(x), atol=1e-5, rtol=1e-5)


def test_head_dims_pruned_to_one_still_run_where_export_dropped_contiguous():
    """head_dim 8 -> 1: the merged heads are no longer contiguous after reshape, so the rewritten view
    is spelled reshape (the same view wherever a view works); the zeroed model's outputs stay."""
    gm = trace(GPT2ExportedAttention().eval())
    x = torch.randn(2, 6, 32)
    cg = _graph(gm, (x,))
    removed = np.zeros(cg.labels.max() + 1, dtype=bool)
    scores = np.random.default_rng(0).random(len(removed))
    for g in cg.prunable_groups():
        for unit in layer_units(cg, g):
            removed[lowest(unit, scores, removal_count(unit, 0.875, 1, 1), cg, 1)] = True
    zero_classes(gm, cg, removed)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.875)], example_inputs=(x,))
    assert pruned.c_attn.weight.shape == (32, 12) and pruned.c_proj.weight.shape == (4, 32)
    torch.testing.assert_close(pruned(x), gm(x), atol=1e-5, rtol=1e-5)


# ---- what must stay -----------------------------------------------------------------------------------
class LengthSlicedTable(nn.Module):
    """A learned table added to a hidden state, sliced by the input's length (`table[:, : x.size(1)]`):
    that bound reads no width, so the table's positions stay; its channels prune with fc1's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 16, 8))
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) + self.table[:, : x.size(1)])


def test_a_slice_bounded_by_another_size_freezes_and_keeps_reading_it():
    gm = trace(LengthSlicedTable().eval())
    x = torch.randn(2, 5, 8)
    cg = _graph(gm, (x,))
    positions = cg.labels[cg.slots[("table", 1)]]
    assert all("computed bounds" in cg.frozen_classes[int(c)] for c in positions)
    removed = pick_half(cg)
    zero_classes(gm, cg, removed)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=(x,))
    assert pruned.table.shape == (1, 16, 4) and pruned.fc1.out_features == 4
    for other in (x, torch.randn(3, 11, 8)):  # the bound still reads the length at run time
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


class TiedUnderOneName(nn.Module):
    """An LM head tied to an embedding, both read as one get_attr (as torch.export can write a tied pair)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, ids):
        return F.linear(F.relu(self.mid(F.embedding(ids, self.embed.weight))), self.embed.weight)


def test_a_tied_tensor_read_under_one_name_is_cut_under_every_name():
    """The head module still holds the tensor under its own name, which the graph never reads (an
    exported program's module() keeps such modules): it is cut with the one the graph reads."""
    gm = trace(TiedUnderOneName().eval())
    gm.head = nn.Linear(16, 20, bias=False)
    gm.head.weight = gm.embed.weight
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} == {"embed.weight"}
    ids = torch.randint(0, 20, (2, 5))
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=(ids,))
    assert pruned.embed.weight is pruned.head.weight and pruned.embed.weight.shape == (20, 8)
    assert _params(pruned) == 20 * 8 + 8 * 8 + 8  # the tied table counted once
