"""Nonzero positions as one pattern symbol per block of `m` elements (N:M sparsity).

A 2:4 mask coded as relative indices costs about 0.93 bit per weight: an order-0 coder sees the gaps,
not the blocks. Coded per block, the choice of which n of the m elements are stored is one symbol of
C(m, n) (6 for 2:4, 70 for 4:8): log2(6) / 4 = 0.65 bit per weight when every pattern is equally
likely, less when some are more. Blocks are runs of `m` elements in storage order, so a linear
weight's 2:4 blocks along its input dimension are the file's blocks. A block with fewer than n
nonzeros stores zeros among its n values (its first zero positions), so every block has exactly n.
Patterns are numbered in the lexicographic order of their position tuples
(itertools.combinations), the same on every machine.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from math import comb

import numpy as np

MAX_BLOCK = 16   # the bit mask of a block indexes a table of 2^m patterns
BLOCKS = (4, 8)  # the block lengths `encode_tensors` tries (2:4, 4:8 and sparser)


@lru_cache(maxsize=None)
def combinations(n: int, m: int) -> np.ndarray:
    """(C(m, n), n) uint8: the positions of every pattern, in symbol order."""
    return np.array(list(itertools.combinations(range(m), n)), dtype=np.uint8).reshape(comb(m, n), n)


@lru_cache(maxsize=None)
def _symbol_of_mask(n: int, m: int) -> np.ndarray:
    """(2^m,) int32: the symbol of each n-element bit mask of a block (-1 for other masks)."""
    table = np.full(1 << m, -1, np.int32)
    table[(np.left_shift(1, combinations(n, m).astype(np.int64))).sum(axis=1)] = np.arange(comb(m, n))
    return table


def block_nonzeros(flat: np.ndarray, m: int) -> int | None:
    """The most nonzeros any block of `m` holds, or None where the elements do not split into blocks."""
    if not 1 < m <= MAX_BLOCK or flat.size == 0 or flat.size % m:
        return None
    return int(np.count_nonzero(flat.reshape(-1, m), axis=1).max())


def encode_pattern(flat: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(one symbol per block, the sorted flat positions of the n stored elements of every block) for a
    tensor whose blocks of m hold at most n nonzeros each; a block with fewer stores its first zeros too."""
    mask = flat.reshape(-1, m) != 0
    short = np.count_nonzero(mask, axis=1) < n
    if short.any():  # take the first zeros of a short block until it has n stored elements
        rows = mask[short]
        needed = n - rows.sum(axis=1, keepdims=True)
        rows |= (np.cumsum(~rows, axis=1) <= needed) & ~rows
        mask[short] = rows
    # each block's bit mask in 16 bits (m <= 16): 2 bytes per element of temporaries, not int64's 8
    bits = (mask * (np.uint16(1) << np.arange(m, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    symbols = _symbol_of_mask(n, m)[bits]
    where = np.flatnonzero(mask.reshape(-1))
    return symbols.astype(np.int64), where


def positions_from_patterns(symbols: np.ndarray, n: int, m: int) -> np.ndarray:
    """The sorted flat positions the pattern symbols (all below C(m, n)) select."""
    starts = np.arange(len(symbols), dtype=np.int64)[:, None] * m
    return (starts + combinations(n, m)[np.asarray(symbols, dtype=np.int64)]).reshape(-1)


def alphabet(n: int, m: int) -> int:
    return comb(m, n)
