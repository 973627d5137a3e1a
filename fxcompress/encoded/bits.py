"""Codes of 0..16 bits packed into bytes, most significant bit first, without per-symbol loops."""
from __future__ import annotations

import numpy as np

MAX_CODE_BITS = 16  # a code plus its bit offset in a byte fits the 24-bit windows used below


def write_codes(codes: np.ndarray, lengths: np.ndarray | int) -> np.ndarray:
    """Concatenate `codes[i]` written on `lengths[i]` bits into a uint8 array (the last byte zero-padded)."""
    codes = np.asarray(codes, dtype=np.int64)
    lengths = np.broadcast_to(np.asarray(lengths, dtype=np.int64), codes.shape)
    if codes.size == 0:
        return np.zeros(0, np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nbytes = (int(ends[-1]) + 7) // 8
    # each code lands in the 3 bytes from starts >> 3; codes never overlap, so summing the byte
    # contributions (exact in float64) is the same as OR-ing them
    window = codes << (24 - lengths - (starts & 7))
    byte = starts >> 3
    out = np.bincount(byte, weights=window >> 16, minlength=nbytes + 2)
    out += np.bincount(byte + 1, weights=(window >> 8) & 255, minlength=nbytes + 2)
    out += np.bincount(byte + 2, weights=window & 255, minlength=nbytes + 2)
    return out[:nbytes].astype(np.uint8)


def windows24(data: np.ndarray, extra: int = 0) -> np.ndarray:
    """For every byte offset q, the 24 bits starting there (bytes past the end read as zero)."""
    padded = np.zeros(len(data) + 3 + extra, dtype=np.uint32)
    padded[:len(data)] = data
    return (padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]


def read_fixed(data: np.ndarray, width: int, count: int, start_bit: int = 0) -> np.ndarray:
    """`count` codes of `width` bits (0..16) starting at `start_bit`, as int64."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    starts = start_bit + np.arange(count, dtype=np.int64) * width
    win = windows24(data)[starts >> 3].astype(np.int64)
    return (win >> (24 - width - (starts & 7))) & ((1 << width) - 1)


def pack(codes: np.ndarray, width: int) -> np.ndarray:
    """Fixed-width packing: every code on `width` bits (0 bits when there is a single symbol)."""
    if width == 0:
        return np.zeros(0, np.uint8)
    return write_codes(codes, width)


def width_for(alphabet: int) -> int:
    """Bits needed for symbols 0..alphabet-1."""
    return max(int(alphabet) - 1, 0).bit_length()
