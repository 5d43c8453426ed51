"""Datasets for training, importance and evaluation: ``--data digits`` and ``--data imagefolder:DIR``.

Every dataset comes as a :class:`DataBundle` with three fixed splits: ``train`` (fine-tuning),
``holdout`` (importance measurements, carved from the training data so the test split stays
untouched) and ``test`` (reported accuracy). Splits are seeded, so every process of a
``torchrun`` job and every resumed run sees the same images in the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from dpcompress.errors import UserError

# Seed of every split: fixed, so tables and checkpoints stay comparable between runs.
SPLIT_SEED = 0
# ImageNet channel statistics, the convention of torchvision's pretrained models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    spec: str
    train: Any  # torch.utils.data.Dataset of (image, label)
    holdout: Any
    test: Any
    num_classes: Optional[int]  # None where the datasets do not say (in-memory datasets)
    input_size: Tuple[int, int]


def load_data(spec: str, input_size: Sequence[int] = (32, 32)) -> DataBundle:
    """The dataset named by ``spec`` with images of ``input_size`` (H, W).

    ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled, 3 channels;
    ``imagefolder:DIR``: ``DIR/train`` and ``DIR/val`` in torchvision ImageFolder layout.
    """
    size = (int(input_size[0]), int(input_size[1]))
    if spec == "digits":
        return _digits(size)
    if spec.startswith("imagefolder:"):
        return _imagefolder(spec, Path(spec[len("imagefolder:"):]), size)
    raise UserError(f"unknown --data {spec!r}; use 'digits' or 'imagefolder:DIR'")


def bundle_from_datasets(train: Any, validation: Any, input_size: Sequence[int]) -> DataBundle:
    """A DataBundle from in-memory ``(train, validation)`` Datasets (or DataLoaders, whose datasets are
    used): a seeded tenth of ``train`` is held out for importance and fine-tuning checks, ``validation``
    is the test split."""
    from torch.utils.data import DataLoader, Subset

    train, validation = (d.dataset if isinstance(d, DataLoader) else d for d in (train, validation))
    for name, dataset in (("train", train), ("validation", validation)):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise UserError(f"data: the {name} set is a {type(dataset).__name__}, not a map-style Dataset "
                            "(or a DataLoader over one)")
    holdout_idx, train_idx = _split_indices(len(train), (0.1,))
    if not train_idx or not holdout_idx:
        raise UserError(f"data: the train set has {len(train)} items, too few to carve a holdout split")
    return DataBundle("in-memory datasets", Subset(train, train_idx), Subset(train, holdout_idx), validation,
                      None, (int(input_size[0]), int(input_size[1])))


def parse_input_size(input_shape: Sequence[int]) -> Tuple[int, int]:
    """(H, W) of an N,C,H,W input shape."""
    if len(input_shape) != 4:
        raise UserError(f"input shape {tuple(input_shape)} is not N,C,H,W")
    return int(input_shape[2]), int(input_shape[3])


def _split_indices(n: int, fractions: Sequence[float]) -> Tuple[Any, ...]:
    """A seeded permutation of range(n) cut into len(fractions)+1 parts (the rest last)."""
    import numpy as np

    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    parts, start = [], 0
    for fraction in fractions:
        count = int(round(n * fraction))
        parts.append(order[start:start + count].tolist())
        start += count
    parts.append(order[start:].tolist())
    return tuple(parts)


def _digits(size: Tuple[int, int]) -> DataBundle:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0, 1]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    test_idx, holdout_idx, train_idx = _split_indices(len(labels), (0.2, 0.1))

    def subset(idx: Sequence[int]) -> TensorDataset:
        index = torch.tensor(idx, dtype=torch.long)
        return TensorDataset(images[index], labels[index])

    return DataBundle("digits", subset(train_idx), subset(holdout_idx), subset(test_idx), 10, size)


def _imagefolder(spec: str, root: Path, size: Tuple[int, int]) -> DataBundle:
    from torch.utils.data import Subset

    from dpcompress.tv_compat import import_torchvision

    if not root.is_dir():
        raise UserError(f"--data {spec}: directory {root} does not exist")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"--data {spec}: {root / split} is missing; expected DIR/train/<class>/*.jpg "
                            "and DIR/val/<class>/*.jpg (torchvision ImageFolder layout)")
    tv = import_torchvision()
    transforms = tv.transforms
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    # Resize to 1/0.875 of the crop, then centre-crop: torchvision's evaluation recipe.
    resize = tuple(int(round(s / 0.875)) for s in size)
    eval_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                                  transforms.ToTensor(), normalize])
    try:
        train_aug = tv.datasets.ImageFolder(str(root / "train"), transform=train_tf)
        train_eval = tv.datasets.ImageFolder(str(root / "train"), transform=eval_tf)
        val = tv.datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders or no images in them
        raise UserError(f"--data {spec}: {err}; expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg") from err
    if val.classes != train_aug.classes:
        raise UserError(f"--data {spec}: train/ and val/ hold different class folders "
                        f"({len(train_aug.classes)} vs {len(val.classes)}); they must match")
    holdout_idx, train_idx = _split_indices(len(train_aug), (0.1,))
    if not train_idx or not holdout_idx:
        raise UserError(f"--data {spec}: train/ has {len(train_aug)} images, too few to carve a holdout split")
    return DataBundle(spec, Subset(train_aug, train_idx), Subset(train_eval, holdout_idx), val,
                      len(train_aug.classes), size)
