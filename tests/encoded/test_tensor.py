"""Random sparse / quantized tensors of random shapes and bit widths round-trip bit for bit."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.streams import CODINGS
from fxcompress.encoded.tensor import LAYOUTS, decode_tensor, encode_half, encode_tensor, pattern_applies


def _compressed(shape, bits, density, kind, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "kmeans":  # weight sharing: 2^bits arbitrary centroids
        centroids = torch.randn(1 << bits, generator=g)
        w = centroids[torch.randint(0, 1 << bits, shape, generator=g)]
    elif kind == "fixed_point":
        w = torch.clamp(torch.round(w * 2 ** (bits - 2)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) / 2 ** (bits - 2)
    elif kind == "per_channel":
        scale = torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) + 0.1
        w = torch.round(w / scale * 2 ** (bits - 1) / 3).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    mask = torch.rand(shape, generator=g) < density
    return w * mask


def two_of_four(w: torch.Tensor) -> torch.Tensor:
    """w with the two smallest magnitudes of every run of 4 elements (storage order) zeroed."""
    blocks = w.reshape(-1, 4)
    smallest = blocks.abs().float().argsort(dim=1)[:, :2]
    return blocks.scatter(1, smallest, torch.zeros_like(blocks[:, :2])).reshape(w.shape)


shapes = st.lists(st.integers(1, 12), min_size=1, max_size=4).map(tuple)


@given(shape=shapes, bits=st.integers(1, 8), density=st.floats(0, 1),
       kind=st.sampled_from(["kmeans", "fixed_point", "per_channel", "float"]),
       layout=st.sampled_from(LAYOUTS), coding=st.sampled_from(CODINGS), index_bits=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 10**6))
def test_round_trip_is_bit_identical(shape, bits, density, kind, layout, coding, index_bits, dtype, seed):
    w = _compressed(shape, bits, density, kind, seed).to(dtype)
    if dtype == torch.float64:  # values no float32 can hold
        w = w + w * 2.0 ** -40
    if layout == "pattern":  # a layout for N:M sparse tensors only
        assume(w.numel() % 4 == 0)
        w = two_of_four(w)
    encoded = encode_tensor(w, layouts=(layout,), codings=(coding,), index_bits=index_bits)
    out = decode_tensor(encoded)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out, w)  # values (a pruned -0.0 may come back as +0.0)
    module = EncodedWeight.from_encoded(encoded)
    module.check_loaded("layer.weight_encoded")  # every real encoding passes the load-time checks


def test_automatic_choice_is_the_smallest_of_all():
    for w in (_compressed((64, 100), 5, 0.1, "kmeans", 0), two_of_four(_compressed((64, 100), 5, 1.0, "kmeans", 0))):
        best = encode_tensor(w)
        for layout in [layout for layout in LAYOUTS if layout != "pattern" or pattern_applies(w)]:
            for coding in CODINGS:
                assert best.nbytes <= encode_tensor(w, layouts=(layout,), codings=(coding,)).nbytes
    assert best.layout == "pattern"  # a 2:4 mask costs less as patterns than as relative indices


def test_fixed_point_values_use_a_grid_instead_of_a_table():
    w = _compressed((32, 32), 6, 1.0, "fixed_point", 1)
    encoded = encode_tensor(w, layouts=("dense",), codings=("fixed",))
    assert encoded.codebook == "grid" and encoded.codebook_data.size == 4
    assert encoded.values.meta["width"] <= 6


def test_sparse_kmeans_tensor_is_small():
    w = _compressed((300, 784), 5, 0.05, "kmeans", 2)
    encoded = encode_tensor(w)
    assert w.numel() * 4 / encoded.nbytes > 25


def test_float16_storage_rounds_to_half():
    b = torch.randn(17)
    assert torch.equal(decode_tensor(encode_half(b)), b.half().float())


def test_encoded_weight_bytes_are_exact_and_decoding_is_cached():
    w = _compressed((40, 30), 4, 0.3, "kmeans", 3)
    module = EncodedWeight.from_encoded(encode_tensor(w, index_bits=5), bits=4)
    parts = module.storage_bytes()
    assert set(parts) == {"positions", "indices", "codebook", "header"}
    assert parts["positions"] + parts["indices"] + parts["codebook"] == module.payload.numel()
    assert torch.equal(module(), w)
    assert module() is module()  # decoded once
    state = module.state_dict()
    assert set(state) == {"payload"} and state["payload"].dtype == torch.uint8
    clone = EncodedWeight(**module.config())
    clone.load_state_dict(state)
    assert torch.equal(clone(), w)


def test_corrupt_payload_raises_format_error():
    from fxcompress.errors import FormatError
    module = EncodedWeight.from_encoded(encode_tensor(torch.zeros(4, 4).index_fill_(0, torch.tensor([1]), 2.0)))
    header = dict(module.header, values=dict(module.header["values"], count=10**6))
    broken = EncodedWeight(header)
    with pytest.raises(FormatError):
        broken()
