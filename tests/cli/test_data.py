"""The data sets a recipe can name beyond fxcompress.datasets': MNIST's IDX files, CIFAR-10 / 100 in their
binary form and image folders, read from small files written here, byte for byte."""
import gzip

import numpy as np
import pytest
import torch

from fxcompress.cli.data import DATASETS, as_channels, subset
from fxcompress.cli.recipe import load_recipe
from fxcompress.cli.run import check_files, data_shape
from fxcompress.datasets import load_digits
from fxcompress.errors import ConfigError, FormatError, MissingDependencyError

RNG = np.random.default_rng(0)


def _cifar_file(path, count, label_bytes, classes):
    labels = RNG.integers(0, classes, size=(count, label_bytes), dtype=np.uint8)
    images = RNG.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
    path.write_bytes(np.concatenate([labels, images], axis=1).tobytes())
    return labels[:, -1], images.reshape(count, 3, 32, 32)


def test_cifar10_binary_batches(tmp_path):
    parts = [_cifar_file(tmp_path / f"data_batch_{i}.bin", 3, 1, 10) for i in range(1, 6)]
    test_labels, test_images = _cifar_file(tmp_path / "test_batch.bin", 4, 1, 10)
    data = DATASETS["cifar-10"].load(tmp_path, 32)
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert torch.equal(data.train_y, torch.from_numpy(np.concatenate([y for y, _ in parts]).astype(np.int64)))
    assert torch.equal(data.test_x, torch.from_numpy(test_images.astype(np.float32) / 255))
    assert data.num_classes == 10 and data.channels == 3


def test_cifar100_uses_the_fine_label(tmp_path):
    fine, _ = _cifar_file(tmp_path / "train.bin", 5, 2, 100)
    _cifar_file(tmp_path / "test.bin", 2, 2, 100)
    data = DATASETS["cifar-100"].load(tmp_path, 32)
    assert torch.equal(data.train_y, torch.from_numpy(fine.astype(np.int64))) and data.num_classes == 100


def test_a_truncated_cifar_file_is_refused_by_name(tmp_path):
    _cifar_file(tmp_path / "train.bin", 2, 2, 100)
    (tmp_path / "test.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(FormatError, match="test.bin: 100 bytes is not a whole number of 3074-byte CIFAR records"):
        DATASETS["cifar-100"].load(tmp_path, 32)


def _idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_without_checksums(tmp_path):
    images = RNG.integers(0, 256, size=(6, 28, 28))
    for split, count in (("train", 6), ("t10k", 6)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:count])
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(count))
    data = DATASETS["mnist"].load(tmp_path, 28)
    assert data.name == "mnist" and data.train_x.shape == (6, 1, 28, 28)
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(images.astype(np.float32) / 255))


def test_image_folder(tmp_path):
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional: without it the folder is refused with the install hint
        for split in ("train", "test"):
            (tmp_path / split / "red").mkdir(parents=True)
            (tmp_path / split / "red" / "a.png").write_bytes(b"")
        with pytest.raises(MissingDependencyError, match="pip install pillow"):
            DATASETS["image-folder"].load(tmp_path, 6)
        return
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for split in ("train", "test"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (10, 7), colour).save(tmp_path / split / name / "a.png")
    data = DATASETS["image-folder"].load(tmp_path, 6)
    assert data.train_x.shape == (2, 3, 6, 6) and data.num_classes == 2
    assert data.train_y.tolist() == [0, 1]  # classes in sorted order: blue, red
    assert torch.equal(data.train_x[0, 2], torch.ones(6, 6)) and torch.equal(data.train_x[1, 0], torch.ones(6, 6))


def test_grey_images_become_three_channels_and_subsets_are_prefixes():
    digits = load_digits()
    rgb = as_channels(digits, 3)
    assert rgb.train_x.shape[1] == 3 and all(torch.equal(rgb.train_x[:, c], digits.train_x[:, 0]) for c in range(3))
    small = subset(digits, 10, 5)
    assert torch.equal(small.train_y, digits.train_y[:10]) and len(small.test_x) == 5


def test_a_missing_data_root_is_reported_at_its_line(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(f"""
        model: zoo:resnet
        data:
          name: cifar-10
          root: {tmp_path / 'nowhere'}
        steps:
          - pass: FoldBatchNorm
        """))
    assert data_shape(recipe) == (3, 32, 10)
    with pytest.raises(ConfigError, match=r"recipe.yaml:4: data.root .* does not hold data_batch_1.bin"):
        check_files(recipe)
