"""Small image-classification data sets for examples, benchmarks and tests, loaded offline.

    data = load_dataset("auto")   # Fashion-MNIST when its files are on disk, else scikit-learn's digits

Fashion-MNIST is read from its four IDX `.gz` files (Xiao et al. 2017); every file is checked
against its SHA-256 and its IDX header before use. scikit-learn's digits (8x8, bundled with
scikit-learn) need no files at all, so they are the fallback that always works.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, FormatError

# Where the Debian package `dataset-fashion-mnist` installs the files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned-byte IDX files of rank 1 (labels) and 3 (images)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images N x C x H x W (float32 in [0, 1]) and int64 labels, split into train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    channels: int
    image_size: int
    num_classes: int


def load_dataset(name: str = "auto", root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load "digits", "fashion-mnist", or "auto" (Fashion-MNIST when its files are present, else digits)."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download=download)
    if name == "auto":
        present = _fashion_dir(root) is not None
        return load_fashion_mnist(root, download=download) if present or download else load_digits()
    raise ConfigError(f"load_dataset.name must be 'auto', 'digits' or 'fashion-mnist', got {name!r}")


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixel values / 16, with a fixed stratified train / test split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    return Dataset("digits", *map(torch.from_numpy, (train_x, train_y, test_x, test_y)),
                   channels=1, image_size=8, num_classes=10)


def load_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False, *,
                       checksums: Mapping[str, str] = FASHION_MNIST_SHA256,
                       mirror: str = FASHION_MNIST_MIRROR) -> Dataset:
    """Fashion-MNIST from `root` (else the Debian package's folder); `download=True` fetches into `root`.

    `checksums` maps each of the four file names to its SHA-256 (None skips the check for a file).
    """
    folder = _fashion_dir(root)
    if folder is None and download:
        if root is None:
            raise ConfigError("load_fashion_mnist: download=True needs a root folder to download into")
        _download(Path(root), checksums, mirror)
        folder = Path(root)
    if folder is None:
        where = f"in {root}" if root is not None else f"in {DEBIAN_FASHION_MNIST}"
        raise FormatError(f"Fashion-MNIST files not found {where}: install the Debian package "
                          f"dataset-fashion-mnist, or call load_dataset('fashion-mnist', root=DIR, download=True)")
    arrays = {name: read_idx(folder / name, checksums.get(name)) for name in FASHION_MNIST_SHA256}
    train_x, train_y, test_x, test_y = (arrays[n] for n in FASHION_MNIST_SHA256)
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FormatError(f"Fashion-MNIST {split}: {images.shape} images do not pair with {labels.shape} labels")
    side = train_x.shape[1]

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    return Dataset("fashion-mnist", images(train_x), torch.from_numpy(train_y.astype(np.int64)),
                   images(test_x), torch.from_numpy(test_y.astype(np.int64)),
                   channels=1, image_size=side, num_classes=10)


def _fashion_dir(root: str | os.PathLike | None) -> Path | None:
    """The folder holding all four Fashion-MNIST files: `root` if given, else the Debian one."""
    folder = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    return folder if all((folder / name).is_file() for name in FASHION_MNIST_SHA256) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read a gzip-compressed unsigned-byte IDX file, checking its SHA-256 (if given) and its header."""
    path = Path(path)
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise FormatError(f"{path.name}: SHA-256 {actual} does not match the expected {sha256}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FormatError(f"{path.name}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise FormatError(f"{path.name}: truncated before the IDX magic number")
    magic = int.from_bytes(raw[:4], "big")
    rank = magic & 0xFF
    if _IDX_MAGIC.get(rank) != magic:
        raise FormatError(f"{path.name}: bad IDX magic 0x{magic:08x} (expected unsigned-byte data of rank 1 or 3)")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise FormatError(f"{path.name}: truncated inside the IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise FormatError(f"{path.name}: {len(raw) - header} data bytes, but the header {dims} needs {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _download(root: Path, checksums: Mapping[str, str], mirror: str) -> None:
    """Fetch the four files into `root`; each is verified before it is renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_SHA256:
        target = root / name
        if target.is_file():
            continue
        fd, temp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(mirror.rstrip("/") + "/" + name) as src:
                shutil.copyfileobj(src, out)
            expected = checksums.get(name)
            if expected is not None and (actual := sha256_of(Path(temp))) != expected:
                raise FormatError(f"{name}: downloaded file has SHA-256 {actual}, expected {expected}")
            os.replace(temp, target)
        except OSError as exc:
            raise FormatError(f"{name}: download from {mirror} failed ({exc})") from exc
        finally:
            if os.path.exists(temp):
                os.remove(temp)
