"""A fuzzing audit of `load` (not collected by pytest: a run takes minutes; the cases it found are tests).

    python -m tests.fileformat.fuzz_harness [--cases N] [--seed S] [--corpus DIR] [--dump DIR] [--only CASE ...]
                                            [--memory-gib G] [--timeout S] [--slow S]

It saves real compressed models (masks and fake-quant, encoded, integer native and reference, sparse,
weight-only, dynamic int8, a transformer block), then mutates each file: (a) raw bytes flipped, truncated
or extended, the manifest's compressed bytes flipped with its checksum recomputed, tensor bytes changed with
every checksum recomputed; (b) the manifest's JSON changed structurally (values replaced by huge, negative,
non-finite, mistyped or deeply nested ones, keys dropped or added, nodes and tensor entries duplicated or
moved, targets and module types swapped for other allow-listed names or for dunders, offsets, dtypes and
shapes changed), re-encoded with valid checksums. Every case loads in a worker process under an address-space
limit and a per-case time limit, then (if it loaded) runs forward on inputs of the shapes the file records.

A defect is anything but: a FormatError at load, or a model whose forward runs (a FormatError from forward,
which a damaged encoded payload gives when it is decoded at first use, is counted apart), within `--slow`
seconds. Defects are printed with the seed and case number; `--dump` writes their files. The same seed
gives the same cases only on the same saved models (lowerings that time kernels choose by this machine's
timings), so keep them with `--corpus DIR` (built there once, reused after) to reproduce a case (`--only`).
The worker loads every model once before the cases: a process's first load of an integer-lowered model
imports torch._dynamo (about 3 s), a cost of the process, not of a case.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from fxcompress.fileformat.container import HEADER_BYTES

_LEN = struct.Struct("<I")


# ---- the corpus ---------------------------------------------------------------------------------

def build_corpus() -> dict[str, tuple[bytes, object]]:
    """name -> (file bytes, example input) of each saved model kind."""
    import torch

    import fxcompress
    from fxcompress.fileformat.container import to_bytes
    from fxcompress.passes import (ActivationConfig, InsertFakeQuant, InsertMasks, LowerDynamicInt8, LowerToEncoded,
                                   LowerToInteger, LowerToSparse, LowerWeightOnly)
    from fxcompress.zoo import ZOO
    from tests.layer_cases import NativeBlock  # run from the repository root as a module

    torch.manual_seed(0)
    calibrated = [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                  activations=ActivationConfig(bits=8, joins=True))]
    block_x = torch.randn(2, 3, 8, 8)
    kinds = {
        "lenet5_masks_fakequant": (ZOO["lenet5"][0], ZOO["lenet5"][1](), [
            [InsertMasks(sparsity=0.5), InsertFakeQuant(method="linear", bits=4,
                                                        activations=ActivationConfig(bits=8))]]),
        "lenet300_encoded": (ZOO["lenet300"][0], ZOO["lenet300"][1](), [
            [InsertMasks(sparsity=0.8), InsertFakeQuant(method="kmeans", bits=4)], [LowerToEncoded()]]),
        "block_integer_native": (NativeBlock, block_x, [calibrated, [LowerToInteger(backend="native", repeats=1)]]),
        "block_integer_reference": (NativeBlock, block_x, [calibrated, [LowerToInteger(backend="reference")]]),
        "block_sparse": (NativeBlock, block_x,
                         [[InsertMasks(sparsity=0.9)], [LowerToSparse(min_sparsity=0.0, repeats=1)]]),
        "lenet300_weight_only": (ZOO["lenet300"][0], ZOO["lenet300"][1](), [
            [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)],
            [LowerWeightOnly(repeats=1)]]),
        "lenet300_dynamic_int8": (ZOO["lenet300"][0], ZOO["lenet300"][1](), [[LowerDynamicInt8(repeats=1)]]),
        "transformer_masks": (ZOO["transformer"][0], ZOO["transformer"][1](), [[InsertMasks(sparsity=0.5)]]),
    }
    corpus = {}
    for name, (make, x, steps) in kinds.items():
        gm = make().eval()
        for passes in steps:
            gm = fxcompress.compile(gm, passes, example_inputs=(x,), calibration_data=[(x,)], verify=False)
        corpus[name] = (to_bytes(gm, example_inputs=(x,)), x)
    return corpus


CORPUS = "corpus.pt"


def save_corpus(corpus: dict[str, tuple[bytes, object]], path: Path) -> None:
    import torch
    torch.save({name: (torch.frombuffer(bytearray(data), dtype=torch.uint8), x) for name, (data, x) in corpus.items()},
               path)


def read_corpus(path: Path) -> dict[str, tuple[bytes, object]]:
    import torch
    stored = torch.load(path, weights_only=True)  # tensors only: nothing is unpickled as code
    return {name: (data.numpy().tobytes(), x) for name, (data, x) in stored.items()}


# ---- file surgery -------------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    length = _LEN.unpack_from(data, 10)[0]
    return json.loads(zlib.decompress(data[HEADER_BYTES:HEADER_BYTES + length])), data[HEADER_BYTES + length:]


def with_packed(data: bytes, packed: bytes, tensors: bytes) -> bytes:
    header = bytearray(data[:HEADER_BYTES])
    struct.pack_into("<II", header, 10, len(packed), zlib.crc32(packed))
    struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
    return bytes(header) + packed + tensors


def join(data: bytes, manifest: object, tensors: bytes) -> bytes:
    # allow_nan: a crafted file may hold NaN / Infinity tokens, which Python's json accepts
    return with_packed(data, zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 6), tensors)


# ---- mutations ----------------------------------------------------------------------------------

DUNDERS = ["__class__", "__init__", "__globals__", "__builtins__", "__dict__", "__reduce__", "__getattribute__",
           "_modules", "forward", "training", "__class__.__base__.__subclasses__"]
FOREIGN = ["os.system", "builtins.eval", "builtins.exec", "builtins.open", "subprocess.Popen", "torch.load",
           "torch.from_file", "torch.hub.load", "pickle.loads", "torch.nn.modules.module.Module",
           "torch.jit.load", "importlib.import_module", "torch.ops.aten.set_", "torch.Tensor.storage",
           "torch.Tensor.data_ptr", "torch.Tensor.untyped_storage", "numpy.load"]
NUMBERS = [0, 1, -1, 2, 3, 7, 255, 256, -129, 2 ** 31, 2 ** 31 - 1, 2 ** 32, 2 ** 63, -(2 ** 63), 2 ** 64, 2 ** 100,
           10 ** 30, 0.5, -0.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, True, False]


def _walk(value, path=()):
    """Every (path, value) in a JSON value."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, path + (i,))


