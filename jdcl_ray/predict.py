"""Apply what was learned: ``python -m jdcl_ray.predict --model RUN_ID|CHECKPOINT --data
FOLDER|PARQUET [--output FILE.parquet] [--embeddings] [--address ADDRESS]``.

Every image gets a cluster, a confidence, an OOD score and an OOD flag (score above the 95th
percentile of the training images' scores). Inputs stream in chunks of ``--batch-size`` images
(folders walked lazily, Parquet read batch by batch) and each chunk is written as a row group,
so memory stays flat whatever the number of images. With ``--address``, the chunks are Ray Data
``map_batches`` over a cluster and the driver writes the rows as they come back, in order.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jdcl_ray import cli, ood, storage, tracking
from jdcl_ray.assign import assign
from jdcl_ray.checkpoint import TrainedModel, load_model
from jdcl_ray.data import IMAGE_EXTENSIONS, decode_images, parquet_image_bytes
from jdcl_ray.engine import embed
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.runtime import init_ray

CPU = torch.device("cpu")

# (where, file or encoded bytes): what data.decode_images reads, one image per pair.
Sources = list[tuple[str, Path | bytes]]


# --- the model, ready to apply ---------------------------------------------------------------


@dataclass
class Predictor:
    """A trained model with what applying it needs, picklable so Ray Data workers get a copy."""

    trained: TrainedModel
    embeddings: bool = False
    device: torch.device = CPU

    def to(self, device: torch.device) -> Predictor:
        self.trained.model.to(device, memory_format=torch.channels_last)
        self.device = device
        return self

    def __call__(self, sources: Sources) -> dict[str, np.ndarray]:
        """cluster, confidence, ood_score, ood (and embedding) of one chunk of encoded images."""
        trained = self.trained
        images = decode_images(sources, trained.image_side, trained.in_channels)
        out = embed(trained.model, images, self.device, batch_size=len(images))
        features = torch.nn.functional.normalize(out["features"], dim=1).numpy()
        clusters, probabilities = assign(
            features, out["assignments"].numpy(), trained.centers, trained.config.loss.temperature
        )
        ood_scores = ood.score(ood.OOD_SCORE, trained.ood_params, out["features"]).numpy()
        columns = {
            "cluster": clusters.astype(np.int64),
            "confidence": probabilities[np.arange(len(clusters)), clusters].astype(np.float32),
            "ood_score": ood_scores.astype(np.float32),
            "ood": ood_scores > trained.ood_threshold,
        }
        if self.embeddings:
            columns["embedding"] = features.astype(np.float32)
        return columns


# --- inputs, in chunks -----------------------------------------------------------------------


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` in sorted order, one directory listed at a time."""
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk_images(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            yield Path(entry.path)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parquet_file(path: Path, image_column: str) -> pq.ParquetFile:
    try:
        # pre_buffer (the default) reads far ahead of one batch: memory would grow with the file.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"--data {path} cannot be read as Parquet: {error}") from None
    if image_column not in parquet.schema_arrow.names:
        raise UserError(
            f"--data {path} has no image column {image_column!r}: found "
            f"{', '.join(parquet.schema_arrow.names)} (pick one with --image-column)"
        )
    return parquet


def _parquet_sources(table: pa.Table, path: Path, image_column: str, first: int) -> Sources:
    blobs = parquet_image_bytes(table.column(image_column), path, image_column)
    return [(f"{path} row {first + row}", blob) for row, blob in enumerate(blobs)]


def input_chunks(
    data: Path, batch_size: int, image_column: str = "image"
) -> tuple[Iterator[tuple[dict[str, Any], Sources]], int | None]:
    """(id columns, sources) per chunk of ``data``, and the number of images when known.

    Folders give each image's absolute ``path`` (usable from any folder, as Ray Data's are);
    Parquet tables each row's ``index``.
    """
    if data.is_dir():
        data = data.absolute()

        def folder_chunks() -> Iterator[tuple[dict[str, Any], Sources]]:
            for files in _batched(_walk_images(data), batch_size):
                yield {"path": [str(file) for file in files]}, [(str(f), f) for f in files]

        return folder_chunks(), None
    if not data.is_file():
        raise UserError(f"--data {data} does not exist: expected a folder of images or a .parquet")
    parquet = _parquet_file(data, image_column)

    def parquet_chunks() -> Iterator[tuple[dict[str, Any], Sources]]:
        first = 0
        for batch in parquet.iter_batches(batch_size, columns=[image_column]):
            table = pa.Table.from_batches([batch])
            yield (
                {"index": np.arange(first, first + len(table), dtype=np.int64)},
                _parquet_sources(table, data, image_column, first),
            )
            first += len(table)

    return parquet_chunks(), parquet.metadata.num_rows


# --- output ----------------------------------------------------------------------------------


def _table(columns: dict[str, Any]) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if name == "embedding":
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            values = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        arrays[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.table(arrays)


def write_stream(tables: Iterable[pa.Table], output: str, total: int | None) -> int:
    """Write tables as they come, one row group each, under a progress bar; returns the rows."""
    from tqdm import tqdm

    writer, rows = None, 0
    try:
        with tqdm(total=total, unit="img", desc="predict", disable=None) as bar:
            for table in tables:
                if writer is None:
                    if not storage.is_uri(output):  # the README writes under outputs/
                        Path(output).parent.mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(output, table.schema)
                writer.write_table(table)
                rows += len(table)
                bar.update(len(table))
    finally:
        if writer is not None:
            writer.close()
    return rows


def predict_local(predictor: Predictor, data: Path, output: str, batch_size: int, **kw: Any) -> int:
    chunks, total = input_chunks(data, batch_size, **kw)
    tables = (_table({**ids, **predictor(sources)}) for ids, sources in chunks)
    return write_stream(tables, output, total)


class _RayBatch:
    """A Ray Data actor: one copy of the model, on this worker's GPU when it has one."""

    def __init__(self, predictor: Predictor, data: str, image_column: str | None) -> None:
        self.predictor = predictor.to(default_device())
        self.data = Path(data)
        self.image_column = image_column

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.image_column is None:  # read_binary_files: columns bytes, path
            paths = table.column("path").to_pylist()
            sources: Sources = list(zip(paths, table.column("bytes").to_pylist(), strict=True))
            return _table({"path": paths, **self.predictor(sources)})
        return _table(self.predictor(_parquet_sources(table, self.data, self.image_column, 0)))


def predict_ray(
    predictor: Predictor, data: Path, output: str, batch_size: int, image_column: str = "image"
) -> int:
    """The same rows through Ray Data: files read and predicted on the cluster's workers."""
    import ray
    from ray.data.context import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    if data.is_dir():
        extensions = [suffix.lstrip(".") for suffix in sorted(IMAGE_EXTENSIONS)]
        dataset = ray.data.read_binary_files(
            str(data), include_paths=True, file_extensions=extensions
        )
        column, total = None, None
    elif data.is_file():
        total = _parquet_file(data, image_column).metadata.num_rows
        dataset = ray.data.read_parquet(str(data)).select_columns([image_column])
        column = image_column
    else:
        raise UserError(f"--data {data} does not exist: expected a folder of images or a .parquet")
    gpus = ray.cluster_resources().get("GPU", 0)
    results = dataset.map_batches(
        _RayBatch,
        fn_constructor_args=(predictor, str(data), column),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=max(int(gpus), 1),
        num_gpus=1 if gpus else 0,
    )
    first = 0

    def numbered() -> Iterator[pa.Table]:
        nonlocal first
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            if column is not None:  # Parquet rows: number them in order, as the local path does
                batch = batch.add_column(
                    0, "index", pa.array(np.arange(first, first + len(batch), dtype=np.int64))
                )
                first += len(batch)
            yield batch

    return write_stream(numbered(), output, total)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return run(cli.parse("predict", argv))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is invalid: expected a positive integer")
    if storage.exists(args.output) and not args.overwrite:
        raise UserError(
            f"--output {args.output} already exists: pass --overwrite to replace it, or choose "
            "another file"
        )
    checkpoint = tracking.resolve_checkpoint(
        args.model, args.tracking_uri or tracking.default_tracking_uri()
    )
    predictor = Predictor(load_model(checkpoint), args.embeddings)
    options = {"batch_size": args.batch_size, "image_column": args.image_column}
    if args.address:
        init_ray(args.address)
        rows = predict_ray(predictor, args.data, args.output, **options)
    else:
        rows = predict_local(predictor.to(default_device()), args.data, args.output, **options)
    if rows == 0:
        raise UserError(f"--data {args.data} holds no images: expected image files or table rows")
    print(f"{rows} images from {args.data} → {args.output} (model {checkpoint})")
    return 0


if __name__ == "__main__":
    run_cli(main)
