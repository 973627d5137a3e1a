import statistics
import tracemalloc

import numpy as np
import pytest
import torch

from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.quant.kmeans1d import INITS, assign, below_or_equal, initial_centroids, kmeans1d


def pruned_like(n, seed, dtype=np.float64):
    """Laplace weights with the small ones removed: two lobes and a gap, as a pruned layer's nonzeros."""
    w = np.random.default_rng(seed).laplace(size=2 * n)
    return w[np.abs(w) > 0.3][:n].astype(dtype)


@pytest.fixture(scope="module")
def sklearn_kmeans():
    """`fit(x, k, start, **options)`: scikit-learn's KMeans from the centroids `start`, on one thread.
    Imported here rather than at collection, which every test process would pay for."""
    cluster = pytest.importorskip("sklearn.cluster", reason="scikit-learn is not installed")
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")

    def fit(x, k, start, **options):
        with threadpoolctl.threadpool_limits(1):
            return cluster.KMeans(k, init=start.reshape(-1, 1), n_init=1, **options).fit(x.reshape(-1, 1))
    return fit


def exact_inertia(x, result):
    return float(((np.asarray(x, np.float64) - result.centroids[result.labels]) ** 2).sum())


@pytest.mark.parametrize("init", INITS)
def test_inertia_reaches_sklearn_with_the_same_initial_centroids(init, sklearn_kmeans):
    gaps = []
    for seed in range(5):
        x = pruned_like(4000, seed)
        start = initial_centroids(x, 16, init, seed=seed)
        ours = kmeans1d(x, 16, init=init, seed=seed)
        theirs = sklearn_kmeans(x, 16, start)
        assert exact_inertia(x, ours) == pytest.approx(ours.inertia, rel=1e-9)
        gaps.append(ours.inertia / theirs.inertia_ - 1)
    assert statistics.median(gaps) <= 1e-3


@pytest.mark.parametrize("init", ["forgy", "density", "kmeans++"])
def test_with_sklearns_stopping_rule_the_iterations_are_sklearns(init, sklearn_kmeans):
    for seed in range(3):
        x = pruned_like(3000, seed)
        start = initial_centroids(x, 16, init, seed=seed)
        ours = kmeans1d(x, 16, init=start, tol=1e-4)
        theirs = sklearn_kmeans(x, 16, start, tol=1e-4)
        assert ours.n_iter == theirs.n_iter_
        assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-9)


