"""The whole pipeline on GPT-style models of 10 M to 1 B parameters: seconds and peak memory per stage.

Stages, each a `compile` call or a file operation on the previous stage's result:
masks (InsertMasks(0.9), global or local) -> k-means (InsertFakeQuant(bits=4, method="kmeans")) ->
encode (LowerToEncoded()) -> save -> load (and load with mmap=True when fxcompress.load takes it)
-> the loaded model's first forward.

Every (size, scope, inplace) row runs in a fresh process, so one row's memory never counts in the
next. Peak memory is VmHWM of /proc/self/status, reset before each stage by writing "5" to
/proc/self/clear_refs (Linux), and reported as the growth over the resident size of the built
model, in multiples of the model's fp32 bytes. The baseline is taken after the whole pipeline has run
once on a tiny model of the same kind in the same process, so the libraries' imports (about 1100
modules, about 100 MB resident) and one-off buffers are the process's cost, not a stage's; each row
prints that warm-up's cost and any module first imported inside a stage. With inplace=False each
stage's caller drops the previous GraphModule as soon as compile returns it (`gm = compile(gm, ...)`), so the one copy
compile makes is the only one alive.

Time grows linearly with parameters when the slope of log(seconds) against log(parameters) is 1;
the fit over the sizes run is printed per row kind and per stage.

Targets: the 1 B model end to end in under 10 minutes; peak growth at most 1.5x with
inplace=True and 2.5x without, at every size; slope at most 1.1.

    python benchmarks/bench_scale.py [--sizes 10M,100M,300M,1B] [--scopes global,local]
                                     [--inplace 1,0] [--threads 1] [--until masks|kmeans] [--json rows.json]
    python benchmarks/bench_scale.py --from-json rows10M.json rows100M.json   # one table and fit over runs

`--fixed-mmap-threshold` runs the rows with glibc's MALLOC_MMAP_THRESHOLD_=131072: large blocks are
then always mapped and unmapped, so freed memory leaves the resident size at once; the difference
from a default run is what glibc's dynamic threshold keeps resident between stages (not the code's).
"""
from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# name -> (width, blocks); parameters are 12 x width^2 x blocks (plus biases and norms)
SIZES = {"10M": (512, 3), "100M": (1024, 8), "300M": (1536, 11), "1B": (2048, 20)}
STAGES = ("masks", "kmeans", "encode", "save", "load", "forward", "load_mmap", "forward_mmap")


