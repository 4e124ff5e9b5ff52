"""MNIST and Fashion-MNIST: the IDX files torchvision and Debian publish them in."""

from __future__ import annotations

import gzip
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from jdcl_ray.data.dataset import (
    _TRAIN_TEST,
    ImageDataset,
    _check_labels,
    _check_split,
    _download,
    _one_line,
    _require_file,
    _root_path,
)
from jdcl_ray.errors import UserError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_path(root: Path, stem: str) -> Path:
    """``stem`` itself or its ``.gz``; the plain name when neither exists (for the error)."""
    gz = root / f"{stem}.gz"
    return gz if gz.is_file() and not (root / stem).is_file() else root / stem


def _read_idx(path: Path) -> np.ndarray:
    """One uint8 IDX array; header parsed here so a broken file names itself."""
    _require_file(path, "IDX", "an MNIST-style IDX file (plain or .gz)")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise UserError(
            f"IDX file {path} cannot be decompressed: expected gzip ({_one_line(error)})"
        ) from error
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"IDX file {path} has no uint8 IDX header: expected magic 00 00 08 <ndim>")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise UserError(
            f"IDX file {path} is truncated: expected {header} header bytes, found {len(data)}"
        )
    dims = struct.unpack(f">{data[3]}I", data[4:header])
    expected, found = int(np.prod(dims)), len(data) - header
    if found != expected:
        raise UserError(
            f"IDX file {path} has {found} data bytes, expected {expected} for shape {dims} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_idx(root: str | Path, split: str = "train") -> ImageDataset:
    """MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) in ``root``."""
    root = _root_path(root, "IDX data set", "train-/t10k-images-idx3-ubyte[.gz]")
    _check_split(split, _TRAIN_TEST, "IDX")
    if not root.is_dir():
        raise UserError(f"IDX folder {root} does not exist: expected the MNIST-style IDX files")
    prefix = _IDX_PREFIX[split]
    images = _read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"))
    labels_path = _idx_path(root, f"{prefix}-labels-idx1-ubyte")
    raw_labels = _read_idx(labels_path)
    if images.ndim != 3 or raw_labels.ndim != 1:
        raise UserError(
            f"IDX files in {root} have shapes {images.shape} and {raw_labels.shape}: "
            "expected (N, H, W) images and (N,) labels"
        )
    num_classes = int(raw_labels.max()) + 1 if len(raw_labels) else 0
    labels = _check_labels(raw_labels, len(images), num_classes, labels_path)
    return ImageDataset(
        images=torch.from_numpy(images[:, None]),
        labels=labels,
        class_names=[str(label) for label in range(num_classes)],
        name=f"{root.name}/{split}",
    )


def _load_torchvision_idx(
    dataset_class: type, key: str, root: Path, split: str, download: bool, hint: str
) -> ImageDataset:
    """IDX files in ``root`` or in torchvision's ``root/<Class>/raw``, downloading if asked."""
    _check_split(split, _TRAIN_TEST, key)
    raw = root / dataset_class.__name__ / "raw"
    stem = f"{_IDX_PREFIX[split]}-images-idx3-ubyte"
    folder = next((base for base in (root, raw) if _idx_path(base, stem).is_file()), None)
    if folder is None and download:
        _download(dataset_class, root, key)
        folder = raw
    if folder is None:
        raise UserError(
            f"{key} file {root / stem}[.gz] is missing: expected it there or in {raw}; {hint}"
        )
    dataset = load_idx(folder, split)
    return replace(dataset, class_names=list(dataset_class.classes), name=f"{key}/{split}")


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = False
) -> ImageDataset:
    """Fashion-MNIST; by default from Debian's ``dataset-fashion-mnist`` package."""
    from torchvision.datasets import FashionMNIST

    return _load_torchvision_idx(
        FashionMNIST,
        "fashion_mnist",
        Path(root or FASHION_MNIST_ROOT).expanduser(),
        split,
        download,
        "install Debian's dataset-fashion-mnist, or pass a root (with download=True to fetch it)",
    )


def load_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = False
) -> ImageDataset:
    """MNIST from its IDX files in ``root`` (no package ships it: give a root)."""
    from torchvision.datasets import MNIST

    root = _root_path(root, "mnist", "the MNIST IDX files (or where to download them)")
    return _load_torchvision_idx(
        MNIST, "mnist", root, split, download, "pass download=True to fetch the files there"
    )
