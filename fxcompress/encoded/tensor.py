"""A weight tensor as a codebook plus symbol streams, decoded bit-identically.

Layouts: `dense` codes every element (zero is one more codebook value); `relative` codes the
nonzeros only, their positions as relative indices (see positions.py).
Codebooks: `table` (the distinct values, per tensor or per output channel), `grid` (values are
k * step for integers k, as fixed-point codes are: only the step is stored), `float16` / `float32`
(no sharing: the raw bit patterns, two 16-bit symbols per float32).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from . import positions as pos
from .streams import CODINGS, Stream, decode_symbols, smallest

LAYOUTS = ("dense", "relative")
MAX_ALPHABET = 1 << 16


@dataclass(frozen=True)
class Codebook:
    kind: str                  # "table" | "table_per_channel" | "grid" | "float16" | "float32"
    data: np.ndarray           # uint8: float32 values, (per channel) uint16 row counts first, or the grid step
    symbols: np.ndarray        # one symbol per coded value (two per value for float32)
    alphabet: int
    offset: int = 0            # grid: the integer of symbol 0


@dataclass(frozen=True)
class EncodedTensor:
    shape: tuple[int, ...]
    layout: str
    index_bits: int
    codebook: str
    codebook_data: np.ndarray
    offset: int
    values: Stream
    positions: Stream | None

    def storage_bytes(self) -> dict[str, int]:
        """Exact bytes by part; `header` is the compact JSON of everything that is not an array."""
        return {"positions": self.positions.nbytes if self.positions else 0, "indices": self.values.nbytes,
                "codebook": int(self.codebook_data.size),
                "header": len(json.dumps(self.header(), separators=(",", ":")))}

    def header(self) -> dict:
        return {"shape": list(self.shape), "layout": self.layout, "index_bits": self.index_bits,
                "codebook": self.codebook, "offset": self.offset, "values": self.values.header(),
                "positions": self.positions.header() if self.positions else None}

    @property
    def nbytes(self) -> int:
        return sum(self.storage_bytes().values())


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def table_codebook(values: np.ndarray) -> Codebook:
    uniq, symbols = np.unique(_bits(values), return_inverse=True)
    return Codebook("table", uniq.astype("<u4").view(np.uint8), symbols, len(uniq))


def table_per_channel_codebook(values: np.ndarray, rows: np.ndarray, num_rows: int) -> Codebook:
    keys = (rows.astype(np.uint64) << np.uint64(32)) | _bits(values).astype(np.uint64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount((uniq >> np.uint64(32)).astype(np.int64), minlength=num_rows)
    first = np.cumsum(counts) - counts
    symbols = inverse - first[rows]
    data = np.concatenate([counts.astype("<u2").view(np.uint8),
                           (uniq & np.uint64(0xFFFFFFFF)).astype("<u4").view(np.uint8)])
    return Codebook("table_per_channel", data, symbols, int(counts.max(initial=1)))


def grid_codebook(values: np.ndarray) -> Codebook | None:
    """Values that are exactly float32(k) * step for a shared step (fixed-point codes), else None."""
    distinct = np.unique(values.astype(np.float64))
    gaps = np.diff(distinct) if len(distinct) > 1 else np.abs(distinct[:1]) + (distinct[:1] == 0)
    power = np.floor(np.log2(gaps.min()))  # fixed-point steps are powers of two, maybe below the smallest gap
    for step in [np.float32(gaps.min())] + [np.float32(2.0 ** (power - i)) for i in range(8)]:
        k = np.rint(values / np.float64(step)).astype(np.int64)
        if k.max() - k.min() < MAX_ALPHABET and np.array_equal(k.astype(np.float32) * step, values):
            data = np.array([step], dtype="<f4").view(np.uint8)
            return Codebook("grid", data, k - k.min(), int(k.max() - k.min() + 1), int(k.min()))
    return None


def raw_codebook(values: np.ndarray, kind: str) -> Codebook:
    symbols = np.ascontiguousarray(values, dtype=np.float16 if kind == "float16" else np.float32).view(np.uint16)
    return Codebook(kind, np.zeros(0, np.uint8), symbols.astype(np.int64), MAX_ALPHABET)


def codebooks(values: np.ndarray, rows: np.ndarray, num_rows: int) -> list[Codebook]:
    """Every lossless codebook that applies to these float32 values."""
    found = [raw_codebook(values, "float32")]
    if values.size and len(np.unique(_bits(values))) <= MAX_ALPHABET:
        found.append(table_codebook(values))
    if values.size and num_rows > 1:
        per_channel = table_per_channel_codebook(values, rows, num_rows)
        if per_channel.alphabet <= MAX_ALPHABET:
            found.append(per_channel)
    grid = grid_codebook(values) if values.size else None
    return found + ([grid] if grid is not None else [])


def encode_tensor(weight: torch.Tensor, *, layouts: tuple[str, ...] = LAYOUTS,
                  codings: tuple[str, ...] = CODINGS, index_bits: int = 5) -> EncodedTensor:
    """The smallest lossless encoding of a float32 tensor among the given layouts and codings."""
    flat = weight.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    shape = tuple(weight.shape)
    num_rows = shape[0] if len(shape) >= 2 else 1
    row_size = max(flat.size // max(num_rows, 1), 1)
    best = None
    for layout in layouts:
        where = np.flatnonzero(flat) if layout == "relative" else np.arange(flat.size)
        positions = None
        if layout == "relative":
            positions = smallest(pos.gaps_from_positions(where, index_bits), 1 << index_bits, codings)
        for book in codebooks(flat[where], where // row_size, num_rows):
            allowed = ("fixed",) if book.kind.startswith("float") else codings
            values = smallest(book.symbols, book.alphabet, allowed)
            candidate = EncodedTensor(shape, layout, index_bits, book.kind, book.data, book.offset, values, positions)
            if best is None or candidate.nbytes < best.nbytes:
                best = candidate
    return best


def encode_half(tensor: torch.Tensor) -> EncodedTensor:
    """A tensor rounded to float16 (lossy, for biases when asked), stored raw."""
    flat = tensor.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    book = raw_codebook(flat, "float16")
    values = smallest(book.symbols, book.alphabet, ("fixed",))
    return EncodedTensor(tuple(tensor.shape), "dense", 0, "float16", book.data, 0, values, None)


def decode_tensor(encoded: EncodedTensor) -> torch.Tensor:
    """The float32 tensor, bit for bit as it was encoded (float16 codebooks: as rounded)."""
    numel = int(np.prod(encoded.shape, dtype=np.int64))
    per_value = 2 if encoded.codebook == "float32" else 1  # two 16-bit symbols per raw float32
    where = None
    if encoded.layout == "relative":
        where = pos.positions_from_gaps(decode_symbols(encoded.positions), encoded.index_bits)
        if len(where) * per_value != encoded.values.count or (len(where) and where[-1] >= numel):
            raise ValueError("positions do not match the tensor")
    elif encoded.values.count != numel * per_value:
        raise ValueError("value count does not match the tensor")
    values = _values(encoded, decode_symbols(encoded.values), where, numel)
    flat = values if where is None else np.zeros(numel, np.float32)
    if where is not None:
        flat[where] = values
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).reshape(encoded.shape)


def _values(encoded: EncodedTensor, symbols: np.ndarray, where: np.ndarray | None, numel: int) -> np.ndarray:
    kind, data = encoded.codebook, encoded.codebook_data
    if kind == "float32":
        return symbols.astype(np.uint16).view(np.float32)
    if kind == "float16":
        return symbols.astype(np.uint16).view(np.float16).astype(np.float32)
    if kind == "grid":
        return (symbols.astype(np.int64) + encoded.offset).astype(np.float32) * data.view("<f4")[0]
    if kind == "table":
        return data.view("<f4")[symbols]
    if kind == "table_per_channel":
        num_rows = encoded.shape[0]
        counts = data[:2 * num_rows].view("<u2").astype(np.int64)
        index = np.arange(numel) if where is None else where
        first = np.cumsum(counts) - counts
        rows = index // (numel // num_rows)
        if np.any(symbols >= counts[rows]):
            raise ValueError("codebook index out of range")
        return data[2 * num_rows:].view("<f4")[first[rows] + symbols]
    raise ValueError(f"unknown codebook {kind!r}")
