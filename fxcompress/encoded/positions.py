"""Nonzero positions as relative indices (zero run-lengths) on a fixed index width.

Deep Compression stores, before each nonzero, the number of zeros since the previous one on
`index_bits` bits (8 for conv, 5 for fc) and pads longer gaps with filler entries. Here the
largest code, 2^index_bits - 1, is the filler: it means "that many zeros, and no value", so a
filler costs an index but no value slot. Every other code g means "g zeros, then a nonzero".
"""
from __future__ import annotations

import numpy as np


def gaps_from_positions(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """The code stream (fillers included) for sorted flat positions of the nonzeros."""
    positions = np.asarray(positions, dtype=np.int64)
    filler = (1 << index_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers, rest = np.divmod(gaps, filler)
    # each nonzero is preceded by its fillers: repeat the filler code, then the remainder
    out = np.full(int(fillers.sum()) + len(gaps), filler, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = rest
    return out


def positions_from_gaps(codes: np.ndarray, index_bits: int) -> np.ndarray:
    """Sorted flat positions of the nonzeros from a code stream."""
    codes = np.asarray(codes, dtype=np.int64)
    filler = (1 << index_bits) - 1
    is_filler = codes == filler
    steps = np.where(is_filler, filler, codes + 1)
    return (np.cumsum(steps) - 1)[~is_filler]
