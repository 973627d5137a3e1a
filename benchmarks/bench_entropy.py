"""Entropy coders on the same symbol streams: size against the Shannon bound, encode / decode speed.

Streams: 32-cluster k-means indices (linear init) of the surviving weights of a pruned Gaussian
layer (the values stream of Deep Compression) and the 5-bit relative-index codes of a 95%-sparse
mask (the positions stream). One thread, median of repeats.
Compared in the same run: our fixed-width packing, canonical Huffman (lane-parallel decoding) and
interleaved rANS, the pure-Python `dahuffman`, and zstd-19 / zlib-9 on the same symbols as bytes.

Then the encoding throughput (`--layers`): encode_tensor, the vectorised path, against the
straightforward encoder it replaced (tests/encoded/reference_encoding.py), interleaved layer by layer
on the weights of GPT-style blocks pruned by magnitude and shared on 16 values (what masks + 4-bit
k-means leave), parameters per second of each and the median ratio; the outputs are checked identical.
And the file (`--load`): save, then load with and without mmap, each in a fresh process: seconds and
RSS growth after load and after decoding every weight (a first forward decodes them all).

    python benchmarks/bench_entropy.py [--symbols 10000000] [--layers 1024x2] [--load 1024x8]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fxcompress.encoded.positions import gaps_from_positions
from fxcompress.encoded.streams import decode_symbols, encode_symbols
from fxcompress.encoded.tensor import encode_tensor, encode_tensors
from fxcompress.quant.kmeans1d import kmeans1d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "encoded"))  # the reference encoder
import reference_encoding  # noqa: E402


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


def gpt_weights(dim: int, blocks: int, seed: int = 0):
    """Each block's qkv, output, MLP-in and MLP-out weights: 90% pruned by magnitude, survivors on 16 values."""
    rng = np.random.default_rng(seed)
    for block in range(blocks):
        for name, shape in (("qkv", (3 * dim, dim)), ("proj", (dim, dim)), ("fc", (4 * dim, dim)),
                            ("fc2", (dim, 4 * dim))):
            w = rng.standard_normal(shape, dtype=np.float32)
            keep = np.abs(w) > np.quantile(np.abs(w), 0.9)
            centroids = np.quantile(w[keep], (np.arange(16) + 0.5) / 16).astype(np.float32)
            shared = centroids[np.searchsorted((centroids[1:] + centroids[:-1]) / 2, w)]  # the nearest
            yield f"blocks.{block}.{name}", torch.from_numpy(np.where(keep, shared, np.float32(0)))


def throughput(dim: int, blocks: int) -> None:
    """New against old encode_tensor on the same layers, interleaved (the order alternates per layer)."""
    times, ratios, params = {"vectorised": [], "reference": []}, [], 0
    for index, (name, w) in enumerate(gpt_weights(dim, blocks)):
        fns = {"vectorised": lambda: encode_tensor(w), "reference": lambda: reference_encoding.encode_tensor(w)}
        outs = {}
        for key in (list(fns) if index % 2 == 0 else list(fns)[::-1]):
            start = time.process_time()
            outs[key] = fns[key]()
            times[key].append(time.process_time() - start)
        assert reference_encoding.encoded_bytes(outs["vectorised"]) == reference_encoding.encoded_bytes(outs["reference"])
        ratios.append(times["reference"][-1] / times["vectorised"][-1])
        params += w.numel()
    weights = [w for _, w in gpt_weights(dim, blocks)]
    start = time.process_time()
    batch = []
    for w in weights + [None]:  # in batches of ~4 M elements, as LowerToEncoded does
        if w is None or sum(b.numel() for b in batch) >= 1 << 22:
            encode_tensors(batch, index_bits=[5] * len(batch))
            batch = []
        if w is not None:
            batch.append(w)
    times["vectorised, layers batched as LowerToEncoded does"] = [time.process_time() - start]
    start, wall = time.process_time(), time.perf_counter()
    encode_tensors(weights[:4], index_bits=[5] * 4, threads=2)
    print(f"\none block in two threads: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - start:.2f} "
          f"CPU s (one thread: see the table), {sum(w.numel() for w in weights[:4]) / 1e6:.1f} M parameters")
    print(f"\nencode_tensor on {blocks} GPT blocks of width {dim} ({params / 1e6:.1f} M parameters, 90% pruned, "
          f"16 shared values), one thread, CPU seconds, outputs identical\n")
    print("| encoder | CPU s | M params / s |\n|---|---:|---:|")
    for key, values in times.items():
        print(f"| {key} | {sum(values):.2f} | {params / sum(values) / 1e6:.2f} |")
    print(f"| median per-layer speed-up | {statistics.median(ratios):.1f}x | |")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def load_child(path: str, mmap: bool) -> dict:
    import fxcompress
    torch.set_num_threads(1)
    before = _rss_mb()
    start = time.perf_counter()
    gm = fxcompress.load(path, mmap=mmap)
    loaded = time.perf_counter() - start
    after_load = _rss_mb()
    start = time.perf_counter()
    gm()  # decodes every weight
    return {"mmap": mmap, "load_s": round(loaded, 3), "load_rss_mb": round(after_load - before, 1),
            "decode_s": round(time.perf_counter() - start, 2), "decoded_rss_mb": round(_rss_mb() - before, 1)}


