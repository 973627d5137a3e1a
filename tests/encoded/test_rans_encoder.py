"""The C rANS encoder (csrc/rans_encode.c) against the numpy loop it replaces and the straightforward
reference (reference_encoding.py): the same words and final states on arbitrary streams and tables,
at the format's edges, and the same refusals. Real lowered models: test_vectorised_coding.py."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.encoded import rans
from fxcompress.errors import ConfigError

from . import reference_encoding as ref

def _encoders(jobs, monkeypatch):
    """encode_many's result (or its refusal) with the C encoder, then with the numpy loop (where no compiler
    builds the C encoder, the numpy loop twice: the checks against the reference still stand)."""
    results = []
    for encoder in (rans._c_encoder, lambda: None):
        monkeypatch.setattr(rans, "_c_encoder", encoder)
        try:
            results.append(rans.encode_many(jobs))
        except ConfigError as exc:
            results.append(str(exc))
    return results


def _assert_same(jobs, monkeypatch, oracle=True):
    c, numpy_loop = _encoders(jobs, monkeypatch)
    assert not isinstance(c, str), c
    for j, ((words, states), (old_words, old_states)) in enumerate(zip(c, numpy_loop)):
        assert words.dtype == old_words.dtype == np.uint16 and states.dtype == old_states.dtype == np.uint32
        assert np.array_equal(words, old_words) and np.array_equal(states, old_states), j
        if oracle:
            ref_words, ref_states = ref.rans_encode(*jobs[j])
            assert np.array_equal(words, ref_words) and np.array_equal(states, ref_states), j
    return c


@st.composite
def streams(draw):
    """A power-of-two frequency table (unused symbols may have frequency 0) and symbols drawn from its
    present symbols, in any number of lanes from 1 to more lanes than symbols."""
    scale = draw(st.integers(0, 16))
    alphabet = draw(st.integers(1, min(300, 1 << scale)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    present = np.sort(rng.choice(alphabet, size=int(rng.integers(1, alphabet + 1)), replace=False))
    cuts = np.sort(rng.choice(np.arange(1, 1 << scale), size=len(present) - 1, replace=False))
    freq = np.zeros(alphabet, np.int64)
    freq[present] = np.diff(np.concatenate([[0], cuts, [1 << scale]]))
    count = draw(st.integers(0, 3000))
    symbols = rng.choice(present, size=count, p=rng.dirichlet(np.full(len(present), 0.5)))
    return symbols, freq, draw(st.integers(1, max(1, count + 3)))


@settings(max_examples=60, deadline=None)
@given(jobs=st.lists(streams(), min_size=1, max_size=3))
def test_c_writes_the_numpy_and_reference_words_on_arbitrary_streams(jobs):
    with pytest.MonkeyPatch.context() as monkeypatch:
        _assert_same(jobs, monkeypatch)


def test_edges_of_the_format(monkeypatch):
    """Empty lanes, one symbol, the largest alphabet (2^16 symbols of frequency 1), more lanes than
    symbols and the most lanes the format allows (one symbol each), full 8,192-symbol lanes."""
    rng = np.random.default_rng(3)
    flat16 = np.ones(1 << 16, np.int64)
    skewed = rans.quantize_counts(np.array([1, 3, 40, 5000]), 14)
    jobs = [(np.zeros(0, np.int64), skewed, 5), (np.array([2]), skewed, 1), (np.array([2]), skewed, 4),
            (np.zeros(9, np.int64), np.array([1 << 14]), 2), (rng.integers(0, 1 << 16, 3000), flat16, 9),
            (rng.integers(0, 4, 8192 * 2 - 5), skewed, 2)]
    results = _assert_same(jobs, monkeypatch)
    assert [len(w) for w, _ in results[:4]] == [0, 0, 0, 0]  # states start at 2^16: no word until they grow
    assert np.all(results[0][1] == rans.LOW)
    symbols = rng.integers(0, 4, 5000)
    typed = [(symbols.astype(dtype), skewed, 7) for dtype in (np.int64, np.int32, np.uint16, np.uint8, np.int16, ">i8")]
    first, *others = _assert_same(typed, monkeypatch, oracle=False)  # read in place (C) or widened first
    assert all(np.array_equal(first[0], w) and np.array_equal(first[1], s) for w, s in others)
    # alone: batched with the others, the numpy loop's grid would be 8,192 steps x 20,000 lanes
    _assert_same([(rng.integers(0, 4, 20_000), skewed, 20_000)], monkeypatch)


def test_states_exactly_at_and_just_below_the_renormalisation_bound(monkeypatch):
    """At scale 16 a symbol of frequency 1 meets the starting state 2^16 exactly at its bound f * 2^16
    (it must emit); a cumulative frequency of 2^16 - 1 then leaves 2^17 - 1, one below the bound of
    a frequency-2 symbol (it must not). Worked by hand: one word 0 (the low half of 2^16), then
    x = 1 * 2^16 + 0 + 65535 = 131071, then x = (131071 // 2) * 2^16 + 1 + 0 = 4294901761."""
    freq = np.zeros(1 << 16, np.int64)
    freq[0], freq[1], freq[-1] = 2, (1 << 16) - 3, 1  # the last symbol's cumulative frequency is 2^16 - 1
    (words, states), = _assert_same([(np.array([0, (1 << 16) - 1]), freq, 1)], monkeypatch)
    assert words.tolist() == [0] and states.tolist() == [4294901761]
    words, states = rans.encode(np.array([0, (1 << 16) - 1]), freq, 1)
    assert rans.decode(words, states, freq, 2).tolist() == [0, (1 << 16) - 1]


BAD = {
    "symbol outside": ((np.array([0, 4]), np.array([1 << 13, 1 << 13, 0, 0]), 1),
                       "symbol 4 at position 1 is outside the alphabet of 4"),
    "negative symbol": ((np.array([-1, 0]), np.array([1 << 14]), 2),
                        "symbol -1 at position 0 is outside the alphabet of 1"),
    "frequency 0": ((np.array([1, 0, 2]), np.array([1 << 13, 1 << 13, 0]), 2),
                    "symbol 2 at position 2 is of frequency 0"),
    "not a power of two": ((np.array([0]), np.array([3, 2]), 1), "frequencies sum to 5"),
    "above 2^16": ((np.array([0]), np.array([1 << 17]), 1), "frequencies sum to 131072"),
    "no lanes": ((np.array([0]), np.array([1 << 14]), 0), "lanes must be an integer >= 1"),
    "float symbols": ((np.array([0.5]), np.array([1 << 14]), 1), "symbols must be a 1-D integer array"),
    "negative frequency": ((np.array([0]), np.array([1 << 15, -(1 << 14)]), 1), "frequencies must be"),
}


@pytest.mark.parametrize("name", BAD)
def test_both_encoders_refuse_what_they_cannot_code(name, monkeypatch):
    job, message = BAD[name]
    good = (np.array([0, 1]), np.array([1 << 13, 1 << 13]), 1)
    c, numpy_loop = _encoders([good, job], monkeypatch)
    assert c == numpy_loop, (c, numpy_loop)
    assert c.startswith("rANS stream 1: ") and message in c, c  # the second stream is named


def test_counts_the_coder_cannot_quantize_are_refused():
    with pytest.raises(ConfigError, match="0 present of 3"):
        rans.quantize_counts(np.zeros(3, np.int64), 14)
    with pytest.raises(ConfigError, match="5 present of 5"):
        rans.quantize_counts(np.ones(5, np.int64), 2)
