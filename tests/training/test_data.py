"""Data: the digits splits and the imagefolder layout checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpcompress.training.data import _split_indices, load_data
from dpcompress.errors import UserError

from tests.digits_helpers import digits16


def test_split_indices_partition_range_and_are_fixed():
    parts = _split_indices(1797, (0.2, 0.1))
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(1797))
    assert [len(p) for p in parts] == [359, 180, 1258]
    assert _split_indices(1797, (0.2, 0.1)) == parts


def test_digits_bundle_shapes_labels_and_determinism():
    data = load_data("digits", (32, 32))
    assert (len(data.train), len(data.holdout), len(data.test)) == (1258, 180, 359)
    assert data.num_classes == 10
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # gray repeated on 3 channels
    again = load_data("digits", (32, 32))
    assert torch.equal(data.test.tensors[0], again.test.tensors[0])
    # Every digit is present in every split.
    for split in (data.train, data.holdout, data.test):
        assert set(split.tensors[1].tolist()) == set(range(10))


def test_digits_at_model_input_size():
    assert digits16().train[0][0].shape == (3, 16, 16)


def _write_images(folder: Path, count: int, color: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(np.full((20, 24, 3), (color + index) % 256, dtype=np.uint8)).save(folder / f"{index}.png")


def test_imagefolder_splits_and_sizes(tmp_path):
    for split, count in (("train", 10), ("val", 3)):
        _write_images(tmp_path / split / "cat", count, 10)
        _write_images(tmp_path / split / "dog", count, 200)
    data = load_data(f"imagefolder:{tmp_path}", (16, 16))
    assert data.num_classes == 2
    assert len(data.train) + len(data.holdout) == 20 and len(data.holdout) == 2
    assert len(data.test) == 6
    assert data.holdout[0][0].shape == (3, 16, 16) and data.train[0][0].shape == (3, 16, 16)
    # The holdout is carved from train with a fixed seed: the same images every time.
    again = load_data(f"imagefolder:{tmp_path}", (16, 16))
    assert data.holdout.indices == again.holdout.indices
    assert not set(data.holdout.indices) & set(data.train.indices)


def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    _write_images(tmp_path / "train" / "cat", 3, 0)
    with pytest.raises(UserError, match="val is missing"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "val").mkdir()  # no class folders inside
    with pytest.raises(UserError, match="ImageFolder|class"):
        load_data(f"imagefolder:{tmp_path}")


def test_unknown_data_spec():
    with pytest.raises(UserError, match="unknown --data"):
        load_data("cifar")
