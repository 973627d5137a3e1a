"""Every coder round-trips exactly; sizes are near the entropy; degenerate streams work."""
import heapq

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxcompress.encoded import huffman, rans
from fxcompress.encoded.bits import pack, read_fixed, width_for, write_codes
from fxcompress.encoded.positions import gaps_from_positions, positions_and_span, positions_from_gaps
from fxcompress.encoded.streams import CODINGS, decode_symbols, encode_symbols, smallest


@given(width=st.integers(1, 16), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_fixed_width_packing_round_trips(width, count, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << width, count)
    data = pack(codes, width)
    assert data.size == (count * width + 7) // 8
    assert np.array_equal(read_fixed(data, width, count), codes)


def test_variable_width_codes_are_msb_first():
    assert write_codes(np.array([1, 0b101]), np.array([1, 3])).tolist() == [0b11010000]


@given(size=st.integers(1, 5000), density=st.floats(0, 1), index_bits=st.integers(1, 12),
       seed=st.integers(0, 2**32 - 1))
def test_relative_indices_round_trip_with_fillers(size, density, index_bits, seed):
    mask = np.random.default_rng(seed).random(size) < density
    where = np.flatnonzero(mask)
    codes = gaps_from_positions(where, index_bits)
    assert codes.max(initial=0) < 1 << index_bits
    assert np.array_equal(positions_from_gaps(codes, index_bits), where)


@given(size=st.integers(1, 3000), density=st.floats(0, 1), index_bits=st.integers(1, 10),
       seed=st.integers(0, 2**32 - 1))
def test_trailing_zeros_are_coded_so_the_codes_bound_the_length(size, density, index_bits, seed):
    where = np.flatnonzero(np.random.default_rng(seed).random(size) < density)
    codes = gaps_from_positions(where, index_bits, size)
    positions, span = positions_and_span(codes, index_bits)
    filler = (1 << index_bits) - 1
    assert np.array_equal(positions, where)
    assert span <= size < span + filler  # short of a filler: what a decoder checks
    assert size < (len(codes) + 1) * filler  # the header-only bound


def test_a_gap_of_exactly_the_filler_length_needs_one_filler():
    # index_bits=2: filler code 3 means 3 zeros; positions 0 and 4 have 3 zeros between them
    assert gaps_from_positions(np.array([0, 4]), 2).tolist() == [0, 3, 0]
    assert gaps_from_positions(np.array([0, 200]), 8).tolist() == [0, 199]


@given(alphabet=st.integers(1, 3000), count=st.integers(0, 20000), skew=st.floats(0.1, 50),
       coding=st.sampled_from(CODINGS), seed=st.integers(0, 2**32 - 1))
def test_every_coding_round_trips(alphabet, count, skew, coding, seed):
    rng = np.random.default_rng(seed)
    p = np.exp(-np.arange(alphabet) / skew)
    symbols = rng.choice(alphabet, count, p=p / p.sum())
    stream = encode_symbols(symbols, alphabet, coding)
    assert np.array_equal(decode_symbols(stream), symbols)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("count", [1, 2, 1000])
def test_single_symbol_streams(coding, count):
    symbols = np.full(count, 3)
    stream = encode_symbols(symbols, 4, coding)
    assert np.array_equal(decode_symbols(stream), symbols)


def test_single_symbol_alphabet_costs_nothing_with_fixed_codes():
    stream = smallest(np.zeros(500, dtype=np.int64), 1)
    assert stream.nbytes == 0 and np.array_equal(decode_symbols(stream), np.zeros(500))


def _entropy_bits(symbols):
    p = np.bincount(symbols) / len(symbols)
    p = p[p > 0]
    return -(p * np.log2(p)).sum() * len(symbols)


def test_huffman_and_rans_sizes_near_the_entropy():
    rng = np.random.default_rng(0)
    p = np.exp(-np.arange(32) / 6)
    symbols = rng.choice(32, 400_000, p=p / p.sum())
    bound = _entropy_bits(symbols) / 8
    huff, ans = encode_symbols(symbols, 32, "huffman"), encode_symbols(symbols, 32, "rans")
    assert huff.nbytes < bound * 1.01
    assert ans.nbytes < bound * 1.003
    assert ans.nbytes < huff.nbytes


def test_huffman_lengths_are_limited_and_canonical():
    counts = 2 ** np.arange(30)  # a Fibonacci-like skew would need 29-bit codes
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= 16
    assert (2.0 ** -lengths).sum() <= 1  # Kraft: still a prefix code
    codes = huffman.canonical_codes(lengths)
    words = {format(c, f"0{l}b") for c, l in zip(codes, lengths)}
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_rans_frequencies_sum_to_the_scale_and_keep_rare_symbols():
    freq = rans.quantize_counts(np.array([10**9, 1, 0, 5]), 14)
    assert freq.sum() == 1 << 14 and freq[1] >= 1 and freq[2] == 0


def test_width_for():
    assert [width_for(a) for a in (1, 2, 3, 4, 5, 256, 257)] == [0, 1, 2, 2, 3, 8, 9]


def _heap_depths(weights):
    """The Huffman tree as a heap of (weight, id) merges it, lightest first, ties to the lower id."""
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent, node = {}, len(heap)
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = {node - 1: 0}
    for child in range(node - 2, -1, -1):
        depth[child] = depth[parent[child]] + 1
    return [depth[i] for i in range(len(weights))]


@given(weights=st.lists(st.integers(1, 6), min_size=2, max_size=60) | st.lists(st.integers(1, 10**9), min_size=2,
                                                                                 max_size=300))
def test_two_queue_huffman_tree_is_the_heap_tree(weights):
    """The same leaf depths as the heap merge, ties included (small weights make many ties)."""
    assert huffman._tree_depths(np.array(weights)).tolist() == _heap_depths(weights)


@pytest.mark.parametrize("alphabet", [257, 512, 1 << 16])
@pytest.mark.parametrize("count", [1, 1000])
def test_a_single_symbol_rans_stream_over_a_large_alphabet_round_trips(alphabet, count):
    """Over more than 256 symbols rANS frequencies sum to 2^16, so a lone symbol's is 2^16: 17 bits, of which
    `pack` wrote 16. Reached by LowerToEncoded(coding="rans", index_bits=9..16) on a layer whose relative
    indices are all equal (one kept input, a single nonzero): the model then failed with an IndexError."""
    symbols = np.full(count, alphabet - 1)
    stream = encode_symbols(symbols, alphabet, "rans")
    assert stream.meta["freq_width"] == 17
    assert np.array_equal(decode_symbols(stream), symbols)


def test_packing_past_sixteen_bits_is_the_same_bit_string():
    codes = np.random.default_rng(0).integers(0, 1 << 17, 301)
    data = pack(codes, 17)
    assert data.size == (301 * 17 + 7) // 8
    assert np.array_equal(read_fixed(data, 17, 301), codes)
    bits = "".join(format(int(c), "017b") for c in codes)
    assert np.array_equal(data, np.packbits(np.array([int(b) for b in bits], np.uint8)))