def file_costs(dim: int, blocks: int) -> None:
    """Save a lowered model of these layers, then load it in fresh processes with and without mmap."""
    import fxcompress
    from torch import nn
    from fxcompress.encoded.module import EncodedWeight
    root, graph, outputs = nn.Module(), torch.fx.Graph(), []
    for name, w in gpt_weights(dim, blocks):
        layer = nn.Module()
        layer.add_module("weight_encoded", EncodedWeight.from_encoded(encode_tensor(w)))
        root.add_module(name.replace(".", "_"), layer)
        outputs.append(graph.call_module(f"{name.replace('.', '_')}.weight_encoded", ()))
    graph.output(tuple(outputs))  # the forward is every weight decoded: what a first forward does
    gm = torch.fx.GraphModule(root, graph)
    params = sum(m.encoded().numel for m in gm.modules() if isinstance(m, EncodedWeight))
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "model.fxc")
        start = time.perf_counter()
        size = fxcompress.save(gm, path)
        saved = time.perf_counter() - start
        rows = [json.loads(subprocess.run([sys.executable, __file__, "--load-child", path, str(int(m))],
                                          capture_output=True, text=True, check=True).stdout) for m in (False, True)]
    print(f"\nfile of {params / 1e6:.1f} M encoded parameters ({params * 4 / 2**20:.0f} MiB fp32): {size / 2**20:.1f} "
          f"MiB, saved in {saved:.2f} s; each load in a fresh process, RSS growth in MiB\n")
    print("| load | load s | RSS after load | decode every weight s | RSS after decoding |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {'mmap=True' if row['mmap'] else 'read'} | {row['load_s']} | {row['load_rss_mb']} | "
              f"{row['decode_s']} | {row['decoded_rss_mb']} |")


# --- group-wise grids on the language model (--lm) ------------------------------------------------

LM_ARMS = ["w4 g64 rtn", "w4 g64 rtn symmetric", "50% magnitude + w4 g64", "50% sparsegpt + w4 g64",
           "50% sparsegpt + w4 g64 gptq", "50% sparsegpt + w4 g128 gptq fp16", "2:4 sparsegpt + w4 g128 gptq fp16 + emb8",
           "2:4 sparsegpt + w4 g256 gptq fp16 + emb8"]


def _bits(n_bytes: float, numel: int) -> str:
    return f"{8 * n_bytes / numel:.3f}"


def _information(encoded) -> tuple[float, float, float]:
    """(mask entropy, code entropy, relative-index bytes) of one group_grid weight. The mask: the binary
    entropy of its zero pattern over every element, or for the pattern layout the empirical entropy of its
    block patterns; the codes: the empirical entropy of the stored values' integers k across all groups;
    and what the same mask costs as 5-bit relative indices (smallest coding), for comparison."""
    from fxcompress.encoded import patterns
    from fxcompress.encoded.positions import gaps_from_positions
    from fxcompress.encoded.streams import decode_symbols, smallest
    from fxcompress.encoded.tensor import decode_tensor
    w = decode_tensor(encoded).numpy().reshape(-1)
    groups = encoded.numel // encoded.group_size
    steps = encoded.codebook_data.view("<f2" if encoded.codebook_data.size == 2 * groups else "<f4")
    nonzero = np.flatnonzero(w)
    stored = nonzero
    p = len(nonzero) / w.size
    mask = 0.0 if p in (0.0, 1.0) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) * w.size / 8
    if encoded.layout == "pattern":
        symbols = decode_symbols(encoded.positions)
        stored, mask = patterns.positions_from_patterns(symbols, *encoded.pattern), entropy_bytes(symbols)
    k = np.rint(w[stored] / np.repeat(steps.astype(np.float32), encoded.group_size)[stored]).astype(np.int64)
    relative = smallest(gaps_from_positions(nonzero, 5, w.size), 32).nbytes
    return mask, entropy_bytes(k - k.min()) if len(k) else 0.0, relative


