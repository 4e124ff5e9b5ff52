"""Where runs keep their state: a local folder, a mount every node shares, or ``s3://`` /
``gs://`` (through pyarrow's filesystems, as Ray Train does). Locations are strings: an absolute
path or a URI."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from jdcl_ray.errors import UserError


def is_uri(location: str) -> bool:
    return "://" in location


def resolve(location: str | Path) -> str:
    """A URI as given; a local path made absolute (Ray needs absolute storage paths)."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError, ValueError) as error:
            raise UserError(f"storage {location!r} can't be opened: {error}") from None
    return pafs.LocalFileSystem(), location


def exists(location: str) -> bool:
    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_folder(location: str) -> bool:
    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def open_input_file(location: str) -> pa.NativeFile:
    """A file opened for random access (Parquet's footer and row groups)."""
    filesystem, path = _filesystem(location)
    return filesystem.open_input_file(path)


def read_bytes(location: str) -> bytes:
    filesystem, path = _filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    filesystem, path = _filesystem(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def open_bytes(location: str) -> io.BytesIO:
    return io.BytesIO(read_bytes(location))


def list_names(location: str) -> list[str]:
    """Names of the entries directly in a folder (empty if it doesn't exist)."""
    filesystem, path = _filesystem(location)
    selector = pafs.FileSelector(path, allow_not_found=True)
    return sorted(info.base_name for info in filesystem.get_file_info(selector))


def delete(location: str) -> None:
    filesystem, path = _filesystem(location)
    filesystem.delete_file(path)


def check_shared(location: str, flag: str) -> None:
    """On a multi-node Ray cluster, a local path must be a mount every node sees: otherwise the
    checkpoints written there are lost with the node that wrote them. Checked for real, by
    writing a marker file here and looking for it from a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if is_uri(location) or len(nodes) < 2:
        return
    marker = join(location, f".jdcl-shared-{uuid.uuid4().hex}")
    write_text(marker, "written by the jdcl-ray driver to check that every node sees this folder")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        checks = [
            sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(marker)
            for node in nodes
        ]
        seen = ray.get(checks, timeout=120)
    finally:
        delete(marker)
    blind = [
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        for node, ok in zip(nodes, seen, strict=True)
        if not ok
    ]
    if blind:
        raise UserError(
            f"{flag} {location} is a local folder that Ray nodes {blind} can't see: checkpoints "
            f"written there would be lost with a node; use s3://BUCKET/PATH or a folder mounted "
            f"on every node (e.g. NFS/EFS)"
        )