class Attention(nn.Module):
    """Fused q/k/v projection and torch's scaled dot-product attention (causal)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x GELU MLP, each behind a layer norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=max(1, dim // 64))
        self.fc, self.proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return self.ln(self.blocks(x))


def rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux clear_refs "5"); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def build(dim: int, blocks: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(dim, blocks).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # no gradient is asked for; the stages must not make one either
    x = torch.randn(1, 16, dim)
    with torch.no_grad():
        model(x)  # torch's lazy initialisation belongs to the baseline, not to the first stage
    return model, x


def stage(name: str, *, results: dict, base_kb: int, fp32_kb: float, work):
    """Run `work()`, recording its seconds and its peak RSS growth over `base_kb` in model sizes."""
    gc.collect()
    exact = reset_peak()
    before = rss_kb()
    start, cpu = time.perf_counter(), time.process_time()
    value = work()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = rss_kb("VmHWM") if exact else max(rss_kb("VmHWM"), before)
    results[name] = {"s": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_x": round((peak - base_kb) / fp32_kb, 2),
                     "after_x": round((rss_kb() - base_kb) / fp32_kb, 2), "exact_peak": exact}
    return value


CHECKED_BELOW = 20_000_000  # global masks are compared with a full ranking of all scores below this size


def full_ranking(model: nn.Module) -> dict[str, torch.Tensor]:
    """The global masks of InsertMasks(0.9) the straightforward way: all |w| at once, one stable sort."""
    weights = {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:round(0.9 * flat.numel())]] = False
    parts = torch.split(keep, [w.numel() for w in weights.values()])
    return {name: part.view(w.shape) for (name, w), part in zip(weights.items(), parts)}


def warm_up(scope: str) -> None:
    """The whole pipeline once on a tiny model of the same kind."""
    import fxcompress
    from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded

    model, x = build(64, 1)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9, scope=scope), InsertFakeQuant(bits=4, method="kmeans"),
                                    LowerToEncoded()], example_inputs=(x,))
    with tempfile.TemporaryDirectory() as folder:
        fxcompress.save(gm, Path(folder) / "warm.fxc")
        _forward(fxcompress.load(Path(folder) / "warm.fxc"), x)


def child(size: str, scope: str, inplace: bool, threads: int, until: str = "all") -> dict:
    torch.set_num_threads(threads)
    before, modules = rss_kb(), len(sys.modules)
    warm_up(scope)  # imports and one-off buffers of the first call are the process's, not the model's
    warm = {"warm_up_mb": round((rss_kb() - before) / 1024, 1), "warm_up_modules": len(sys.modules) - modules}
    model, x = build(*SIZES[size])
    params = sum(p.numel() for p in model.parameters())
    reference = full_ranking(model) if scope == "global" and params < CHECKED_BELOW else None
    gc.collect()
    results: dict = {}
    measure = functools.partial(stage, results=results, base_kb=rss_kb(), fp32_kb=params * 4 / 1024)
    total, total_cpu = time.perf_counter(), time.process_time()
    box = [model]
    del model  # the stages hold the only reference: with inplace=False the input of each goes once it is copied
    imported = set(sys.modules)
    box = [_compile_stages(box, x, scope, inplace, until, measure, reference)]
    if box[0] is not None:
        _file_stages(box, x, measure)
        results["end_to_end_s"] = round(time.perf_counter() - total, 2)
        results["end_to_end_cpu_s"] = round(time.process_time() - total_cpu, 2)
    # a module first imported inside a stage would put its import cost into that stage's peak
    late = sorted(set(sys.modules) - imported)
    return {"size": size, "params": params, "scope": scope, "inplace": inplace, **results, **warm,
            "imported_in_stages": late}


def _compile_stages(box, x, scope, inplace, until, measure, reference):
    """masks -> k-means -> encode, each a compile call; None when `until` stops before the file stages."""
    import fxcompress
    from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded

    gm = box.pop()

    def run(passes):
        return lambda: fxcompress.compile(gm, passes, example_inputs=(x,), inplace=inplace)

    # `gm = compile(gm, ...)`: each stage's input is dropped once its result exists
    gm = measure("masks", work=run([InsertMasks(sparsity=0.9, scope=scope)]))
    if reference is not None:
        measure.keywords["results"]["masks_equal_full_ranking"] = all(
            torch.equal(gm.get_buffer(f"{name}_mask"), keep) for name, keep in reference.items())
        del reference
    if until == "masks":
        return None
    gm = measure("kmeans", work=run([InsertFakeQuant(bits=4, method="kmeans")]))
    if until == "kmeans":
        return None
    return measure("encode", work=run([LowerToEncoded()]))


def _file_stages(box: list, x, measure) -> None:
    """save -> load -> first forward, and again with load(mmap=True) when load takes it. The model
    comes in `box`, the only reference to it, so that it is gone before the loads are measured."""
    import fxcompress

    gm = box.pop()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.fxc"
        measure("save", work=lambda: fxcompress.save(gm, path))
        del gm
        loads = [("load", {}, "forward")]
        if "mmap" in inspect.signature(fxcompress.load).parameters:
            loads.append(("load_mmap", {"mmap": True}, "forward_mmap"))
        for load_name, options, forward_name in loads:
            loaded = measure(load_name, work=lambda: fxcompress.load(path, **options))
            measure(forward_name, work=lambda: _forward(loaded, x))
            del loaded
        measure.keywords["results"]["file_bytes"] = path.stat().st_size


def _forward(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gm(x)


def slope(params: list[int], seconds: list[float]) -> float:
    """Slope of the least-squares line through (log params, log seconds)."""
    return float(np.polyfit(np.log(params), np.log(np.maximum(seconds, 1e-3)), 1)[0])


def report(rows: list[dict]) -> None:
    stages = [s for s in STAGES if any(s in r for r in rows)]
    print("\nper stage: wall seconds (CPU seconds) / peak RSS growth over the built model (x fp32 bytes)")
    print(f"{'size':>5} {'params':>11} {'scope':<7} {'inplace':<7} " + " ".join(f"{s:>21}" for s in stages)
          + f" {'file MB':>8} {'total s (CPU)':>15}")
    for r in rows:
        cells = " ".join(f"{r[s]['s']:>6.1f} ({r[s]['cpu_s']:>5.1f}) / {r[s]['peak_x']:>4.2f}x" if s in r
                         else f"{'-':>21}" for s in stages)
        ends = (f"{r['file_bytes'] / 2 ** 20:>8.1f} {r['end_to_end_s']:>7.1f} ({r['end_to_end_cpu_s']:>5.1f})"
                if "file_bytes" in r else f"{'-':>8} {'-':>15}")
        print(f"{r['size']:>5} {r['params']:>11,} {r['scope']:<7} {str(r['inplace']):<7} {cells} {ends}")
    for r in rows:
        if "warm_up_mb" in r:
            late = r["imported_in_stages"]
            print(f"{r['size']} {r['scope']} inplace={r['inplace']}: baseline taken after a warm-up run on a tiny model "
                  f"(+{r['warm_up_mb']} MB, {r['warm_up_modules']} modules imported, not counted); modules first "
                  f"imported inside the stages: {', '.join(late[:5]) + (' ...' if len(late) > 5 else '') if late else 'none'}")
    for r in rows:
        if "masks_equal_full_ranking" in r:
            print(f"{r['size']} global masks equal to a stable sort of all scores: {r['masks_equal_full_ranking']}")
    worst = {True: 1.5, False: 2.5}
    for r in rows:
        peak = max(r[s]["peak_x"] for s in stages if s in r)
        flag = "met" if peak <= worst[r["inplace"]] else "NOT met"
        print(f"{r['size']} {r['scope']} inplace={r['inplace']}: worst peak growth {peak:.2f}x "
              f"(target {worst[r['inplace']]}x: {flag}); end to end {r.get('end_to_end_s', '-')} s")
    for scope in sorted({r["scope"] for r in rows}):
        for inplace in (True, False):
            kind = sorted((r for r in rows if r["scope"] == scope and r["inplace"] == inplace),
                          key=lambda r: r["params"])
            if len({r["params"] for r in kind}) < 2:
                continue
            params = [r["params"] for r in kind]
            fits = {s: slope(params, [r[s]["cpu_s"] for r in kind])
                    for s in ("masks", "kmeans", "encode") if all(s in r for r in kind)}
            whole = (f"end to end {slope(params, [r['end_to_end_cpu_s'] for r in kind]):.2f} CPU, "
                     f"{slope(params, [r['end_to_end_s'] for r in kind]):.2f} wall (target <= 1.1); "
                     if all("end_to_end_s" in r for r in kind) else "")
            print(f"log-log slope of time vs parameters, {scope} inplace={inplace}: {whole}CPU by stage: "
                  + ", ".join(f"{s} {v:.2f}" for s, v in fits.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--scopes", default="global,local")
    parser.add_argument("--inplace", default="1,0", choices=("1", "0", "1,0", "0,1"),
                        help="1 (inplace=True), 0 (False) or 1,0 (both)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--until", choices=("masks", "kmeans", "all"), default="all",
                        help="stop after this stage (memory and time of the first stages on the largest sizes)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="print the tables and fits of rows saved by earlier runs' --json, run nothing")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="children run with MALLOC_MMAP_THRESHOLD_=131072 (glibc: freed blocks unmapped)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "SCOPE", "INPLACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, scope, inplace = args.child
        print(json.dumps(child(size, scope, inplace == "1", args.threads, args.until)))
        return
    if args.from_json:
        report([row for name in args.from_json for row in json.loads(Path(name).read_text())])
        return
    sizes = [s.strip() for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    print(f"torch {torch.__version__}, {args.threads} thread(s)"
          f"{', MALLOC_MMAP_THRESHOLD_=131072' if args.fixed_mmap_threshold else ''}; GPT-style models (pre-norm, fused qkv, "
          f"scaled_dot_product_attention, MLP 4x), input 1 x 16 x width; peak growth is over the resident size "
          f"after a warm-up run of the pipeline on a tiny model (imports not counted) and the built model")
    rows = []
    for size in sizes:
        for scope in args.scopes.split(","):
            for inplace in args.inplace.split(","):
                rows.append(_run_child(size, scope, inplace, args.threads, args.until, args.fixed_mmap_threshold))
                r = rows[-1]
                print(f"  {size} {scope} inplace={r['inplace']}: {r.get('end_to_end_s', '-')} s end to end "
                      f"({r.get('end_to_end_cpu_s', '-')} CPU s), "
                      + ", ".join(f"{s} {r[s]['s']} s ({r[s]['cpu_s']} CPU) / {r[s]['peak_x']}x"
                                  for s in STAGES if s in r), flush=True)
                if args.json:  # after every row: a long run stopped part way keeps the rows it finished
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    report(rows)


def _run_child(size: str, scope: str, inplace: str, threads: int, until: str, fixed_mmap: bool = False) -> dict:
    malloc = {"MALLOC_MMAP_THRESHOLD_": "131072"} if fixed_mmap else {}
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--until", until,
                          "--child", size, scope, inplace],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **malloc})
    if out.returncode != 0:
        raise SystemExit(f"{size} {scope} inplace={inplace} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
