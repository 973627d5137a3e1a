"""Group-wise linear grids in the encoded file: one step per group, the integers of all groups in one
alphabet. Decoding is bit-identical to the fake-quant weights, and the file is smaller than the
per-group float codebooks the encoder found without the steps."""
import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.tensor import GroupSteps, decode_tensor, encode_tensor
from fxcompress.errors import FormatError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded

PATH = "fc1.weight_encoded"


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 96), nn.Linear(96 * 4 // 3, 32)  # fc2's 128 inputs fit every group

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.cat([h, h[:, :32]], dim=1))


@functools.cache
def _fake_quant(group_size: int, symmetric: bool, sparsity: float | None):
    """The fake-quant model, made once per setting: both tests lower the same ones (compile copies it)."""
    torch.manual_seed(group_size + symmetric)
    x = torch.randn(4, 256)
    passes = ([InsertMasks(sparsity=sparsity)] if sparsity else []) + \
        [InsertFakeQuant(bits=4, method="linear", group_size=group_size, symmetric=symmetric)]
    gm = fxcompress.compile(TwoLayers().eval(), passes, example_inputs=(x,))
    return gm, {layer.weight: effective_weight(gm, layer).clone() for layer in find_layers(gm)}, x


def _lowered(group_size: int, symmetric: bool, sparsity: float | None, **lower):
    gm, fake, x = _fake_quant(group_size, symmetric, sparsity)
    return fxcompress.compile(gm, [LowerToEncoded(**lower)], example_inputs=(x,)), fake, x


def _encoded(gm) -> dict[str, EncodedWeight]:
    return {path.removesuffix("_encoded"): m for path, m in gm.named_modules() if isinstance(m, EncodedWeight)}


@pytest.mark.parametrize("group_size, symmetric, sparsity", [  # each group size, both grids, with and without masks
    (32, True, 0.5), (32, False, None), (64, False, 0.5), (64, True, None), (128, True, 0.5), (128, False, None)])
def test_lowered_group_grids_decode_bit_identically(group_size, symmetric, sparsity, tmp_path):
    gm, fake, x = _lowered(group_size, symmetric, sparsity)
    encoded = _encoded(gm)
    assert set(encoded) == set(fake)
    for path, module in encoded.items():
        assert module.header["codebook"] == "group_grid" and module.header["group_size"] == group_size
        dense = module()
        assert dense.view(torch.int32).equal(fake[path].view(torch.int32)), path  # bit patterns, not values
        if sparsity:
            assert (dense == 0).float().mean() >= 0.5
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    for path, module in _encoded(loaded).items():
        assert module().view(torch.int32).equal(fake[path].view(torch.int32))
    assert torch.equal(loaded(x), gm(x))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["dense", "relative"])
def test_the_file_is_smaller_than_per_group_float_codebooks(symmetric, layout):
    gm, fake, _ = _lowered(64, symmetric, 0.5, layout=layout)
    for path, module in _encoded(gm).items():
        without_steps = encode_tensor(fake[path], layouts=(layout,), index_bits=5)
        assert without_steps.codebook != "group_grid"
        ours = sum(module.storage_bytes().values())
        assert ours < 0.6 * without_steps.nbytes, (path, ours, without_steps.nbytes)
        assert module.header["layout"] == layout
        assert torch.equal(module(), fake[path])


def _on_grid(rows: int, cols: int, group_size: int, steps: np.ndarray, seed: int, density: float = 1.0):
    rng = np.random.default_rng(seed)
    k = rng.integers(-7, 8, (rows, cols)) * (rng.random((rows, cols)) < density)
    w = (k.astype(np.float32) * np.repeat(steps.reshape(rows, -1), group_size, axis=1)).astype(np.float32)
    return torch.from_numpy(w)


def test_steps_are_float16_only_where_that_decodes_exactly():
    rng = np.random.default_rng(0)
    halves = (2.0 ** rng.integers(-12, -4, 48)).astype(np.float32)  # exact in float16
    arbitrary = rng.uniform(0.01, 0.02, 48).astype(np.float32)      # not
    for steps, width in ((halves, 2), (arbitrary, 4)):
        w = _on_grid(12, 128, 32, steps, 1)
        encoded = encode_tensor(w, groups=GroupSteps(steps, 32))
        assert encoded.codebook == "group_grid" and encoded.codebook_data.size == width * 48
        assert torch.equal(decode_tensor(encoded), w)


