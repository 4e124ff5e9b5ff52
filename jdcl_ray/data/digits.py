"""scikit-learn's digits: a set that needs no files, for quick starts."""

from __future__ import annotations

import numpy as np
import torch

from jdcl_ray.data.dataset import ImageDataset, _check_split


def load_digits(split: str = "train") -> ImageDataset:
    """scikit-learn's 8x8 digits (always installed): the quick-start set.

    Split is deterministic so every run and machine sees the same test images:
    ``train`` = i % 5 != 0, ``test`` = i % 5 == 0, ``all`` = everything.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_split(split, ("train", "test", "all"), "digits")
    bunch = sklearn_digits()
    keep = np.arange(len(bunch.images))
    if split != "all":
        keep = keep[(keep % 5 == 0) == (split == "test")]
    pixels = np.rint(bunch.images[keep] * (255 / 16)).astype(np.uint8)
    return ImageDataset(
        images=torch.from_numpy(pixels[:, None]),
        labels=bunch.target[keep].astype(np.int64),
        class_names=[str(digit) for digit in range(10)],
        name=f"digits/{split}",
    )