def _get(root, path):
    for step in path:
        root = root[step]
    return root


def _set(root, path, value):
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


class Mutator:
    def __init__(self, rng: random.Random, pool: dict[str, list]):
        self.rng, self.pool = rng, pool

    def value(self, old):
        rng = self.rng
        choice = rng.randrange(12)
        if choice == 0:
            return rng.choice(NUMBERS)
        if choice == 1 and isinstance(old, (int, float)) and not isinstance(old, bool):
            return rng.choice([old + 1, old - 1, -old, old * 2, old * 1000, float(old), str(old), old + 0.5])
        if choice == 2:
            return rng.choice([None, [], {}, "", "x", [old], {"t": [old]}, {"n": "x"}, {"f": "nan"}, {"e": 1},
                               {"dt": "float64"}, {"dev": "cuda"}, {"mf": "channels_last"}, {"s": [0, None, 2]}])
        if choice == 3:
            depth = rng.choice([5, 33, 63, 70, 200])
            nested = old
            for _ in range(depth):
                nested = rng.choice([[nested], {"t": [nested]}])
            return nested
        if choice == 4:
            return rng.choice(DUNDERS + FOREIGN)
        if choice == 5:
            return rng.choice(self.pool["strings"])
        if choice == 6:
            return copy.deepcopy(rng.choice(self.pool["values"]))
        if choice == 7 and isinstance(old, list):
            return [self.value(v) if rng.random() < 0.3 else v for v in old]
        if choice == 8 and isinstance(old, list) and old:
            return rng.choice([old[:-1], old + [old[-1]], old[::-1], old * 2, [old[0]] * 40])
        if choice == 9 and isinstance(old, dict):
            return {k: v for k, v in old.items() if rng.random() < 0.8}
        if choice == 10 and isinstance(old, dict):
            return dict(old, **{rng.choice(["device", "dtype", "x", "out", "inplace", "__class__", "same_as",
                                            "default"]): self.value(None)})
        return rng.choice([None, True, -1, 2 ** 70, math.nan, "0", [], {}])

    def structural(self, m):
        """One change to the manifest `m` (returned: it may replace the whole value)."""
        rng = self.rng
        kind = rng.randrange(10)
        if kind <= 3 or not isinstance(m, dict):  # any value anywhere
            path, old = rng.choice(list(_walk(m)))
            return _set(m, path, self.value(old))
        if kind == 4:  # a whole node, module or tensor entry duplicated, dropped or moved
            section = m.get(rng.choice(["graph", "modules", "tensors"]))
            if isinstance(section, list) and section:
                i, j = rng.randrange(len(section)), rng.randrange(len(section) + 1)
                action = rng.randrange(3)
                if action == 0:
                    section.insert(j, copy.deepcopy(section[i]))
                elif action == 1:
                    del section[i]
                else:
                    section.insert(j, section.pop(i))
            return m
        if kind == 5:  # a graph node's field from another node (of any of the models: plausible, allow-listed)
            graph = m.get("graph")
            if isinstance(graph, list) and graph and isinstance(node := rng.choice(graph), dict):
                field = rng.choice(["target", "args", "kwargs", "op", "name"])
                node[field] = copy.deepcopy(rng.choice(self.pool["node_" + field]))
            return m
        if kind == 6:  # a module entry's type or config from another model's module
            modules = m.get("modules")
            if isinstance(modules, list) and len(modules) > 1 and isinstance(entry := rng.choice(modules[1:]), dict):
                other = rng.choice(self.pool["modules"])
                if rng.random() < 0.5:
                    entry["type"] = other["type"]
                else:
                    entry["config"] = copy.deepcopy(other["config"])
                    if rng.random() < 0.5:
                        entry["type"] = other["type"]
            return m
        if kind == 7:  # a tensor entry's dtype, shape or place changed (length kept consistent or not)
            table = m.get("tensors")
            if isinstance(table, list) and table and isinstance(entry := rng.choice(table), dict) and "shape" in entry:
                field = rng.choice(["dtype", "shape", "offset", "swap", "kind"])
                if field == "dtype":
                    entry["dtype"] = rng.choice(["float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64",
                                                 "bool", "float64", "int16", "complex64", "float128"])
                elif field == "shape":
                    shape = entry["shape"]
                    entry["shape"] = rng.choice([shape[::-1], shape + [1], [1] + shape, shape[:-1], [0] + shape,
                                                 [math.prod(shape)] if shape else [1], [2 ** 40] + shape])
                elif field == "offset":
                    entry["offset"] = rng.choice([0, entry["offset"] - 1, entry["offset"] + 1, m.get("data_bytes", 0)])
                elif field == "swap" and len(table) > 1:
                    other = rng.choice(table)
                    if isinstance(other, dict):
                        entry["name"], other["name"] = other.get("name"), entry.get("name")
                else:
                    entry["kind"] = rng.choice(["parameter", "buffer", "non_persistent_buffer"])
            return m
        if kind == 8:  # the recorded inputs' shapes and dtypes
            inputs = m.get("inputs")
            if isinstance(inputs, list) and inputs and isinstance(spec := inputs[0], dict) and "shape" in spec:
                shape = spec["shape"]
                change = rng.randrange(5)
                if change == 0 and shape:
                    shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 2 ** 20, 2 ** 40, -1])
                elif change == 1:
                    spec["shape"] = shape[1:] if rng.random() < 0.5 else [1] + shape
                elif change == 2:
                    spec["dtype"] = rng.choice(["int64", "uint8", "float16", "bool", "int8", "bfloat16", "float64"])
                elif change == 3:
                    m["inputs"] = rng.choice([None, [], inputs * 2, [{"default": True}], [{"t": inputs}]])
                else:
                    spec["shape"] = [rng.choice([1, 2, 3, 5]) for _ in range(rng.randrange(0, 6))]
            return m
        # an op target from the allow-list pool, a dunder or foreign name
        graph = m.get("graph")
        if isinstance(graph, list) and graph and isinstance(node := rng.choice(graph), dict):
            node["target"] = rng.choice(self.pool["node_target"] + DUNDERS + FOREIGN)
            if rng.random() < 0.3:
                node["op"] = rng.choice(["call_function", "call_method", "call_module", "get_attr"])
        return m

    def bytes_level(self, data: bytes) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:  # random bytes flipped anywhere, checksums left alone
            out = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            return "flip", bytes(out)
        if kind == 1:
            return "truncate", data[:rng.randrange(len(data))]
        if kind == 2:
            return "extend", data + rng.choice([b"\0", rng.randbytes(rng.randint(1, 64)), data[:rng.randint(1, 999)]])
        length = _LEN.unpack_from(data, 10)[0]
        packed, tensors = data[HEADER_BYTES:HEADER_BYTES + length], data[HEADER_BYTES + length:]
        if kind == 3:  # the compressed manifest damaged, its checksum recomputed
            out = bytearray(packed)
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] = rng.randrange(256)
            return "packed", with_packed(data, bytes(out), tensors)
        if kind == 4:  # the header's version / length fields with a valid header checksum
            header = bytearray(data[:HEADER_BYTES])
            struct.pack_into("<H", header, 8, rng.choice([0, 1, 2, 3, 4, 65535]))
            if rng.random() < 0.5:
                struct.pack_into("<I", header, 10, rng.choice([0, length - 1, length + 1, 2 ** 32 - 1]))
            struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
            return "header", bytes(header) + data[HEADER_BYTES:]
        # tensor bytes changed with every checksum recomputed: indices, codes, scales and payload headers
        manifest, tensors = split(data)
        entries = [e for e in manifest["tensors"] if "length" in e and e["length"]]
        entry = rng.choice(entries)
        out = bytearray(tensors)
        start, end = entry["offset"], entry["offset"] + entry["length"]
        for _ in range(rng.choice([1, 2, 4, 16])):
            at = rng.randrange(start, end)
            out[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        if rng.random() < 0.3:  # a whole segment of one byte (all-0xFF indices, NaN-like floats)
            out[start:end] = bytes([rng.choice([0, 0xFF, 0x7F])]) * (end - start)
        entry["crc32"] = zlib.crc32(bytes(out[start:end]))
        return f"tensor:{entry['name']}", join(data, manifest, bytes(out))


def make_pool(corpus: dict[str, tuple[bytes, object]]) -> dict[str, list]:
    pool = collections.defaultdict(list)
    for data, _ in corpus.values():
        manifest, _ = split(data)
        for node in manifest["graph"]:
            for field in ("target", "args", "kwargs", "op", "name"):
                pool["node_" + field].append(node[field])
        pool["modules"] += manifest["modules"][1:]
        for _, value in _walk(manifest):
            (pool["strings"] if isinstance(value, str) else pool["values"]).append(value)
    return pool


def make_case(rng: random.Random, corpus: dict, names: list, pool: dict) -> tuple[str, str, bytes]:
    """(model name, what was done, hostile file)."""
    name = rng.choice(names)
    data = corpus[name][0]
    mutator = Mutator(rng, pool)
    if rng.random() < 0.3:
        what, out = mutator.bytes_level(data)
        return name, what, out
    manifest, tensors = split(data)
    steps = rng.choice([1, 1, 1, 2, 3])
    for _ in range(steps):
        try:
            manifest = mutator.structural(manifest)
        except (TypeError, KeyError, IndexError, AttributeError):  # an earlier step left a value this one cannot edit
            pass
    return name, f"json x{steps}", join(data, manifest, tensors)


# ---- the worker: one process, many loads, under the limits ---------------------------------------

def _inputs_for(data: bytes, fallback):
    """Real inputs of the shapes the file records (the example input where they are its shapes); None if unknown."""
    import torch
    try:
        specs = split(data)[0].get("inputs")
    except Exception:  # noqa: BLE001 - a file load accepted has a readable manifest; be safe anyway
        return None
    if not isinstance(specs, list):
        return None
    values = []
    for spec in specs:
        if not (isinstance(spec, dict) and set(spec) == {"shape", "dtype"}):
            return None
        shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
        if math.prod(shape) > 1 << 24:
            return None
        if list(fallback.shape) == shape and fallback.dtype == dtype:
            values.append(fallback)
        elif dtype.is_floating_point:
            values.append(torch.randn(shape).to(dtype))
        else:
            values.append(torch.zeros(shape, dtype=dtype))  # 0 is a valid index into any table
    return tuple(values)


def worker(memory_bytes: int, corpus_path: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import torch
    torch.set_num_threads(1)
    from fxcompress.errors import FormatError
    from fxcompress.fileformat.container import from_bytes, load
    corpus = read_corpus(Path(corpus_path))
    inputs = {name: x for name, (_, x) in corpus.items()}
    for data, _ in corpus.values():  # the first load of a process pays one-off imports (the integer modules' dry
        from_bytes(data)  # run imports torch._dynamo, about 3 s): not a case's cost
    scratch = Path(tempfile.mkdtemp(prefix="fxc-fuzz-"))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(8):
        size, use_mmap = struct.unpack("<II", header)
        name = stdin.read(int.from_bytes(stdin.read(2), "little")).decode()
        data = stdin.read(size)
        start = time.perf_counter()
        try:
            if use_mmap:
                (scratch / "case.fxc").write_bytes(data)
                gm = load(scratch / "case.fxc", mmap=True)
            else:
                gm = from_bytes(data)
            outcome = "loaded"
        except FormatError as exc:
            outcome, gm = "FormatError", None
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - the point: anything else is a defect
            outcome, gm = f"load {type(exc).__name__}", None
            message = f"{type(exc).__name__}: {exc}"[:400]
        load_s = time.perf_counter() - start
        if gm is not None:
            message = ""
            x = _inputs_for(data, inputs[name])
            if x is None:
                outcome = "loaded, no forward"
            else:
                try:
                    with torch.no_grad():
                        gm(*x)
                    outcome = "loaded, forward ok"
                except FormatError as exc:
                    outcome, message = "loaded, forward FormatError", str(exc)[:400]
                except BaseException as exc:  # noqa: BLE001
                    outcome, message = f"forward {type(exc).__name__}", f"{type(exc).__name__}: {exc}"[:400]
        reply = json.dumps({"outcome": outcome, "message": message, "load_s": load_s,
                            "total_s": time.perf_counter() - start}).encode()
        stdout.write(_LEN.pack(len(reply)) + reply)
        stdout.flush()


class Worker:
    def __init__(self, memory_bytes: int, corpus_path: str):
        self.args = [sys.executable, "-m", "tests.fileformat.fuzz_harness", "--worker", str(memory_bytes), corpus_path]
        self.proc = None

    def run(self, name: str, data: bytes, use_mmap: bool, timeout: float) -> dict:
        import select
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
            timeout += 60  # the worker imports torch first
        encoded = name.encode()
        try:
            self.proc.stdin.write(struct.pack("<II", len(data), use_mmap) + len(encoded).to_bytes(2, "little")
                                  + encoded + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead("crash (broken pipe)")
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return {"outcome": "timeout", "message": f"no answer in {timeout} s"}
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            return self._dead("crash")
        return json.loads(self.proc.stdout.read(_LEN.unpack(head)[0]))

    def _dead(self, what: str) -> dict:
        code = self.proc.wait()
        return {"outcome": f"{what} (exit {code})", "message": ""}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


GOOD = {"FormatError", "loaded, forward ok", "loaded, forward FormatError", "loaded, no forward"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-gib", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=20.0, help="a case killed after this many seconds")
    parser.add_argument("--slow", type=float, default=2.0, help="a case slower than this is a defect")
    parser.add_argument("--only", type=int, nargs="*", help="run only these case numbers (same seed)")
    parser.add_argument("--corpus", help="a folder for the saved models: built once, then reused")
    parser.add_argument("--dump", help="write each defect's file into this folder")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1])
        return 0
    # the corpus is kept: lowerings that time kernels may choose differently in another run, and the same seed
    # reproduces the same cases only on the same files
    folder = Path(args.corpus or tempfile.mkdtemp(prefix="fxc-fuzz-corpus-"))
    if not (folder / CORPUS).exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_corpus(build_corpus(), folder / CORPUS)
    corpus = read_corpus(folder / CORPUS)
    names, pool = sorted(corpus), make_pool(corpus)
    rng = random.Random(args.seed)
    runner = Worker(int(args.memory_gib * 2 ** 30), str(folder / CORPUS))
    outcomes, defects, slowest = collections.Counter(), [], (0.0, None)
    late = []  # FormatErrors raised by a forward (lazily decoded payloads): allowed, but worth reading
    started = time.time()
    try:
        for case in range(args.cases):
            name, what, data = make_case(rng, corpus, names, pool)
            use_mmap = rng.random() < 0.25
            if args.only and case not in args.only:
                continue
            result = runner.run(name, data, use_mmap, args.timeout)
            outcome = result["outcome"]
            outcomes[outcome] += 1
            seconds = result.get("total_s", math.inf)
            if seconds > slowest[0] and seconds != math.inf:
                slowest = (seconds, case)
            if outcome == "loaded, forward FormatError":
                late.append(f"case {case} ({name}, {what}): {result['message'][:200]}")
            if outcome not in GOOD or seconds > args.slow:
                defects.append((case, name, what, use_mmap, outcome, round(seconds, 2), result["message"]))
                print(f"DEFECT case {case} ({name}, {what}, mmap={use_mmap}): {outcome} in {seconds:.2f} s: "
                      f"{result['message'][:300]}", flush=True)
                if args.dump:
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    (Path(args.dump) / f"case{case}-{name}.fxc").write_bytes(data)
            if case % 500 == 499:
                print(f"... {case + 1} cases in {time.time() - started:.0f} s: {dict(outcomes)}", flush=True)
    finally:
        runner.close()
    print(f"seed {args.seed}: {sum(outcomes.values())} cases in {time.time() - started:.0f} s; outcomes "
          f"{dict(outcomes)}; slowest {slowest[0]:.2f} s (case {slowest[1]}); defects {len(defects)}")
    for line in late[:10]:
        print(f"  FormatError at the first forward: {line}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
