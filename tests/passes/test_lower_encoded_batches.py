"""LowerToEncoded encodes in batches bounded by the model's size: the file it writes is, byte for byte,
the file the straightforward encoder (tests/encoded/reference_encoding.py) gives each weight alone,
whatever the batches; the global thresholds are those of a stable sort of all scores."""
import copy
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
import fxcompress.passes.lower_encoded as lower_encoded

from encoded import reference_encoding as ref


class Block(nn.Module):
    """bench_scale's pre-norm GPT block (fused qkv, scaled_dot_product_attention, MLP 4x), small."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


def _fake_quant_model():
    torch.manual_seed(0)
    model = nn.Sequential(Block(64), Block(64)).eval()
    x = torch.randn(1, 8, 64)
    scores = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:round(0.9 * scores.numel())]] = False  # the full ranking
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9, scope="global"), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,))
    return gm, x, keep


def _file_hash(gm, path) -> str:
    fxcompress.save(gm, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reference_file(gm, lowered, path) -> str:
    """The lowered model with every encoded weight replaced by the reference encoder's encoding of the
    fake-quant model's effective weight: the file main's encoder would write."""
    reference = copy.deepcopy(lowered)
    weights = {layer.weight: effective_weight(gm, layer) for layer in find_layers(gm)}
    for path_, module in list(reference.named_modules()):
        if isinstance(module, EncodedWeight):
            owner, _, name = path_.rpartition(".")
            encoded = ref.encode_tensor(weights[path_.removesuffix("_encoded")], index_bits=module.header["index_bits"])
            reference.get_submodule(owner).add_module(name, EncodedWeight.from_encoded(encoded, bits=module.bits))
    return _file_hash(reference, path)


def test_batched_encoding_writes_the_reference_file(tmp_path, monkeypatch):
    gm, x, keep = _fake_quant_model()
    masks = torch.cat([gm.get_buffer(f"{layer.weight}_mask").flatten() for layer in find_layers(gm)])
    assert torch.equal(masks, keep)  # the thresholds: a stable sort of every score
    batches = []
    encode = LowerToEncoded._encode
    monkeypatch.setattr(LowerToEncoded, "_encode", lambda self, w, *a: batches.append(len(w)) or encode(self, w, *a))
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    assert len(batches) > 2 and max(batches) < len(find_layers(gm))  # several batches really ran
    ours = _file_hash(lowered, tmp_path / "ours.fxc")
    assert ours == _reference_file(gm, lowered, tmp_path / "reference.fxc")
    monkeypatch.setattr(lower_encoded, "_BATCH_SHARE", 1)  # every weight in one batch, as main encoded this model
    batches.clear()
    together = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    assert [b for b in batches if b] == [len(find_layers(gm))]
    assert _file_hash(together, tmp_path / "together.fxc") == ours
    assert torch.equal(together(x), gm(x))


def test_inplace_false_shares_the_callers_tensors_and_leaves_them_untouched():
    """compile(inplace=False) with passes that only read tensors copies the module tree, not the weights
    the passes replace: the caller's model keeps every tensor, value, version and flag, and still computes
    as before; the tensors the result keeps (biases) are its own, so writing into it leaves the caller's."""
    gm, x, _ = _fake_quant_model()
    before = {name: (t.clone(), t.data_ptr(), t._version, t.requires_grad) for name, t in gm.state_dict(keep_vars=True).items()}
    expected = gm(x)
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    after = gm.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for name, (value, pointer, version, grad) in before.items():
        assert torch.equal(after[name], value) and after[name].data_ptr() == pointer, name
        assert after[name]._version == version and after[name].requires_grad == grad, name
    assert torch.equal(gm(x), expected) and torch.equal(lowered(x), expected)
    kept = dict(lowered.named_parameters())
    assert kept and all(kept[name].data_ptr() != before[name][1] for name in kept)  # copies of what is kept
    with torch.no_grad():
        for parameter in kept.values():
            parameter.add_(1.0)  # as an optimizer step would
    assert all(torch.equal(after[name], before[name][0]) for name in kept)
    assert torch.equal(gm(x), expected)
    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5, select="0.fc")], example_inputs=(x,))
    assert masked.get_parameter("0.fc.weight").data_ptr() != before["0.fc.weight"][1]  # other passes: a real copy
