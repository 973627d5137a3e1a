"""Interleaved rANS (Duda 2013; Giesen's interleaving) with every lane a numpy array element.

A 32-bit state per lane, 16-bit renormalisation words, frequencies quantized to 2^scale_bits.
Symbol i goes to lane i % lanes; the encoder runs the steps backwards and the decoder forwards,
both one numpy operation per step across all lanes. The words of one step are stored as a block
in lane order, so the decoder reads the blocks front to back. Costs over the entropy: the
frequency quantization and 32 bits of final state per lane.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from fxcompress.errors import ConfigError
from fxcompress.kernels.compiled import library

LANE_SYMBOLS = 8192
LOW = 1 << 16  # states live in [LOW, 2^32)
_SYMBOL_KINDS = {np.dtype(np.int64): 0, np.dtype(np.int32): 1, np.dtype(np.uint16): 2, np.dtype(np.uint8): 3}  # read as is in C
_GATHERED = 1 << 16  # lane-steps whose four float64 table rows are gathered at once: 2 MiB, whatever the model


def lanes_for(count: int, lane_symbols: int = LANE_SYMBOLS) -> int:
    """Lanes of `lane_symbols` symbols; short streams get at least 16 lanes so few steps run in Python."""
    per_lane = min(lane_symbols, max(256, count // 16))
    return max(1, -(-count // per_lane))


def scale_bits_for(alphabet: int) -> int:
    return 16 if alphabet > 256 else 14


def quantize_counts(counts: np.ndarray, scale_bits: int) -> np.ndarray:
    """Frequencies summing to 2^scale_bits, every present symbol at least 1."""
    counts = np.asarray(counts, dtype=np.int64)
    if not counts.any() or counts.min() < 0 or np.count_nonzero(counts) > 1 << scale_bits:
        # no present symbol, or more than the total can give 1 each: the loop below would never end
        raise ConfigError(f"rANS counts must be >= 0 with 1 to 2^{scale_bits} symbols present, got "
                          f"{int(np.count_nonzero(counts))} present of {len(counts)}")
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
    return encode_many([(symbols, freq, lanes)])[0]


def encode_many(jobs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode` for several streams (symbols, frequencies, lanes) at once, byte for byte the same.

    Each stream is coded by csrc/rans_encode.c where a compiler exists (one call per stream, the GIL
    released, so threads code streams side by side), by the numpy loop otherwise; both write the same
    words and states (tested). A stream neither can code exactly is refused with a ConfigError naming
    it: lanes below 1, frequencies not summing to a power of two up to 2^16, a symbol outside the
    table or of frequency 0.
    """
    checked = [_checked(job, j) for j, job in enumerate(jobs)]
    lib = _c_encoder()
    if lib is None:
        for j, (symbols, freq, _) in enumerate(checked):
            _check_symbols(symbols, freq, j)
        return _encode_many_numpy(checked)
    return [_encode_c(lib, *job, j) for j, job in enumerate(checked)]


