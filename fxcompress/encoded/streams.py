"""One interface over the symbol coders: a Stream is plain data (small ints + two byte arrays).

    fixed    every symbol on ceil(log2(alphabet)) bits (0 bits for a single symbol)
    huffman  canonical Huffman, code lengths stored 5 bits per symbol, lanes for fast decoding
    rans     interleaved rANS, frequencies stored on a fixed width, one 32-bit final state per lane
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fxcompress.errors import FormatError

from . import huffman, rans
from .bits import MAX_CODE_BITS, pack, read_fixed, width_for

CODINGS = ("fixed", "huffman", "rans")
_LENGTH_BITS = 5  # Huffman code lengths are 0..16
ENTROPY_CODED_ALPHABET = 4096  # larger alphabets (unshared float values) are only bit-packed by smallest()
MAX_ALPHABET = 1 << 16  # symbols are 16-bit at most
FREE_SYMBOLS = 1 << 16  # a single-symbol fixed stream codes up to this many symbols on 0 bits, longer ones on 1
MAX_COUNT = 1 << 40  # far above any real tensor; keeps every size computed from a header an exact int64
# the integer fields of each coding, besides the common ones
_CODING_FIELDS = {"fixed": ("width",), "huffman": ("lanes", "lane_base", "lane_width"), "rans": ("lanes", "freq_width")}
_COMMON_FIELDS = ("coding", "count", "alphabet", "table_bytes", "payload_bytes")


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
    return choose([Request(symbols, alphabet, (coding,), filtered=False)])[0].write()


@dataclass
class Plan:
    """One coding of one symbol stream, sized exactly before any byte is written: the sizes come from
    the symbol counts (fixed, Huffman) or from running the coder (rANS, whose words are kept)."""

    coding: str
    count: int
    alphabet: int
    meta: dict
    table_bytes: int
    payload_bytes: int
    write: Callable[[], Stream]

    @property
    def nbytes(self) -> int:
        return self.table_bytes + self.payload_bytes

    def header(self) -> dict:
        return {"coding": self.coding, "count": self.count, "alphabet": self.alphabet, **self.meta,
                "table_bytes": self.table_bytes, "payload_bytes": self.payload_bytes}

    def cost(self) -> int:
        """What `smallest` compares: the bytes plus the compact JSON of the header."""
        return self.nbytes + len(json.dumps(self.header(), separators=(",", ":")))


@dataclass
class Request:
    """A symbol stream to code with the smallest of `codings`. `symbols` may be a callable that makes
    them (so a stream only fixed-width packing can code is never materialised before it wins);
    `counts`, when given, are its symbol counts. With `filtered`, only the codings whose size
    estimate is within 5% of the best are tried, as `smallest` does."""

    symbols: np.ndarray | Callable[[], np.ndarray]
    alphabet: int
    codings: tuple[str, ...] = CODINGS
    count: int | None = None
    counts: np.ndarray | None = None
    filtered: bool = True
    # the Huffman code lengths and rANS frequencies of `counts`, made once: the size estimate and the
    # plan of the same coding read the same ones (each is pure Python or a loop over the alphabet)
    lengths: np.ndarray | None = field(default=None, repr=False)
    freq: np.ndarray | None = field(default=None, repr=False)

    def materialise(self) -> np.ndarray:
        if callable(self.symbols):
            self.symbols = np.asarray(self.symbols())
        return self.symbols


def choose(requests: list[Request]) -> list[Plan]:
    """The smallest coding of every request, byte for byte what `smallest` picks; the rANS runs of
    all requests share one batched coder loop (rans.encode_many)."""
    pending, jobs = [], []
    for request in requests:
        plans = []
        for coding in _tried(request):
            plans.append(_plan(request, coding, jobs))
        pending.append(plans)
    done = rans.encode_many([job[:3] for job in jobs])
    for (symbols, freq, lanes, slot), (words, states) in zip(jobs, done):
        slot[0] = _rans_plan(len(symbols), freq, lanes, words, states)
    return [min((p[0] if isinstance(p, list) else p for p in plans), key=Plan.cost) for plans in pending]


def _tried(request: Request) -> list[str]:
    codings = request.codings
    if not request.filtered:
        return list(codings)
    if request.alphabet > ENTROPY_CODED_ALPHABET and "fixed" in codings:
        codings = ("fixed",)  # a code table that large costs more than it can save
    if codings == ("fixed",):
        return ["fixed"]  # the estimate of a lone coding cannot exclude it: no counts needed
    estimates = {c: _estimate(request, c) for c in codings}
    best = min(estimates.values())
    return [c for c in codings if estimates[c] <= best * 1.05 + 64]


def _counts(request: Request) -> np.ndarray:
    if request.counts is None:
        request.counts = np.bincount(request.materialise(), minlength=request.alphabet)
    return request.counts


def _estimate(request: Request, coding: str) -> float:
    """estimate_bytes of the request's counts, with the code lengths or frequencies its plan reuses."""
    counts = _counts(request)
    if coding == "fixed" or not counts.any():
        return estimate_bytes(counts, coding)
    if coding == "huffman":
        return estimate_bytes(counts, coding, lengths=_lengths(request))
    return estimate_bytes(counts, coding, freq=_freq(request))


