"""One interface over the symbol coders: a Stream is plain data (small ints + two byte arrays).

    fixed    every symbol on ceil(log2(alphabet)) bits (0 bits for a single symbol)
    huffman  canonical Huffman, code lengths stored 5 bits per symbol, lanes for fast decoding
    rans     interleaved rANS, frequencies stored on a fixed width, one 32-bit final state per lane
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from . import huffman, rans
from .bits import pack, read_fixed, width_for

CODINGS = ("fixed", "huffman", "rans")
_LENGTH_BITS = 5  # Huffman code lengths are 0..16
ENTROPY_CODED_ALPHABET = 4096  # larger alphabets (unshared float values) are only bit-packed by smallest()


@dataclass(frozen=True)
class Stream:
    """Symbols 0..alphabet-1 coded with `coding`: `table` describes the code, `payload` holds the symbols."""

    coding: str
    count: int
    alphabet: int
    meta: dict = field(default_factory=dict)
    table: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    payload: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))

    @property
    def nbytes(self) -> int:
        return int(self.table.size + self.payload.size)

    def header(self) -> dict:
        """Everything but the bytes, as plain data."""
        return {"coding": self.coding, "count": self.count, "alphabet": self.alphabet, **self.meta,
                "table_bytes": int(self.table.size), "payload_bytes": int(self.payload.size)}


def encode_symbols(symbols: np.ndarray, alphabet: int, coding: str) -> Stream:
    symbols = np.asarray(symbols, dtype=np.int64)
    if coding == "fixed" or symbols.size == 0:
        width = width_for(alphabet)
        return Stream("fixed", len(symbols), alphabet, {"width": width}, payload=pack(symbols, width))
    counts = np.bincount(symbols, minlength=alphabet)
    if coding == "huffman":
        return _huffman(symbols, counts)
    if coding == "rans":
        return _rans(symbols, counts)
    raise ValueError(f"unknown coding {coding!r}; expected one of {CODINGS}")


def _huffman(symbols: np.ndarray, counts: np.ndarray) -> Stream:
    lengths = huffman.code_lengths(counts)
    lanes = huffman.lanes_for(len(symbols))
    data, lane_bits = huffman.encode(symbols, lengths, lanes)
    starts = lane_bits[:-1]
    base = int(starts.min(initial=0))
    width = width_for(int(starts.max(initial=0)) - base + 1)
    table = np.concatenate([pack(lengths, _LENGTH_BITS), pack(starts - base, width)])
    meta = {"lanes": lanes, "lane_base": base, "lane_width": width}
    return Stream("huffman", len(symbols), len(counts), meta, table, data)


def _rans(symbols: np.ndarray, counts: np.ndarray) -> Stream:
    freq = rans.quantize_counts(counts, rans.scale_bits_for(len(counts)))
    lanes = rans.lanes_for(len(symbols))
    words, states = rans.encode(symbols, freq, lanes)
    width = int(freq.max()).bit_length()
    table = np.concatenate([pack(freq, width), states.astype("<u4").view(np.uint8)])
    meta = {"lanes": lanes, "freq_width": width}
    return Stream("rans", len(symbols), len(counts), meta, table, words.astype("<u2").view(np.uint8))


def decode_symbols(stream: Stream) -> np.ndarray:
    """The symbols of `stream` (int32 or int64 array of length `stream.count`)."""
    if stream.coding == "fixed":
        return read_fixed(stream.payload, stream.meta["width"], stream.count)
    if stream.coding == "huffman":
        return _decode_huffman(stream)
    if stream.coding == "rans":
        return _decode_rans(stream)
    raise ValueError(f"unknown coding {stream.coding!r}")


def _decode_huffman(stream: Stream) -> np.ndarray:
    meta, table = stream.meta, stream.table
    lengths = read_fixed(table, _LENGTH_BITS, stream.alphabet)
    length_bytes = (stream.alphabet * _LENGTH_BITS + 7) // 8
    starts = read_fixed(table[length_bytes:], meta["lane_width"], meta["lanes"] - 1) + meta["lane_base"]
    lane_bits = np.append(starts, 0)
    if lengths.max(initial=0) > 16 or int(starts.sum()) > 8 * stream.payload.size:
        raise ValueError("Huffman table does not match its stream")
    return huffman.decode(stream.payload, lengths, lane_bits, stream.count)


def _decode_rans(stream: Stream) -> np.ndarray:
    meta, table = stream.meta, stream.table
    freq = read_fixed(table, meta["freq_width"], stream.alphabet)
    freq_bytes = (stream.alphabet * meta["freq_width"] + 7) // 8
    states = table[freq_bytes:freq_bytes + 4 * meta["lanes"]].view("<u4")
    total = int(freq.sum())
    if total & (total - 1) or len(states) != meta["lanes"]:
        raise ValueError("rANS table does not match its stream")
    return rans.decode(stream.payload.view("<u2"), states, freq, stream.count)


def smallest(symbols: np.ndarray, alphabet: int, codings: tuple[str, ...] = CODINGS) -> Stream:
    """The smallest of the given codings for these symbols (ties go to the faster, earlier one).

    Sizes are first estimated from the symbol counts (exact for fixed and Huffman payloads); only the
    codings whose estimate is within 5% of the best are really encoded and compared.
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    if alphabet > ENTROPY_CODED_ALPHABET and "fixed" in codings:
        codings = ("fixed",)  # a code table that large costs more than it can save
    counts = np.bincount(symbols, minlength=alphabet)
    estimates = {c: estimate_bytes(counts, c) for c in codings}
    best = min(estimates.values())
    streams = [encode_symbols(symbols, alphabet, c) for c in codings if estimates[c] <= best * 1.05 + 64]
    return min(streams, key=lambda s: s.nbytes + len(json.dumps(s.header(), separators=(",", ":"))))


def estimate_bytes(counts: np.ndarray, coding: str) -> float:
    """Bytes a coding would take for symbols with these counts (tables and lane overheads included)."""
    n, alphabet = int(counts.sum()), len(counts)
    if coding == "fixed" or n == 0:
        return (n * width_for(alphabet) + 7) // 8
    if coding == "huffman":
        bits = int((counts * huffman.code_lengths(counts)).sum())
        return bits / 8 + (alphabet * _LENGTH_BITS) / 8 + 2 * huffman.lanes_for(n)
    freq = rans.quantize_counts(counts, rans.scale_bits_for(alphabet))
    present = counts > 0
    bits = -(counts[present] * np.log2(freq[present] / freq.sum())).sum()
    lanes = rans.lanes_for(n)
    return bits / 8 + 6 * lanes + alphabet * int(freq.max()).bit_length() / 8 + 4 * lanes


__all__ = ["CODINGS", "Stream", "decode_symbols", "encode_symbols", "smallest"]
