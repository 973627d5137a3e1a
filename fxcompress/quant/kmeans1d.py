"""Exact 1-D k-means (Lloyd's algorithm) in O(N log N) once plus O(k log N) per iteration.

In one dimension the clusters of a Lloyd step are contiguous runs of the sorted values, cut at the
midpoints between sorted centroids. So the values are sorted once, each iteration finds the k - 1
cuts with a binary search, and the new centroids are differences of prefix sums: no N x k distance
matrix, and the iterations cost microseconds. The result is the same fixed point a generic Lloyd
(scikit-learn's KMeans with the same initial centroids) reaches, up to ties.

    result = kmeans1d(weights, 32, init="linear")
    result.centroids[result.labels]      # the clustered values, in the input's order

Costs: the sort, two float64 prefix-sum arrays (16 bytes a value: float32 prefix sums would lose
the cluster means on large layers) and a final table-driven label assignment. A float32 input is
never copied to float64 as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import check_choice, check_int, check_real
from ..errors import ConfigError, PreconditionError

INITS = ("linear", "forgy", "density", "kmeans++")


@dataclass(frozen=True)
class KMeans1DResult:
    """Sorted centroids, the index of each value's centroid (input order), and the summed squared error."""

    centroids: np.ndarray  # float64, ascending; fewer than k only when there are fewer distinct values
    labels: np.ndarray     # smallest unsigned dtype that holds k - 1 (uint8 up to k = 256)
    inertia: float
    n_iter: int


def kmeans1d(values: Any, k: int, init: str | Any = "linear", *, max_iter: int = 1000, tol: float = 0.0,
             seed: int = 0) -> KMeans1DResult:
    """Cluster the 1-D `values` (any shape, flattened) into at most `k` centroids.

    `init` is "linear" (evenly spaced between min and max: Deep Compression's best), "forgy"
    (k values drawn at random), "density" (evenly spaced on the CDF), "kmeans++" (D^2 sampling),
    or an array of k initial centroids. Empty clusters are refilled deterministically: the cluster
    with the largest squared error gives up its farthest member as a new centroid.

    With `tol=0` Lloyd runs until no cut moves (or `max_iter`). A positive `tol` is scikit-learn's
    rule: stop once the summed squared centroid shift of an iteration is at most tol x variance.
    """
    x = _as_finite_vector(values)
    check_int("kmeans1d", "k", k, 1)
    check_int("kmeans1d", "max_iter", max_iter, 1)
    check_real("kmeans1d", "tol", tol, 0.0)
    data = _Sorted(x)
    if data.distinct <= k:
        return _exact(x, data)
    centroids = _initial(data, k, init, np.random.default_rng(seed))
    centroids, edges, n_iter = _lloyd(data, centroids, max_iter, tol * data.variance())
    inertia = float(data.sse(edges, centroids).sum())
    del data  # the sorted copy and prefix sums (20 bytes a float32 value) go before the labels are made
    return KMeans1DResult(centroids, _assign(x, centroids), inertia, n_iter)


def initial_centroids(values: Any, k: int, init: str = "linear", *, seed: int = 0) -> np.ndarray:
    """The k sorted starting centroids `kmeans1d(values, k, init, seed=seed)` begins from."""
    check_int("kmeans1d", "k", k, 1)
    return _initial(_Sorted(_as_finite_vector(values)), k, init, np.random.default_rng(seed))


