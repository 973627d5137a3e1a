"""The vectorised encoder writes exactly the bytes of the straightforward one (reference_encoding.py):
every candidate sized before it is written, rANS streams coded together, the bit writer by packbits."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress.encoded import huffman, rans
from fxcompress.encoded.bits import write_codes
from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.streams import CODINGS, Request, choose, smallest
from fxcompress.encoded.tensor import decode_tensor, encode_tensor, encode_tensors, grid_codebook
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import ZOO

from . import reference_encoding as ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _weight(seed, shape, sparsity, values, dtype, grid=False):
    """A pruned, shared weight: `values` distinct values (0: unshared floats), `sparsity` zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if values:
        centroids = np.sort(rng.standard_normal(values))
        centroids = np.round(centroids * 16) / 16 if grid else centroids
        w = centroids[np.clip(np.searchsorted(centroids, w), 0, values - 1)]
    w[rng.random(shape) < sparsity] = 0
    return torch.from_numpy(w).to(dtype)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 40), cols=st.integers(1, 70),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), values=st.sampled_from([0, 1, 3, 16, 40]),
       dtype=st.sampled_from(DTYPES), grid=st.booleans(), index_bits=st.integers(1, 9),
       options=st.sampled_from([{}, {"layouts": ("dense",)}, {"layouts": ("relative",)}, {"codings": ("huffman",)},
                                {"codings": ("rans",)}, {"codings": ("fixed", "rans")}]))
def test_encode_tensor_writes_the_reference_bytes(seed, rows, cols, sparsity, values, dtype, grid, index_bits, options):
    w = _weight(seed, (rows, cols), sparsity, values, dtype, grid)
    fast = encode_tensor(w, index_bits=index_bits, **options)
    assert ref.encoded_bytes(fast) == ref.encoded_bytes(ref.encode_tensor(w, index_bits=index_bits, **options))
    assert torch.equal(decode_tensor(fast), w)


def test_large_layers_and_batches_write_the_reference_bytes():
    """Lanes at their full length (8192 rANS / 2048 Huffman symbols), several tensors in one batch."""
    weights = [_weight(1, (600, 512), 0.9, 16, torch.float32), _weight(2, (64, 32, 3, 3), 0.7, 32, torch.float32),
               _weight(3, (120, 120), 0.3, 5, torch.float32), _weight(4, (77,), 0.0, 8, torch.float32)]
    batch = encode_tensors(weights, index_bits=[5, 8, 5, 5])
    for w, bits, fast in zip(weights, [5, 8, 5, 5], batch):
        assert ref.encoded_bytes(fast) == ref.encoded_bytes(ref.encode_tensor(w, index_bits=bits))
    assert {b.values.coding for b in batch} >= {"rans"}  # the batched coder really ran
    threaded = encode_tensors(weights, index_bits=[5, 8, 5, 5], threads=3)
    assert [ref.encoded_bytes(t) for t in threaded] == [ref.encoded_bytes(b) for b in batch]


def test_rans_streams_coded_together_match_each_coded_alone():
    rng = np.random.default_rng(0)
    jobs = []
    for count, alphabet in [(1, 1), (5, 2), (999, 17), (20_000, 16), (30_000, 300), (9_000, 4000)]:
        p = np.exp(-np.arange(alphabet) / 4.0)
        symbols = rng.choice(alphabet, count, p=p / p.sum())
        freq = rans.quantize_counts(np.bincount(symbols, minlength=alphabet), rans.scale_bits_for(alphabet))
        jobs.append((symbols, freq, rans.lanes_for(count)))
    for (words, states), job in zip(rans.encode_many(jobs), jobs):
        old_words, old_states = ref.rans_encode(*job)
        assert words.dtype == old_words.dtype and np.array_equal(words, old_words)
        assert states.dtype == old_states.dtype and np.array_equal(states, old_states)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 5000), width=st.integers(1, 16), variable=st.booleans())
