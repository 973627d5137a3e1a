"""What load's dry run costs: load time of a file that records its inputs (format version 2: the graph
runs once on meta tensors before load returns) against the same file without them (version 1: no dry
run), interleaved, one thread, medians of the repeats and their ratio in the same run.

Files: the README's quick-start / demo pipeline on LeNet-300-100 (90% global pruning, 5-bit k-means,
LowerToEncoded(coding="auto"); untrained weights: load time does not depend on their values) and the
100 M-parameter GPT-style model of benchmarks/bench_scale.py (width 1024, 8 blocks), saved in float.

    python benchmarks/bench_load_dry_run.py [--sizes demo,100M] [--repeats 7]
    python benchmarks/bench_load_dry_run.py --fresh [--repeats 5]

--fresh: what a new process pays for its first `fxcompress.load` (import fxcompress, then load): a masked
LeNet-5, the same lowered to encoded weights, LeNet-5 lowered to integers (LowerToInteger, native backend: the
dry run's rule for its input quantizer computes that module's `/`, `+` and `clamp` by the same tables), and the
zoo transformer from the export front end, each loaded
by a fresh interpreter with the dry run's op tables (fileformat/metaops.py) and without them (the tables
emptied: every op runs through torch's meta references, as before the tables), interleaved; CPU seconds of
the load alone, and whether it imported torch._dynamo / sympy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

import fxcompress
from fxcompress.fileformat import metaops
from fxcompress.fileformat.container import HEADER_BYTES
from fxcompress.fileformat.dryrun import dry_run
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks, LowerToEncoded, LowerToInteger
from fxcompress.zoo import ZOO

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import SIZES, build  # noqa: E402  (the GPT builder of the scale benchmark)


def demo_model() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    make_model, _ = ZOO["lenet300"]
    x = torch.randn(8, 1, 28, 28)
    gm = fxcompress.compile(make_model().eval(), [InsertMasks(sparsity=0.9, scope="global"),
                                                 InsertFakeQuant(bits=5, method="kmeans")], example_inputs=(x,))
    return fxcompress.compile(gm, [LowerToEncoded(coding="auto")], example_inputs=(x,)), x


def gpt_model(size: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    model, x = build(*SIZES[size])
    return fxcompress.compile(model, [], example_inputs=(x,), inplace=True), x


def without_inputs(data: bytes) -> bytes:
    """The same file as format version 1 wrote it: no `inputs` in the manifest, so load runs no dry run."""
    length = struct.unpack_from("<I", data, 10)[0]
    manifest = json.loads(zlib.decompress(data[HEADER_BYTES:HEADER_BYTES + length]))
    del manifest["inputs"]
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = bytearray(data[:HEADER_BYTES])
    struct.pack_into("<HII", header, 8, 1, len(packed), zlib.crc32(packed))
    struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
    return bytes(header) + packed + data[HEADER_BYTES + length:]


def timed_load(path: Path) -> float:
    start = time.perf_counter()
    gm = fxcompress.load(path)
    seconds = time.perf_counter() - start
    del gm
    return seconds


@contextlib.contextmanager
def _tables_off():
    """The dry run without metaops' tables: every op through torch's meta references, as before them."""
    tables = (metaops.FUNCTIONS, metaops.METHODS, metaops.MODULES)
    saved = [dict(t) for t in tables]
    for t in tables:
        t.clear()
    try:
        yield
    finally:
        for t, kept in zip(tables, saved):
            t.update(kept)


def measure(name: str, folder: Path, repeats: int) -> dict:
    with_run, without = folder / f"{name}.v2.fxc", folder / f"{name}.v1.fxc"
    gm, _ = demo_model() if name == "demo" else gpt_model(name)
    fxcompress.save(gm, with_run)
    del gm  # only the loaded copy stays alive while loads are timed
    without.write_bytes(without_inputs(with_run.read_bytes()))
    loaded = fxcompress.load(with_run)
    inputs = json.loads(zlib.decompress(with_run.read_bytes()[HEADER_BYTES:HEADER_BYTES + struct.unpack_from(
        "<I", with_run.read_bytes(), 10)[0]]))["inputs"]
    times: dict[str, list[float]] = {"v1 (no dry run)": [], "v2 (dry run)": [], "dry run alone": [],
                                     "dry run, tables off": []}
    timed_load(with_run), timed_load(without)  # first loads: page cache and lazy initialisation
    for _ in range(repeats):  # interleaved: drift on a shared machine hits both alike
        times["v1 (no dry run)"].append(timed_load(without))
        times["v2 (dry run)"].append(timed_load(with_run))
        start = time.perf_counter()
        dry_run(loaded, inputs)
        times["dry run alone"].append(time.perf_counter() - start)
        with _tables_off():
            start = time.perf_counter()
            dry_run(loaded, inputs)
            times["dry run, tables off"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"file": name, "bytes": with_run.stat().st_size, "nodes": len(loaded.graph.nodes),
            "params": sum(t.numel() for t in loaded.state_dict().values()), **medians,
            "ratio": medians["v2 (dry run)"] / medians["v1 (no dry run)"]}


_FRESH = """
import sys, time, json
import fxcompress
from fxcompress.fileformat import metaops
if sys.argv[2] == "off":
    metaops.FUNCTIONS.clear(), metaops.METHODS.clear(), metaops.MODULES.clear()
