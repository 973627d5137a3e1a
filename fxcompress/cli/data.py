"""The data sets a recipe can name: fxcompress.datasets' own, plus MNIST, CIFAR-10 / 100 in their binary
form and a folder of images, all read offline into a `fxcompress.datasets.Dataset`.

The table `DATASETS` gives, per name, its loader and its shape (channels, side, classes) known without
reading anything, so a recipe's model is built and checked before any file is opened.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..datasets import FASHION_MNIST_SHA256, Dataset, load_digits, load_fashion_mnist, read_idx
from ..errors import FormatError, MissingDependencyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_CIFAR_RECORD = 3 * 32 * 32


@dataclass(frozen=True)
class Shape:
    channels: int
    image_size: int | None  # None: read from the files (image folders)
    num_classes: int | None


@dataclass(frozen=True)
class DataKind:
    load: Callable[[Path | None, int | None], Dataset]  # (root, image size) -> Dataset
    shape: Shape
    needs_root: bool
    files: tuple[str, ...] = ()  # what must be in root (checked before any work)

    def why_not_resized(self, name: str) -> str | None:
        """Why an image size given for this data set would be ignored (None: its images are resized)."""
        side = self.shape.image_size
        if side is None:
            return None
        return f"{name} images are {side}x{side} and are not resized (only image-folder takes an image size)"


def _digits(root, size) -> Dataset:
    return load_digits()


def _fashion(root, size) -> Dataset:
    return load_fashion_mnist(root)


def _mnist(root, size) -> Dataset:
    """MNIST's four IDX files carry the same names as Fashion-MNIST's; no checksum (mirrors differ)."""
    data = load_fashion_mnist(root, checksums={name: None for name in FASHION_MNIST_SHA256})
    return replace(data, name="mnist")


def _cifar_records(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_RECORD
    if raw.size == 0 or raw.size % record:
        raise FormatError(f"{path.name}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    raw = raw.reshape(-1, record)
    # CIFAR-100 records start with the coarse label, then the fine one (the one used here)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_bytes - 1].astype(np.int64)


def _cifar(name: str, train: tuple[str, ...], test: tuple[str, ...], label_bytes: int, classes: int):
    def load(root: Path, size) -> Dataset:
        parts = {split: [_cifar_records(root / f, label_bytes) for f in files]
                 for split, files in (("train", train), ("test", test))}
        arrays = []
        for split in ("train", "test"):
            images = np.concatenate([x for x, _ in parts[split]])
            labels = np.concatenate([y for _, y in parts[split]])
            if labels.max(initial=0) >= classes:
                raise FormatError(f"{name} {split}: label {labels.max()} out of range for {classes} classes")
            arrays += [torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels)]
        return Dataset(name, *arrays, channels=3, image_size=32, num_classes=classes)
    return load


def _folder_split(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError("image folders need Pillow: pip install pillow") from exc
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((folder / cls).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(file) as image:
                        pixels = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32)
                except OSError as exc:
                    raise FormatError(f"{file}: not a readable image ({exc})") from None
                images.append(pixels.transpose(2, 0, 1) / 255.0)
                labels.append(label)
    if not images:
        raise FormatError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def _image_folder(root: Path, size: int) -> Dataset:
    """root/train/<class>/*.png and root/test/<class>/*.png (torchvision's ImageFolder layout, split in two)."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise FormatError(f"{root / 'train'}: no class folders")
    missing = [c for c in classes if not (root / "test" / c).is_dir()]
    if missing:
        raise FormatError(f"{root / 'test'}: class folders {missing} of train/ are missing")
    train_x, train_y = _folder_split(root / "train", classes, size)
    test_x, test_y = _folder_split(root / "test", classes, size)
    return Dataset(root.name, train_x, train_y, test_x, test_y, channels=3, image_size=size,
                   num_classes=len(classes))


_IDX = tuple(FASHION_MNIST_SHA256)
_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))

DATASETS: dict[str, DataKind] = {
    "digits": DataKind(_digits, Shape(1, 8, 10), needs_root=False),
    "fashion-mnist": DataKind(_fashion, Shape(1, 28, 10), needs_root=False),  # default: the Debian package
    "mnist": DataKind(_mnist, Shape(1, 28, 10), needs_root=True, files=_IDX),
    "cifar-10": DataKind(_cifar("cifar-10", _CIFAR10_TRAIN, ("test_batch.bin",), 1, 10), Shape(3, 32, 10),
                         needs_root=True, files=(*_CIFAR10_TRAIN, "test_batch.bin")),
    "cifar-100": DataKind(_cifar("cifar-100", ("train.bin",), ("test.bin",), 2, 100), Shape(3, 32, 100),
                          needs_root=True, files=("train.bin", "test.bin")),
    "image-folder": DataKind(_image_folder, Shape(3, None, None), needs_root=True, files=("train", "test")),
}


def image_folder_classes(root: Path) -> int:
    """The class count of an image folder, read from its train/ sub-folders (no image is opened)."""
    return len([p for p in (root / "train").iterdir() if p.is_dir()])


def as_channels(data: Dataset, channels: int) -> Dataset:
    """Grey images repeated to `channels` (a 3-channel model on digits); other counts must match."""
    if data.channels == channels:
        return data
    if data.channels != 1:
        raise FormatError(f"data {data.name}: {data.channels}-channel images cannot become {channels} channels")
    grow = (lambda x: x.repeat(1, channels, 1, 1))
    return replace(data, train_x=grow(data.train_x), test_x=grow(data.test_x), channels=channels)


def subset(data: Dataset, train: int | None, test: int | None) -> Dataset:
    """The first `train` / `test` examples (quick runs); a fixed slice, so reruns see the same data."""
    return replace(data, train_x=data.train_x[:train], train_y=data.train_y[:train],
                   test_x=data.test_x[:test], test_y=data.test_y[:test])
