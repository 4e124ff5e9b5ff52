"""CIFAR-10 and CIFAR-100 from their published python pickles."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from jdcl_ray.data.dataset import (
    _TRAIN_TEST,
    ImageDataset,
    _check_labels,
    _check_split,
    _extracted,
    _one_line,
    _require_file,
    _root_path,
)
from jdcl_ray.errors import UserError


def _read_pickle(path: Path, what: str, keys: Sequence[str]) -> dict[str, object]:
    """A CIFAR pickle with byte keys (Python 2 origin) normalised to str keys."""
    _require_file(path, what, f"the python pickles of {path.parent.name}")
    try:
        with path.open("rb") as file:
            raw = pickle.load(file, encoding="bytes")  # the published format is pickle
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UserError(
            f"{what} file {path} is not a readable python pickle ({_one_line(error)})"
        ) from error
    if not isinstance(raw, dict):
        raise UserError(f"{what} file {path} holds a {type(raw).__name__}: expected a dict")
    entry = {_text(key): value for key, value in raw.items()}
    missing = [key for key in keys if key not in entry]
    if missing:
        raise UserError(
            f"{what} file {path} lacks key(s) {', '.join(missing)}: found {', '.join(entry)}"
        )
    return entry


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_cifar(
    base: Path, files: Sequence[str], meta: str, label_key: str, names_key: str, what: str
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    class_names = [_text(name) for name in _read_pickle(base / meta, what, [names_key])[names_key]]
    images, labels = [], []
    for file in files:
        path = base / file
        batch = _read_pickle(path, what, ["data", label_key])
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(
                f"{what} file {path} has data of shape {data.shape}: expected (N, 3072)"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(
            _check_labels(np.asarray(batch[label_key]), len(data), len(class_names), path)
        )
    return torch.from_numpy(np.concatenate(images)), np.concatenate(labels), class_names


def load_cifar10(root: str | Path, split: str = "train", download: bool = False) -> ImageDataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (``root`` is that folder or its parent)."""
    from torchvision.datasets import CIFAR10

    root = _root_path(root, "cifar10", "cifar-10-batches-py")
    _check_split(split, _TRAIN_TEST, "cifar10")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    base = _extracted(root, CIFAR10, files[0], "CIFAR-10", download)
    images, labels, names = _read_cifar(
        base, files, "batches.meta", "labels", "label_names", "CIFAR-10"
    )
    return ImageDataset(images, labels, names, f"cifar10/{split}")


def load_cifar100(
    root: str | Path, split: str = "train", label: str = "fine", download: bool = False
) -> ImageDataset:
    """CIFAR-100 from ``cifar-100-python``: 100 ``fine`` classes or 20 ``coarse`` super-classes."""
    from torchvision.datasets import CIFAR100

    root = _root_path(root, "cifar100", "cifar-100-python")
    _check_split(split, _TRAIN_TEST, "cifar100")
    if label not in ("fine", "coarse"):
        raise UserError(f"cifar100 label {label!r} is unknown: expected fine or coarse")
    base = _extracted(root, CIFAR100, split, "CIFAR-100", download)
    images, labels, names = _read_cifar(
        base, [split], "meta", f"{label}_labels", f"{label}_label_names", "CIFAR-100"
    )
    key = "cifar100" if label == "fine" else "cifar100_coarse"
    return ImageDataset(images, labels, names, f"{key}/{split}")
