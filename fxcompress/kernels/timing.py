"""Choosing a kernel by timing every candidate form of a layer on that layer's own inputs.

Kernels that win on paper lose on real shapes (torch's weight-only int8 ran slower than fp32 at batch 1
here), so a lowering pass never trusts a kernel: it times the candidates interleaved (each round calls
every candidate once, so a slow spell of the machine hits all of them alike), takes medians, and keeps
the baseline unless another form is faster by `margin`.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a layer runs, and the median milliseconds per call measured for each candidate."""

    kernel: str
    times_ms: Mapping[str, float]

    @property
    def ms(self) -> float:
        return self.times_ms[self.kernel]

    def speedup_over(self, baseline: str) -> float:
        return self.times_ms[baseline] / self.times_ms[self.kernel]

    def as_stats(self) -> dict[str, Any]:
        """Plain data for pass statistics, history and files."""
        return {"kernel": self.kernel, "times_ms": {k: round(v, 6) for k, v in self.times_ms.items()}}

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> "KernelChoice":
        times = {str(k): float(v) for k, v in stats["times_ms"].items()}
        if stats["kernel"] not in times:
            raise ConfigError(f"kernel choice names {stats['kernel']!r}, which was not measured ({sorted(times)})")
        return cls(str(stats["kernel"]), times)


def median_ms(fn: Callable[..., Any], args: tuple, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of `fn(*args)` without autograd."""
    return choose_kernel({"only": fn}, args, repeats=repeats, warmup=warmup, baseline="only").ms


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of the calling thread: on a shared machine, time the process spends preempted is not
    # counted (single-threaded kernels only: work on other threads is not counted either)
    "thread": time.thread_time,
}


def choose_kernel(candidates: Mapping[str, Callable[..., Any]], args: tuple, *, baseline: str,
                  repeats: int = 7, warmup: int = 2, margin: float = 1.05, clock: str = "wall") -> KernelChoice:
    """Time each candidate on `args` (interleaved rounds, medians) and pick the fastest; the baseline
    stays unless a candidate is at least `margin` times faster, so noise never swaps kernels. `clock`
    is "wall" (elapsed time) or "thread" (the calling thread's CPU time, see CLOCKS)."""
    if baseline not in candidates:
        raise ConfigError(f"baseline kernel {baseline!r} is not among the candidates {sorted(candidates)}")
    if clock not in CLOCKS:
        raise ConfigError(f"choose_kernel: clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if repeats < 1 or warmup < 0 or margin < 1.0:
        raise ConfigError(f"choose_kernel needs repeats >= 1, warmup >= 0 and margin >= 1 "
                          f"(got {repeats}, {warmup}, {margin})")
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, fn in candidates.items():
                start = now()
                fn(*args)
                if round_ >= warmup:
                    samples[name].append((now() - start) * 1e3)
    times = {name: statistics.median(values) for name, values in samples.items()}
    fastest = min(times, key=times.__getitem__)
    kernel = fastest if times[fastest] * margin <= times[baseline] else baseline
    return KernelChoice(kernel, times)
