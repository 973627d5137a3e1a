"""Linear-grid fake quantization: today's quantizers against the plain formulas they replaced.

    python benchmarks/bench_quantizers.py [--rounds 15]

`linear_grid` + `fake_quantize` on weights of common shapes (per tensor, per channel, groups of 128),
the plain formulas (aminmax along a dim, repeated group scales, the straight-through autograd function on
every forward) from tests/quant/test_quantizers_identical.py, which proves the outputs bit for bit equal.
One thread, no_grad, interleaved rounds, medians of process CPU time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "quant"))  # the plain formulas
from test_quantizers_identical import reference_fake_quantize, reference_min_max  # noqa: E402

from fxcompress.quant import quantizers  # noqa: E402

CASES = [((64, 64), 0, None), ((256, 256), 0, None), ((768, 768), 0, None), ((768, 768), 0, 128),
         ((32, 16, 3, 3), 0, None), ((256, 256), None, None)]


def plain(w: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    fast = quantizers._min_max
    quantizers._min_max = reference_min_max  # the grid's formula with the plain min-max
    try:
        grid = quantizers.linear_grid(w, 4, False, axis, group_size)
    finally:
        quantizers._min_max = fast
    return reference_fake_quantize(w, grid, axis)


def today(w: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    return quantizers.fake_quantize(w, quantizers.linear_grid(w, 4, False, axis, group_size), axis)


def cpu_us(fn, calls: int = 20) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| weight | axis | group | plain formulas (us) | today (us) | x |\n|---|---|---|---:|---:|---:|")
    with torch.no_grad():
        for shape, axis, group_size in CASES:
            w = torch.randn(shape)
            assert torch.equal(plain(w, axis, group_size), today(w, axis, group_size))
            times = {"plain": [], "today": []}
            for _ in range(args.rounds):
                for name, fn in (("plain", plain), ("today", today)):
                    times[name].append(cpu_us(lambda: fn(w, axis, group_size)))
            old, new = statistics.median(times["plain"]), statistics.median(times["today"])
            print(f"| {'x'.join(map(str, shape))} | {axis} | {group_size or '-'} | {old:.1f} | {new:.1f} | {old / new:.1f} |")


if __name__ == "__main__":
    main()