def test_steps_that_do_not_fit_the_values_are_not_used():
    steps = np.full(24, 0.01, np.float32)
    w = _on_grid(12, 128, 64, steps, 2)
    wrong = encode_tensor(w, groups=GroupSteps(steps * np.float32(1.37), 64))  # not the grid's steps
    assert wrong.codebook != "group_grid" and torch.equal(decode_tensor(wrong), w)
    w[3, 5] += 1e-4  # one value off the grid
    off = encode_tensor(w, groups=GroupSteps(steps, 64))
    assert off.codebook != "group_grid" and torch.equal(decode_tensor(off), w)
    with pytest.raises(ValueError, match="GroupSteps: 24 steps of 32 elements"):
        encode_tensor(w, groups=GroupSteps(steps, 32))


def test_a_group_grid_is_no_larger_than_the_information_it_holds():
    """Entropy-coded integers come within 2% (plus tables) of mask entropy + code entropy."""
    rng = np.random.default_rng(3)
    steps = rng.uniform(0.01, 0.02, 256).astype(np.float32)
    w = _on_grid(128, 128, 64, steps, 4, density=0.5)
    encoded = encode_tensor(w, groups=GroupSteps(steps, 64))
    k = np.rint(w.numpy().reshape(-1) / np.repeat(steps, 64)).astype(np.int64) + 7
    p = np.bincount(k) / k.size
    bound = -(p[p > 0] * np.log2(p[p > 0])).sum() * k.size / 8
    assert encoded.values.nbytes <= 1.02 * bound + 200
    assert encoded.values.nbytes >= bound  # no coder beats the entropy: the measurement is real


# --- hostile headers ------------------------------------------------------------------------------

def _module() -> tuple[dict, bytes]:
    steps = np.random.default_rng(5).uniform(0.01, 0.02, 24).astype(np.float32)
    w = _on_grid(12, 128, 64, steps, 6, density=0.6)
    module = EncodedWeight.from_encoded(encode_tensor(w, groups=GroupSteps(steps, 64), codings=("huffman",)))
    assert module.header["codebook"] == "group_grid" and module.header["codebook_bytes"] == 96
    return copy.deepcopy(module.header), module.payload.numpy().tobytes()


def _refused(header: dict, payload: bytes, match: str) -> None:
    with torch.device("meta"):
        module = EncodedWeight(header=header)
    module.register_buffer("payload", torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()))
    with pytest.raises(FormatError, match=f"^encoded weight {PATH}: {match}"):
        module.check_loaded(PATH)


@pytest.mark.parametrize("edit, match", [
    (lambda h, p: h.pop("group_size") and p, "header: group_size goes with the group_grid codebook"),
    (lambda h, p: h.update(codebook="table") or p, "header: group_size goes with the group_grid codebook"),
    (lambda h, p: h.update(group_size=100) or p, "header: group_size 100 does not divide the 1536 elements"),
    (lambda h, p: h.update(group_size=0) or p, r"header: field 'group_size' is 0, expected an integer in \[1, 1536\]"),
    (lambda h, p: h.update(group_size=10 ** 9) or p, r"header: field 'group_size' is 1000000000"),
    (lambda h, p: h.update(group_size="64") or p, r"header: field 'group_size' is '64'"),
    (lambda h, p: h.update(group_size=128) or p, "codebook: 96 bytes are not one float16 or float32 step for each "
                                                 "of 12 groups"),
    (lambda h, p: h.update(dtype="float64") or p, "header: a group_grid codebook decodes in float32"),
    (lambda h, p: h.update(offset=-(1 << 30)) or p, "header: offset -1073741824 and alphabet"),
    (lambda h, p: b"\xff\xff\xff\x7f" + p[4:], "codebook: a group step is not finite"),
    (lambda h, p: h.update(codebook_bytes=48) or p, "header: codebook and streams describe|values stream"),
])
def test_crafted_group_grid_headers_name_the_part(edit, match):
    header, payload = _module()
    payload = edit(header, payload)  # edits the header in place, returns the payload
    _refused(header, payload, match)


def test_the_unmutated_group_grid_passes_and_a_group_size_on_another_kind_is_refused():
    header, payload = _module()
    with torch.device("meta"):
        module = EncodedWeight(header=header)
    module.register_buffer("payload", torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()))
    module.check_loaded(PATH)
    assert module().shape == (12, 128)
    table = EncodedWeight.from_encoded(encode_tensor(torch.tensor([[0.5, 1.5], [2.5, 0.0]]), codings=("fixed",)))
    header = copy.deepcopy(table.header) | {"group_size": 2}
    _refused(header, table.payload.numpy().tobytes(), "header: group_size goes with the group_grid codebook")
