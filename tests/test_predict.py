"""predict: a real tiny training run, real image folders and Parquet tables, a real MLflow store."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jdcl_ray import metrics, tracking
from jdcl_ray.checkpoint import ASSIGNMENTS_FILE, read_assignments
from jdcl_ray.config import load_config
from jdcl_ray.data import load_digits
from jdcl_ray.errors import UserError, run_cli
from jdcl_ray.predict import main
from jdcl_ray.tracking import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_lt.yaml"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_inputs(folder: Path, images: list[bytes]) -> tuple[Path, Path]:
    """The same encoded images as a folder of PNGs and as a Parquet table."""
    (folder / "images").mkdir(parents=True)
    for number, blob in enumerate(images):
        (folder / "images" / f"img_{number:05d}.png").write_bytes(blob)
    table = folder / "images.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), table, row_group_size=64)
    return folder / "images", table


def training_digits(trained: Path, count: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``count`` training images (encoded) and the clusters training gave them."""
    assignments = read_assignments(trained / ASSIGNMENTS_FILE)
    indices = assignments["index"][:count]
    images = load_digits("train").images[indices, 0].numpy()
    return [png(image) for image in images], assignments["cluster"][:count]


def predict(model: Path | str, data: Path, output: Path, *extra: str) -> pa.Table:
    assert main(["--model", str(model), "--data", str(data), "--output", str(output), *extra]) == 0
    return pq.read_table(output)


def test_folder_and_parquet_give_the_training_clusters(trained, tmp_path):
    images, clusters = training_digits(trained, 150)
    folder, table = write_inputs(tmp_path, images)
    run_folder = trained.parents[1]  # resolved to its newest checkpoint
    from_folder = predict(run_folder, folder, tmp_path / "a.parquet", "--batch-size", "64")
    from_table = predict(trained, table, tmp_path / "b.parquet", "--embeddings")
    assert from_folder.num_rows == from_table.num_rows == 150
    assert from_folder.column("path").to_pylist() == sorted(str(p) for p in folder.iterdir())
    assert from_table.column("index").to_pylist() == list(range(150))
    for result in (from_folder, from_table):
        assert result.column("cluster").to_numpy().min() >= 0
        assert result.column("cluster").to_numpy().max() < 10
        confidence = result.column("confidence").to_numpy()
        assert ((confidence >= 0) & (confidence <= 1)).all()
        assert result.column("ood").type == pa.bool_()
    # Same image, same cluster from both inputs, and the cluster training gave it.
    np.testing.assert_array_equal(from_folder.column("cluster"), from_table.column("cluster"))
    np.testing.assert_array_equal(from_table.column("cluster").to_numpy(), clusters)
    np.testing.assert_allclose(from_folder.column("ood_score"), from_table.column("ood_score"))
    embedding = np.stack(from_table.column("embedding").to_numpy(zero_copy_only=False))
    assert embedding.shape == (150, 64)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1, rtol=1e-5)


def test_noise_scores_higher_than_digits(trained, tmp_path):
    digits, _ = training_digits(trained, 200)
    noise = [png(pixels) for pixels in np.random.default_rng(0).integers(0, 256, (200, 8, 8), "u1")]
    _, table = write_inputs(tmp_path, digits + noise)
    result = predict(trained, table, tmp_path / "out.parquet")
    scores, flagged = result.column("ood_score").to_numpy(), result.column("ood").to_numpy()
    assert metrics.ood_auroc(scores[:200], scores[200:]) > 0.75
    assert np.median(scores[200:]) > np.quantile(scores[:200], 0.75)
    assert flagged[200:].mean() > 2 * flagged[:200].mean()


PEAK_MEMORY = """
import sys
from jdcl_ray.predict import main
main(["--model", sys.argv[1], "--data", sys.argv[2], "--output", sys.argv[3], "--batch-size", "64",
      "--overwrite"])
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
"""


