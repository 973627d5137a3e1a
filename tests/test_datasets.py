"""Data loading: tiny IDX files built here (no network), digits from scikit-learn's file, split as scikit-learn does."""
import gzip
import hashlib
import types

import numpy as np
import pytest
import torch

from fxcompress import datasets
from fxcompress.datasets import FASHION_MNIST_SHA256, load_dataset, load_fashion_mnist, read_idx
from fxcompress.errors import ConfigError, FormatError, MissingDependencyError


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, payload: bytes) -> str:
    path.write_bytes(gzip.compress(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_fashion(folder, n_train=6, n_test=4, side=5):
    """Four IDX files with known content; returns their checksums."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, side, side)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, side, side)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    sums = {name: write_gz(folder / name, idx_bytes(a)) for name, a in arrays.items()}
    return arrays, sums


def test_good_idx_files_load_with_their_values(tmp_path):
    arrays, sums = tiny_fashion(tmp_path)
    data = load_fashion_mnist(tmp_path, checksums=sums)
    assert data.train_x.shape == (6, 1, 5, 5) and data.test_x.shape == (4, 1, 5, 5)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(data.train_x, expected)
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert (data.channels, data.image_size, data.num_classes) == (1, 5, 10)


def test_checksum_mismatch_names_the_file(tmp_path):
    _, sums = tiny_fashion(tmp_path)
    bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "0" * 64})
    with pytest.raises(FormatError, match="t10k-labels-idx1-ubyte.gz: SHA-256"):
        load_fashion_mnist(tmp_path, checksums=bad)


def test_the_real_checksums_reject_tiny_files(tmp_path):
    tiny_fashion(tmp_path)
    with pytest.raises(FormatError, match="SHA-256"):
        load_fashion_mnist(tmp_path)


def test_bad_magic_raises(tmp_path):
    path = tmp_path / "x.gz"
    write_gz(path, (0x0D03).to_bytes(4, "big") + (1).to_bytes(4, "big") * 3 + b"\0")
    with pytest.raises(FormatError, match="x.gz: bad IDX magic"):
        read_idx(path)


@pytest.mark.parametrize("cut, message", [(2, "magic"), (9, "header"), (-3, "data bytes")])
def test_truncated_files_raise(tmp_path, cut, message):
    payload = idx_bytes(np.zeros((2, 3, 3)))
    path = tmp_path / "t.gz"
    write_gz(path, payload[:cut])
    with pytest.raises(FormatError, match=message):
        read_idx(path)


def test_a_file_that_is_not_gzip_raises(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(FormatError, match="plain.gz: not a readable gzip"):
        read_idx(path)


def test_images_and_labels_must_pair(tmp_path):
    _, sums = tiny_fashion(tmp_path)
    sums["train-labels-idx1-ubyte.gz"] = write_gz(tmp_path / "train-labels-idx1-ubyte.gz",
                                                  idx_bytes(np.zeros(5)))
    with pytest.raises(FormatError, match="do not pair"):
        load_fashion_mnist(tmp_path, checksums=sums)


def test_missing_files_explain_how_to_get_them(tmp_path):
    with pytest.raises(FormatError, match="download=True"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_download_writes_verified_files_atomically(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _, sums = tiny_fashion(mirror)
    root = tmp_path / "data"
    data = load_fashion_mnist(root, download=True, checksums=sums, mirror=mirror.as_uri())
    assert len(data.train_x) == 6
    assert sorted(p.name for p in root.iterdir()) == sorted(FASHION_MNIST_SHA256)  # no temp files left


def test_download_with_a_bad_checksum_leaves_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _, sums = tiny_fashion(mirror)
    root = tmp_path / "data"
    with pytest.raises(FormatError, match="downloaded file has SHA-256"):
        load_fashion_mnist(root, download=True, checksums=dict(sums, **{"train-images-idx3-ubyte.gz": "1" * 64}),
                           mirror=mirror.as_uri())
    assert not (root / "train-images-idx3-ubyte.gz").exists()
    assert not [p for p in root.iterdir() if p.name.endswith(".part")]


def test_auto_falls_back_to_digits_without_files(tmp_path):
    data = load_dataset("auto", root=tmp_path)
    assert data.name == "digits"


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    assert torch.bincount(a.test_y).min() >= 35  # stratified: every class ~36 of 360


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="load_dataset.name"):
        load_dataset("cifar")


def _sklearn_digits(test_size, seed):
    """What load_digits returned when it ran scikit-learn for every call: its loader and its split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split
    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)


@pytest.mark.parametrize("test_size, seed", [(360, 0), (300, 3)])
def test_digits_are_scikit_learns_arrays_and_split_exactly(test_size, seed):
    """The default split comes from the cached indices and the pixels from our reading of the pinned file,
    another split from scikit-learn's train_test_split: every tensor equals scikit-learn's own, element
    for element and in order (the training order decides the batches)."""
    train_x, test_x, train_y, test_y = _sklearn_digits(test_size, seed)
    data = datasets.load_digits(test_size=test_size, seed=seed)
    for ours, theirs in ((data.train_x, train_x), (data.train_y, train_y), (data.test_x, test_x),
                         (data.test_y, test_y)):
        assert ours.dtype == torch.from_numpy(theirs).dtype and ours.is_contiguous()
        assert np.array_equal(ours.numpy(), theirs)


def test_another_digits_file_is_read_by_scikit_learn(monkeypatch):
    """A digits file that is not the pinned one (another scikit-learn's) is left to scikit-learn, cached
    split and all: the result is still its load_digits with its train_test_split."""
    monkeypatch.setattr(datasets, "DIGITS_SHA256", "0" * 64)
    datasets._digits_file.cache_clear()
    try:
        assert datasets._digits_file() == (None, None)
        data = datasets.load_digits()
    finally:
        monkeypatch.undo()
        datasets._digits_file.cache_clear()
    train_x, _, _, test_y = _sklearn_digits(360, 0)
    assert np.array_equal(data.train_x.numpy(), train_x) and np.array_equal(data.test_y.numpy(), test_y)


def test_digits_without_scikit_learn_is_a_typed_error(monkeypatch):
    no_sklearn = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None))
    monkeypatch.setattr(datasets, "importlib", no_sklearn)  # what datasets sees; the real finder is untouched
    datasets._digits_file.cache_clear()
    try:
        with pytest.raises(MissingDependencyError, match="scikit-learn"):
            datasets.load_digits()
    finally:
        monkeypatch.undo()
        datasets._digits_file.cache_clear()
