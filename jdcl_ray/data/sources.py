"""Image sources: every supported data set read into one in-memory ``ImageDataset``.

Each loader reads the files in their published on-disk format from a local folder, so runs work on
machines without internet; ``download=True`` hands the fetching to torchvision for users who have it.
Images stay uint8 on the CPU: augmentation runs batched on the training device (method.md).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import io
import json
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from jdcl_ray.errors import UserError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
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

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at ``indices`` (e.g. a long-tailed sample), same classes and name."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[indices]
        return replace(self, images=self.images[torch.from_numpy(indices)], labels=labels)


# --- shared checks ---------------------------------------------------------------------------


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


# --- scikit-learn digits ---------------------------------------------------------------------


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


# --- MNIST / Fashion-MNIST (IDX) -------------------------------------------------------------

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


def _download(dataset_class: Callable[..., object], root: Path, key: str) -> None:
    try:
        dataset_class(str(root), download=True)
    except (OSError, RuntimeError) as error:  # no network, no space, bad checksum
        raise UserError(
            f"{key} download to {root} failed: expected network access, or put the files there "
            f"yourself ({_one_line(error)})"
        ) from error


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


# --- CIFAR-10 / CIFAR-100 (python pickles) ---------------------------------------------------


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


# --- STL-10 (binary) -------------------------------------------------------------------------

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


# --- decoded images: folders and Parquet share one decoder -----------------------------------


@contextmanager
def _open_image(where: str, source: Path | bytes) -> Iterator[Image.Image]:
    """An opened image; any decode failure becomes a UserError naming ``where``."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            yield image
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(
            f"image {where} cannot be read: expected a valid PNG/JPEG/BMP/WebP ({_one_line(error)})"
        ) from error


def decode_images(
    sources: Sequence[tuple[str, Path | bytes]], image_size: int | None, channels: int | None
) -> torch.Tensor:
    """Decode ``(where, file or bytes)`` pairs to uint8 (N, C, H, W).

    A first pass reads only headers, to pick the channel count and check sizes before any
    pixels are decoded; the second decodes into one preallocated array.
    """
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise UserError(f"image_size {image_size!r} is invalid: expected a positive integer")
    if channels not in (None, 1, 3):
        raise UserError(f"channels {channels!r} is invalid: expected 1 or 3")
    headers = []
    for where, source in sources:
        with _open_image(where, source) as image:
            headers.append((image.mode, image.size))
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for mode, _ in headers) else 3
    width, height = (image_size, image_size) if image_size else headers[0][1]
    if image_size is None:
        for (where, _), (_, size) in zip(sources, headers, strict=True):
            if size != (width, height):
                raise UserError(
                    f"image {where} is {size[0]}x{size[1]} but {sources[0][0]} is "
                    f"{width}x{height}: expected one size for all images, or set image_size"
                )
    pixels = np.empty((len(sources), height, width, channels), dtype=np.uint8)
    for index, (where, source) in enumerate(sources):
        with _open_image(where, source) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            pixels[index] = np.asarray(image).reshape(height, width, channels)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def _is_visible_image(path: Path, folder: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file()


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if _is_visible_image(path, folder))


def load_image_folder(
    root: str | Path, image_size: int | None = None, channels: int | None = None
) -> ImageDataset:
    """One sub-folder per class (sorted names give the labels) or a flat, unlabelled folder."""
    root = _root_path(root, "image folder", "images or one sub-folder of images per class")
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: expected a folder of images")
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    top_level = [path for path in root.iterdir() if _is_visible_image(path, root)]
    if classes and top_level:
        raise UserError(
            f"image folder {root} has both images ({top_level[0].name}) and class sub-folders: "
            "expected one or the other"
        )
    if classes:
        per_class = [_image_files(root / name) for name in classes]
        for name, files in zip(classes, per_class, strict=True):
            if not files:
                raise UserError(f"class folder {root / name} has no images: expected .png/.jpg/...")
        files = [path for paths in per_class for path in paths]
        labels = np.repeat(np.arange(len(classes)), [len(paths) for paths in per_class])
    else:
        files, labels = sorted(top_level), None
        if not files:
            raise UserError(
                f"image folder {root} has no images: expected {', '.join(sorted(IMAGE_EXTENSIONS))} "
                "files or class sub-folders"
            )
    images = decode_images([(str(path), path) for path in files], image_size, channels)
    return ImageDataset(images, labels, classes, f"folder/{root.name}")