start = time.process_time()
fxcompress.load(sys.argv[1])
print(json.dumps([time.process_time() - start, "torch._dynamo" in sys.modules, "sympy" in sys.modules]))
"""


def fresh_files(folder: Path) -> dict[str, Path]:
    """The four files --fresh loads (module docstring)."""
    files = {}
    for name, passes, frontend in (("lenet5 masked", [InsertMasks(sparsity=0.9, scope="global")], "auto"),
                                   ("lenet5 encoded", [InsertMasks(sparsity=0.9, scope="global"),
                                                       InsertFakeQuant(bits=5, method="kmeans"), LowerToEncoded()],
                                    "auto"),
                                   ("transformer (export)", [], "export")):
        make_model, make_input = ZOO[name.split()[0]]
        x = make_input()
        files[name] = folder / f"{name.split()[0]}-{len(files)}.fxc"
        fxcompress.save(fxcompress.compile(make_model().eval(), passes, (x,), frontend=frontend), files[name])
    make_model, make_input = ZOO["lenet5"]
    x = make_input()
    calibrate = InsertFakeQuant(bits=8, method="linear", symmetric=True, per_channel=True,
                                activations=ActivationConfig(bits=8))
    fq = fxcompress.compile(make_model().eval(), [calibrate], (x,), calibration_data=[(x,)])
    files["lenet5 native"] = folder / "lenet5-native.fxc"
    fxcompress.save(fxcompress.compile(fq, [LowerToInteger(backend="native", repeats=1)], (x,)), files["lenet5 native"])
    return files


def fresh(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        files = fresh_files(Path(folder))
        runs: dict[tuple[str, str], list] = {}
        for _ in range(repeats):  # interleaved: drift on a shared machine hits both alike
            for name, path in files.items():
                for mode in ("off", "on"):
                    done = subprocess.run([sys.executable, "-c", _FRESH, str(path), mode], check=True,
                                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                    runs.setdefault((name, mode), []).append(json.loads(done.stdout.splitlines()[-1]))
    print(f"torch {torch.__version__}, fresh processes, medians of {repeats} interleaved runs (CPU seconds of load)\n")
    print("| file | load, tables off s | imports (off) | load, tables on s | imports (on) | ratio on/off |")
    print("|---|---:|---|---:|---|---:|")
    for name in files:
        (off, on) = (runs[(name, mode)] for mode in ("off", "on"))
        def imports(rows):
            return ", ".join(m for m, i in (("torch._dynamo", 1), ("sympy", 2)) if rows[0][i]) or "neither"
        t_off, t_on = statistics.median(r[0] for r in off), statistics.median(r[0] for r in on)
        print(f"| {name} | {t_off:.3f} | {imports(off)} | {t_on:.3f} | {imports(on)} | {t_on / t_off:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,100M")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fresh", action="store_true", help="first loads in fresh processes (docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fresh:
        return fresh(args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            rows.append(measure(size, Path(folder), args.repeats))
    print(f"torch {torch.__version__}, 1 thread, medians of {args.repeats} interleaved loads\n")
    print("| file | bytes | nodes | stored values | load, no dry run (v1) s | load with dry run (v2) s | "
          "dry run alone ms | dry run, tables off ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['file']} | {r['bytes']:,} | {r['nodes']} | {r['params']:,} | {r['v1 (no dry run)']:.4f} | "
              f"{r['v2 (dry run)']:.4f} | {1000 * r['dry run alone']:.1f} | "
              f"{1000 * r['dry run, tables off']:.1f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
