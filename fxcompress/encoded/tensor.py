"""A weight tensor as a codebook plus symbol streams, decoded bit-identically.

Layouts: `dense` codes every element (zero is one more codebook value); `relative` codes the
nonzeros only, their positions as relative indices (see positions.py); `pattern` codes n elements of
every block of m (N:M sparsity), their positions as one pattern symbol per block (see patterns.py).
Codebooks: `table` (the distinct values, per tensor or per output channel), `grid` (values are
k * step for integers k, as fixed-point codes are: only the step is stored), `group_grid` (each run
of `group_size` elements in storage order has its own step, stored as float16 where that decodes
exactly, else float32; the symbols are the integers k of all groups in one shared alphabet, so the
coders see one distribution: GPTQ / AWQ-style group-wise linear grids), `float16` / `float32`
/ `float64` (no sharing: the raw bit patterns as 16-bit symbols, 1, 2 or 4 per value).
Values are coded as float64 for float64 tensors and as float32 otherwise (exact for float16 and
bfloat16); `dtype` gives the decoded tensor's dtype.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fxcompress.errors import FormatError

from . import patterns
from . import positions as pos
from .streams import CODINGS, ENTROPY_CODED_ALPHABET, MAX_ALPHABET, Request, Stream, check_tables, choose, \
    decode_symbols, header_int, smallest, stream_from_header

LAYOUTS = ("dense", "relative", "pattern")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
RAW_KINDS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}  # 16-bit symbols: itemsize / 2
CODEBOOKS = ("table", "table_per_channel", "grid", "group_grid", *RAW_KINDS)
MAX_DIMS = 8
_HEADER_FIELDS = {"shape", "layout", "index_bits", "codebook", "offset", "values", "positions", "codebook_bytes"}
_OPTIONAL_FIELDS = {"dtype", "group_size", "pattern"}
_EXACT_INTEGERS = 1 << 24  # a group grid's integers k are exact in float32 up to this magnitude


def coded_type(dtype: str) -> type:
    """The float type a tensor of `dtype` is coded in: exact for every supported dtype."""
    return np.float64 if dtype == "float64" else np.float32


@dataclass(frozen=True)
class Codebook:
    kind: str                  # "table" | "table_per_channel" | "grid" | "float16" | "float32" | "float64"
    data: np.ndarray           # uint8: the values, (per channel) uint16 row counts first, or the grid step
    symbols: np.ndarray        # one symbol per coded value (two / four per value for float32 / float64)
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
    dtype: str = "float32"
    group_size: int = 0        # group_grid: elements per step (runs in storage order); 0 for other kinds
    pattern: tuple[int, int] | None = None  # the pattern layout's (n, m): n stored elements per block of m

    def storage_bytes(self) -> dict[str, int]:
        """Exact bytes by part; `header` is the compact JSON of everything that is not an array."""
        return {"positions": self.positions.nbytes if self.positions else 0, "indices": self.values.nbytes,
                "codebook": int(self.codebook_data.size),
                "header": len(json.dumps(self.header(), separators=(",", ":")))}

    def header(self) -> dict:
        """The plain-data header; `dtype` only when it is not float32 (older files have none)."""
        header = {"shape": list(self.shape), "layout": self.layout, "index_bits": self.index_bits,
                  "codebook": self.codebook, "offset": self.offset, "values": self.values.header(),
                  "positions": self.positions.header() if self.positions else None}
        header |= {"group_size": self.group_size} if self.codebook == "group_grid" else {}
        header |= {"pattern": list(self.pattern)} if self.layout == "pattern" else {}
        return header | ({"dtype": self.dtype} if self.dtype != "float32" else {})

    @property
    def nbytes(self) -> int:
        return sum(self.storage_bytes().values())

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def symbols_per_value(self) -> int:
        return np.dtype(RAW_KINDS[self.codebook]).itemsize // 2 if self.codebook in RAW_KINDS else 1


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).view(f"u{values.itemsize}")


def _little_endian(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("<")).view(np.uint8)


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted distinct bit patterns, each value's index among them): np.unique(return_inverse=True)
    without sorting every value: a hash-based unique, then a binary search of the few distinct ones."""
    bits = _bits(values)
    uniq = np.sort(_unique_values(bits))
    # uint16 (int32 past 2^16 distinct values): a quarter of searchsorted's int64, made a chunk at a time
    index = np.empty(bits.size, np.uint16 if len(uniq) <= MAX_ALPHABET else np.int32)
    for start in range(0, bits.size, _CHUNK):
        index[start:start + _CHUNK] = np.searchsorted(uniq, bits[start:start + _CHUNK])
    return uniq, index


