"""Entropy coders on the same symbol streams: size against the Shannon bound, encode / decode speed.

Streams: 32-cluster k-means indices (linear init) of the surviving weights of a pruned Gaussian
layer (the values stream of Deep Compression) and the 5-bit relative-index codes of a 95%-sparse
mask (the positions stream). One thread, median of repeats.
Compared in the same run: our fixed-width packing, canonical Huffman (lane-parallel decoding) and
interleaved rANS, the pure-Python `dahuffman`, and zstd-19 / zlib-9 on the same symbols as bytes.

    python benchmarks/bench_entropy.py [--symbols 10000000]
"""
from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np
import torch

from fxcompress.encoded.positions import gaps_from_positions
from fxcompress.quant.kmeans1d import kmeans1d
from fxcompress.encoded.streams import decode_symbols, encode_symbols


def streams(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(n * 12).astype(np.float32)
    survivors = weights[np.abs(weights) > 1.6][:n]  # the ~11% largest of a Gaussian layer
    labels = kmeans1d(survivors, 32, init="linear").labels.astype(np.int64)  # Deep Compression's sharing
    mask = rng.random(n * 20) < 0.05
    gaps = gaps_from_positions(np.flatnonzero(mask), 5)
    return {"kmeans-32 indices": (labels, 32), "relative index (5-bit)": (gaps[:n], 32)}


def entropy_bytes(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / len(symbols)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * len(symbols) / 8)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def ours(symbols, alphabet, coding, repeats):
    enc_t, stream = timed(lambda: encode_symbols(symbols, alphabet, coding), repeats)
    dec_t, decoded = timed(lambda: decode_symbols(stream), repeats)
    assert np.array_equal(decoded, symbols)
    return stream.nbytes, enc_t, dec_t


def byte_compressor(compress, decompress):
    def run(symbols, alphabet, repeats):
        raw = symbols.astype(np.uint8).tobytes()
        enc_t, packed = timed(lambda: compress(raw), repeats)
        dec_t, back = timed(lambda: decompress(packed), repeats)
        assert back == raw
        return len(packed), enc_t, dec_t
    return run


def dahuffman_run(symbols, alphabet, repeats):
    from dahuffman import HuffmanCodec
    sample = symbols[:200_000].tolist()  # pure Python: time on a slice, size scaled from it
    codec = HuffmanCodec.from_data(symbols.tolist())
    enc_t, packed = timed(lambda: codec.encode(sample), 1)
    dec_t, back = timed(lambda: codec.decode(packed), 1)
    assert back == sample
    scale = len(symbols) / len(sample)
    return len(codec.encode(symbols.tolist())), enc_t * scale, dec_t * scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import zstandard
    others = {"zstd-19": byte_compressor(zstandard.ZstdCompressor(level=19).compress,
                                         zstandard.ZstdDecompressor().decompress),
              "zlib-9": byte_compressor(lambda b: zlib.compress(b, 9), zlib.decompress),
              "dahuffman (pure Python)": dahuffman_run}
    print(f"{args.symbols:,} symbols per stream, one thread, median of {args.repeats}\n")
    print("| stream | coder | bytes | x Shannon bound | encode Msym/s | decode Msym/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (symbols, alphabet) in streams(args.symbols).items():
        bound = entropy_bytes(symbols)
        rows = {f"fxcompress {c}": ours(symbols, alphabet, c, args.repeats) for c in ("fixed", "huffman", "rans")}
        rows |= {k: run(symbols, alphabet, args.repeats if "dahuffman" not in k else 1) for k, run in others.items()}
        for coder, (size, enc_t, dec_t) in rows.items():
            print(f"| {name} | {coder} | {size:,} | {size / bound:.4f} | {len(symbols) / enc_t / 1e6:.1f} | "
                  f"{len(symbols) / dec_t / 1e6:.1f} |")
        print(f"| {name} | Shannon bound | {bound:,.0f} | 1.0000 | | |")


if __name__ == "__main__":
    main()
