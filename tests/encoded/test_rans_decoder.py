"""The C rANS decoder (csrc/rans_decode.c) against the numpy loop it replaces: the same symbols, the same
final states and the same refusal, on real streams and on arbitrary (hostile) words and states."""
import numpy as np
import pytest

from fxcompress.encoded import rans

pytestmark = pytest.mark.skipif(rans._c_decoder() is None, reason="no C compiler here: numpy decodes")


def _both(words, states, freq, count, monkeypatch):
    """decode's result (or its ValueError) with the C decoder, then with numpy's loop."""
    results = []
    for decoder in (rans._c_decoder, lambda: None):
        monkeypatch.setattr(rans, "_c_decoder", decoder)
        try:
            results.append(rans.decode(words, states, freq, count))
        except ValueError as exc:
            results.append(str(exc))
    return results


@pytest.mark.parametrize("alphabet, count", [(2, 7), (16, 1000), (300, 20000), (5, 30_000)])
def test_c_decodes_what_was_encoded_as_numpy_does(alphabet, count, monkeypatch):
    rng = np.random.default_rng(alphabet)
    symbols = rng.choice(alphabet, size=count, p=rng.dirichlet(np.full(alphabet, 0.3))).astype(np.int32)
    freq = rans.quantize_counts(np.bincount(symbols, minlength=alphabet), rans.scale_bits_for(alphabet))
    words, states = rans.encode(symbols, freq, rans.lanes_for(count))
    c, numpy_loop = _both(words, states, freq, count, monkeypatch)
    np.testing.assert_array_equal(c, symbols)
    np.testing.assert_array_equal(numpy_loop, symbols)
    if len(words):   # a stream missing its last word is refused by both
        assert _both(words[:-1], states, freq, count, monkeypatch) == ["rANS stream ends early"] * 2


@pytest.mark.parametrize("seed", range(6))
def test_c_equals_numpy_on_arbitrary_words_and_states(seed, monkeypatch):
    """A crafted file's words and states wrap the uint32 arithmetic: C must wrap as numpy does."""
    rng = np.random.default_rng(seed)
    freq = rans.quantize_counts(rng.integers(0, 50, size=int(rng.integers(2, 300))) + 1, 14)
    words = rng.integers(0, 1 << 16, size=int(rng.integers(0, 4000)), dtype=np.uint16)
    states = rng.integers(0, 1 << 32, size=int(rng.integers(1, 40)), dtype=np.uint64).astype(np.uint32)
    c, numpy_loop = _both(words, states, freq, int(rng.integers(1, 3000)), monkeypatch)
    if isinstance(c, str):
        assert c == numpy_loop == "rANS stream ends early"
    else:
        np.testing.assert_array_equal(c, numpy_loop)
