"""Streamed image sets (``data.stream``, issue 21): read chunk by chunk, the same images as in
memory, one-line errors; with Ray, the same losses as the in-memory path and bounded memory.

Parquet tables and folders are written by the tests: 32 px colour digits (``test_own_images``),
and for the memory test noise PNGs, whose decoded pixels are large beside a model's features.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from servers import IDENTITY_VIEWS, ROOT, sets
from test_own_images import digit_images, write_folder

from jdcl_ray.config import load_config
from jdcl_ray.data import load_image_folder, load_parquet, open_stream, prepare_data
from jdcl_ray.data.stream import read_chunk, read_or_mark
from jdcl_ray.engine import embed_training_set, worker_context
from jdcl_ray.errors import UserError
from jdcl_ray.models import build_model

SIZES = (150, 100, 60, 30, 15)  # 355 images, five classes


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_table(path: Path, sizes=SIZES, row_group_size: int = 40, labelled: bool = True) -> Path:
    """Labelled digits, classes interleaved by a fixed shuffle, in row groups of 40 images."""
    images = [(label, image) for label, n in enumerate(sizes) for image in digit_images(label, n)]
    order = np.random.default_rng(0).permutation(len(images))
    columns = {"image": pa.array([png(images[i][1]) for i in order], pa.binary())}
    if labelled:
        columns["label"] = pa.array([images[i][0] for i in order], pa.int64())
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def read_all(streamed) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a streamed set, read here, put back in order: (images, positions seen)."""
    parts = list(streamed.iter_images(rows=32))
    positions = np.concatenate([part["position"] for part in parts])
    images = np.concatenate([part["image"] for part in parts])
    ordered = np.empty_like(images)
    ordered[positions] = images
    return ordered, np.sort(positions)


# --- reading, without Ray ----------------------------------------------------------------------


