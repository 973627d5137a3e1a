"""The straightforward encoder as it was before vectorisation, kept as the reference the fast path must
match byte for byte (tests) and the baseline it is timed against (benchmarks/bench_entropy.py).

Self-contained on purpose: it shares only the plain data classes (Stream, EncodedTensor, Codebook)
and the code-length / frequency rules that define the format, so a change to the fast path's
helpers cannot change the reference too.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from fxcompress.encoded import huffman, patterns, rans
from fxcompress.encoded.bits import width_for
from fxcompress.encoded.positions import gaps_from_positions
from fxcompress.encoded.streams import CODINGS, ENTROPY_CODED_ALPHABET, FREE_SYMBOLS, Stream, estimate_bytes
from fxcompress.encoded.tensor import (DTYPES, LAYOUTS, MAX_ALPHABET, RAW_KINDS, Codebook, EncodedTensor,
                                       coded_type)

_LENGTH_BITS = 5


def write_codes(codes, lengths):
    codes = np.asarray(codes, dtype=np.int64)
    lengths = np.broadcast_to(np.asarray(lengths, dtype=np.int64), codes.shape)
    if codes.size == 0:
        return np.zeros(0, np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nbytes = (int(ends[-1]) + 7) // 8
    window = codes << (24 - lengths - (starts & 7))
    byte = starts >> 3
    out = np.bincount(byte, weights=window >> 16, minlength=nbytes + 2)
    out += np.bincount(byte + 1, weights=(window >> 8) & 255, minlength=nbytes + 2)
    out += np.bincount(byte + 2, weights=window & 255, minlength=nbytes + 2)
    return out[:nbytes].astype(np.uint8)


def pack(codes, width):
    return np.zeros(0, np.uint8) if width == 0 else write_codes(codes, width)


def huffman_encode(symbols, lengths, lanes):
    codes = huffman.canonical_codes(lengths)
    steps = -(-len(symbols) // lanes)
    grid = np.arange(steps * lanes).reshape(steps, lanes).T.reshape(-1)
    order = grid[grid < len(symbols)]
    ordered = symbols[order]
    lane_of = np.arange(len(symbols)) % lanes
    lane_bits = np.bincount(lane_of, weights=lengths[symbols], minlength=lanes).astype(np.int64)
    return write_codes(codes[ordered], lengths[ordered]), lane_bits


def rans_encode(symbols, freq, lanes):
    scale = int(freq.sum()).bit_length() - 1
    cum = (np.cumsum(freq) - freq).astype(np.uint64)
    f64 = freq.astype(np.uint64)
    steps = -(-len(symbols) // lanes)
    grid = np.full(steps * lanes, int(np.argmax(freq)), dtype=np.int64)
    grid[:len(symbols)] = symbols
    grid = grid.reshape(steps, lanes)
    x = np.full(lanes, rans.LOW, dtype=np.uint64)
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


def encode_symbols(symbols, alphabet, coding):
    symbols = np.asarray(symbols, dtype=np.int64)
    if coding == "fixed" or symbols.size == 0:
        width = width_for(alphabet) or int(len(symbols) > FREE_SYMBOLS)
        return Stream("fixed", len(symbols), alphabet, {"width": width}, payload=pack(symbols, width))
    counts = np.bincount(symbols, minlength=alphabet)
    if coding == "huffman":
        lengths = huffman.code_lengths(counts)
        lanes = huffman.lanes_for(len(symbols))
        data, lane_bits = huffman_encode(symbols, lengths, lanes)
        starts = lane_bits[:-1]
        base = int(starts.min(initial=0))
        width = width_for(int(starts.max(initial=0)) - base + 1)
        table = np.concatenate([pack(lengths, _LENGTH_BITS), pack(starts - base, width)])
        return Stream("huffman", len(symbols), len(counts), {"lanes": lanes, "lane_base": base, "lane_width": width},
                      table, data)
    freq = rans.quantize_counts(counts, rans.scale_bits_for(len(counts)))
    lanes = rans.lanes_for(len(symbols))
    words, states = rans_encode(symbols, freq, lanes)
    width = int(freq.max()).bit_length()
    table = np.concatenate([pack(freq, width), states.astype("<u4").view(np.uint8)])
    return Stream("rans", len(symbols), len(counts), {"lanes": lanes, "freq_width": width}, table,
                  words.astype("<u2").view(np.uint8))


def smallest(symbols, alphabet, codings=CODINGS):
    symbols = np.asarray(symbols, dtype=np.int64)
    if alphabet > ENTROPY_CODED_ALPHABET and "fixed" in codings:
        codings = ("fixed",)
    counts = np.bincount(symbols, minlength=alphabet)
    estimates = {c: estimate_bytes(counts, c) for c in codings}
    best = min(estimates.values())
    streams = [encode_symbols(symbols, alphabet, c) for c in codings if estimates[c] <= best * 1.05 + 64]
    return min(streams, key=lambda s: s.nbytes + len(json.dumps(s.header(), separators=(",", ":"))))


def _bits(values):
    return np.ascontiguousarray(values).view(f"u{values.itemsize}")


def _little_endian(array):
    return array.astype(array.dtype.newbyteorder("<")).view(np.uint8)


def table_codebook(values):
    uniq, symbols = np.unique(_bits(values), return_inverse=True)
    return Codebook("table", _little_endian(uniq), symbols, len(uniq))


def table_per_channel_codebook(values, rows, num_rows):
    distinct, value_id = np.unique(_bits(values), return_inverse=True)
    keys = (rows.astype(np.uint64) << np.uint64(32)) | value_id.astype(np.uint64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount((uniq >> np.uint64(32)).astype(np.int64), minlength=num_rows)
    first = np.cumsum(counts) - counts
    symbols = inverse - first[rows]
    data = np.concatenate([counts.astype("<u2").view(np.uint8),
                           _little_endian(distinct[(uniq & np.uint64(0xFFFFFFFF)).astype(np.int64)])])
    return Codebook("table_per_channel", data, symbols, int(counts.max(initial=1)))


def grid_codebook(values, ftype=np.float32):
    distinct = np.unique(values.astype(np.float64))
    gaps = np.diff(distinct) if len(distinct) > 1 else np.abs(distinct[:1]) + (distinct[:1] == 0)
    power = np.floor(np.log2(gaps.min()))
    for step in [ftype(gaps.min())] + [ftype(2.0 ** (power - i)) for i in range(8)]:
        k = np.rint(values / np.float64(step)).astype(np.int64)
        if k.max() - k.min() < MAX_ALPHABET and np.array_equal(k.astype(ftype) * step, values):
            data = _little_endian(np.array([step], dtype=ftype))
            return Codebook("grid", data, k - k.min(), int(k.max() - k.min() + 1), int(k.min()))
    return None


def raw_codebook(values, kind):
    symbols = np.ascontiguousarray(values, dtype=RAW_KINDS[kind]).view(np.uint16)
    return Codebook(kind, np.zeros(0, np.uint8), symbols.astype(np.int64), MAX_ALPHABET)


def codebooks(values, rows, num_rows):
    found = [raw_codebook(values, "float64" if values.dtype == np.float64 else "float32")]
    if values.size and len(np.unique(_bits(values))) <= MAX_ALPHABET:
        found.append(table_codebook(values))
    if values.size and num_rows > 1:
        per_channel = table_per_channel_codebook(values, rows, num_rows)
        if per_channel.alphabet < MAX_ALPHABET:
            found.append(per_channel)
    grid = grid_codebook(values, values.dtype.type) if values.size else None
    return found + ([grid] if grid is not None else [])


def encode_tensor(weight: torch.Tensor, *, layouts=LAYOUTS, codings=CODINGS, index_bits: int = 5) -> EncodedTensor:
    """The old encode_tensor: every layout x codebook encoded, the smallest kept."""
    dtype = str(weight.dtype).removeprefix("torch.")
    flat = weight.detach().to("cpu", DTYPES[np.dtype(coded_type(dtype)).name]).contiguous().numpy().reshape(-1)
    shape = tuple(weight.shape)
    num_rows = shape[0] if len(shape) >= 2 else 1
    row_size = max(flat.size // max(num_rows, 1), 1)
    best = None
    for layout, bits, pattern, where, positions in _views(flat, layouts, codings, index_bits):
        for book in codebooks(flat[where], where // row_size, num_rows):
            allowed = ("fixed",) if book.kind in RAW_KINDS else codings
            values = smallest(book.symbols, book.alphabet, allowed)
            candidate = EncodedTensor(shape, layout, bits, book.kind, book.data, book.offset, values,
                                      positions, dtype, pattern=pattern)
            if best is None or candidate.nbytes < best.nbytes:
                best = candidate
    return best


def _views(flat, layouts, codings, index_bits):
    """(layout, index bits, pattern, stored positions, positions stream) of each layout that applies."""
    for layout in layouts:
        if layout == "dense":
            yield layout, index_bits, None, np.arange(flat.size), None
        elif layout == "relative":
            where = np.flatnonzero(flat)
            yield layout, index_bits, None, where, smallest(gaps_from_positions(where, index_bits, flat.size),
                                                            1 << index_bits, codings)
        else:
            for m in patterns.BLOCKS:
                n = patterns.block_nonzeros(flat, m)
                if n is not None and n <= m // 2:  # an all-zero tensor stores one zero per block
                    symbols, where = patterns.encode_pattern(flat, n := max(n, 1), m)
                    yield layout, 0, (n, m), where, smallest(symbols, patterns.alphabet(n, m), codings)


def encoded_bytes(encoded: EncodedTensor) -> bytes:
    """Header and every byte of an encoding, to compare two encodings exactly."""
    parts = [encoded.codebook_data, encoded.values.table, encoded.values.payload]
    if encoded.positions is not None:
        parts += [encoded.positions.table, encoded.positions.payload]
    return json.dumps(encoded.header(), sort_keys=True).encode() + b"|" + b"|".join(
        np.ascontiguousarray(p).astype(np.uint8).tobytes() for p in parts)
