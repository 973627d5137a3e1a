"""Embeddings and Hugging Face's Conv1D (addmm, weight [in, out]) as layers for every weight pass,
and tied embedding / LM head pairs, which stay one tensor through masks, fake-quant, encoding and
the file format."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.layers import find_layers, layer_node, weight_arg
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import GPT2Block, gpt2_tokens


def _compiled(passes):
    torch.manual_seed(0)
    x = gpt2_tokens()
    return fxcompress.compile(GPT2Block().eval(), passes, example_inputs=(x,)), x


@pytest.fixture(scope="module")
def traced():
    """The block compiled without passes, once for the module: the tests using it only read it."""
    return _compiled([])


@pytest.fixture(scope="module")
def masked_and_quantized():
    """The block with masks and 4-bit k-means, once for the module: the tests using it only read it
    (compile copies it; a hook a test adds is removed)."""
    return _compiled([InsertMasks(sparsity=0.7), InsertFakeQuant(bits=4, method="kmeans")])


def test_every_embedding_and_conv1d_is_a_layer_and_the_lm_head_is_tied_to_the_token_table(traced):
    gm, _ = traced
    layers = {layer.name: layer for layer in find_layers(gm)}
    assert {name: layer.kind for name, layer in layers.items() if layer.tied_to is None} == {
        "wte": "embedding", "wpe": "embedding", "attn.c_attn": "addmm", "attn.c_proj": "addmm", "c_fc": "addmm",
        "c_proj": "addmm"}
    assert layers["lm_head"].tied_to == "wte" and layers["lm_head"].kind == "linear"


def test_a_tied_weight_gets_one_mask_and_one_quantizer_read_by_both_layers(masked_and_quantized):
    gm, x = masked_and_quantized
    embedding, head = (layer_node(gm, layer) for layer in find_layers(gm) if layer.weight == "wte.weight")
    assert weight_arg(embedding) is weight_arg(head) and weight_arg(embedding).target == "wte.weight_quant"
    assert not hasattr(gm, "lm_head")  # the head's module held only the shared weight
    shared = gm.wte.weight_quant(gm.wte.weight * gm.wte.weight_mask)
    assert torch.unique(shared).numel() <= 16 and (shared == 0).float().mean() >= 0.7
    hidden = {}
    hook = gm.ln_f.register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
    try:
        torch.testing.assert_close(gm(x), hidden["h"] @ shared.t())
    finally:
        hook.remove()


def test_a_tied_weight_is_encoded_and_saved_once_and_loads_shared_and_exact(masked_and_quantized):
    gm, x = masked_and_quantized
    expected = gm(x)
    encoded = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    loaded = from_bytes(to_bytes(encoded))
    for model in (encoded, loaded):
        embedding, head = (layer_node(model, layer) for layer in find_layers(model)
                           if layer.weight == "wte.weight_encoded" or "tied" in layer.name or layer.name == "wte")
        assert weight_arg(embedding) is weight_arg(head) and weight_arg(embedding).target == "wte.weight_encoded"
        assert not any(name.startswith(("lm_head", "wte.weight_quant")) or name == "wte.weight"
                       for name, _ in model.named_parameters())
        assert torch.equal(model(x), expected)
    rows = {row["layer"]: row for row in fxcompress.summary(encoded).rows}
    (tied,) = [row for name, row in rows.items() if name.endswith("(tied to wte)")]
    assert tied["params"] == tied["compressed_bytes"] == 0 and tied["op"] == "linear" and tied["macs"] > 0
    assert rows["wte"]["exact"] == "yes" and rows["wte"]["params"] == 50 * 32


def test_per_channel_quantization_follows_the_output_dims_of_embeddings_and_conv1d():
    """Per channel is per embedding dimension (weight dim 1) for an embedding, per output feature
    (weight dim 1, the [in, out] layout) for Conv1D: the dims channel pruning removes."""
    gm, _ = _compiled([InsertFakeQuant(bits=2, method="linear", per_channel=True)])
    for name in ("wte", "c_fc"):
        weight = gm.get_submodule(name).weight
        quantized = gm.get_submodule(f"{name}.weight_quant")(weight)
        assert all(torch.unique(column).numel() <= 4 for column in quantized.unbind(1)), name
        assert torch.unique(quantized).numel() > 4, name  # the grids differ from column to column


def test_filter_masks_of_conv1d_remove_whole_output_columns():
    gm, x = _compiled([InsertMasks(sparsity=0.5, granularity="filter", select="c_fc")])
    mask = gm.c_fc.weight_mask
    assert mask.shape == (32, 128) and torch.equal(mask.all(0), mask.any(0)) and int(mask.all(0).sum()) == 64


def test_summary_counts_conv1d_macs_from_its_input_and_none_for_a_lookup(traced):
    gm, x = traced
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    tokens = x.numel()
    assert rows["c_fc"]["macs"] == tokens * 32 * 128 and rows["attn.c_attn"]["macs"] == tokens * 32 * 96
    assert rows["wte"]["macs"] == rows["wpe"]["macs"] == 0 and rows["lm_head (tied to wte)"]["macs"] == tokens * 32 * 50
    assert sum(row["params"] for row in rows.values()) == sum(p.numel() for p in GPT2Block().parameters())


def test_channel_masks_of_an_embedding_are_refused_by_name():
    with pytest.raises(PreconditionError, match="granularity 'channel' needs input channels; wte is embedding"):
        _compiled([InsertMasks(sparsity=0.5, granularity="channel", select="wte")])
