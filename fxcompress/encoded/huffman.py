"""Canonical Huffman coding with table-driven decoding in independent lanes.

Symbols are dealt round-robin to lanes (symbol i to lane i % lanes) and each lane's codes are
written one after another. With the bit length of every lane stored, all lanes decode side by
side: each step decodes the next symbol of every lane with a handful of numpy operations (a lookup
in a 2^L-entry table indexed by the next L bits gives the symbol and its code length), and the
steps' rows are already the symbols in their original order.
"""
from __future__ import annotations

import numpy as np

from .bits import MAX_CODE_BITS, write_codes

LANE_SYMBOLS = 2048


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code lengths (0 for absent symbols), no longer than `limit` bits.

    Lengths come from the classic merge of the two lightest subtrees. If the longest code exceeds
    `limit`, the counts are flattened (shifted right, every present symbol kept at >= 1) as little
    as needed and the code rebuilt: a small loss only very skewed streams of large alphabets see.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(present) == 1:
        lengths[present] = 1  # a single symbol still needs one bit to be a prefix code
        return lengths
    weights = counts[present]
    depth = _tree_depths(weights)
    if depth.max() > limit:  # the smallest flattening (counts >> shift, kept >= 1) that fits the limit
        low, high = 0, int(weights.max()).bit_length()  # at `high` all counts are 1: a balanced tree
        while high - low > 1:
            middle = (low + high) // 2
            if _tree_depths(np.maximum(weights >> middle, 1)).max() <= limit:
                high = middle
            else:
                low = middle
        depth = _tree_depths(np.maximum(weights >> high, 1))
    lengths[present] = depth
    return lengths


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of the Huffman tree that merges the two lightest nodes, ties to the lower id (leaves
    are ids 0..n-1, merged nodes get increasing ids). Two queues instead of a heap (van Leeuwen): the
    leaves sorted by (weight, id) and the merged nodes, made with nondecreasing weights and increasing
    ids, so the lighter front, a leaf on a tie, is the (weight, id) minimum a heap would pop: the same
    tree, in plain Python lists (numpy's per-element indexing cost more than the merging)."""
    weight = [int(w) for w in weights]
    count = len(weight)
    leaves = sorted(range(count), key=weight.__getitem__)  # stable: ties in id order
    weight += [0] * max(count - 1, 0)
    parent = [0] * max(2 * count - 1, 0)
    leaf, merged = 0, count  # the front of each queue; merged nodes are ids merged..node-1
    for node in range(count, 2 * count - 1):
        pair = []
        for _ in range(2):
            if leaf < count and (merged == node or weight[leaves[leaf]] <= weight[merged]):
                pair.append(leaves[leaf])
                leaf += 1
            else:
                pair.append(merged)
                merged += 1
        parent[pair[0]] = parent[pair[1]] = node
        weight[node] = weight[pair[0]] + weight[pair[1]]
    depth = [0] * len(parent)
    for child in range(2 * count - 3, -1, -1):  # from the root down
        depth[child] = depth[parent[child]] + 1
    return np.array(depth[:count], dtype=np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values: symbols sorted by (length, symbol) get consecutive codes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code, previous = 0, 0
    for length in range(1, int(lengths.max(initial=0)) + 1):
        members = order[lengths[order] == length]
        code <<= length - previous
        codes[members] = code + np.arange(len(members))
        code += len(members)
        previous = length
    return codes


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Table indexed by the next L bits: entry = (code length << 16) | symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    symbols = np.flatnonzero(lengths)
    firsts = codes[symbols] << (width - lengths[symbols])
    order = np.argsort(firsts)  # canonical codes tile the table from 0 in this order
    spans = 1 << (width - lengths[symbols[order]])
    filled = np.repeat((lengths[symbols[order]] << 16) | symbols[order], spans)
    table = np.zeros(1 << width, dtype=np.int32)
    table[:len(filled)] = filled
    return table, width


def encode(symbols: np.ndarray, lengths: np.ndarray, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """The bitstream and the bit length of every lane. Symbol i goes to lane i % lanes."""
    return write(symbols, lengths, lanes), lane_bits(symbols, lengths, lanes)


def lane_bits(symbols: np.ndarray, lengths: np.ndarray, lanes: int) -> np.ndarray:
    """The bit length of every lane, from the code lengths alone (no bits written)."""
    steps = _per_lane(len(symbols), lanes)
    grid = np.zeros(steps * lanes, dtype=np.uint8)  # code lengths are at most 16: one byte a symbol
    grid[:len(symbols)] = np.asarray(lengths, dtype=np.uint8)[symbols]
    return grid.reshape(steps, lanes).sum(axis=0, dtype=np.int64)


def write(symbols: np.ndarray, lengths: np.ndarray, lanes: int) -> np.ndarray:
    """The bitstream: each lane's codes one after another, lane 0 first."""
    codes = canonical_codes(lengths)
    ordered = symbols[lane_order(len(symbols), lanes)]
    return write_codes(codes[ordered], lengths[ordered])


def _per_lane(count: int, lanes: int) -> int:
    return -(-count // lanes)


def lane_order(count: int, lanes: int) -> np.ndarray:
    """Symbol indices lane by lane: lane k holds symbols k, k + lanes, k + 2 * lanes, ..."""
    steps = _per_lane(count, lanes)
    grid = np.arange(steps * lanes).reshape(steps, lanes).T.reshape(-1)
    return grid[grid < count]


def lanes_for(count: int, lane_symbols: int = LANE_SYMBOLS) -> int:
    """Lanes of `lane_symbols` symbols; short streams get at least 16 lanes so few steps run in Python."""
    per_lane = min(lane_symbols, max(64, count // 16))
    return max(1, -(-count // per_lane))


def decode(data: np.ndarray, lengths: np.ndarray, lane_bits: np.ndarray, count: int) -> np.ndarray:
    """Decode `count` symbols: each step decodes the next symbol of every lane at once."""
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    table, width = decode_table(lengths)
    steps = _per_lane(count, len(lane_bits))
    windows = windows32(data, extra=(steps * width) // 8 + 8)  # a short lane reads a little past its end
    pos = (np.cumsum(lane_bits) - lane_bits).astype(np.int64 if windows.size > 1 << 27 else np.int32)
    out = np.empty((steps, len(pos)), dtype=np.int32)
    byte, offset, bits = np.empty_like(pos), np.empty(len(pos), np.uint32), np.empty(len(pos), np.uint32)
    drop = np.uint32(32 - width)
    for step in range(steps):
        row = out[step]
        np.right_shift(pos, 3, out=byte)
        np.take(windows, byte, out=bits)
        np.bitwise_and(pos, 7, out=offset, casting="unsafe")
        np.left_shift(bits, offset, out=bits)  # the uint32 shift drops the bits of earlier codes
        np.right_shift(bits, drop, out=bits)
        np.take(table, bits, out=row)
        np.right_shift(row, 16, out=byte)
        pos += byte
    np.bitwise_and(out, 0xFFFF, out=out)
    return out.reshape(-1)[:count]


def windows32(data: np.ndarray, extra: int = 0) -> np.ndarray:
    """For every byte offset, the 32 bits starting there (bytes past the end read as zero)."""
    padded = np.zeros(len(data) + 4 + extra, dtype=np.uint32)
    padded[:len(data)] = data
    return (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