def _parquet_class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """ClassLabel names that Hugging Face datasets stores in the Parquet metadata, if any."""
    metadata = (schema.metadata or {}).get(b"huggingface")
    if metadata is None:
        return None
    try:
        feature = json.loads(metadata)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(name) for name in names] if names else None


def _parquet_labels(
    column: pa.ChunkedArray, path: Path, name: str, schema: pa.Schema
) -> tuple[np.ndarray, list[str]]:
    if column.null_count:
        raise UserError(f"Parquet file {path} column {name!r} has {column.null_count} empty labels")
    if pa.types.is_integer(column.type):
        labels = column.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise UserError(f"Parquet file {path} column {name!r} has negative labels")
        names = _parquet_class_names(schema, name)
        count = int(labels.max()) + 1 if len(labels) else 0
        if names is None or len(names) < count:
            names = [str(label) for label in range(count)]
        return labels, names
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        names, labels = np.unique(np.asarray(column.to_pylist(), dtype=object), return_inverse=True)
        return labels.astype(np.int64).reshape(-1), [str(name) for name in names]
    raise UserError(
        f"Parquet file {path} column {name!r} has type {column.type}: expected integers or strings"
    )


def parquet_image_bytes(column: pa.ChunkedArray, path: Path, name: str) -> list[bytes]:
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks])
        kind = column.type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise UserError(
            f"Parquet file {path} column {name!r} has type {column.type}: expected encoded image "
            "bytes or a struct with a 'bytes' field"
        )
    values = column.to_pylist()
    empty = next((row for row, value in enumerate(values) if value is None), None)
    if empty is not None:
        raise UserError(f"Parquet file {path} column {name!r} row {empty} has no image bytes")
    return values


def load_parquet(
    path: str | Path,
    image_column: str = "image",
    label_column: str | None = "label",
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """A Parquet table of encoded images (e.g. a Hugging Face export).

    A missing column under the default name ``label`` means an unlabelled set; any other
    ``label_column`` that is missing is a mistake.
    """
    path = _root_path(path, "parquet", "a .parquet file")
    if not path.is_file():
        raise UserError(f"Parquet file {path} does not exist: expected a .parquet file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(
            f"Parquet file {path} cannot be read: expected Parquet ({_one_line(error)})"
        ) from error
    if image_column not in schema.names:
        raise UserError(
            f"Parquet file {path} has no image column {image_column!r}: "
            f"found {', '.join(schema.names)}"
        )
    if label_column is not None and label_column not in schema.names:
        if label_column != "label":
            raise UserError(
                f"Parquet file {path} has no label column {label_column!r}: "
                f"found {', '.join(schema.names)}"
            )
        label_column = None
    columns = [image_column] + ([label_column] if label_column else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise UserError(
            f"Parquet file {path} cannot be read: expected Parquet ({_one_line(error)})"
        ) from error
    if table.num_rows == 0:
        raise UserError(f"Parquet file {path} has no rows: expected at least one image")
    blobs = parquet_image_bytes(table.column(image_column), path, image_column)
    images = decode_images(
        [(f"{path} row {row}", blob) for row, blob in enumerate(blobs)], image_size, channels
    )
    labels, class_names = None, []
    if label_column:
        labels, class_names = _parquet_labels(
            table.column(label_column), path, label_column, schema
        )
    return ImageDataset(images, labels, class_names, f"parquet/{path.stem}")


# --- one entry point -------------------------------------------------------------------------


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
        raise UserError(
            f"image folder {folder} has no {split}/ sub-folder: expected {folder / split}, "
            "or give the folder of that split as root with split train"
        )
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
        raise UserError(
            f"parquet split {split!r} is not supported: give the file of that split as root "
            "with split train"
        )
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
