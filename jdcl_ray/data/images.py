"""Encoded image files: one decoder shared by image folders, Parquet and prediction."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jdcl_ray.data.dataset import ImageDataset, _one_line, _root_path
from jdcl_ray.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


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


MIXED_SIZE_MAX_SIDE = 128


def mixed_size_side(sizes: Sequence[tuple[int, int]]) -> int:
    """The square side images of mixed sizes are resized to (unless image_size is set): their
    median shorter side, at most 128 px, so that a folder of photos fits in memory."""
    return int(min(MIXED_SIZE_MAX_SIDE, np.median([min(size) for size in sizes])))


def image_header(where: str, source: Path | bytes) -> tuple[str, tuple[int, int]]:
    """An image's mode and (width, height), from its header only."""
    with _open_image(where, source) as image:
        return image.mode, image.size


def decoded_shape(
    headers: Sequence[tuple[str, tuple[int, int]]], image_size: int | None, channels: int | None
) -> tuple[int, tuple[int, int]]:
    """Channels and (width, height) that images with these headers are decoded to: grey when
    all are grey; their own size when all agree, else ``mixed_size_side``."""
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for mode, _ in headers) else 3
    if image_size is None and len({size for _, size in headers}) > 1:
        image_size = mixed_size_side([size for _, size in headers])
    return channels, (image_size, image_size) if image_size else headers[0][1]


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
    headers = [image_header(where, source) for where, source in sources]
    channels, (width, height) = decoded_shape(headers, image_size, channels)
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


def folder_files(root: Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """The image files of ``root`` in order, their labels and the class names: one sub-folder
    per class (sorted names give the labels) or a flat, unlabelled folder."""
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
        return files, labels, classes
    if not top_level:
        raise UserError(
            f"image folder {root} has no images: expected {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "files or class sub-folders"
        )
    return sorted(top_level), None, []


def load_image_folder(
    root: str | Path, image_size: int | None = None, channels: int | None = None
) -> ImageDataset:
    """One sub-folder per class (sorted names give the labels) or a flat, unlabelled folder."""
    root = _root_path(root, "image folder", "images or one sub-folder of images per class")
    files, labels, classes = folder_files(root)
    images = decode_images([(str(path), path) for path in files], image_size, channels)
    return ImageDataset(images, labels, classes, f"folder/{root.name}")
