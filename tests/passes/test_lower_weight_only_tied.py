"""A linear layer tied to a token embedding (GPT-2's LM head reading `wte`) lowered by LowerWeightOnly
and LowerDynamicInt8: the head runs on its measured kernel, the embedding gathers rows of the same codes
(one copy of the weight in the model and in the file)."""
import copy
import json
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import FormatError, PreconditionError
from fxcompress.fileformat.container import HEADER_BYTES, from_bytes, to_bytes
from fxcompress.kernels.dynamic import DynamicInt8Embedding, DynamicInt8Linear
from fxcompress.kernels.weight_only import WeightOnlyEmbedding, WeightOnlyLinear
from fxcompress.layers import find_layers, layer_node, weight_arg
from fxcompress.passes import InsertFakeQuant, LowerDynamicInt8, LowerWeightOnly

VOCAB, DIM, CONTEXT = 96, 64, 8


class TinyGPT(nn.Module):
    """Token and position embeddings, one pre-norm MLP block, an LM head tied to the token table: an
    nn.Linear sharing the Parameter (Hugging Face's tying) or F.linear on the table (`functional`)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(CONTEXT, DIM)
        self.ln, self.fc, self.proj, self.ln_f = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM), \
            nn.LayerNorm(DIM)
        self.functional = functional
        if not functional:
            self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        x = x + self.proj(F.gelu(self.fc(self.ln(x))))
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight) if self.functional else self.lm_head(x)


def _tokens():
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def _fake_quant(functional=False, **grid):
    torch.manual_seed(0)
    grid = grid or {"bits": 4, "group_size": 32}
    return fxcompress.compile(TinyGPT(functional).eval(), [InsertFakeQuant(method="linear", **grid)],
                              example_inputs=(_tokens(),))


@pytest.fixture(scope="module")
def fake_quantized():
    """The default 4-bit, group-32 fake-quant model, once for the module: the tests only read it (compile
    copies it; the lowered models each test changes are its own)."""
    return _fake_quant()


def _lowered(fq, lowering=None):
    return fxcompress.compile(fq, [lowering or LowerWeightOnly(repeats=1)], example_inputs=(_tokens(),))


@pytest.fixture(scope="module")
def lowered(fake_quantized):
    """The default fake-quant model lowered by LowerWeightOnly, once for the module: tests that change it
    change a deep copy (test_copies_and_conversions_keep_the_tie shows a copy keeps the tie)."""
    return _lowered(fake_quantized)


def _pair(gm, head_type=WeightOnlyLinear, embedding_type=WeightOnlyEmbedding):
    (head,) = [m for m in gm.modules() if isinstance(m, head_type) and m.out_features == VOCAB]
    (embedding,) = [m for m in gm.modules() if isinstance(m, embedding_type)]
    return head, embedding


def test_one_group_wise_grid_on_the_tied_table_is_read_by_the_embedding_and_the_head(fake_quantized):
    fq = fake_quantized
    embedding, head = (layer_node(fq, layer) for layer in find_layers(fq) if layer.weight == "wte.weight")
    assert weight_arg(embedding) is weight_arg(head) and weight_arg(head).target == "wte.weight_quant"
    quant = fq.wte.weight_quant
    assert quant.axis == 0 and quant.group_size == 32  # groups of each token's row: the head's output rows
    table = quant(fq.wte.weight)
    assert all(torch.unique(group).numel() <= 16 for group in table.reshape(-1, 32))
    assert torch.unique(table).numel() > 16  # the grids differ from group to group


@pytest.mark.parametrize("functional, grid", [(False, dict(bits=4, group_size=32)),
                                              (True, dict(bits=4, group_size=64, symmetric=True)),
                                              (False, dict(bits=8, symmetric=True, group_size=DIM))])
def test_outputs_equal_the_fake_quant_model_and_the_weight_is_held_once(functional, grid):
    fq = _fake_quant(functional, **grid)
    gm, x = _lowered(fq), _tokens()
    head, embedding = _pair(gm)
    table = fq.wte.weight_quant(fq.wte.weight)
    assert torch.equal(embedding(x), F.embedding(x, table))  # rows exact, dequantized only where read
    for kernel in (head.kernel, "float"):
        head.kernel, head._run = kernel, None
        torch.testing.assert_close(gm(x), fq(x), rtol=1e-5, atol=1e-5)
    assert all(embedding._buffers[n] is head._buffers[n] for n in ("codes", "scale", "zero"))
    tensors = dict(gm.named_buffers(remove_duplicate=False)) | dict(gm.named_parameters(remove_duplicate=False))
    unique = {t.data_ptr(): t for t in tensors.values()}
    assert len(unique) == len(tensors) - 3  # the embedding's three names are the head's tensors
    assert not any(t.is_floating_point() and t.numel() >= VOCAB * DIM for t in unique.values())  # no float table
    held = sum(t.numel() * t.element_size() for t in unique.values())
    float_bytes = sum(p.numel() * 4 for p in TinyGPT().parameters())
    assert held < float_bytes * (0.2 if grid["bits"] == 4 else 0.35)
    stats = fxcompress.history(gm)[-1].stats
    name = "linear" if functional else "lm_head"
    assert stats["layers"][name]["tied_embeddings"] == ["wte.weight_only_embedding"] and not stats["skipped"]
    assert "wte.weight_only_embedding" in stats["layers"][name]["shared_weight"]
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    tied = rows["wte.weight_only_embedding (rows of wte.weight_only)"]  # its weight is the head's row
    assert tied["params"] == tied["compressed_bytes"] == 0 and rows["wte.weight_only"]["params"] == VOCAB * DIM


def test_save_load_keeps_one_copy_and_the_tie(lowered):
    gm, x = lowered, _tokens()
    data = to_bytes(gm)
    manifest = json.loads(zlib.decompress(data[HEADER_BYTES:]))
    ties = {entry["name"]: entry["same_as"] for entry in manifest["tensors"] if "same_as" in entry}
    assert ties == {f"wte.weight_only_embedding.{n}": f"wte.weight_only.{n}" for n in ("codes", "scale", "zero")}
    loaded = from_bytes(data)
    head, embedding = _pair(loaded)
    assert embedding.head is head and all(embedding._buffers[n] is head._buffers[n] for n in ("codes", "scale"))
    assert torch.equal(loaded(x), gm(x))


def _reloaded(lowered, change):
    gm = copy.deepcopy(lowered)
    change(*_pair(gm))
    return from_bytes(to_bytes(gm))


@pytest.mark.parametrize("change, message", [
    (lambda head, emb: emb._buffers.update(codes=emb.codes.clone()), "are not those of one WeightOnlyLinear"),
    (lambda head, emb: setattr(emb, "num_embeddings", 48), r"'codes' is torch.uint8 \[96, 32\] .* torch.uint8 \[48, 32\]"),
    (lambda head, emb: setattr(emb, "group_size", 64), r"'scale' is torch.float32 \[96, 2\] .* torch.float32 \[96, 1\]"),
    (lambda head, emb: setattr(emb, "packing", "pairs"), "does not match its head's"),
    (lambda head, emb: setattr(emb, "bits", 5), "WeightOnlyEmbedding: needs positive"),
])
def test_a_file_that_breaks_the_tie_or_its_shapes_is_refused(lowered, change, message):
    with pytest.raises(FormatError, match=message):
        _reloaded(lowered, change)


def test_copies_and_conversions_keep_the_tie(fake_quantized):
    gm = _lowered(fake_quantized)  # its own: _apply converts it in place
    for model in (copy.deepcopy(gm), gm._apply(lambda t: t.clone())):
        head, embedding = _pair(model)
        assert embedding.head is head and all(embedding._buffers[n] is head._buffers[n]
                                              for n in ("codes", "scale", "zero"))


def test_torch_export_and_compile_run_the_tied_model(lowered):
    gm, x = lowered, _tokens()
    expected = gm(x)
    exported = torch.export.export(gm, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-5)


def test_a_per_column_grid_on_the_tied_table_is_skipped_with_the_reason():
    fq = _fake_quant(bits=8, per_channel=True, symmetric=True)  # an embedding's channels: its table's columns
    stats = fxcompress.history(_lowered(fq))[-1].stats
    assert "not along its output channels" in stats["skipped"]["lm_head"] and set(stats["layers"]) == {"fc", "proj"}


def test_dynamic_int8_lowers_the_tied_head_and_its_embedding_reads_the_same_codes():
    torch.manual_seed(0)
    model, x = TinyGPT().eval(), _tokens()
    gm = fxcompress.compile(model, [LowerDynamicInt8(repeats=1)], example_inputs=(x,))
    head, embedding = _pair(gm, DynamicInt8Linear, DynamicInt8Embedding)
    assert embedding.weight is head.weight and embedding.weight_scale is head.weight_scale
    table = head.dequantize()
    assert torch.equal(embedding(x), F.embedding(x, table))
    assert (table - model.wte.weight).abs().max() <= head.weight_scale.max() / 2 + 1e-7  # on the int8 grid
    stats = fxcompress.history(gm)[-1].stats["layers"]["lm_head"]
    assert stats["tied_embeddings"] == ["wte.dynamic_int8_embedding"]
    loaded = from_bytes(to_bytes(gm))
    assert torch.equal(loaded(x), gm(x)) and _pair(loaded, DynamicInt8Linear, DynamicInt8Embedding)[1].head is not None


def test_select_may_name_the_tied_head_alone_and_a_weight_shared_by_two_linear_layers_is_refused(fake_quantized):
    gm = _lowered(fake_quantized, LowerWeightOnly(repeats=1, select="lm_head"))
    assert set(fxcompress.history(gm)[-1].stats["layers"]) == {"lm_head"}
    torch.testing.assert_close(gm(_tokens()), fake_quantized(_tokens()), rtol=1e-5, atol=1e-5)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
            self.fc2.weight = self.fc1.weight

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
    x = torch.randn(2, DIM)
    fq = fxcompress.compile(Shared().eval(), [InsertFakeQuant(method="linear", bits=4, group_size=32)],
                            example_inputs=(x,))
    with pytest.raises(PreconditionError, match=r"tied to another layer's \(fc2_1?, linear\), not only to token"):
        fxcompress.compile(fq, [LowerWeightOnly(repeats=1)], example_inputs=(x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_converting_the_model_keeps_the_tie_and_the_float32_codes_scales(fake_quantized, dtype):
    """The head and its embedding share their scales: `.double()` must leave one float32 tensor, read by both."""
    gm, x = _lowered(fake_quantized), _tokens()
    expected = gm(x)
    gm.to(dtype)
    head, embedding = _pair(gm)
    assert embedding.head is head and all(embedding._buffers[n] is head._buffers[n] for n in ("codes", "scale", "zero"))
    assert head.scale.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(gm(x).float(), expected, rtol=tolerance, atol=tolerance)