def test_a_streamed_parquet_folder_gives_the_images_and_labels_the_loader_decodes(tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    write_table(folder / "part-0.parquet", sizes=(30, 20, 10))
    write_table(folder / "part-1.parquet", sizes=(12, 8, 5), row_group_size=7)
    parts = [load_parquet(folder / f"part-{i}.parquet") for i in (0, 1)]
    expected = np.concatenate([part.images.numpy() for part in parts])
    for root in (folder, f"file://{folder}"):  # a path, and a URI as an object store gives
        streamed = open_stream("parquet", root)
        assert (len(streamed), streamed.channels, streamed.side) == (85, 3, 32)
        assert len(streamed.row_groups) == 2 + 4  # 60 rows in groups of 40; 25 in groups of 7
        np.testing.assert_array_equal(
            streamed.labels, np.concatenate([part.labels for part in parts])
        )
        images, positions = read_all(streamed)
        np.testing.assert_array_equal(positions, np.arange(85))  # each image once
        np.testing.assert_array_equal(images, expected)


def test_a_draw_of_a_streamed_set_reads_only_its_images(tmp_path):
    table = write_table(tmp_path / "digits.parquet")
    in_memory = load_parquet(table)
    draw = np.sort(np.random.default_rng(1).choice(len(in_memory), 100, replace=False))
    streamed = open_stream("parquet", table).subset(draw)
    images, positions = read_all(streamed)
    np.testing.assert_array_equal(positions, np.arange(100))
    np.testing.assert_array_equal(images, in_memory.images.numpy()[draw])
    np.testing.assert_array_equal(streamed.labels, in_memory.labels[draw])


def test_a_streamed_folder_mixes_its_classes_in_every_chunk(tmp_path):
    root = write_folder(tmp_path / "folder")
    in_memory = load_image_folder(root)
    streamed = open_stream("folder", root)
    images, positions = read_all(streamed)
    np.testing.assert_array_equal(positions, np.arange(len(in_memory)))
    np.testing.assert_array_equal(images, in_memory.images.numpy())
    # The files are sorted by class; the read tasks group them in a seeded random order.
    chunks = streamed.chunks(64, seed=0)
    assert all(len(set(streamed.labels[chunk["position"]])) >= 3 for chunk in chunks[:-1])
    assert streamed.chunks(64, seed=0) == chunks


def test_prepare_data_streams_the_same_long_tailed_draw(tmp_path):
    table = write_table(tmp_path / "digits.parquet")
    settings = [f"data.root={table}", "data.name=parquet", "data.imbalance_ratio=5"]
    settings += ["optim.batch_size=32"]  # the draw holds 38 images
    in_memory = prepare_data(load_config(None, settings))
    streamed = prepare_data(load_config(None, [*settings, "data.stream=true"]))
    np.testing.assert_array_equal(streamed.lt_indices, in_memory.lt_indices)
    np.testing.assert_array_equal(streamed.train.labels, in_memory.train.labels)
    assert streamed.class_order == in_memory.class_order
    assert streamed.evaluated_on == in_memory.evaluated_on
    images, _ = read_all(streamed.train)
    np.testing.assert_array_equal(images, in_memory.train.images.numpy())
    # Evaluation on a streamed set reads it chunk by chunk: the same features as in memory.
    config = load_config(None, [*settings, "model.num_clusters=5"])
    model = build_model(config, 3, 32)
    cpu = worker_context(False).device
    features = [
        embed_training_set(model, data, config, cpu).features for data in (in_memory, streamed)
    ]
    np.testing.assert_allclose(features[0], features[1], atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------


def test_streaming_a_source_that_is_loaded_in_memory_is_a_config_error():
    with pytest.raises(UserError, match=r"config key 'data.stream' = True .*'digits'"):
        load_config(None, ["data.stream=true"])
    with pytest.raises(UserError, match=r"data\.shuffle_buffer"):
        load_config(None, ["data.name=folder", "data.stream=true", "data.shuffle_buffer=0"])


def no_image_column(folder: Path) -> Path:
    pq.write_table(pa.table({"x": [1]}), folder / "t.parquet")
    return folder / "t.parquet"


def not_parquet(folder: Path) -> Path:
    (folder / "t.parquet").write_text("not parquet")
    return folder / "t.parquet"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder / "missing.parquet", "missing.parquet does not exist"),
        (lambda folder: folder, "has no .parquet files"),
        (no_image_column, "has no image column 'image': found x"),
        (not_parquet, "cannot be read: expected Parquet"),
    ],
)
def test_a_bad_table_is_one_line_naming_it(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as error:
        open_stream("parquet", make(tmp_path))
    assert "\n" not in str(error.value)


def test_an_unreadable_image_names_its_row_or_file(tmp_path):
    table = write_table(tmp_path / "digits.parquet", sizes=(20, 20))
    streamed = open_stream("parquet", table)  # opened first: the headers it samples are fine
    rows = pq.read_table(table).to_pydict()
    rows["image"][25] = b"not an image"
    pq.write_table(pa.table(rows), table, row_group_size=40)
    bad = next(chunk for chunk in streamed.chunks(8) if 25 in chunk["row"])
    with pytest.raises(UserError, match=r"digits.parquet row 25 cannot be read"):
        list(read_chunk(bad, streamed.decoding, 8))
    # A reader in another process marks the image instead; reading it again here names the row.
    marks = [part["position"] for part in read_or_mark(bad, streamed.decoding, 8)]
    assert sum(len(mark) for mark in marks[:-1]) == 24  # three good parts of 8, then the mark
    assert marks[-1].tolist() == [-(25 + 1)]  # rows are positions here (every row is drawn)
    with pytest.raises(UserError, match=r"row 25 cannot be read"):
        streamed.raise_read_error(25)
    # Opening reads the first rows' headers: a bad one among them stops before any training.
    with pytest.raises(UserError, match=r"row 25 cannot be read"):
        open_stream("parquet", table)

    root = write_folder(tmp_path / "folder", sizes=(10, 10))
    streamed = open_stream("folder", root)
    broken = sorted((root / "class_1").iterdir())[3]
    broken.write_bytes(b"truncated")
    with pytest.raises(UserError, match=f"image {broken} cannot be read"):
        read_all(streamed)


# --- with Ray: the same training, bounded memory ------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from jdcl_ray.runtime import init_ray

    init_ray(None)
    yield
    ray.shutdown()


def train(table: Path, output: Path, *overrides: str) -> dict:
    from jdcl_ray.train import main

    assert main(["--data", str(table), "--output", str(output), *sets(*overrides)]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_streamed_and_in_memory_training_give_the_same_losses(local_ray, tmp_path):
    """One worker, one step an epoch holding every image, identity views: the step sees the same
    images either way (in another order), so the first epoch's losses agree to float rounding;
    the second's, after one Adam step (which amplifies rounding: its step is ~sign(g)), to 1e-3."""
    from jdcl_ray.checkpoint import saved_checkpoints

    folder = tmp_path / "digits"  # a folder with a test split: evaluation streams it too
    write_folder(folder / "train")
    write_folder(folder / "test", sizes=(20, 20, 20, 20, 20))
    common = ["run.epochs=2", "optim.batch_size=355", "model.num_clusters=5", *IDENTITY_VIEWS]
    common += ["run.checkpoint_every=1", "run.keep_checkpoints=2"]
    runs = {
        stream: train(folder, tmp_path / f"stream_{stream}", f"data.stream={stream}", *common)
        for stream in ("false", "true")
    }
    memory, streamed = runs["false"], runs["true"]
    firsts = [saved_checkpoints(str(tmp_path / f"stream_{s}"))[0][0] for s in runs]
    losses = [key for key in memory if key.startswith("loss/")]
    assert "loss/dcl" in losses and "loss/clustering" in losses
    for key in losses:
        assert firsts[1][key] == pytest.approx(firsts[0][key], rel=1e-5, abs=1e-7), key
        assert streamed[key] == pytest.approx(memory[key], rel=1e-3, abs=1e-6), key
    assert streamed["knn_acc_pixels"] == memory["knn_acc_pixels"]  # the same pixels, in order
    assert streamed["knn_acc"] == pytest.approx(memory["knn_acc"], abs=3 / 100)
    assert streamed["test/nmi"] == pytest.approx(memory["test/nmi"], abs=0.05)
    tables = [pq.read_table(tmp_path / f"stream_{s}" / "assignments.parquet") for s in runs]
    assert tables[0].column("index").equals(tables[1].column("index"))


@pytest.mark.slow
def test_two_workers_stream_their_shards_and_an_unreadable_image_is_one_line(local_ray, tmp_path):
    table = write_table(tmp_path / "digits.parquet")
    settings = ["run.workers=2", "run.epochs=2", "optim.batch_size=64", "model.num_clusters=5"]
    memory = train(table, tmp_path / "memory", *settings)
    streamed = train(table, tmp_path / "streamed", "data.stream=true", *settings)
    # Real views from other batches: the same losses within what batch order moves them by.
    for key in ("loss/dcl", "loss/total"):
        assert streamed[key] == pytest.approx(memory[key], rel=0.05), key
    assert sum(streamed["predicted_sizes"]) == 355
    assert streamed["knn_acc_pixels"] == memory["knn_acc_pixels"]

    rows = pq.read_table(table).to_pydict()
    rows["image"][300] = b"not an image"
    pq.write_table(pa.table(rows), table, row_group_size=40)
    from jdcl_ray.train import main

    with pytest.raises(UserError) as error:
        main(
            [
                "--data",
                str(table),
                "--output",
                str(tmp_path / "bad"),
                *sets("data.stream=true", *settings),
            ]
        )
    assert "digits.parquet row 300 cannot be read" in str(error.value)
    assert "\n" not in str(error.value)


def write_noise_table(path: Path, rows: int, side: int = 96) -> int:
    """``rows`` colour noise PNGs (64 distinct ones, repeated), unlabelled; returns the bytes of
    one decoded image."""
    rng = np.random.default_rng(0)
    pool = [png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(64)]
    column = pa.array([pool[row % 64] for row in range(rows)], pa.binary())
    pq.write_table(pa.table({"image": column}), path, row_group_size=250, use_dictionary=False)
    return side * side * 3


@pytest.mark.slow
def test_a_streamed_runs_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """One epoch on 1,000 and on 4,000 96 px images, 2 workers, each run in its own process:
    streamed, the peak resident memory of the driver and of the workers (each run's figures,
    in its metrics) stays flat; decoded in memory, as a control, it grows by most of the 3,000
    extra images' decoded bytes (79 MB), which is what the streamed run must not hold."""
    peaks: dict[tuple[str, int], tuple[float, float]] = {}
    image_bytes = 0
    for rows in (1000, 4000):
        table = tmp_path / f"noise_{rows}.parquet"
        image_bytes = write_noise_table(table, rows)
        for stream in ("true", "false"):
            output = tmp_path / f"run_{rows}_{stream}"
            settings = [
                f"data.stream={stream}",
                "data.shuffle_buffer=256",  # the buffers are bounded, and both sets exceed them
                "data.stream_buffer_mb=16",
                "run.epochs=1",
                "run.workers=2",
                "model.backbone=small_cnn",
                "model.width=8",  # the run's time goes to reading, not to the model
            ]
            command = [sys.executable, "-m", "jdcl_ray.train", "--data", str(table)]
            command += ["--output", str(output), *(f"--set={key}" for key in settings)]
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=600,
                env={**os.environ, "RAY_ADDRESS": ""},
            )
            assert done.returncode == 0, done.stderr[-3000:]
            result = json.loads((output / "metrics.json").read_text())
            peaks[stream, rows] = (result["memory/driver_peak_mb"], result["memory/worker_peak_mb"])
    extra_mb = 3000 * image_bytes / 2**20
    for small, large in zip(peaks["true", 1000], peaks["true", 4000], strict=True):
        assert large < 1.3 * small, peaks
        assert large - small < 0.25 * extra_mb, (peaks, extra_mb)
    # The control: the same measure sees images held in memory (driver: encoded and decoded).
    for small, large in zip(peaks["false", 1000], peaks["false", 4000], strict=True):
        assert large - small > 0.75 * extra_mb, (peaks, extra_mb)
