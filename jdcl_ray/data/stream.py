"""Image sets read chunk by chunk (``data.stream``), for sets larger than memory.

The driver learns what it must before any pixel is decoded: the file list or the Parquet row
groups, the labels (one small column), the long-tailed draw by index, and the size and channels
every image is decoded to. The pixels are read one chunk at a time, here in plain Python; Ray
Data runs this reading on its workers and shards it across the training workers
(``jdcl_ray/streaming.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jdcl_ray import storage
from jdcl_ray.config import STREAMED_SOURCES
from jdcl_ray.data.dataset import _one_line, _root_path
from jdcl_ray.data.images import (
    decode_images,
    decoded_shape,
    folder_files,
    image_header,
    mixed_size_side,
)
from jdcl_ray.data.parquet import _parquet_labels, checked_columns, parquet_image_bytes
from jdcl_ray.data.registry import MissingSplit
from jdcl_ray.errors import UserError

# Images whose headers fix the decoded side and channels when data.image_size is null.
HEADER_SAMPLE = 1000


class RowGroup(NamedTuple):
    """One row group of a Parquet set: its file (number), group, first row's position in the
    set, and that row's position in its file (for errors that name the row)."""

    file: int
    group: int
    start: int
    file_row: int


@dataclass
class StreamedSet:
    """A set of encoded images on disk (or an object store): metadata in memory, pixels not.

    ``indices`` are the chosen images' positions in the source (the long-tailed draw, sorted);
    ``labels`` are theirs, in the same order. ``files`` are the image files (a folder) or the
    Parquet files, whose rows in order make the source.
    """

    name: str
    kind: str  # "parquet" or "folder"
    files: list[str]
    row_groups: list[RowGroup]
    image_column: str
    indices: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    channels: int
    side: int

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, positions: np.ndarray) -> StreamedSet:
        """The images at ``positions`` of this set (e.g. a long-tailed draw of it)."""
        positions = np.asarray(positions, dtype=np.int64)
        labels = None if self.labels is None else self.labels[positions]
        return replace(self, indices=self.indices[positions], labels=labels)

    def chunks(self, rows: int, seed: int = 0) -> list[dict[str, Any]]:
        """The read tasks of one pass, each self-contained (``read_chunk`` needs nothing else).

        Parquet: the chosen rows of one row group per task (a row group is read whole, so it
        is the unit; ``read_chunk`` hands it on ``rows`` images at a time). Folder: ``rows``
        files per task, grouped in a seeded random order, so that a folder sorted by class
        does not give one-class chunks.
        """
        positions = np.arange(len(self.indices))
        if self.kind == "folder":
            order = np.random.default_rng(seed).permutation(positions)
            parts = [np.sort(order[start : start + rows]) for start in range(0, len(order), rows)]
            return [
                {"position": part.tolist(), "path": [self.files[i] for i in self.indices[part]]}
                for part in parts
            ]
        starts = np.array([group.start for group in self.row_groups])
        groups = np.searchsorted(starts, self.indices, side="right") - 1
        bounds = np.flatnonzero(np.diff(groups)) + 1
        tasks = []
        for part in np.split(positions, bounds):
            group = self.row_groups[groups[part[0]]]
            tasks.append(
                {
                    "position": part.tolist(),
                    "row": (self.indices[part] - group.start + group.file_row).tolist(),
                    "path": [self.files[group.file]],
                    "group": group.group,
                    "group_row": group.file_row,
                }
            )
        return tasks

    def raise_read_error(self, position: int) -> None:
        """Read again, here, the image at ``position`` that a reader could not read
        (``read_or_mark``), so that its UserError names the file or row, with no Ray traceback."""
        (chunk,) = self.subset(np.array([position])).chunks(1)
        for _ in read_chunk(chunk, self.decoding, 1):
            pass
        raise UserError(f"{self.name}: image {position} of the set could not be read")

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.side, self.channels, self.image_column)

    def iter_images(self, rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
        """Every chosen image once, read here (no Ray), a chunk at a time."""
        for chunk in self.chunks(rows):
            yield from read_chunk(chunk, self.decoding, rows)


class Decoding(NamedTuple):
    """What every chunk of a set is decoded to."""

    side: int
    channels: int
    image_column: str


def read_chunk(
    chunk: Mapping[str, Any], decoding: Decoding, rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded images (uint8, n x C x side x side) and their ``position`` in the set, at most
    ``rows`` at a time, of one task from ``StreamedSet.chunks``."""
    positions = np.asarray(chunk["position"], dtype=np.int64)
    if "row" not in chunk:  # a folder's files, one path each
        paths = [str(path) for path in chunk["path"]]
        sources: list[tuple[str, Path | bytes]] = [(path, Path(path)) for path in paths]
    else:
        path = str(chunk["path"][0])
        table = _read_parquet(
            path,
            lambda parquet: parquet.read_row_group(int(chunk["group"]), [decoding.image_column]),
        )
        rows_in_file = np.asarray(chunk["row"], dtype=np.int64)
        column = table.column(decoding.image_column).take(rows_in_file - int(chunk["group_row"]))
        blobs = parquet_image_bytes(column, path, decoding.image_column)
        sources = [
            (f"{path} row {row}", blob)
            for row, blob in zip(rows_in_file.tolist(), blobs, strict=True)
        ]
    for start in range(0, len(sources), rows):
        images = decode_images(sources[start : start + rows], decoding.side, decoding.channels)
        yield {"image": images.numpy(), "position": positions[start : start + rows]}


def read_or_mark(
    chunk: Mapping[str, Any], decoding: Decoding, rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """``read_chunk`` for a reader in another process: an image that can't be read yields one
    row at position -(p + 1), p its position, instead of raising; the consumer reads it again
    to raise the UserError (``StreamedSet.raise_read_error``). A reader's exception would reach
    the user as pages of tracebacks from every process it passed through."""
    done = 0
    try:
        for part in read_chunk(chunk, decoding, rows):
            done += len(part["position"])
            yield part
    except UserError:
        shape = (1, decoding.channels, decoding.side, decoding.side)
        yield {
            "image": np.zeros(shape, np.uint8),
            "position": np.array([-(_unreadable(chunk, decoding, done) + 1)]),
        }


def _unreadable(chunk: Mapping[str, Any], decoding: Decoding, done: int) -> int:
    """The position of the first image of ``chunk`` after its ``done`` first that can't be read
    alone (its first one when the whole chunk can't: an unreadable file)."""
    per_image = ("position", "row") if "row" in chunk else ("position", "path")
    for number in range(done, len(chunk["position"])):
        one = {
            key: value[number : number + 1] if key in per_image else value
            for key, value in chunk.items()
        }
        try:
            for _ in read_chunk(one, decoding, 1):
                pass
        except UserError:
            return int(chunk["position"][number])
    return int(chunk["position"][done])


def _read_parquet(path: str, read: Callable[[pq.ParquetFile], Any]) -> Any:
    """``read`` of a Parquet file (a path or an object store URI); a failure is a UserError."""
    try:
        with storage.open_input_file(path) as file:
            # pre_buffer (the default) reads far ahead: memory would grow with the row group.
            return read(pq.ParquetFile(file, pre_buffer=False))
    except (pa.ArrowException, OSError) as error:
        raise UserError(
            f"Parquet file {path} cannot be read: expected Parquet ({_one_line(error)})"
        ) from error


def open_stream(
    name: str,
    root: str | Path | None,
    split: str = "train",
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
) -> StreamedSet:
    """A Parquet table (one file, or a folder of ``*.parquet`` files read in name order) or an
    image folder (``root/<split>/`` when it exists), without decoding its pixels."""
    if name not in STREAMED_SOURCES:
        raise UserError(
            f"config key 'data.stream' = true reads {' or '.join(STREAMED_SOURCES)} sources: "
            f"data.name {name!r} is loaded in memory (set data.stream: false)"
        )
    if name == "folder":
        return _open_folder(root, split, image_size)
    if split != "train":
        raise MissingSplit(f"a Parquet table {root} is one split, not {split}")
    return _open_parquet(root, image_size, image_column, label_column)


def _open_folder(root: str | Path | None, split: str, image_size: int | None) -> StreamedSet:
    folder = _root_path(root, "folder", "images or one sub-folder of images per class").absolute()
    if (folder / split).is_dir():
        folder = folder / split
    elif split != "train":
        raise MissingSplit(f"image folder {folder} has no {split}/ sub-folder")
    files, labels, classes = folder_files(folder)
    step = max(1, len(files) // HEADER_SAMPLE)
    headers = [image_header(str(path), path) for path in files[::step]]
    channels, side = _shape(headers, image_size)
    return StreamedSet(
        name=f"folder/{folder.name}",
        kind="folder",
        files=[str(path) for path in files],
        row_groups=[],
        image_column="",
        indices=np.arange(len(files)),
        labels=labels,
        class_names=classes,
        channels=channels,
        side=side,
    )


def _shape(headers: list[tuple[str, tuple[int, int]]], image_size: int | None) -> tuple[int, int]:
    """Channels and the square side every image is decoded to (a stream's images must agree
    before most are seen: a sample's sizes decide, and a non-square size becomes a square)."""
    channels, (width, height) = decoded_shape(headers, image_size, None)
    return channels, width if width == height else mixed_size_side([(width, height)])


def _parquet_files(root: str | Path | None) -> list[str]:
    """A Parquet file, or the ``*.parquet`` files of a folder in name order: local paths
    (made absolute, for readers in other processes) or object store URIs (``s3://…``)."""
    location = str(root) if root is not None and storage.is_uri(str(root)) else ""
    location = storage.resolve(location or _root_path(root, "parquet", "a .parquet file or folder"))
    if storage.is_folder(location):
        names = [name for name in storage.list_names(location) if name.endswith(".parquet")]
        if not names:
            raise UserError(
                f"Parquet folder {location} has no .parquet files: expected one or more"
            )
        return [storage.join(location, name) for name in names]
    if not storage.exists(location):
        raise UserError(f"Parquet file {location} does not exist: expected a .parquet file")
    return [location]


def _first_rows(parquet: pq.ParquetFile, column: str) -> pa.Table:
    """The first HEADER_SAMPLE rows of ``column``, reading only the row groups that hold them
    (left free, pyarrow's reader reads many row groups ahead: memory would grow with the file)."""
    groups, rows = [], 0
    while rows < HEADER_SAMPLE and len(groups) < parquet.metadata.num_row_groups:
        rows += parquet.metadata.row_group(len(groups)).num_rows
        groups.append(len(groups))
    batches = parquet.iter_batches(HEADER_SAMPLE, row_groups=groups, columns=[column])
    return pa.Table.from_batches([next(batches)])


def _open_parquet(
    root: str | Path | None, image_size: int | None, image_column: str, label_column: str | None
) -> StreamedSet:
    files = _parquet_files(root)
    schema = _read_parquet(files[0], lambda parquet: parquet.schema_arrow)
    label_column = checked_columns(schema, files[0], image_column, label_column)
    row_groups, label_parts, start = [], [], 0
    for number, path in enumerate(files):
        metadata = _read_parquet(path, lambda parquet: parquet.metadata)
        file_row = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                row_groups.append(RowGroup(number, group, start, file_row))
            start, file_row = start + rows, file_row + rows
        if label_column:
            label_parts.append(_read_parquet(path, lambda parquet: parquet.read([label_column])))
    if start == 0:
        raise UserError(f"Parquet file {files[0]} has no rows: expected at least one image")
    labels, class_names = None, []
    if label_column:
        column = pa.concat_tables(label_parts).column(label_column)
        labels, class_names = _parquet_labels(column, files[0], label_column, schema)
    first = _read_parquet(files[0], lambda parquet: _first_rows(parquet, image_column))
    blobs = parquet_image_bytes(first.column(image_column), files[0], image_column)
    headers = [image_header(f"{files[0]} row {row}", blob) for row, blob in enumerate(blobs)]
    channels, side = _shape(headers, image_size)
    parts = files[0].rstrip("/").split("/")
    name = parts[-1].removesuffix(".parquet") if len(files) == 1 else parts[-2]
    return StreamedSet(
        name=f"parquet/{name}",
        kind="parquet",
        files=files,
        row_groups=row_groups,
        image_column=image_column,
        indices=np.arange(start),
        labels=labels,
        class_names=class_names,
        channels=channels,
        side=side,
    )