_CHUNK = 1 << 18  # elements per step of the encoder's int64 temporaries
_unique_values = getattr(np, "unique_values", np.unique)  # numpy >= 2.3 hashes instead of sorting


def table_codebook(values: np.ndarray) -> Codebook:
    uniq, symbols = _distinct(values)
    return Codebook("table", _little_endian(uniq), symbols, len(uniq))


def table_per_channel_codebook(values: np.ndarray, rows: np.ndarray, num_rows: int,
                               distinct: tuple[np.ndarray, np.ndarray] | None = None) -> Codebook:
    """Each channel's distinct values, in the order of the values' bit patterns; symbols index them."""
    distinct, value_id = distinct if distinct is not None else _distinct(values)
    narrow = num_rows * len(distinct) < 1 << 31  # int32 keys: half the memory of int64 ones
    keys = rows.astype(np.int32 if narrow else np.int64, copy=False) * len(distinct)
    keys += value_id  # sorts as (row, value) pairs do
    if num_rows * len(distinct) <= 4 * keys.size + (1 << 20):  # a presence table is small: no sort
        present = np.bincount(keys, minlength=num_rows * len(distinct)) > 0
        if present.all():  # every channel holds every value: its symbols are the table's
            counts = np.full(num_rows, len(distinct))
            data = np.concatenate([counts.astype("<u2").view(np.uint8), _little_endian(np.tile(distinct, num_rows))])
            return Codebook("table_per_channel", data, value_id, len(distinct))
        uniq = np.flatnonzero(present)
        inverse = (np.cumsum(present) - 1).astype(keys.dtype)[keys]
    else:
        uniq, inverse = np.unique(keys, return_inverse=True)
    del keys
    counts = np.bincount(uniq // len(distinct), minlength=num_rows)
    first = (np.cumsum(counts) - counts).astype(inverse.dtype)
    inverse -= first[rows]
    # each value's index in its channel's codebook, in 16 bits when the counts allow (they are uint16)
    symbols = inverse.astype(np.uint16) if counts.max(initial=0) <= MAX_ALPHABET else inverse
    data = np.concatenate([counts.astype("<u2").view(np.uint8), _little_endian(distinct[uniq % len(distinct)])])
    return Codebook("table_per_channel", data, symbols, int(counts.max(initial=1)))


def grid_codebook(values: np.ndarray, ftype: type = np.float32) -> Codebook | None:
    """Values that are exactly ftype(k) * step for a shared step (fixed-point codes), else None."""
    uniq, value_id = _distinct(values)
    grid = _grid_of_distinct(uniq.view(values.dtype), ftype)
    if grid is None:
        return None
    step, k = grid
    return Codebook("grid", _little_endian(np.array([step], dtype=ftype)), (k - k.min())[value_id],
                    int(k.max() - k.min() + 1), int(k.min()))


def _grid_of_distinct(distinct_values: np.ndarray, ftype: type) -> tuple[object, np.ndarray] | None:
    """(step, the integer k of every distinct value) if they all lie on one grid of ftype(k) * step.
    Every test is an equality or an extreme over the values, so the distinct ones decide it."""
    distinct = np.unique(distinct_values.astype(np.float64))
    gaps = np.diff(distinct) if len(distinct) > 1 else np.abs(distinct[:1]) + (distinct[:1] == 0)
    power = np.floor(np.log2(gaps.min()))  # fixed-point steps are powers of two, maybe below the smallest gap
    for step in [ftype(gaps.min())] + [ftype(2.0 ** (power - i)) for i in range(8)]:
        k = np.rint(distinct_values / np.float64(step)).astype(np.int64)
        if k.max() - k.min() < MAX_ALPHABET and np.array_equal(k.astype(ftype) * step, distinct_values):
            return step, k
    return None


@dataclass(frozen=True)
class GroupSteps:
    """The step of every run of `group_size` elements in storage order (a group-wise linear grid's
    scales, read from its fake-quant layer): a hint the encoder checks value by value, never trusts."""
    steps: np.ndarray          # float32, one per group
    group_size: int

    def check(self, numel: int) -> None:
        if self.group_size < 1 or numel % self.group_size or self.steps.size != numel // self.group_size:
            raise ValueError(f"GroupSteps: {self.steps.size} steps of {self.group_size} elements do not cover "
                             f"a tensor of {numel}")


def _per_value(steps: np.ndarray, group_size: int, where: np.ndarray | None) -> np.ndarray:
    """Each value's step: every element's (where is None) or the elements' at `where`."""
    return np.repeat(steps, group_size) if where is None else steps[where // group_size]


def _grid_integers(values: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
    """The integers k with float32(k) * step == value for every value (int32), or None if any has none.
    Equality, not bit patterns: a -0.0 decodes as +0.0, as the relative layout's zeros do."""
    with np.errstate(all="ignore"):
        k = np.rint(values / steps)
    if not np.isfinite(k).all() or np.abs(k).max(initial=0) > _EXACT_INTEGERS or \
            k.max(initial=0) - k.min(initial=0) >= ENTROPY_CODED_ALPHABET:
        return None
    k = k.astype(np.int32)
    return k if np.array_equal(k.astype(np.float32) * steps, values) else None


def group_grid_book(values: np.ndarray, where: np.ndarray | None, hint: GroupSteps,
                    codings: tuple[str, ...] = CODINGS) -> _Book | None:
    """The group_grid codebook of `values` (all elements, or the nonzeros at `where`) if each is exactly
    k * its group's step; steps stored as float16 when those decode every value exactly, else float32."""
    if values.dtype != np.float32 or not values.size:
        return None
    for width in ("<f2", "<f4"):
        with np.errstate(over="ignore"):
            steps = hint.steps.astype(width)
        k = _grid_integers(values, _per_value(steps.astype(np.float32), hint.group_size, where))
        if k is not None:
            low = int(k.min())
            k -= low
            return _Book("group_grid", steps.view(np.uint8), Request(k, int(k.max()) + 1, codings), low,
                         hint.group_size)
    return None


def raw_codebook(values: np.ndarray, kind: str) -> Codebook:
    symbols = np.ascontiguousarray(values, dtype=RAW_KINDS[kind]).view(np.uint16)
    return Codebook(kind, np.zeros(0, np.uint8), symbols.astype(np.int64), MAX_ALPHABET)


def codebooks(values: np.ndarray, rows: np.ndarray, num_rows: int) -> list[Codebook]:
    """Every lossless codebook that applies to these values (float32 or float64)."""
    found = []
    for book in _books(values, lambda: rows, num_rows):
        symbols = book.request.materialise()
        found.append(Codebook(book.kind, book.data, np.asarray(symbols, dtype=np.int64), book.request.alphabet,
                              book.offset))
    return found


@dataclass
class _Book:
    """A codebook whose symbols are a Request: made when first needed (raw symbols never are unless they win)."""
    kind: str
    data: np.ndarray
    request: Request
    offset: int = 0
    group_size: int = 0


def _books(values: np.ndarray, rows, num_rows: int, codings: tuple[str, ...] = CODINGS) -> list[_Book]:
    """The codebooks of `codebooks`, in its order, each with a Request for its symbols; `rows` makes the
    channel of every value. The distinct values are found once and serve table, per-channel and grid."""
    kind = "float64" if values.dtype == np.float64 else "float32"
    per_value = np.dtype(RAW_KINDS[kind]).itemsize // 2
    found = [_Book(kind, np.zeros(0, np.uint8), Request(lambda: raw_codebook(values, kind).symbols, MAX_ALPHABET,
                                                         ("fixed",), count=values.size * per_value))]
    if not values.size:
        return found
    uniq, value_id = _distinct(values)
    if len(uniq) <= MAX_ALPHABET:
        found.append(_Book("table", _little_endian(uniq),
                           Request(value_id, len(uniq), codings, counts=np.bincount(value_id, minlength=len(uniq)))))
    if num_rows > 1:
        book = table_per_channel_codebook(values, rows(), num_rows, (uniq, value_id))
        if book.alphabet < MAX_ALPHABET:  # channel counts are stored as uint16
            same = book.symbols is value_id and len(found) > 1  # the table's stream: coded once, shared
            found.append(_Book(book.kind, book.data, found[1].request if same else
                               Request(book.symbols, book.alphabet, codings)))
    grid = _grid_of_distinct(uniq.view(values.dtype), values.dtype.type)
    if grid is not None:
        step, k = grid
        alphabet = int(k.max() - k.min() + 1)
        counts = np.bincount(k - k.min(), weights=np.bincount(value_id, minlength=len(uniq)), minlength=alphabet)
        found.append(_Book("grid", _little_endian(np.array([step], dtype=values.dtype.type)),
                           Request((k - k.min()).astype(np.uint16)[value_id], alphabet, codings,
                                   counts=counts.astype(np.int64)),
                           int(k.min())))
    return found


def encode_tensor(weight: torch.Tensor, *, layouts: tuple[str, ...] = LAYOUTS,
                  codings: tuple[str, ...] = CODINGS, index_bits: int = 5,
                  groups: GroupSteps | None = None) -> EncodedTensor:
    """The smallest lossless encoding of a floating-point tensor among the given layouts and codings
    (`groups`: the steps of a group-wise grid the weight may lie on, which adds the group_grid codebook)."""
    return encode_tensors([weight], layouts=layouts, codings=codings, index_bits=[index_bits], groups=[groups])[0]


def encode_tensors(weights: list[torch.Tensor], *, layouts: tuple[str, ...] = LAYOUTS,
                   codings: tuple[str, ...] = CODINGS, index_bits: list[int], threads: int = 1,
                   groups: list[GroupSteps | None] | None = None) -> list[EncodedTensor]:
    """`encode_tensor` of each weight (with its own index width); their rANS runs share one batched loop.

    Every (layout, codebook) candidate is sized exactly before any byte is written: fixed and Huffman
    sizes follow from symbol counts, rANS sizes from running the coder. Only the smallest candidate's
    streams are then written, so the result is the one trying every candidate in turn gives.
    With `threads` > 1 the weights are split into that many groups of about equal size, each encoded
    in its own thread (numpy releases the GIL inside its operations); the results do not depend on it.
    """
    hints = groups if groups is not None else [None] * len(weights)
    for weight, hint in zip(weights, hints):
        if hint is not None:
            hint.check(weight.numel())
    parts = _split(weights, threads)
    if len(parts) > 1:
        with ThreadPoolExecutor(len(parts)) as pool:
            done = list(pool.map(lambda g: encode_tensors([weights[i] for i in g], layouts=layouts, codings=codings,
                                                          index_bits=[index_bits[i] for i in g],
                                                          groups=[hints[i] for i in g]), parts))
        result = {i: tensor for g, tensors in zip(parts, done) for i, tensor in zip(g, tensors)}
        return [result[i] for i in range(len(weights))]
    tensors = [_candidates(w, layouts, codings, bits, hint) for w, bits, hint in zip(weights, index_bits, hints)]
    requests = {id(r): r for candidates in tensors for c in candidates for r in (c[2], c[3]) if r is not None}
    plans = dict(zip(requests, choose(list(requests.values()))))
    return [_smallest(candidates, plans) for candidates in tensors]


def _split(weights: list[torch.Tensor], threads: int) -> list[list[int]]:
    """Indices of the weights in at most `threads` groups, largest first into the lightest group."""
    groups = [[] for _ in range(max(1, min(threads, len(weights))))]
    loads = [0] * len(groups)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i].numel()):
        lightest = loads.index(min(loads))
        groups[lightest].append(i)
        loads[lightest] += weights[i].numel()
    return [sorted(g) for g in groups if g]


def _candidates(weight: torch.Tensor, layouts: tuple[str, ...], codings: tuple[str, ...], index_bits: int,
                hint: GroupSteps | None = None) -> list:
    """(EncodedTensor fields, book, positions request, values request) for every layout and codebook."""
    dtype = _dtype_name(weight)
    flat = weight.detach().to("cpu", DTYPES[np.dtype(coded_type(dtype)).name]).contiguous().numpy().reshape(-1)
    shape = tuple(weight.shape)
    num_rows = shape[0] if len(shape) >= 2 else 1
    row_size = max(flat.size // max(num_rows, 1), 1)
    found = []
    for layout, bits, pattern, positions, where in _layout_views(flat, layouts, codings, index_bits):
        values = flat if where is None else flat[where]
        if where is None:
            rows = lambda: np.repeat(np.arange(num_rows, dtype=np.int32), row_size)[:flat.size]  # noqa: E731
        else:
            rows = lambda where=where: where // row_size  # noqa: E731
        books = _books(values, rows, num_rows, codings)
        grouped = group_grid_book(values, where, hint, codings) if hint is not None else None
        for book in books + ([grouped] if grouped is not None else []):
            found.append(((shape, layout, bits, dtype, pattern), book, positions, book.request))
    return found


def _layout_views(flat: np.ndarray, layouts: tuple[str, ...], codings: tuple[str, ...], index_bits: int):
    """(layout, index bits, pattern, positions request, stored positions) of every layout that applies:
    dense stores every element (None), relative the nonzeros; pattern is tried for blocks of 4 and 8 whose
    fullest block holds at most half its elements nonzero (N:M masks: 2:4, 4:8 and sparser ones)."""
    for layout in layouts:
        if layout == "dense":
            yield "dense", index_bits, None, None, None
        elif layout == "relative":
            where = np.flatnonzero(flat)
            yield "relative", index_bits, None, \
                Request(pos.gaps_from_positions(where, index_bits, flat.size), 1 << index_bits, codings), where
        else:
            for n, m in _pattern_blocks(flat):
                symbols, where = patterns.encode_pattern(flat, n, m)
                yield "pattern", 0, (n, m), Request(symbols, patterns.alphabet(n, m), codings), where


def _pattern_blocks(flat: np.ndarray) -> list[tuple[int, int]]:
    """The (n, m) the pattern layout can code `flat` with: blocks of m in `patterns.BLOCKS` whose fullest
    holds n <= m / 2 nonzeros (an all-zero tensor stores one zero per block: n is at least 1)."""
    found = []
    for m in patterns.BLOCKS:
        n = patterns.block_nonzeros(flat, m)
        if n is not None and n <= m // 2:
            found.append((max(n, 1), m))
    return found


def pattern_applies(weight: torch.Tensor) -> bool:
    """Whether the pattern layout can code this tensor: blocks of 4 or 8 elements, each at most half nonzero."""
    # zero or not is all it reads: a bool array, which numpy has for every dtype (it has no bfloat16)
    return bool(_pattern_blocks((weight.detach() != 0).reshape(-1).cpu().numpy()))


def _smallest(candidates: list, plans: dict) -> EncodedTensor:
    best, best_size = None, None
    for (shape, layout, index_bits, dtype, pattern), book, positions, values in candidates:
        sized = EncodedTensor(shape, layout, index_bits, book.kind, book.data, book.offset, plans[id(values)],
                              plans[id(positions)] if positions is not None else None, dtype, book.group_size,
                              pattern)
        if best is None or sized.nbytes < best_size:
            best, best_size = sized, sized.nbytes
    if best is None:
        raise ValueError("no layout applies to this tensor (the pattern layout needs blocks of 4 or 8 elements, "
                         "each at most half nonzero)")
    return EncodedTensor(best.shape, best.layout, best.index_bits, best.codebook, best.codebook_data, best.offset,
                         best.values.write(), best.positions.write() if best.positions else None, best.dtype,
                         best.group_size, best.pattern)


def encode_half(tensor: torch.Tensor) -> EncodedTensor:
    """A tensor rounded to float16 (lossy, for biases when asked), stored raw; decoded to its own dtype."""
    dtype = _dtype_name(tensor)
    flat = tensor.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    book = raw_codebook(flat, "float16")
    values = smallest(book.symbols, book.alphabet, ("fixed",))
    return EncodedTensor(tuple(tensor.shape), "dense", 0, "float16", book.data, 0, values, None, dtype)


def _dtype_name(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"cannot encode a {name} tensor; supported dtypes: {', '.join(DTYPES)}")
    return name


def decode_tensor(encoded: EncodedTensor) -> torch.Tensor:
    """The tensor, bit for bit as it was encoded (float16 codebooks: as rounded), in its dtype."""
    numel, per_value = encoded.numel, encoded.symbols_per_value
    where = None
    if encoded.layout == "relative":
        where, span = pos.positions_and_span(decode_symbols(encoded.positions), encoded.index_bits)
        if len(where) * per_value != encoded.values.count:
            raise FormatError(f"positions stream: {len(where)} positions for {encoded.values.count} value symbols")
        if span > numel or numel - span >= (1 << encoded.index_bits) - 1:
            raise FormatError(f"positions stream: covers {span} elements of a tensor of {numel}")
    elif encoded.layout == "pattern":  # the counts were checked against the shape when the header was read
        where = patterns.positions_from_patterns(decode_symbols(encoded.positions), *encoded.pattern)
    values = _values(encoded, decode_symbols(encoded.values), where)
    flat = values if where is None else np.zeros(numel, values.dtype)
    if where is not None:
        flat[where] = values
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(encoded.shape).to(DTYPES[encoded.dtype])


def _values(encoded: EncodedTensor, symbols: np.ndarray, where: np.ndarray | None) -> np.ndarray:
    kind, data, ftype = encoded.codebook, encoded.codebook_data, coded_type(encoded.dtype)
    values = np.dtype(ftype).newbyteorder("<")
    if kind in RAW_KINDS:
        return symbols.astype(np.uint16).view(RAW_KINDS[kind]).astype(ftype)
    if kind == "grid":
        return (symbols.astype(np.int64) + encoded.offset).astype(ftype) * data.view(values)[0]
    if kind == "group_grid":  # float32 arithmetic, as the fake-quant layer computed (q - zero_point) * scale
        steps = data.view("<f2" if data.size == encoded.numel // encoded.group_size * 2 else "<f4")
        return (symbols.astype(np.int32) + encoded.offset).astype(np.float32) * \
            _per_value(steps.astype(np.float32), encoded.group_size, where)
    if kind == "table":
        return data.view(values)[symbols]
    num_rows = encoded.shape[0]  # table_per_channel
    counts = data[:2 * num_rows].view("<u2").astype(np.int64)
    index = np.arange(encoded.numel) if where is None else where
    first = np.cumsum(counts) - counts
    rows = index // max(encoded.numel // num_rows, 1)
    if np.any(symbols >= counts[rows]):
        raise FormatError("values stream: a codebook index is past its channel's codebook")
    return data[2 * num_rows:].view(values)[first[rows] + symbols]


def _check_group_grid(encoded: EncodedTensor) -> None:
    """One finite float16 or float32 step per group, and integers offset .. offset + alphabet - 1 that
    float32 holds exactly (the decode's arithmetic)."""
    groups, size = encoded.numel // encoded.group_size, encoded.codebook_data.size
    if encoded.dtype == "float64":
        raise FormatError("header: a group_grid codebook decodes in float32, not to a float64 tensor")
    if size not in (2 * groups, 4 * groups):
        raise FormatError(f"codebook: {size} bytes are not one float16 or float32 step for each of {groups} groups")
    steps = encoded.codebook_data.view("<f2" if size == 2 * groups else "<f4")
    if not np.isfinite(steps).all():
        raise FormatError("codebook: a group step is not finite")
    if max(abs(encoded.offset), abs(encoded.offset + encoded.values.alphabet - 1)) > _EXACT_INTEGERS:
        raise FormatError(f"header: offset {encoded.offset} and alphabet {encoded.values.alphabet} reach integers "
                          f"beyond {_EXACT_INTEGERS}")


def tensor_from_header(header: dict, payload: np.ndarray) -> EncodedTensor:
    """The EncodedTensor a plain-data header describes over `payload`, every size checked first.

    Raises FormatError naming the part ("header", "codebook", "values stream", "positions stream").
    Nothing is allocated by a declared size: every part must be present in `payload`, and the
    declared tensor must be one the streams can describe (see _check_counts).
    """
    if not isinstance(header, dict) or not _HEADER_FIELDS <= set(header) <= _HEADER_FIELDS | _OPTIONAL_FIELDS:
        raise FormatError(f"header: expected the fields {sorted(_HEADER_FIELDS)} (and optionally "
                          f"{', '.join(sorted(_OPTIONAL_FIELDS))})")
    shape, layout, index_bits, kind, dtype = _header_fields(header)
    cursor = _field(header_int, header, "codebook_bytes", 0, payload.size)
    codebook, parts = payload[:cursor], []
    for name in ("values", "positions"):
        if header[name] is None:
            parts.append(None)
            continue
        try:
            size = header_int(header[name], "table_bytes", 0, payload.size) + \
                header_int(header[name], "payload_bytes", 0, payload.size)
            parts.append(stream_from_header(header[name], payload[cursor:cursor + size]))
        except (FormatError, KeyError, TypeError) as exc:
            raise FormatError(f"{name} stream: {_reason(exc)}") from None
        cursor += size
    if cursor != payload.size:
        raise FormatError(f"header: codebook and streams describe {cursor} bytes, the payload has {payload.size}")
    encoded = EncodedTensor(shape, layout, index_bits, kind, codebook, header["offset"], parts[0], parts[1], dtype,
                            _group_size(header, shape), _pattern(header, shape))
    _check_counts(encoded)
    _check_codebook(encoded)
    for name, stream in (("values", encoded.values), ("positions", encoded.positions)):
        if stream is not None:
            _in_part(f"{name} stream", check_tables, stream)
    return encoded


def _reason(exc: Exception) -> str:
    return f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else str(exc)


def _in_part(part: str, check, *args):
    try:
        return check(*args)
    except FormatError as exc:
        raise FormatError(f"{part}: {exc}") from None


def _field(check, *args):
    return _in_part("header", check, *args)


def _header_fields(header: dict) -> tuple[tuple[int, ...], str, int, str, str]:
    shape = header["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            any(type(d) is not int or not 0 <= d < 1 << 31 for d in shape):
        raise FormatError(f"header: shape {shape!r} is not a list of at most {MAX_DIMS} sizes")
    choices = {"layout": LAYOUTS, "codebook": CODEBOOKS, "dtype": tuple(DTYPES)}
    for key, allowed in choices.items():
        if header.get(key, "float32") not in allowed:
            raise FormatError(f"header: {key} {header[key]!r} is not one of {allowed}")
    relative = header["layout"] == "relative"
    index_bits = _field(header_int, header, "index_bits", int(relative), 16)
    positioned = header["layout"] in ("relative", "pattern")
    _field(header_int, header, "offset", -(1 << 53), 1 << 53)
    if header["values"] is None:
        raise FormatError("header: the values stream is missing")
    if (header["positions"] is None) == positioned:
        raise FormatError("header: a positions stream goes with the relative layout or the pattern layout, and only with them")
    return tuple(shape), header["layout"], index_bits, header["codebook"], header.get("dtype", "float32")


def _group_size(header: dict, shape: tuple[int, ...]) -> int:
    """A group grid's group size: present with that codebook only, and dividing the tensor's elements."""
    if (header["codebook"] == "group_grid") != ("group_size" in header):
        raise FormatError("header: group_size goes with the group_grid codebook, and only with it")
    if "group_size" not in header:
        return 0
    numel = int(np.prod(shape, dtype=np.int64))
    size = _field(header_int, header, "group_size", 1, max(numel, 1))
    if numel % size:
        raise FormatError(f"header: group_size {size} does not divide the {numel} elements")
    return size


def _pattern(header: dict, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The pattern layout's [n, m]: present with that layout only, 1 <= n < m <= 16, m dividing the elements."""
    if (header["layout"] == "pattern") != ("pattern" in header):
        raise FormatError("header: pattern goes with the pattern layout, and only with it")
    if "pattern" not in header:
        return None
    value = header["pattern"]
    if not isinstance(value, list) or len(value) != 2 or any(type(v) is not int for v in value) or \
            not 1 <= value[0] < value[1] <= patterns.MAX_BLOCK:
        raise FormatError(f"header: pattern {value!r} is not [n, m] with 1 <= n < m <= {patterns.MAX_BLOCK}")
    numel = int(np.prod(shape, dtype=np.int64))
    if numel % value[1]:
        raise FormatError(f"header: pattern blocks of {value[1]} do not divide the {numel} elements")
    return value[0], value[1]


def _check_pattern_counts(encoded: EncodedTensor) -> None:
    """One pattern symbol of C(m, n) per block of m, and n values (of symbols_per_value symbols) per block."""
    (n, m), blocks = encoded.pattern, encoded.numel // encoded.pattern[1]
    if encoded.positions.alphabet != patterns.alphabet(n, m):
        raise FormatError(f"positions stream: alphabet {encoded.positions.alphabet} for {n}:{m} patterns "
                          f"(expected {patterns.alphabet(n, m)})")
    if encoded.positions.count != blocks:
        raise FormatError(f"positions stream: {encoded.positions.count} patterns for {blocks} blocks of {m}")
    if encoded.values.count != blocks * n * encoded.symbols_per_value:
        raise FormatError(f"values stream: {encoded.values.count} symbols for {blocks} blocks of {n} values")


def _check_counts(encoded: EncodedTensor) -> None:
    """The declared tensor is one the streams describe: as many values as elements (dense), or
    positions whose codes reach the last element (relative: trailing zeros are coded as fillers)
    and are no more than the elements. Decoding then allocates in proportion to the tensor."""
    numel, per_value, values = encoded.numel, encoded.symbols_per_value, encoded.values.count
    if encoded.layout == "pattern":
        _check_pattern_counts(encoded)
    if encoded.layout == "dense" and values != numel * per_value:
        raise FormatError(f"values stream: {values} symbols for {numel} elements of {per_value} symbols each")
    if encoded.layout == "relative":
        filler = (1 << encoded.index_bits) - 1
        if values % per_value or values > numel * per_value:
            raise FormatError(f"values stream: {values} symbols for at most {numel} elements")
        if encoded.positions.alphabet != filler + 1:
            raise FormatError(f"positions stream: alphabet {encoded.positions.alphabet} for "
                              f"{encoded.index_bits}-bit indices")
        if numel >= (encoded.positions.count + 1) * filler:
            raise FormatError(f"positions stream: {encoded.positions.count} codes cannot reach element {numel - 1}")
        if encoded.positions.count > numel:  # every code covers at least one element
            raise FormatError(f"positions stream: {encoded.positions.count} codes for {numel} elements")


def _check_codebook(encoded: EncodedTensor) -> None:
    """The codebook's size fits its kind and addresses every symbol the values stream can hold."""
    kind, size, alphabet = encoded.codebook, encoded.codebook_data.size, encoded.values.alphabet
    item = np.dtype(coded_type(encoded.dtype)).itemsize
    if kind in RAW_KINDS:
        if size:
            raise FormatError(f"codebook: a raw {kind} codebook has no bytes, found {size}")
        if alphabet != MAX_ALPHABET:
            raise FormatError(f"values stream: alphabet {alphabet} for 16-bit raw symbols")
        return
    if encoded.offset and kind not in ("grid", "group_grid"):
        raise FormatError(f"header: offset {encoded.offset} is only for grid codebooks")
    if kind == "group_grid":
        _check_group_grid(encoded)
        return
    if kind == "grid":
        if size != item or not np.isfinite(encoded.codebook_data.view(f"<f{item}")[0]):
            raise FormatError(f"codebook: a grid is one finite step of {item} bytes")
        return
    rows = encoded.shape[0] if kind == "table_per_channel" else 0
    if kind == "table_per_channel" and (len(encoded.shape) < 2 or rows == 0):
        raise FormatError(f"codebook: per-channel codebook for shape {list(encoded.shape)}")
    if size < 2 * rows or (size - 2 * rows) % item:
        raise FormatError(f"codebook: {size} bytes are not {2 * rows} count bytes and whole {item}-byte values")
    entries = (size - 2 * rows) // item
    counts = encoded.codebook_data[:2 * rows].view("<u2")
    if rows and (int(counts.sum(dtype=np.int64)) != entries or max(int(counts.max()), 1) != alphabet):
        raise FormatError("codebook: channel counts do not match its values or the alphabet")
    if not rows and alphabet > entries and encoded.values.count:
        raise FormatError(f"values stream: alphabet {alphabet} is larger than the codebook ({entries} values)")