def _as_finite_vector(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor: share its memory when it is float32 / float64
        values = values.detach().cpu()
        values = (values if values.dtype.is_floating_point and values.itemsize >= 4 else values.double()).numpy()
    x = np.asarray(values)
    if x.dtype.kind not in "fiu" or x.dtype == np.float16:
        x = x.astype(np.float64 if x.dtype.kind != "f" else np.float32)
    x = x.reshape(-1)
    if x.size == 0:
        raise ConfigError("kmeans1d: values is empty")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise PreconditionError(f"kmeans1d: values contain {bad} NaN/Inf entries; only finite values can be clustered")
    return x if x.dtype.kind == "f" else x.astype(np.float64)


class _Sorted:
    """The sorted values with prefix sums of x and x^2, so any run's count, sum and SSE is O(1)."""

    def __init__(self, x: np.ndarray) -> None:
        # sorted in place between -inf / +inf sentinels, so `padded[c] <= m < padded[c + 1]` checks a cut c
        self.padded = np.empty(x.size + 2, x.dtype)
        self.padded[[0, -1]] = -np.inf, np.inf
        self.padded[1:-1] = x
        self.xs = self.padded[1:-1]
        self.xs.sort()
        self.n = self.xs.size
        self.s1 = np.zeros(self.n + 1)
        np.cumsum(self.xs, dtype=np.float64, out=self.s1[1:])
        self.s2 = np.zeros(self.n + 1)
        np.square(self.xs, out=self.s2[1:], dtype=np.float64)
        np.cumsum(self.s2[1:], out=self.s2[1:])
        self.distinct = 1 + int(np.count_nonzero(self.xs[1:] != self.xs[:-1]))

    def variance(self) -> float:
        mean = self.s1[-1] / self.n
        return max(float(self.s2[-1] / self.n - mean * mean), 0.0)

    def _midpoints(self, centroids: np.ndarray) -> np.ndarray:
        return below_or_equal(0.5 * (centroids[:-1] + centroids[1:]), self.xs.dtype)

    def cuts(self, centroids: np.ndarray) -> np.ndarray:
        """Run boundaries for sorted centroids: [0, ..., N]; a value on a midpoint goes to the lower one."""
        return np.concatenate(([0], np.searchsorted(self.xs, self._midpoints(centroids), side="right"), [self.n]))

    def recut(self, centroids: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """`cuts(centroids)` given the previous boundaries: only the cuts that moved are searched again.

        Near convergence few cuts move, and a full binary search over a large array per cut would
        dominate the iteration.
        """
        midpoints = 0.5 * (centroids[:-1] + centroids[1:])
        inner = edges[1:-1]
        # comparing the k gathered float32 neighbours with float64 midpoints is exact and cheap
        moved = np.flatnonzero((self.padded[inner] > midpoints) | (midpoints >= self.padded[inner + 1]))
        if moved.size == 0:
            return edges
        edges = edges.copy()
        edges[moved + 1] = np.searchsorted(self.xs, below_or_equal(midpoints[moved], self.xs.dtype), side='right')
        return edges

    def _search_near(self, keys: np.ndarray, previous: np.ndarray, reach: int = 8) -> np.ndarray:
        """#values <= key for each key, looking first within `reach` places of its previous cut.

        A cut moves a few places per iteration; scanning that short window beats a binary search
        whose every step is a cache miss on a large array. Keys outside the window are searched fully.
        """
        lo = np.clip(previous - reach, 0, self.n)
        hi = np.minimum(lo + 2 * reach, self.n)
        window = self.padded[1 + np.minimum(lo[:, None] + np.arange(2 * reach), hi[:, None])]
        found = lo + np.count_nonzero(window <= keys[:, None], axis=1)
        far = np.flatnonzero((self.padded[lo] > keys) | (keys >= self.padded[hi + 1]))
        found[far] = np.searchsorted(self.xs, keys[far], side="right")
        return found

    def sums(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count and sum of each run."""
        return np.diff(edges), np.diff(self.s1[edges])

    def sse(self, edges: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Summed squared distance of each run to its centroid (clipped at 0 against rounding)."""
        counts, sums = self.sums(edges)
        squares = np.diff(self.s2[edges])
        return np.maximum(squares - 2.0 * centroids * sums + counts * centroids ** 2, 0.0)


def below_or_equal(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` rounded down into `dtype`, so `x <= result` iff `x <= values` for every x of that dtype.

    Searching a float32 array for float64 keys would make numpy copy the whole array to float64.
    """
    cast = values.astype(dtype)
    too_big = cast > values
    cast[too_big] = np.nextafter(cast[too_big], dtype.type(-np.inf))
    return cast


def _exact(x: np.ndarray, data: _Sorted) -> KMeans1DResult:
    """No more distinct values than clusters: each distinct value is its own centroid."""
    starts = np.flatnonzero(np.concatenate(([True], data.xs[1:] != data.xs[:-1])))
    centroids = data.xs[starts].astype(np.float64)
    return KMeans1DResult(centroids, _assign(x, centroids), 0.0, 0)


def _lloyd(data: _Sorted, centroids: np.ndarray, max_iter: int,
           shift_limit: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Lloyd iterations from sorted `centroids`; returns centroids, the runs they cut, iterations."""
    edges = data.cuts(centroids)
    for n_iter in range(1, max_iter + 1):
        counts, sums = data.sums(edges)
        if not counts.all():
            centroids = _refill(data, edges, centroids)
            edges = data.cuts(centroids)
            continue
        previous, centroids = centroids, sums / counts
        new_edges = data.recut(centroids, edges)
        if new_edges is edges or ((centroids - previous) ** 2).sum() <= shift_limit:
            return centroids, new_edges, n_iter
        edges = new_edges
    return centroids, data.cuts(centroids), max_iter


def _refill(data: _Sorted, edges: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Move each empty cluster's centroid onto the farthest member of a cluster with large error.

    Donors are taken in decreasing order of squared error, one empty cluster each; ties go to the
    lower cluster, so runs are reproducible.
    """
    counts, sums = data.sums(edges)
    full = counts > 0
    means = np.where(full, sums / np.maximum(counts, 1), centroids)
    errors = np.where(full, data.sse(edges, means), -1.0)
    donors = np.argsort(-errors, kind="stable")
    empty = np.flatnonzero(~full)
    for target, donor in zip(empty, donors[: empty.size]):
        if errors[donor] <= 0:
            break
        first, last = data.xs[edges[donor]], data.xs[edges[donor + 1] - 1]
        means[target] = first if means[donor] - first > last - means[donor] else last
    return np.sort(means)


def _initial(data: _Sorted, k: int, init: str | Any, rng: np.random.Generator) -> np.ndarray:
    if not isinstance(init, str):
        given = np.sort(np.asarray(init, dtype=np.float64).reshape(-1))
        if given.size != k or not np.isfinite(given).all():
            raise ConfigError(f"kmeans1d.init: an array init needs {k} finite centroids, got {given.size}")
        return given
    check_choice("kmeans1d", "init", init, INITS)
    xs = data.xs
    if init == "linear":
        return np.linspace(float(xs[0]), float(xs[-1]), k)
    if init == "forgy":
        return np.sort(xs[rng.choice(data.n, size=k, replace=False)].astype(np.float64))
    if init == "density":
        return xs[((np.arange(k) + 0.5) * (data.n / k)).astype(np.int64)].astype(np.float64)
    return _kmeans_plus_plus(data, k, rng)


def _kmeans_plus_plus(data: _Sorted, k: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur & Vassilvitskii's D^2 sampling, exact, with each run's D^2 mass from prefix sums."""
    centroids = np.array([float(data.xs[rng.integers(data.n)])])
    while centroids.size < k:
        edges = data.cuts(centroids)
        mass = data.sse(edges, centroids)
        total = mass.sum()
        if total <= 0:
            break
        u = rng.random() * total
        run = min(int(np.searchsorted(np.cumsum(mass), u, side="right")), centroids.size - 1)
        before = u - (mass[:run].sum())
        index = _sample_in_run(data, edges[run], edges[run + 1], centroids[run], before)
        centroids = np.sort(np.append(centroids, float(data.xs[index])))
    return centroids


def _sample_in_run(data: _Sorted, lo: int, hi: int, centre: float, u: float) -> int:
    """The first index i in [lo, hi) whose cumulative (x - centre)^2 from lo passes u (binary search)."""
    def mass(i: int) -> float:
        return (data.s2[i] - data.s2[lo]) - 2 * centre * (data.s1[i] - data.s1[lo]) + centre ** 2 * (i - lo)

    left, right = lo, hi - 1
    while left < right:
        middle = (left + right) // 2
        if mass(middle + 1) > u:
            right = middle
        else:
            left = middle + 1
    return left


def label_dtype(k: int) -> np.dtype:
    """The smallest unsigned dtype that holds the labels 0 .. k - 1."""
    return np.dtype(np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.int64)


def assign(values: Any, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for every value (ties to the lower centroid).

    A lookup table over a uniform grid of the value range settles most values with two gathers;
    only values in grid cells near a midpoint fall back to a binary search. This is several times
    faster than np.searchsorted over all values.
    """
    return _assign(_as_finite_vector(values), np.sort(np.asarray(centroids, dtype=np.float64).reshape(-1)))


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    midpoints = 0.5 * (centroids[:-1] + centroids[1:])
    dtype = label_dtype(centroids.size)
    if midpoints.size == 0:
        return np.zeros(x.size, dtype)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo or x.size < 4096 or hi - lo > np.finfo(x.dtype).max / 4:
        return np.searchsorted(midpoints, x, side="left").astype(dtype)
    cells = int(min(1 << 16, max(1024, x.size // 8)))  # tables of 64K entries stay in cache
    cell = _grid_cell(x, lo, hi, cells)
    # a value computed to lie in cell c is within one cell of the truth: it lies in [edge c-1, edge c+2]
    edges = lo + (hi - lo) / cells * np.arange(-1, cells + 3)
    low = np.searchsorted(midpoints, edges[:-3], side="left")
    high = np.searchsorted(midpoints, edges[3:], side="left")
    labels = low.astype(dtype)[cell]
    unsure = np.flatnonzero((low != high)[cell])
    labels[unsure] = np.searchsorted(midpoints, x[unsure], side="left")
    return labels


def _grid_cell(x: np.ndarray, lo: float, hi: float, cells: int) -> np.ndarray:
    """floor((x - lo) / (hi - lo) * cells) in x's own dtype, clipped to [0, cells - 1]."""
    t = np.subtract(x, x.dtype.type(lo))
    np.multiply(t, x.dtype.type(cells / (hi - lo)), out=t)
    np.minimum(t, cells - 1, out=t)
    return t.astype(np.int32)
