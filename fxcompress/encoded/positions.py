"""Nonzero positions as relative indices (zero run-lengths) on a fixed index width.

Deep Compression stores, before each nonzero, the number of zeros since the previous one on
`index_bits` bits (8 for conv, 5 for fc) and pads longer gaps with filler entries. Here the
largest code, 2^index_bits - 1, is the filler: it means "that many zeros, and no value", so a
filler costs an index but no value slot. Every other code g means "g zeros, then a nonzero".
The zeros after the last nonzero are coded as fillers too (all but fewer than a filler's worth), so
the codes bound the tensor's size: a decoder can refuse a tensor the stream does not reach.
"""
from __future__ import annotations

import numpy as np


def gaps_from_positions(positions: np.ndarray, index_bits: int, length: int | None = None) -> np.ndarray:
    """The code stream (fillers included) for sorted flat positions of the nonzeros of a tensor
    of `length` elements (None: no fillers for the zeros after the last nonzero)."""
    positions = np.asarray(positions, dtype=np.int64)
    filler = (1 << index_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers, rest = np.divmod(gaps, filler)
    trailing = 0 if length is None else (length - 1 - int(positions[-1] if len(positions) else -1)) // filler
    # each nonzero is preceded by its fillers: repeat the filler code, then the remainder
    out = np.full(int(fillers.sum()) + len(gaps) + trailing, filler, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = rest
    return out


def positions_from_gaps(codes: np.ndarray, index_bits: int) -> np.ndarray:
    """Sorted flat positions of the nonzeros from a code stream."""
    return positions_and_span(codes, index_bits)[0]


def positions_and_span(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, int]:
    """(sorted flat positions of the nonzeros, number of elements the codes cover)."""
    codes = np.asarray(codes, dtype=np.int64)
    filler = (1 << index_bits) - 1
    is_filler = codes == filler
    ends = np.cumsum(np.where(is_filler, filler, codes + 1))
    return ends[~is_filler] - 1, int(ends[-1]) if len(ends) else 0