def _arm_rows(name: str, lowered, fake_quant_weights: dict) -> dict:
    """Bytes by part of the encoded block weights, the per-group float codebook of the same weights (the
    encoding without the grid's steps), the information bound, and the masks as relative indices."""
    from fxcompress.encoded.module import EncodedWeight
    parts, numel, old, mask, codes, relative, kinds = Counter(), 0, 0, 0.0, 0.0, 0, Counter()
    for path, module in lowered.named_modules():
        if not isinstance(module, EncodedWeight) or not path.startswith("model.layers."):
            continue
        encoded = module.encoded()
        assert torch.equal(module(), fake_quant_weights[path])  # bit-identical to the fake-quant weights
        parts.update(encoded.storage_bytes())
        numel += encoded.numel
        kinds[f"{encoded.layout}/{encoded.codebook}"] += 1
        old += encode_tensor(fake_quant_weights[path], index_bits=5).nbytes
        if encoded.codebook == "group_grid":
            m, c, r = _information(encoded)
            mask, codes, relative = mask + m, codes + c, relative + r
    total = sum(parts.values())
    return {"arm": name, "numel": numel, "parts": dict(parts), "total": total, "old": old, "mask": mask,
            "codes": codes, "relative": relative, "kinds": dict(kinds)}


def lm_groups(checkpoint: Path, arm_names: list[str], n_cal: int) -> None:
    """50% sparse + 4-bit group-64 arms of bench_llm on its trained byte-level Llama, lowered to the
    entropy-coded file: bytes per weight by part against fp32, the per-group float codebook, the bound."""
    import fxcompress
    from fxcompress import passes
    from fxcompress.layers import effective_weight, find_layers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_llm
    model = bench_llm.load(checkpoint)
    cal, held, _ = bench_llm.data(n_cal, 8)
    example = cal[0]
    graph = fxcompress.compile(torch.export.export(model, example, strict=False), [], example)
    table = bench_llm.arms() | {"w4 g64 rtn symmetric": lambda: [bench_llm.q(4, symmetric=True)],
                                "50% magnitude + w4 g64": lambda: [passes.InsertMasks(select=bench_llm.BLOCKS),
                                                                   bench_llm.q(4)]}
    rows = []
    for name in arm_names:
        gm = fxcompress.compile(graph, table[name](), example, calibration_data=cal)
        weights = {layer.weight + "_encoded": effective_weight(gm, layer).clone() for layer in find_layers(gm)}
        lowered = fxcompress.compile(gm, [passes.LowerToEncoded()], example)
        rows.append(_arm_rows(name, lowered, weights) | {"ppl": bench_llm.perplexity(gm, held),
                                                         "lowered_ppl": bench_llm.perplexity(lowered, held)})
        with tempfile.TemporaryDirectory() as folder:
            rows[-1]["file"] = fxcompress.save(lowered, Path(folder) / "m.fxc")
            rows[-1]["dense_file"] = fxcompress.save(graph, Path(folder) / "d.fxc")
    _print_lm(rows)


