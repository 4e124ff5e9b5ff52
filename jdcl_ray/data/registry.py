"""Data sets by their config name, so a config picks its source and options as plain data."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

from jdcl_ray.data.cifar import load_cifar10, load_cifar100
from jdcl_ray.data.dataset import ImageDataset, _root_path
from jdcl_ray.data.digits import load_digits
from jdcl_ray.data.idx import load_fashion_mnist, load_mnist
from jdcl_ray.data.images import load_image_folder
from jdcl_ray.data.parquet import load_parquet
from jdcl_ray.data.stl import load_stl10
from jdcl_ray.errors import UserError


class MissingSplit(UserError):
    """The source has no such split (a folder without test/, a single Parquet table)."""


def _digits_entry(root: str | Path | None, split: str) -> ImageDataset:
    return load_digits(split)  # ships with scikit-learn: root is not needed


def _folder_entry(
    root: str | Path | None, split: str, image_size: int | None = None, channels: int | None = None
) -> ImageDataset:
    """``root/<split>/`` when it exists (train/ test/ layouts), else ``root`` itself for train."""
    folder = _root_path(root, "folder", "images or one sub-folder of images per class")
    if (folder / split).is_dir():
        folder = folder / split
    elif split != "train":
        raise MissingSplit(f"image folder {folder} has no {split}/ sub-folder")
    return load_image_folder(folder, image_size, channels)


def _parquet_entry(
    root: str | Path | None,
    split: str,
    image_column: str = "image",
    label_column: str | None = "label",
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    if split != "train":
        raise MissingSplit(f"a Parquet table {root} is one split, not {split}")
    return load_parquet(root, image_column, label_column, image_size, channels)


LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "digits": _digits_entry,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "cifar100_coarse": functools.partial(load_cifar100, label="coarse"),
    "stl10": load_stl10,
    "folder": _folder_entry,
    "parquet": _parquet_entry,
}


def load_dataset(
    name: str, root: str | Path | None = None, split: str = "train", **options: object
) -> ImageDataset:
    """Load a data set by its config name; unknown names and options are UserErrors."""
    loader = LOADERS.get(name)
    if loader is None:
        raise UserError(f"dataset {name!r} is unknown: expected one of {', '.join(LOADERS)}")
    signature = inspect.signature(loader)
    try:
        signature.bind(root, split, **options)
    except TypeError:
        accepted = [key for key in signature.parameters if key not in ("root", "split")]
        unknown = ", ".join(sorted(set(options) - set(accepted)))
        raise UserError(
            f"dataset {name!r} does not take option(s) {unknown}: expected "
            f"{', '.join(accepted) or 'no options'}"
        ) from None
    return loader(root, split, **options)
