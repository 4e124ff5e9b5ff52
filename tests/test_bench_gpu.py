"""The GPU suite (`python -m jdcl_ray.bench gpu`, issue 20): its `--smoke` mode runs the same
code on the CPU with tiny sizes, so the script for the GPU machine can't rot while no GPU is at
hand. It runs with Ray and MLflow made unimportable, as on the bare GPU machine."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jdcl_ray.bench.gpu import SMOKE
from jdcl_ray.data import load_digits

ROOT = Path(__file__).resolve().parents[1]
# Ray and MLflow unimportable: `import ray` raises ImportError, as where they are not installed.
WITHOUT_RAY = (
    "import sys; sys.modules['ray'] = sys.modules['mlflow'] = None; "
    "from jdcl_ray.bench import main; from jdcl_ray.errors import run_cli; run_cli(main)"
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    """Fashion-MNIST's four files' layout, filled with the 8 px digits (the code path only)."""
    folder = tmp_path_factory.mktemp("fashion")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        digits = load_digits(split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", digits.images[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", digits.labels)
    return folder


def bench_gpu(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "gpu", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def smoke(idx_folder, tmp_path_factory) -> tuple[dict, str]:
    output = tmp_path_factory.mktemp("gpu")
    done = bench_gpu("--smoke", "--output", str(output), "--fashion-root", str(idx_folder))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((output / "gpu.json").read_text()), (output / "gpu.md").read_text()


def test_smoke_runs_every_section_without_ray_or_mlflow(smoke):
    result, _ = smoke
    assert result["errors"] == {}
    assert set(result["section_s"]) == {"step", "loss", "quality", "compile"}
    assert result["environment"]["torch"] == torch.__version__
    assert result["matmul_flops"] > 0


def test_the_step_is_measured_per_batch_and_precision(smoke):
    result, _ = smoke
    measured = {(row["batch"], row["precision"]) for row in result["step"]}
    assert measured == {(b, p) for b in SMOKE.batches for p in SMOKE.precisions}
    for row in result["step"]:
        assert row["full_step_img_s"] > 0 and row["model_only_img_s"] > 0
        assert 0 < row["input_share_of_full_step"] < 1
        assert row["flops_per_image"] > 0 and 0 < row["mfu"] < 1


def test_the_loss_share_grows_with_the_global_batch(smoke):
    result, _ = smoke
    rows = result["loss"]
    assert [row["global_batch"] for row in rows] == list(SMOKE.global_batches)
    assert all(0 < row["share_of_step"] < 1 for row in rows)
    assert rows[-1]["objective_s"] > rows[0]["objective_s"]  # 16x the pairs


def test_the_quality_run_reports_caa_nmi_knn_and_sizes(smoke):
    result, _ = smoke
    quality = result["quality"]
    assert quality["epochs"] >= 1
    assert sum(quality["predicted_sizes"]) == quality["images"] == sum(quality["true_sizes"])
    assert sum(quality["head"]["predicted_sizes"]) == quality["images"]
    for key in ("train/caa", "train/nmi", "test/caa", "knn_acc", "knn_acc_pixels"):
        assert 0 <= quality[key] <= 1, key
    assert 0 <= quality["head"]["caa"] <= 1


def test_the_compiled_step_is_timed_with_its_compile_apart(smoke):
    result, markdown = smoke
    (row,) = result["compile"]
    assert row["compiled"] and row["backend"] == SMOKE.compile_backend
    assert row["full_step_img_s"] > 0 and row["first_calls_s"] > 0
    for heading in ("joint training step", "loss terms' share", "Quality"):
        assert heading in markdown


def test_without_a_gpu_or_data_it_says_what_to_do(tmp_path):
    missing = bench_gpu("--smoke", "--output", str(tmp_path), "--fashion-root", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "--fashion-root" in missing.stderr
    if not torch.cuda.is_available():
        no_gpu = bench_gpu("--output", str(tmp_path))
        assert no_gpu.returncode == 2 and "--smoke" in no_gpu.stderr
        assert no_gpu.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_run_sh_stops_at_once_on_a_machine_without_a_gpu(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh")],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not a GPU machine" in done.stderr