def _print_lm(rows: list[dict]) -> None:
    print("\nblock weights of the byte-level Llama (bench_llm's checkpoint), bits per weight by part; x fp32 is "
          "fp32 bytes / encoded bytes of those weights; bound = mask entropy + code entropy (steps excluded)\n")
    print("| arm | layouts / codebooks | positions | indices | codebook (steps) | header | total | x fp32 "
          "| per-group float codebook (x fp32) | bound (x fp32) | mask as relative indices "
          "| held-out ppl fake-quant / lowered | whole file x fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n, p = r["numel"], r["parts"]
        bound = r["mask"] + r["codes"]
        print(f"| {r['arm']} | {', '.join(f'{k} x{v}' for k, v in r['kinds'].items())} | "
              f"{_bits(p['positions'], n)} | {_bits(p['indices'], n)} | {_bits(p['codebook'], n)} | "
              f"{_bits(p['header'], n)} | {_bits(r['total'], n)} | {4 * n / r['total']:.2f}x | "
              f"{_bits(r['old'], n)} ({4 * n / r['old']:.2f}x) | "
              f"{_bits(bound, n) + f' ({4 * n / bound:.2f}x)' if bound else 'n/a'} | "
              f"{_bits(r['relative'], n)} | "
              f"{r['ppl']:.3f} / {r['lowered_ppl']:.3f} | {r['dense_file'] / r['file']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default="1024x2", help="WIDTHxBLOCKS for the throughput table ('' skips it)")
    parser.add_argument("--load", default="1024x8", help="WIDTHxBLOCKS for the file table ('' skips it)")
    parser.add_argument("--skip-coders", action="store_true", help="only the throughput and file tables")
    parser.add_argument("--rans-decoders", action="store_true",
                        help="only rANS decoding in C against the numpy loop (no optional coders needed)")
    parser.add_argument("--rans-encoders", action="store_true",
                        help="only rANS encoding in C against the numpy loop (no optional coders needed)")
    parser.add_argument("--lm", nargs="*", default=None, metavar="ARM",
                        help="only the group-wise grid table on bench_llm's checkpoint (default arms if none named)")
    parser.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent / ".cache" / "llama-bytes")
    parser.add_argument("--load-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        print(json.dumps(load_child(args.load_child[0], args.load_child[1] == "1")))
        return
    torch.set_num_threads(1)
    if args.lm is not None:
        return lm_groups(args.checkpoint, args.lm or LM_ARMS, 32)
    if args.rans_decoders:
        return rans_decoders(args)
    if args.rans_encoders:
        return rans_encoders(args)
    if not args.skip_coders:
        coders(args)
        rans_decoders(args)
        rans_encoders(args)
    if args.layers:
        throughput(*map(int, args.layers.split("x")))
    if args.load:
        file_costs(*map(int, args.load.split("x")))


def coders(args) -> None:
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


def rans_decoders(args) -> None:
    """rANS decoding in C (csrc/rans_decode.c) against the numpy loop it replaces, on a stream of LeNet-5's
    size (431 K weights: 53 lanes, 8,192 steps of Python) and on the coders' streams."""
    from fxcompress.encoded import rans
    c_decoder = rans._c_decoder
    print("\n| rANS stream | symbols | lanes | numpy loop Msym/s | C Msym/s | C / numpy |\n|---|---:|---:|---:|---:|---:|")
    for name, (symbols, alphabet) in streams(args.symbols).items():
        for count in (431_080, len(symbols)):
            stream = encode_symbols(symbols[:count], alphabet, "rans")
            times = {}
            for label, decoder in (("numpy", lambda: None), ("c", c_decoder)):
                rans._c_decoder = decoder
                times[label], decoded = timed(lambda: decode_symbols(stream), args.repeats)
                assert np.array_equal(decoded, symbols[:count])
            rans._c_decoder = c_decoder
            print(f"| {name} | {count:,} | {rans.lanes_for(count)} | {count / times['numpy'] / 1e6:.1f} | "
                  f"{count / times['c'] / 1e6:.1f} | {times['numpy'] / times['c']:.1f}x |")


def rans_encoders(args) -> None:
    """rANS encoding in C (csrc/rans_encode.c) against the numpy loop, on the same streams as the decoders:
    the two run interleaved (the order alternating per repeat), medians of CPU time, identical words
    and states required."""
    from fxcompress.encoded import rans
    c_encoder = rans._c_encoder
    print("\n| rANS stream | symbols | lanes | numpy loop Msym/s | C Msym/s | C / numpy |\n|---|---:|---:|---:|---:|---:|")
    for name, (symbols, alphabet) in streams(args.symbols).items():
        for count in (431_080, len(symbols)):
            part = symbols[:count]
            freq = rans.quantize_counts(np.bincount(part, minlength=alphabet), rans.scale_bits_for(alphabet))
            job = (part, freq, rans.lanes_for(count))
            times, outs = {"numpy": [], "c": []}, {}
            for repeat in range(args.repeats):
                order = [("numpy", lambda: None), ("c", c_encoder)]
                for label, encoder in order[::-1] if repeat % 2 else order:
                    rans._c_encoder = encoder
                    start = time.process_time()
                    outs[label] = rans.encode_many([job])[0]
                    times[label].append(time.process_time() - start)
            rans._c_encoder = c_encoder
            assert all(np.array_equal(a, b) for a, b in zip(outs["numpy"], outs["c"]))
            numpy_t, c_t = statistics.median(times["numpy"]), statistics.median(times["c"])
            print(f"| {name} | {count:,} | {job[2]} | {count / numpy_t / 1e6:.1f} | {count / c_t / 1e6:.1f} | "
                  f"{numpy_t / c_t:.1f}x |")


if __name__ == "__main__":
    main()