def _lengths(request: Request) -> np.ndarray:
    if request.lengths is None:
        request.lengths = huffman.code_lengths(_counts(request))
    return request.lengths


def _freq(request: Request) -> np.ndarray:
    if request.freq is None:
        counts = _counts(request)
        request.freq = rans.quantize_counts(counts, rans.scale_bits_for(len(counts)))
    return request.freq


def _plan(request: Request, coding: str, jobs: list) -> Plan | list:
    count = request.count if request.count is not None else len(request.materialise())
    if coding == "fixed" or count == 0:
        width = width_for(request.alphabet) or int(count > FREE_SYMBOLS)  # keeps count bounded by the bytes
        return Plan("fixed", count, request.alphabet, {"width": width}, 0, (count * width + 7) // 8,
                    lambda: Stream("fixed", count, request.alphabet, {"width": width},
                                   payload=pack(request.materialise(), width)))
    if coding == "huffman":
        return _huffman_plan(request.materialise(), _counts(request), _lengths(request))
    if coding != "rans":
        raise ValueError(f"unknown coding {coding!r}; expected one of {CODINGS}")
    slot = [None]  # filled once the batched rANS loop has run
    jobs.append((request.materialise(), _freq(request), rans.lanes_for(count), slot))
    return slot


def _huffman_plan(symbols: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> Plan:
    lanes = huffman.lanes_for(len(symbols))
    lane_bits = huffman.lane_bits(symbols, lengths, lanes)
    starts = lane_bits[:-1]
    base = int(starts.min(initial=0))
    width = width_for(int(starts.max(initial=0)) - base + 1)
    meta = {"lanes": lanes, "lane_base": base, "lane_width": width}
    table_bytes = (len(counts) * _LENGTH_BITS + 7) // 8 + ((lanes - 1) * width + 7) // 8

    def write() -> Stream:
        table = np.concatenate([pack(lengths, _LENGTH_BITS), pack(starts - base, width)])
        return Stream("huffman", len(symbols), len(counts), meta, table, huffman.write(symbols, lengths, lanes))
    return Plan("huffman", len(symbols), len(counts), meta, table_bytes, (int(lane_bits.sum()) + 7) // 8, write)


def _rans_plan(count: int, freq: np.ndarray, lanes: int, words: np.ndarray, states: np.ndarray) -> Plan:
    width = int(freq.max()).bit_length()
    meta = {"lanes": lanes, "freq_width": width}
    table_bytes = (len(freq) * width + 7) // 8 + 4 * lanes
    return Plan("rans", count, len(freq), meta, table_bytes, 2 * len(words),
                lambda: Stream("rans", count, len(freq), meta,
                               np.concatenate([pack(freq, width), states.astype("<u4").view(np.uint8)]),
                               words.astype("<u2").view(np.uint8)))


def decode_symbols(stream: Stream) -> np.ndarray:
    """The symbols of `stream` (int32 or int64 array of length `stream.count`)."""
    if stream.coding == "fixed":
        symbols = read_fixed(stream.payload, stream.meta["width"], stream.count)
        if symbols.max(initial=0) >= stream.alphabet:
            raise FormatError(f"symbol {int(symbols.max())} is outside the alphabet of {stream.alphabet}")
        return symbols
    if stream.coding == "huffman":
        return _decode_huffman(stream)
    if stream.coding == "rans":
        return _decode_rans(stream)
    raise ValueError(f"unknown coding {stream.coding!r}")


def _decode_huffman(stream: Stream) -> np.ndarray:
    lengths, lane_bits = _huffman_table(stream)
    return huffman.decode(stream.payload, lengths, lane_bits, stream.count)


def _huffman_table(stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """(code lengths, bits of every lane), checked to form a prefix code that fits the payload."""
    meta, table = stream.meta, stream.table
    lengths = read_fixed(table, _LENGTH_BITS, stream.alphabet)
    length_bytes = (stream.alphabet * _LENGTH_BITS + 7) // 8
    starts = read_fixed(table[length_bytes:], meta["lane_width"], meta["lanes"] - 1) + meta["lane_base"]
    if lengths.max(initial=0) > MAX_CODE_BITS:
        raise FormatError(f"Huffman code length {int(lengths.max())} is above {MAX_CODE_BITS}")
    used = lengths[lengths > 0]
    kraft = int((np.int64(1) << (MAX_CODE_BITS - used)).sum())  # 2^16 * the Kraft sum
    # the encoder writes complete codes, or one symbol on one bit
    if stream.count and kraft != 1 << MAX_CODE_BITS and used.tolist() != [1]:
        raise FormatError("Huffman code lengths do not form a complete prefix code")
    if int(starts.sum()) > 8 * stream.payload.size:
        raise FormatError("Huffman lane lengths exceed the payload")
    return lengths, np.append(starts, 0)


def _decode_rans(stream: Stream) -> np.ndarray:
    freq, states = _rans_table(stream)
    try:
        return rans.decode(stream.payload.view("<u2"), states, freq, stream.count)
    except ValueError as exc:
        raise FormatError(str(exc)) from None


def _rans_table(stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, final lane states), checked: a power-of-two total, states in the coder's range."""
    meta, table = stream.meta, stream.table
    freq = read_fixed(table, meta["freq_width"], stream.alphabet)
    freq_bytes = (stream.alphabet * meta["freq_width"] + 7) // 8
    states = table[freq_bytes:].view("<u4")
    total = int(freq.sum())
    if total == 0 or total & (total - 1) or total > 1 << 16:
        raise FormatError(f"rANS frequencies sum to {total}, not a power of two up to 2^16")
    if stream.count and states.min() < rans.LOW:
        raise FormatError("rANS lane state below the coder's range")
    return freq, states


def stream_from_header(header: dict, data: np.ndarray) -> Stream:
    """The Stream a plain-data header describes over `data` (its table then payload bytes), checked."""
    if not isinstance(header, dict):
        raise FormatError(f"header is {type(header).__name__}, not a mapping")
    coding = header.get("coding")
    if coding not in CODINGS:
        raise FormatError(f"coding {coding!r} is not one of {CODINGS}")
    expected = set(_COMMON_FIELDS + _CODING_FIELDS[coding])
    if set(header) != expected:
        raise FormatError(f"fields {sorted(set(header) ^ expected)} are missing or unknown for {coding}")
    count, alphabet = header_int(header, "count", 0, MAX_COUNT), header_int(header, "alphabet", 1, MAX_ALPHABET)
    table_bytes = header_int(header, "table_bytes", 0, data.size)
    if table_bytes + header_int(header, "payload_bytes", 0, data.size) != data.size:
        raise FormatError("table and payload bytes do not add up to the stream's part of the payload")
    meta = {k: header_int(header, k, 0, MAX_COUNT) for k in _CODING_FIELDS[coding]}
    stream = Stream(coding, count, alphabet, meta, data[:table_bytes], data[table_bytes:])
    _SIZE_CHECKS[coding](stream)
    return stream


def check_tables(stream: Stream) -> None:
    """Check the code tables (not the symbols): Huffman lengths, rANS frequencies and states."""
    if stream.coding == "huffman":
        _huffman_table(stream)
    elif stream.coding == "rans":
        _rans_table(stream)


def header_int(header: dict, key: str, low: int, high: int) -> int:
    value = header[key]
    if type(value) is not int or not low <= value <= high:
        raise FormatError(f"field {key!r} is {value!r}, expected an integer in [{low}, {high}]")
    return value


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(message)


def _check_fixed(s: Stream) -> None:
    width = s.meta["width"]
    _expect(width_for(s.alphabet) <= width <= MAX_CODE_BITS,
            f"width {width} cannot code an alphabet of {s.alphabet} on at most {MAX_CODE_BITS} bits")
    _expect(width > 0 or s.count <= FREE_SYMBOLS, f"{s.count} symbols on 0 bits (at most {FREE_SYMBOLS})")
    _expect(s.table.size == 0, "a fixed code has no table")
    _expect(s.payload.size == (s.count * width + 7) // 8, f"{s.count} symbols of {width} bits need "
            f"{(s.count * width + 7) // 8} bytes, the payload has {s.payload.size}")


def _check_lanes(s: Stream, lane_symbols: int, table_bytes: int) -> None:
    lanes = s.meta["lanes"]
    _expect(1 <= lanes <= max(s.count, 1), f"{lanes} lanes for {s.count} symbols")
    _expect(s.count <= lanes * lane_symbols, f"{s.count} symbols in {lanes} lanes of at most {lane_symbols}")
    _expect(s.table.size == table_bytes, f"table is {s.table.size} bytes, its fields describe {table_bytes}")


def _check_huffman(s: Stream) -> None:
    _expect(s.meta["lane_width"] <= MAX_CODE_BITS, f"lane width {s.meta['lane_width']} is above {MAX_CODE_BITS}")
    _expect(s.meta["lane_base"] <= 8 * s.payload.size, "lane base is past the payload")
    _expect(s.count <= 8 * s.payload.size, f"{s.count} symbols cannot fit {s.payload.size} bytes of codes")
    lanes = s.meta["lanes"]
    table_bytes = (s.alphabet * _LENGTH_BITS + 7) // 8 + (max(lanes - 1, 0) * s.meta["lane_width"] + 7) // 8
    _check_lanes(s, huffman.LANE_SYMBOLS, table_bytes)


def _check_rans(s: Stream) -> None:
    width = s.meta["freq_width"]
    _expect(1 <= width <= 17, f"frequency width {width} is not in [1, 17]")
    _expect(s.payload.size % 2 == 0, "payload is not a whole number of 16-bit words")
    _check_lanes(s, rans.LANE_SYMBOLS, (s.alphabet * width + 7) // 8 + 4 * s.meta["lanes"])


_SIZE_CHECKS = {"fixed": _check_fixed, "huffman": _check_huffman, "rans": _check_rans}


def smallest(symbols: np.ndarray, alphabet: int, codings: tuple[str, ...] = CODINGS) -> Stream:
    """The smallest of the given codings for these symbols (ties go to the faster, earlier one).

    Sizes are first estimated from the symbol counts (exact for fixed and Huffman payloads); only the
    codings whose estimate is within 5% of the best are really sized (fixed and Huffman from the
    counts, rANS by running it) and compared; only the winner's bytes are written.
    """
    return choose([Request(np.asarray(symbols, dtype=np.int64), alphabet, codings)])[0].write()


def estimate_bytes(counts: np.ndarray, coding: str, lengths: np.ndarray | None = None,
                   freq: np.ndarray | None = None) -> float:
    """Bytes a coding would take for symbols with these counts (tables and lane overheads included);
    `lengths` / `freq`, when given, are the counts' Huffman code lengths / rANS frequencies, already made."""
    n, alphabet = int(counts.sum()), len(counts)
    if coding == "fixed" or n == 0:
        return (n * width_for(alphabet) + 7) // 8
    if coding == "huffman":
        bits = int((counts * (huffman.code_lengths(counts) if lengths is None else lengths)).sum())
        return bits / 8 + (alphabet * _LENGTH_BITS) / 8 + 2 * huffman.lanes_for(n)
    if freq is None:
        freq = rans.quantize_counts(counts, rans.scale_bits_for(alphabet))
    present = counts > 0
    bits = -(counts[present] * np.log2(freq[present] / freq.sum())).sum()
    lanes = rans.lanes_for(n)
    return bits / 8 + 6 * lanes + alphabet * int(freq.max()).bit_length() / 8 + 4 * lanes


__all__ = ["CODINGS", "Plan", "Request", "Stream", "choose", "check_tables", "decode_symbols", "encode_symbols", "smallest", "stream_from_header"]