@pytest.mark.parametrize("init", ["forgy", "density", "kmeans++"])
def test_same_fixed_point_as_a_fully_converged_sklearn_lloyd(init, sklearn_kmeans):
    x = pruned_like(3000, 7)
    start = initial_centroids(x, 8, init, seed=3)
    ours = kmeans1d(x, 8, init=start)
    theirs = sklearn_kmeans(x, 8, start, tol=0, max_iter=5000)
    np.testing.assert_allclose(ours.centroids, np.sort(theirs.cluster_centers_.ravel()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("init", INITS)
def test_result_is_a_lloyd_fixed_point(init):
    x = pruned_like(5000, 1, np.float32)
    r = kmeans1d(x, 32, init=init, seed=2)
    assert r.centroids.shape == (32,) and np.all(np.diff(r.centroids) > 0)
    assert r.labels.dtype == np.uint8
    distance = np.abs(x.astype(np.float64)[:, None] - r.centroids[None, :])
    assert np.all(distance[np.arange(x.size), r.labels] <= distance.min(axis=1))  # nearest centroid
    for j in range(32):  # every cluster is non-empty and its centroid is its members' mean
        members = x[r.labels == j].astype(np.float64)
        assert members.size > 0
        assert r.centroids[j] == pytest.approx(members.mean(), rel=1e-9, abs=1e-12)


def test_empty_clusters_from_linear_init_are_refilled():
    x = np.concatenate([np.full(50, -1.0), np.linspace(0.9, 1.1, 500)])  # most linear centroids start empty
    start = initial_centroids(x, 8, "linear")
    assert np.count_nonzero(np.histogram(x, bins=np.r_[-np.inf, (start[1:] + start[:-1]) / 2, np.inf])[0]) < 8
    r = kmeans1d(x, 8, init="linear")
    assert np.unique(r.labels).size == 8
    assert r.inertia == pytest.approx(exact_inertia(x, r), rel=1e-9)


def test_fewer_distinct_values_than_clusters_is_exact():
    x = np.array([3.0, -1.0, 3.0, 0.5, -1.0])
    r = kmeans1d(x, 8)
    np.testing.assert_array_equal(r.centroids, [-1.0, 0.5, 3.0])
    np.testing.assert_array_equal(r.centroids[r.labels], x)
    assert r.inertia == 0.0


@pytest.mark.parametrize("values", [np.full(1000, 0.25, np.float32), np.array([7.0]), np.zeros(10)])
def test_constant_and_single_values(values):
    r = kmeans1d(values, 4)
    assert r.centroids.size == 1 and r.centroids[0] == values[0]
    assert np.all(r.labels == 0) and r.inertia == 0.0


def test_k_equal_one_is_the_mean():
    x = pruned_like(1000, 3)
    r = kmeans1d(x, 1)
    assert r.centroids[0] == pytest.approx(x.mean())
    assert r.inertia == pytest.approx(((x - x.mean()) ** 2).sum())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    x = np.ones(100, np.float32)
    x[17] = bad
    with pytest.raises(PreconditionError, match="1 NaN/Inf"):
        kmeans1d(x, 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k"), ({"k": 2.5}, "k"), ({"k": 4, "init": "random"}, "init"),
    ({"k": 4, "init": [0.0, 1.0]}, "4 finite centroids"), ({"k": 4, "max_iter": 0}, "max_iter"),
    ({"k": 4, "tol": -1.0}, "tol"),
])
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kmeans1d(pruned_like(100, 0), **kwargs)
    with pytest.raises(ConfigError, match="empty"):
        kmeans1d(np.array([]), 2)


def test_float32_input_is_not_copied_to_float64():
    x = pruned_like(200_000, 5, np.float32)
    tracemalloc.start()
    kmeans1d(x, 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # sorted float32 copy (4 B) + two float64 prefix sums (16 B) a value; a float64 copy would add 8 B
    assert peak < 24 * x.size


def test_below_or_equal_keeps_comparisons_exact_in_float32():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal(1000)
    x = np.sort(rng.standard_normal(5000).astype(np.float32))
    x = np.sort(np.concatenate([x, keys.astype(np.float32)]))  # float32 neighbours of every key
    rounded = below_or_equal(keys, np.dtype(np.float32))
    assert rounded.dtype == np.float32
    np.testing.assert_array_equal(np.searchsorted(x, rounded, side="right"),
                                  np.searchsorted(x.astype(np.float64), keys, side="right"))


def test_assign_matches_brute_force_including_ties():
    rng = np.random.default_rng(4)
    centroids = np.sort(rng.standard_normal(50))
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    x = np.concatenate([rng.standard_normal(20000), midpoints, centroids])  # > 4096: the table path
    labels = assign(x, centroids)
    distance = np.abs(x[:20000, None] - centroids[None, :])
    np.testing.assert_array_equal(labels[:20000], distance.argmin(axis=1))
    np.testing.assert_array_equal(labels[20000:20049], np.arange(49))  # on a midpoint: the lower centroid
    np.testing.assert_array_equal(labels[20049:], np.arange(50))


def test_torch_tensor_input_and_initialisations():
    x = torch.from_numpy(pruned_like(2000, 9, np.float32))
    r = kmeans1d(x, 8, init="kmeans++", seed=1)
    assert r.centroids.size == 8
    values = set(x.numpy().astype(np.float64).tolist())
    assert set(initial_centroids(x, 8, "forgy", seed=1).tolist()) <= values
    assert set(initial_centroids(x, 8, "kmeans++", seed=1).tolist()) <= values
    density = initial_centroids(x, 4, "density")
    np.testing.assert_array_equal(density, np.sort(x.numpy())[[250, 750, 1250, 1750]])  # CDF at 1/8, 3/8, ...
    np.testing.assert_allclose(initial_centroids(x, 3, "linear"), [x.min(), 0.5 * (x.min() + x.max()), x.max()],
                               rtol=1e-6)
