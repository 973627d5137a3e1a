"""fxcompress's exact 1-D k-means against scikit-learn's KMeans(n_init=1), one thread each.

Data looks like a pruned layer's surviving weights: Laplace values with the small ones removed.
Both sides start from the same linear initial centroids; runs are interleaved and the table
reports medians and the median of the per-round time ratios.

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
    ours, theirs, ratios = [], [], []
    for _ in range(repeats):
        t_ours, result = timed(lambda: kmeans1d(values, k, init=init))
        t_sk, fitted = timed(lambda: KMeans(k, init=init.reshape(-1, 1), n_init=1).fit(column))
        ours.append(t_ours)
        theirs.append(t_sk)
        ratios.append(t_sk / t_ours)
    exact = float(((values.astype(np.float64) - result.centroids[result.labels]) ** 2).sum())
    return {"ours": statistics.median(ours), "sklearn": statistics.median(theirs),
            "ratio": statistics.median(ratios), "inertia_vs_sklearn": exact / fitted.inertia_}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--clusters", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| weights | clusters | fxcompress kmeans1d (s) | sklearn KMeans n_init=1 (s) | speed-up | inertia / sklearn's |")
    print("|---:|---:|---:|---:|---:|---:|")
    with threadpool_limits(1):
        for size in args.sizes:
            values = pruned_like(int(size))
            for k in args.clusters:
                r = compare(values, k, args.repeats)
                print(f"| {int(size):.0e} | {k} | {r['ours']:.3f} | {r['sklearn']:.2f} | {r['ratio']:.0f}x "
                      f"| {r['inertia_vs_sklearn']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
