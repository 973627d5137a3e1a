"""Interleaved rANS (Duda 2013; Giesen's interleaving) with every lane a numpy array element.

A 32-bit state per lane, 16-bit renormalisation words, frequencies quantized to 2^scale_bits.
Symbol i goes to lane i % lanes; the encoder runs the steps backwards and the decoder forwards,
both one numpy operation per step across all lanes. The words of one step are stored as a block
in lane order, so the decoder reads the blocks front to back. Costs over the entropy: the
frequency quantization and 32 bits of final state per lane.
"""
from __future__ import annotations

import numpy as np

LANE_SYMBOLS = 8192
LOW = 1 << 16  # states live in [LOW, 2^32)


def lanes_for(count: int, lane_symbols: int = LANE_SYMBOLS) -> int:
    """Lanes of `lane_symbols` symbols; short streams get at least 16 lanes so few steps run in Python."""
    per_lane = min(lane_symbols, max(256, count // 16))
    return max(1, -(-count // per_lane))


def scale_bits_for(alphabet: int) -> int:
    return 16 if alphabet > 256 else 14


def quantize_counts(counts: np.ndarray, scale_bits: int) -> np.ndarray:
    """Frequencies summing to 2^scale_bits, every present symbol at least 1."""
    counts = np.asarray(counts, dtype=np.int64)
    total = 1 << scale_bits
    freq = np.where(counts > 0, np.maximum(1, counts * total // max(counts.sum(), 1)), 0)
    # hand the rounding remainder to (or take it from) the symbols that lose the least by it
    excess = int(freq.sum()) - total
    while excess != 0:
        step = -1 if excess > 0 else 1
        movable = freq > 1 if step < 0 else counts > 0
        cost = np.where(movable, counts * np.log2((freq + step).clip(1) / freq.clip(1)) * -step, np.inf)
        pick = np.argsort(cost)[:min(abs(excess), int(movable.sum()))]
        freq[pick] += step
        excess += step * len(pick)
    return freq


def encode(symbols: np.ndarray, freq: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """(16-bit words in decoding order, final state of every lane)."""
    scale = int(freq.sum()).bit_length() - 1
    cum = (np.cumsum(freq) - freq).astype(np.uint64)
    f64 = freq.astype(np.uint64)
    grid = _grid(symbols, freq, lanes)
    x = np.full(lanes, LOW, dtype=np.uint64)
    blocks = []
    for step in range(grid.shape[0] - 1, -1, -1):
        s = grid[step]
        f = f64[s]
        emit = x >= (f << np.uint64(32 - scale))
        blocks.append((x[emit] & np.uint64(0xFFFF)).astype(np.uint16))
        x = np.where(emit, x >> np.uint64(16), x)
        x = ((x // f) << np.uint64(scale)) + (x % f) + cum[s]
    words = np.concatenate(blocks[::-1]) if blocks else np.zeros(0, np.uint16)
    return words, x.astype(np.uint32)


def _grid(symbols: np.ndarray, freq: np.ndarray, lanes: int) -> np.ndarray:
    """Symbols as (steps, lanes); the tail is padded with the most frequent symbol."""
    steps = -(-len(symbols) // lanes)
    grid = np.full(steps * lanes, int(np.argmax(freq)), dtype=np.int64)
    grid[:len(symbols)] = symbols
    return grid.reshape(steps, lanes)


def decode(words: np.ndarray, states: np.ndarray, freq: np.ndarray, count: int) -> np.ndarray:
    scale = int(freq.sum()).bit_length() - 1
    total = 1 << scale
    sym_of_slot = np.repeat(np.arange(len(freq), dtype=np.int32), freq)
    freq_of_slot = np.asarray(freq, dtype=np.uint32)[sym_of_slot]
    bias_of_slot = (np.arange(total) - (np.cumsum(freq) - freq)[sym_of_slot]).astype(np.uint32)
    lanes = len(states)
    steps = -(-count // lanes)
    x = states.astype(np.uint32).copy()
    words = words.astype(np.uint32)
    out = np.empty((steps, lanes), dtype=np.int32)
    slot, low = np.empty(lanes, np.uint32), np.empty(lanes, bool)
    read = 0
    for step in range(steps):
        np.bitwise_and(x, total - 1, out=slot)
        np.take(sym_of_slot, slot, out=out[step])
        x >>= scale
        x *= freq_of_slot[slot]
        x += bias_of_slot[slot]
        np.less(x, LOW, out=low)
        need = int(np.count_nonzero(low))
        if need:
            if read + need > len(words):
                raise ValueError("rANS stream ends early")
            x[low] = (x[low] << 16) | words[read:read + need]
            read += need
    return out.reshape(-1)[:count]
