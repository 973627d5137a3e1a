"""Peak memory of compile() on a GPT-style model, as a multiple of the fp32 model's size.

Each measurement runs in a fresh process (peak RSS cannot be reset): the model is built, its
resident size noted, then compile() runs with the given passes and the peak RSS growth is
reported. Target: the pipeline's peak stays within ~2.5x the fp32 model.

Peak RSS also counts memory glibc keeps after it was freed (transient tensors below its adaptive
mmap threshold stay in the heap), so each row runs twice: with the default allocator, and with
MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB so freed tensors go back to the system at once.

    python benchmarks/bench_compile_memory.py [--dim 1024] [--blocks 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


import torch
from torch import nn

from fxcompress.zoo import SelfAttention


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads=max(1, dim // 64))
        self.fc, self.proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(x)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(dim: int, blocks: int, passes: str, inplace: bool) -> dict:
    import fxcompress
    from fxcompress.passes import InsertMasks

    torch.set_num_threads(1)
    model = GPT(dim, blocks)
    model_mb = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    x = torch.randn(1, 16, dim)
    before = _rss_mb()
    chosen = {"none": [], "masks": [InsertMasks(sparsity=0.5)]}[passes]
    fxcompress.compile(model, chosen, example_inputs=(x,), inplace=inplace)
    return {"passes": passes, "inplace": inplace, "model_mb": round(model_mb, 1),
            "peak_growth_mb": round(_rss_mb() - before, 1),
            "peak_total_over_model": round((_rss_mb() - before + model_mb) / model_mb, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.dim, args.blocks, args.child[0], args.child[1] == "1")))
        return
    print(f"GPT-style model, dim {args.dim}, {args.blocks} blocks; peak memory during compile()")
    print(f"{'passes':<8} {'inplace':<8} {'allocator':<18} {'model MB':>9} {'peak growth MB':>15} {'peak / model':>13}")
    for passes in ("none", "masks"):
        for inplace in ("0", "1"):
            for allocator, extra in (("glibc default", {}), ("mmap threshold", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
                out = subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--blocks", str(args.blocks),
                                      "--child", passes, inplace], capture_output=True, text=True, check=True,
                                     env={**os.environ, **extra})
                r = json.loads(out.stdout)
                print(f"{r['passes']:<8} {str(r['inplace']):<8} {allocator:<18} {r['model_mb']:>9} "
                      f"{r['peak_growth_mb']:>15} {r['peak_total_over_model']:>13}")

if __name__ == "__main__":
    main()