def test_memory_stays_flat_with_eight_times_the_images(trained, tmp_path):
    """Peak RSS predicting 256 vs 2048 noise images (27 kB each: 48 MB more if not streamed)."""
    rng = np.random.default_rng(1)
    blobs = [png(rng.integers(0, 256, (96, 96, 3), "u1")) for _ in range(256)]
    peaks = []
    for copies in (1, 8):
        folder, table = write_inputs(tmp_path / f"x{copies}", blobs * copies)
        for data in (table, folder):
            run = subprocess.run(
                [sys.executable, "-c", PEAK_MEMORY, str(trained), str(data), str(tmp_path / "o")],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert pq.read_metadata(tmp_path / "o").num_rows == 256 * copies
            peaks.append(int(run.stdout.split()[-1]) / 1024)  # MiB
    table_growth, folder_growth = peaks[2] - peaks[0], peaks[3] - peaks[1]
    assert table_growth < 20 and folder_growth < 20, peaks


def test_resolve_model_from_every_kind_of_name(trained, tmp_path, mlflow_store):
    uri, client, experiment = mlflow_store
    assert resolve_checkpoint(str(trained), uri) == str(trained)
    assert resolve_checkpoint(str(trained.parents[1]), uri) == str(trained)
    parent = tracking.start_parent(client, experiment, "search", {"best_trial": "t1"})
    child, _ = tracking.child_run(
        client, experiment, parent, "t1", "trial", load_config(DIGITS, [])
    )
    client.set_tag(child, tracking.CHECKPOINT_TAG, str(trained))
    assert resolve_checkpoint(child, uri) == str(trained)
    assert resolve_checkpoint(parent, uri) == str(trained)  # a search stands for its best trial
    client.create_registered_model("digits")
    version = client.create_model_version("digits", f"runs:/{child}/model", run_id=child)
    assert resolve_checkpoint(f"models:/digits/{version.version}", uri) == str(trained)

    lonely = client.create_run(experiment).info.run_id
    for model, message in [
        (lonely, f"MLflow run {lonely} has no 'checkpoint' tag"),
        ("0" * 32, f"MLflow run {'0' * 32} is not in {uri}"),
        (str(tmp_path), f"--model {tmp_path} holds no state.pt"),
        ("no/such/run", "'no/such/run' is not a folder, an MLflow run id"),
        ("models:/digits/7", "--model models:/digits/7: no such model version"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_checkpoint(model, uri)


def cli_error(capsys, *argv: str) -> str:
    """The one line a CLI mistake prints (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    images, _ = training_digits(trained, 3)
    folder, _ = write_inputs(tmp_path, images)
    (folder / "img_00001.png").write_bytes(b"not a png")
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "other.parquet")
    model = ["--model", str(trained), "--output", str(tmp_path / "out.parquet")]
    assert "img_00001.png cannot be read" in cli_error(capsys, *model, "--data", str(folder))
    assert "has no image column 'image': found pixels" in cli_error(
        capsys, *model, "--data", str(tmp_path / "other.parquet")
    )
    assert f"--data {tmp_path / 'nope'} does not exist" in cli_error(
        capsys, *model, "--data", str(tmp_path / "nope")
    )
    (tmp_path / "empty").mkdir()
    assert "holds no images" in cli_error(capsys, *model, "--data", str(tmp_path / "empty"))


def test_an_existing_output_is_replaced_only_when_asked(trained, tmp_path, capsys):
    images, _ = training_digits(trained, 4)
    folder, _ = write_inputs(tmp_path, images)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"the user's file")
    error = cli_error(
        capsys, "--model", str(trained), "--data", str(folder), "--output", str(output)
    )
    assert f"--output {output} already exists: pass --overwrite" in error
    assert output.read_bytes() == b"the user's file"
    assert predict(trained, folder, output, "--overwrite").num_rows == 4


def test_ray_data_gives_the_same_rows(trained, tmp_path):
    import ray

    images, _ = training_digits(trained, 100)
    folder, table = write_inputs(tmp_path, images)
    local = predict(trained, folder, tmp_path / "local.parquet")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        on_ray = {
            data: predict(trained, data, tmp_path / f"ray_{data.name}.parquet", "--address", "auto")
            for data in (folder, table)
        }
    finally:
        ray.shutdown()
    assert on_ray[folder].column("path").to_pylist() == local.column("path").to_pylist()
    assert on_ray[table].column("index").to_pylist() == list(range(100))
    for result in on_ray.values():
        np.testing.assert_array_equal(result.column("cluster"), local.column("cluster"))
        np.testing.assert_allclose(result.column("ood_score"), local.column("ood_score"))
