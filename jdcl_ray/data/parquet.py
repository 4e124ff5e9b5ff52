"""Parquet tables of encoded images, such as Hugging Face exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jdcl_ray.data.dataset import ImageDataset, _one_line, _root_path
from jdcl_ray.data.images import decode_images
from jdcl_ray.errors import UserError


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
    column: pa.ChunkedArray, path: Path | str, name: str, schema: pa.Schema
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


def parquet_image_bytes(column: pa.ChunkedArray, path: Path | str, name: str) -> list[bytes]:
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


def checked_columns(
    schema: pa.Schema, path: Path | str, image_column: str, label_column: str | None
) -> str | None:
    """The label column to read (None: an unlabelled table). A missing column under the
    default name ``label`` means an unlabelled set; any other missing column is a mistake."""
    if image_column not in schema.names:
        raise UserError(
            f"Parquet file {path} has no image column {image_column!r}: "
            f"found {', '.join(schema.names)}"
        )
    if label_column is None or label_column in schema.names:
        return label_column
    if label_column != "label":
        raise UserError(
            f"Parquet file {path} has no label column {label_column!r}: "
            f"found {', '.join(schema.names)}"
        )
    return None


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
    label_column = checked_columns(schema, path, image_column, label_column)
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
