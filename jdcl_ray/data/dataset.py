"""The one in-memory form every source loads into, and the checks the loaders share.

Images stay uint8 on the CPU: augmentation runs batched on the training device (method.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from jdcl_ray.errors import UserError

_TRAIN_TEST = ("train", "test")


@dataclass
class ImageDataset:
    """Images (uint8, N x C x H x W, C in {1, 3}) with optional int64 labels."""

    images: torch.Tensor
    labels: np.ndarray | None
    class_names: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W)")
        if self.images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: images must have 1 or 3 channels")
        self.images = self.images.contiguous()
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(f"{self.name}: labels must have shape ({len(self.images)},)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def side(self) -> int:
        """The side models are built for (the longer one, for non-square images)."""
        return int(max(self.images.shape[-2:]))

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at ``indices`` (e.g. a long-tailed sample), same classes and name."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[indices]
        return replace(self, images=self.images[torch.from_numpy(indices)], labels=labels)


def _one_line(error: Exception) -> str:
    """A library's error text squeezed onto one line (torchvision's download errors span several)."""
    return " ".join(str(error).split())


def _check_split(split: str, allowed: Sequence[str], what: str) -> None:
    if split not in allowed:
        raise UserError(f"{what} split {split!r} is unknown: expected one of {', '.join(allowed)}")


def _root_path(root: str | Path | None, what: str, expected: str) -> Path:
    if root is None:
        raise UserError(f"{what} needs a root: expected the folder holding {expected}")
    return Path(root).expanduser()


def _require_file(path: Path, what: str, expected: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} file {path} is missing: expected {expected}")
    return path


def _locate(root: Path, folder: str, first_file: str, what: str) -> Path:
    """The extracted ``folder`` given either itself or its parent as ``root``."""
    for base in (root / folder, root):
        if (base / first_file).is_file():
            return base
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist: expected {folder}/ or its contents")
    base = root / folder if (root / folder).is_dir() else root
    raise UserError(f"{what} file {base / first_file} is missing: expected the files of {folder}/")


def _download(dataset_class: Callable[..., object], root: Path, key: str) -> None:
    try:
        dataset_class(str(root), download=True)
    except (OSError, RuntimeError) as error:  # no network, no space, bad checksum
        raise UserError(
            f"{key} download to {root} failed: expected network access, or put the files there "
            f"yourself ({_one_line(error)})"
        ) from error


def _extracted(root: Path, dataset_class: type, first_file: str, what: str, download: bool) -> Path:
    """The extracted folder of a torchvision data set, downloaded first if asked and absent."""
    folder = dataset_class.base_folder
    if download and not any((base / first_file).is_file() for base in (root / folder, root)):
        _download(dataset_class, root, what)
    return _locate(root, folder, first_file, what)


def _check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> np.ndarray:
    if len(labels) != count:
        raise UserError(
            f"label file {path} has {len(labels)} labels, expected {count} (one per image)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"label file {path} has labels {labels.min()}..{labels.max()}: "
            f"expected 0..{num_classes - 1}"
        )
    return labels.astype(np.int64)
