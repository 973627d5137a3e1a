"""Codes of 0..16 bits packed into bytes, most significant bit first, without per-symbol loops."""
from __future__ import annotations

import numpy as np

MAX_CODE_BITS = 16  # a code plus its bit offset in a byte fits the 24-bit windows used below


_CHUNK = 1 << 20  # codes per step of the bit writer: bounds its transient arrays to ~16 bytes a code


def write_codes(codes: np.ndarray, lengths: np.ndarray | int) -> np.ndarray:
    """Concatenate `codes[i]` written on `lengths[i]` bits into a uint8 array (the last byte zero-padded).

    Each code is left-aligned in 16 bits and spread into single bits by numpy's unpackbits; the
    first `lengths[i]` of them are kept and packbits joins them, MSB first.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size == 0:
        return np.zeros(0, np.uint8)
    fixed = np.ndim(lengths) == 0
    if fixed and int(lengths) in (8, 16):
        return codes.astype(">u2" if int(lengths) == 16 else np.uint8).view(np.uint8)
    lengths = np.broadcast_to(np.asarray(lengths, dtype=np.int64), codes.shape)
    pieces = []
    for start in range(0, codes.size, _CHUNK):
        part, width = codes[start:start + _CHUNK], lengths[start:start + _CHUNK]
        bits = np.unpackbits((part << (16 - width)).astype(">u2").view(np.uint8)).reshape(-1, 16)
        if fixed:
            pieces.append(bits[:, :int(width[0])].reshape(-1))
        else:
            pieces.append(bits[np.arange(16) < width[:, None]])
    return np.packbits(np.concatenate(pieces))


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
    """Fixed-width packing: every code on `width` bits (0 bits when there is a single symbol). Widths past
    MAX_CODE_BITS (a single-symbol rANS stream over more than 256 symbols has the frequency 2^16: 17 bits)
    are written as each code's high bits then its low 16, which is the same bit string MSB first; write_codes
    alone wrote 16 of the 17 bits, and the stream then failed to decode."""
    if width == 0:
        return np.zeros(0, np.uint8)
    if width > MAX_CODE_BITS:
        codes = np.asarray(codes, dtype=np.int64)
        halves = np.stack([codes >> MAX_CODE_BITS, codes & ((1 << MAX_CODE_BITS) - 1)], axis=1).reshape(-1)
        return write_codes(halves, np.tile([width - MAX_CODE_BITS, MAX_CODE_BITS], codes.size))
    return write_codes(codes, width)


def width_for(alphabet: int) -> int:
    """Bits needed for symbols 0..alphabet-1."""
    return max(int(alphabet) - 1, 0).bit_length()
