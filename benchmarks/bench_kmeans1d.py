"""fxcompress's exact 1-D k-means against scikit-learn's KMeans(n_init=1), one thread each.

Data looks like a pruned layer's surviving weights: Laplace values with the small ones removed.
Both sides start from the same linear initial centroids; runs are interleaved and the table
reports medians and the median of the per-round time ratios. "same rule" stops as scikit-learn
does (tol=1e-4: the same iterations, so the same inertia); "to convergence" is kmeans1d's default
(tol=0: until no cut moves, at most 1000 iterations), which usually ends at a lower inertia.

    python benchmarks/bench_kmeans1d.py [--sizes 1e6 1e7] [--clusters 32 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from fxcompress.quant.kmeans1d import initial_centroids, kmeans1d


def pruned_like(n: int, seed: int = 0) -> np.ndarray:
    """n float32 weights as a magnitude-pruned layer keeps them (|w| above the 20% quantile)."""
    w = np.random.default_rng(seed).laplace(size=int(n * 1.3)).astype(np.float32)
    return w[np.abs(w) > 0.22][:n]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(values: np.ndarray, k: int, repeats: int) -> dict:
    init = initial_centroids(values, k, "linear")
    column = values.reshape(-1, 1)
    times: dict[str, list[float]] = {"same": [], "converged": [], "sklearn": []}
    ratios: dict[str, list[float]] = {"same": [], "converged": []}
    for _ in range(repeats):
        t_same, same = timed(lambda: kmeans1d(values, k, init=init, tol=1e-4))
        t_sk, fitted = timed(lambda: KMeans(k, init=init.reshape(-1, 1), n_init=1).fit(column))
        t_conv, converged = timed(lambda: kmeans1d(values, k, init=init))
        for key, t in (("same", t_same), ("converged", t_conv), ("sklearn", t_sk)):
            times[key].append(t)
        ratios["same"].append(t_sk / t_same)
        ratios["converged"].append(t_sk / t_conv)
    row = {key: statistics.median(t) for key, t in times.items()}
    row.update({f"{key}_ratio": statistics.median(r) for key, r in ratios.items()})
    row["same_inertia"] = exact_inertia(values, same) / fitted.inertia_
    row["converged_inertia"] = exact_inertia(values, converged) / fitted.inertia_
    return row


def exact_inertia(values: np.ndarray, result) -> float:
    return float(((values.astype(np.float64) - result.centroids[result.labels]) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--clusters", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| weights | clusters | sklearn KMeans n_init=1 (s) | kmeans1d, same rule (s) | speed-up "
          "| inertia / sklearn's | kmeans1d, to convergence (s) | speed-up | inertia / sklearn's |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with threadpool_limits(1):
        for size in args.sizes:
            values = pruned_like(int(size))
            for k in args.clusters:
                r = compare(values, k, args.repeats)
                print(f"| {int(size):.0e} | {k} | {r['sklearn']:.2f} | {r['same']:.3f} | {r['same_ratio']:.0f}x "
                      f"| {r['same_inertia']:.4f} | {r['converged']:.3f} | {r['converged_ratio']:.0f}x "
                      f"| {r['converged_inertia']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