def test_bit_writer_matches_the_reference(seed, count, width, variable):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 17, count) if variable else width
    codes = rng.integers(0, 1 << 16, count) & ((1 << np.asarray(lengths)) - 1)
    assert np.array_equal(write_codes(codes, lengths), ref.write_codes(codes, lengths))


def test_huffman_writer_and_lane_lengths_match_the_reference():
    symbols = np.random.default_rng(1).integers(0, 40, 70_000)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=40))
    for lanes in (1, 7, huffman.lanes_for(len(symbols))):
        data, lane_bits = huffman.encode(symbols, lengths, lanes)
        old_data, old_bits = ref.huffman_encode(symbols, lengths, lanes)
        assert np.array_equal(data, old_data) and np.array_equal(lane_bits, old_bits)


@pytest.mark.parametrize("codings", [CODINGS, ("huffman", "rans"), ("fixed",)])
def test_choose_picks_what_smallest_picked(codings):
    rng = np.random.default_rng(2)
    streams = [(rng.integers(0, 3, 5000), 3), (rng.geometric(0.3, 20_000).clip(max=31) - 1, 32),
               (rng.integers(0, 5000, 3000), 5000), (np.zeros(0, np.int64), 4)]
    chosen = choose([Request(s, a, codings) for s, a in streams])
    for plan, (symbols, alphabet) in zip(chosen, streams):
        old = ref.smallest(symbols, alphabet, codings)
        new = plan.write()
        assert new.header() == old.header() == plan.header()
        assert np.array_equal(new.table, old.table) and np.array_equal(new.payload, old.payload)
        assert smallest(symbols, alphabet, codings).header() == old.header()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf / step: both encoders cast it to an integer
def test_grid_codebook_from_distinct_values_matches_the_reference():
    for values in [np.array([0.5, -0.25, 0.0, -0.0, 0.75], np.float32), _weight(5, (1000,), 0.5, 9, torch.float32, True)
                   .numpy(), np.array([0.1, 0.2, 0.3], np.float32), np.array([np.inf, 1.0], np.float32)]:
        fast, old = grid_codebook(values), ref.grid_codebook(values)
        assert (fast is None) == (old is None)
        if fast is not None:
            assert (fast.alphabet, fast.offset) == (old.alphabet, old.offset)
            assert np.array_equal(fast.symbols, old.symbols) and np.array_equal(fast.data, old.data)


@pytest.mark.parametrize("name", ["lenet5", "transformer"])
def test_lowered_zoo_models_hold_the_reference_encodings(name, monkeypatch):
    """Masks + 4-bit k-means + LowerToEncoded: every encoded weight is what the old encoder wrote, and
    the numpy rANS loop codes every stream the lowering coded as the C encoder did. (LeNet-5 holds
    what LeNet-300-100 would: linear layers of full-length lanes and a small one, plus convolutions.)"""
    make_model, make_input = ZOO[name]
    x = make_input()
    gm = fxcompress.compile(make_model().eval(), [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,))
    coded, encode_many = [], rans.encode_many
    monkeypatch.setattr(rans, "encode_many", lambda jobs: coded.append((jobs, encode_many(jobs))) or coded[-1][1])
    gm = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    monkeypatch.setattr(rans, "_c_encoder", lambda: None)
    assert sum(len(jobs) for jobs, _ in coded) > 3
    for jobs, results in coded:
        for (words, states), (old_words, old_states) in zip(results, encode_many(jobs)):
            assert np.array_equal(words, old_words) and np.array_equal(states, old_states)
    encoded = [(path, m) for path, m in gm.named_modules() if isinstance(m, EncodedWeight)]
    assert encoded
    for path, module in encoded:
        weight = module()
        old = EncodedWeight.from_encoded(ref.encode_tensor(weight, index_bits=module.header["index_bits"]))
        assert module.header == old.header, path
        assert torch.equal(module.payload, old.payload), path