def _checked(job: tuple, j: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(symbols in a type the C encoder reads, frequencies as uint32, lanes) of stream `j`, or a ConfigError
    naming its field."""
    symbols, freq, lanes = np.asarray(job[0]), np.asarray(job[1]), job[2]
    if symbols.ndim != 1 or (symbols.size and symbols.dtype.kind not in "iu"):
        raise ConfigError(f"rANS stream {j}: symbols must be a 1-D integer array, got {symbols.dtype} "
                          f"of shape {symbols.shape}")
    if not isinstance(lanes, (int, np.integer)) or lanes < 1:
        raise ConfigError(f"rANS stream {j}: lanes must be an integer >= 1, got {lanes!r}")
    if freq.ndim != 1 or freq.dtype.kind not in "iu" or (freq.size and freq.min() < 0):
        raise ConfigError(f"rANS stream {j}: frequencies must be a 1-D array of integers >= 0")
    total = int(freq.sum())
    if total == 0 or total & (total - 1) or total > 1 << 16:
        raise ConfigError(f"rANS stream {j}: frequencies sum to {total}, not a power of two up to 2^16")
    if symbols.dtype not in _SYMBOL_KINDS:  # other widths, and other byte orders, are read as int64
        symbols = symbols.astype(np.int64)
    return np.ascontiguousarray(symbols), np.ascontiguousarray(freq, np.uint32), int(lanes)


def _check_symbols(symbols: np.ndarray, freq: np.ndarray, j: int) -> None:
    """The numpy loop's guard: it would index another stream's table rows or divide by 0 otherwise."""
    bad = np.flatnonzero((symbols < 0) | (symbols >= len(freq)))
    if not bad.size:
        bad = np.flatnonzero(freq[symbols] == 0)
    if bad.size:
        raise ConfigError(_refusal(symbols, freq, j, int(bad[0])))


def _refusal(symbols: np.ndarray, freq: np.ndarray, j: int, i: int) -> str:
    s = int(symbols[i])
    why = f"outside the alphabet of {len(freq)}" if not 0 <= s < len(freq) else "of frequency 0"
    return f"rANS stream {j}: symbol {s} at position {i} is {why}"


def _encode_c(lib: ctypes.CDLL, symbols: np.ndarray, freq: np.ndarray, lanes: int,
              j: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream through csrc/rans_encode.c: the words are written from the end of a buffer of one word
    per lane-step (the most a valid stream emits), then copied out so the buffer is freed."""
    scale = int(freq.sum()).bit_length() - 1
    capacity = -(-len(symbols) // lanes) * lanes
    words, states, used = np.empty(capacity, np.uint16), np.empty(lanes, np.uint32), ctypes.c_int64(0)
    pad = int(np.argmax(freq))
    status = lib.rans_encode(symbols.ctypes.data, _SYMBOL_KINDS[symbols.dtype], len(symbols), freq.ctypes.data,
                             len(freq), scale, pad, lanes, words.ctypes.data, capacity, states.ctypes.data,
                             ctypes.byref(used))
    if status == 1:
        raise ConfigError(_refusal(symbols, freq, j, used.value))
    if status:
        raise MemoryError("rANS encoder: no memory for the cumulative frequency table")
    return words[capacity - used.value:].copy(), states


def _encode_many_numpy(jobs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The numpy coder, every stream at once.

    Every lane of every stream is one element of a single state vector, so all streams advance
    in one loop of numpy operations per step: a layer's (or several layers') streams cost one
    pass of Python overhead instead of one each. Streams are ordered by their number of steps,
    longest first, so the lanes still coding at any step are a prefix of the vector. States are
    float64: every value the coder forms stays below 2^32, so each operation is exact, and
    floor(x / f) replaces the slower integer division.
    """
    if not jobs:
        return []
    order = sorted(range(len(jobs)), key=lambda j: -_steps(jobs[j]))
    grid, table, lane_job, active = _batch([jobs[j] for j in order])
    x = np.full(len(lane_job), float(LOW))
    blocks, masks, rows = [], [], None
    chunk = max(16, _GATHERED // max(len(lane_job), 1))  # steps whose table rows are gathered at once
    for top in range(grid.shape[0], 0, -chunk):
        low = max(top - chunk, 0)
        rows = table[:, grid[low:top, :active[low]]]  # (emit threshold, f, M - f, cumulative) x step x lane
        for step in range(top - 1, low - 1, -1):
            k = active[step]
            threshold, f, spread, cum = rows[:, step - low, :k]
            xv = x[:k]
            emit = xv >= threshold
            out = xv[emit]
            blocks.append(out)
            masks.append(emit)
            xv[emit] = np.floor(out * (1 / 65536))
            q = np.floor(xv / f)
            q *= spread  # x' = floor(x / f) * M + x mod f + c = x + floor(x / f) * (M - f) + c
            q += cum
            xv += q
    del grid, table, rows  # the symbols are coded: only the words and their masks are needed now
    blocks.reverse()
    masks.reverse()
    results = _split_words(blocks, masks, lane_job, x, len(jobs))
    unsorted = [None] * len(jobs)
    for position, j in enumerate(order):
        unsorted[j] = results[position]
    return unsorted


def _steps(job: tuple[np.ndarray, np.ndarray, int]) -> int:
    return -(-len(job[0]) // job[2])


def _batch(jobs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps x lanes grid of row numbers into `table`, the table, the job of every lane, the lanes still
    coding at each step). Each job's symbols index its own block of table rows."""
    lanes = np.array([job[2] for job in jobs])
    steps = np.array([_steps(job) for job in jobs])
    rows_dtype = np.int16 if sum(len(job[1]) for job in jobs) <= 1 << 15 else np.int32  # the grid is the largest array
    grid = np.zeros((int(steps.max(initial=0)), int(lanes.sum())), dtype=rows_dtype)
    tables, base, lane = [], 0, 0
    for (symbols, freq, width), count in zip(jobs, steps):
        scale = int(freq.sum()).bit_length() - 1
        f = freq.astype(np.float64)
        tables.append(np.stack([f * 2.0 ** (32 - scale), f, 2.0 ** scale - f, np.cumsum(f) - f], axis=1))
        rows = _grid(symbols, freq, width, rows_dtype)
        rows += base  # in place, in the grid's own narrow type
        grid[:count, lane:lane + width] = rows
        del rows
        base, lane = base + len(freq), lane + width
    active = np.searchsorted(-steps, -np.arange(grid.shape[0]), side="left")  # jobs with more steps than t
    active = np.cumsum(np.append(0, lanes))[active]
    return grid, np.concatenate(tables).T.copy(), np.repeat(np.arange(len(jobs)), lanes), active


def _split_words(blocks: list, masks: list, lane_job: np.ndarray, x: np.ndarray, count: int) -> list:
    """Each job's words, steps ascending and lanes ascending within a step, and its final states."""
    # a block holds whole states (below 2^32) of which the word is the low 16 bits; converted block by
    # block, so the float64 blocks and the words are never both whole copies
    words = np.concatenate([(b.astype(np.uint32) & 0xFFFF).astype(np.uint16) for b in blocks] or
                           [np.zeros(0, np.uint16)])
    blocks.clear()
    flags = np.concatenate(masks) if masks else np.zeros(0, bool)
    starts = np.cumsum([0] + [len(m) for m in masks])
    masks.clear()  # the steps' arrays are joined: each is freed (the caller's lists hold them otherwise)
    emitted = np.flatnonzero(flags)
    owner = lane_job[emitted - starts[np.searchsorted(starts, emitted, side="right") - 1]]
    grouped = words[np.argsort(owner, kind="stable")].astype(np.uint16)
    word_ends = np.cumsum(np.bincount(owner, minlength=count))
    lane_ends = np.cumsum(np.bincount(lane_job, minlength=count))
    states = x.astype(np.uint32)
    return [(grouped[_start(word_ends, j):word_ends[j]],
             states[_start(lane_ends, j):lane_ends[j]]) for j in range(count)]


def _start(ends: np.ndarray, j: int) -> int:
    return int(ends[j - 1]) if j else 0


def _grid(symbols: np.ndarray, freq: np.ndarray, lanes: int, dtype: type = np.int32) -> np.ndarray:
    """Symbols as (steps, lanes); the tail is padded with the most frequent symbol."""
    steps = -(-len(symbols) // lanes)
    grid = np.full(steps * lanes, int(np.argmax(freq)), dtype=dtype)
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
    words = np.ascontiguousarray(words, dtype=np.uint32)
    out = np.empty((steps, lanes), dtype=np.int32)
    tables = (sym_of_slot, freq_of_slot, bias_of_slot)
    lib = _c_decoder() if 0 < scale < 32 and len(sym_of_slot) >= total else None
    ended_early = (_decode_c(lib, words, x, scale, tables, out) if lib is not None
                   else _decode_numpy(words, x, scale, tables, out))
    if ended_early:
        raise ValueError("rANS stream ends early")
    return out.reshape(-1)[:count]


def _decode_numpy(words: np.ndarray, x: np.ndarray, scale: int, tables: tuple, out: np.ndarray) -> bool:
    """The steps of `out` [steps, lanes], one numpy operation per step across the lanes; True where the
    stream ends early."""
    sym_of_slot, freq_of_slot, bias_of_slot = tables
    slot, low = np.empty(len(x), np.uint32), np.empty(len(x), bool)
    read = 0
    for step in range(out.shape[0]):
        np.bitwise_and(x, (1 << scale) - 1, out=slot)
        np.take(sym_of_slot, slot, out=out[step])
        x >>= scale
        x *= freq_of_slot[slot]
        x += bias_of_slot[slot]
        np.less(x, LOW, out=low)
        need = int(np.count_nonzero(low))
        if need:
            if read + need > len(words):
                return True
            x[low] = (x[low] << 16) | words[read:read + need]
            read += need
    return False


def _decode_c(lib: ctypes.CDLL, words: np.ndarray, x: np.ndarray, scale: int, tables: tuple,
              out: np.ndarray) -> bool:
    """The same steps in csrc/rans_decode.c (bit for bit the numpy loop; tested)."""
    sym_of_slot, freq_of_slot, bias_of_slot = tables
    return bool(lib.rans_decode(words.ctypes.data, len(words), x.ctypes.data, len(x), out.shape[0], scale,
                                sym_of_slot.ctypes.data, freq_of_slot.ctypes.data, bias_of_slot.ctypes.data,
                                out.ctypes.data))


def _c_decoder() -> ctypes.CDLL | None:
    """csrc/rans_decode.c built for this machine with its argument types set, or None (numpy decodes)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return _c_library("rans_decode", (p, i64, p, i64, i64, ctypes.c_int, p, p, p, p))


def _c_encoder() -> ctypes.CDLL | None:
    """csrc/rans_encode.c built for this machine with its argument types set, or None (numpy encodes)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return _c_library("rans_encode", (p, ctypes.c_int, i64, p, i64, ctypes.c_int, i64, i64, p, i64, p, p))


@functools.cache
def _c_library(name: str, argtypes: tuple) -> ctypes.CDLL | None:
    """The kernel library `name`, whose one function (of the same name) returns an int status, or None."""
    lib = library(name)
    if lib is not None:
        function = getattr(lib, name)
        function.argtypes, function.restype = list(argtypes), ctypes.c_int
    return lib
