"""STL-10 from its published column-major binaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jdcl_ray.data.dataset import (
    ImageDataset,
    _check_labels,
    _check_split,
    _extracted,
    _require_file,
    _root_path,
)
from jdcl_ray.errors import UserError

_STL_SIDE = 96


def _read_stl_images(path: Path) -> np.ndarray:
    """Column-major STL-10 images, transposed to row-major without a second full copy."""
    per_image = 3 * _STL_SIDE * _STL_SIDE
    size = _require_file(path, "STL-10", "the binaries of stl10_binary").stat().st_size
    if size == 0 or size % per_image:
        raise UserError(
            f"STL-10 file {path} has {size} bytes: expected a positive multiple of {per_image} "
            "(3x96x96 per image; truncated?)"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _STL_SIDE, _STL_SIDE)
    images = np.empty(raw.shape, dtype=np.uint8)
    np.copyto(images, raw.transpose(0, 1, 3, 2))
    return images


def load_stl10(root: str | Path, split: str = "train", download: bool = False) -> ImageDataset:
    """STL-10 from ``stl10_binary``; the ``unlabeled`` split (100k images) has labels None."""
    from torchvision.datasets import STL10

    root = _root_path(root, "stl10", "stl10_binary")
    _check_split(split, ("train", "test", "unlabeled"), "stl10")
    base = _extracted(root, STL10, f"{split}_X.bin", "STL-10", download)
    images = _read_stl_images(base / f"{split}_X.bin")
    names_path = _require_file(base / "class_names.txt", "STL-10", "one class name a line")
    class_names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    labels = None
    if split != "unlabeled":
        labels_path = _require_file(
            base / f"{split}_y.bin", "STL-10", "labels 1..10, one byte each"
        )
        one_based = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)
        labels = _check_labels(one_based - 1, len(images), len(class_names), labels_path)
    return ImageDataset(torch.from_numpy(images), labels, class_names, f"stl10/{split}")
