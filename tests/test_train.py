"""Ray Train end to end: real local Ray, real workers (gloo DDP), real digits-LT images."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from servers import IDENTITY_VIEWS, cli, sets

from jdcl_ray import metrics
from jdcl_ray.checkpoint import load_state
from jdcl_ray.train import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_lt.yaml"


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def train(output: Path, *overrides: str) -> dict:
    assert main(["--config", str(DIGITS), "--output", str(output), *sets(*overrides)]) == 0
    return json.loads((output / "metrics.json").read_text())


def checkpoints(output: Path) -> list[Path]:
    return sorted(path for path in (output / "train").glob("checkpoint_*") if path.is_dir())


@pytest.fixture(scope="module")
def two_worker_run(local_ray, tmp_path_factory):
    output = tmp_path_factory.mktemp("two_workers")
    # 512 of the 539 digits-LT images: one step per epoch, so epoch 0's loss is the first step's.
    result = train(
        output,
        "run.workers=2",
        "run.cpus_per_worker=1",
        "run.epochs=2",
        "optim.batch_size=512",
        "loss.clustering_warmup_epochs=0",
        *IDENTITY_VIEWS,
    )
    return output, result


def test_two_workers_write_every_metric_and_a_checkpoint(two_worker_run):
    output, result = two_worker_run
    assert result["epoch"] == 1
    expected = metrics.cluster_metrics(np.array([0, 1, 1]), np.array([1, 0, 0]))
    for split in ("train", "test"):
        for key in expected:
            assert 0.0 <= result[f"{split}/{key}"] <= 1.0 or np.isnan(result[f"{split}/{key}"])
    for key in ("knn_acc", "selection_score", "cluster_size_l1", "images_per_s", "loss/dcl"):
        assert key in result
    assert sum(result["predicted_sizes"]) == sum(result["true_sizes"]) == 539
    saved = checkpoints(output)
    assert saved, "no checkpoint written"
    state = load_state(saved[-1])
    assert int(state["epoch"]) == 1
    assert state["config"]["run"]["workers"] == 2
    np.testing.assert_array_equal(state["lt_indices"].numpy(), np.load(output / "lt_indices.npy"))
    assert (output / "config.yaml").is_file()


def test_one_worker_and_two_workers_give_the_same_first_step_loss(two_worker_run, tmp_path):
    _, two = two_worker_run
    one = train(
        tmp_path / "one_worker",
        "run.workers=1",
        "run.cpus_per_worker=2",
        "run.epochs=2",
        "optim.batch_size=512",
        "loss.clustering_warmup_epochs=0",
        *IDENTITY_VIEWS,
    )
    # Epoch 1 is one step after one identical update: equal only if gradients match too.
    for key in ("loss/dcl", "loss/ddc_l1", "loss/ddc_l2", "loss/ddc_l3", "loss/total"):
        assert one[key] == pytest.approx(two[key], rel=2e-4, abs=1e-5), key


def saved_epochs(output: Path) -> list[int]:
    """Epochs of the complete checkpoints, oldest first (a folder cut short by a kill is skipped)."""
    epochs = []
    for path in checkpoints(output):
        try:
            epochs.append(int(load_state(path)["epoch"]))
        except Exception:
            continue
    return epochs


run_cli = functools.partial(cli, "train")


def test_resume_continues_at_the_next_epoch(tmp_path):
    output = tmp_path / "run"
    args = ["--config", str(DIGITS), "--output", str(output)]
    args += sets("run.epochs=12", "run.keep_checkpoints=100", "eval.every=100")
    first = run_cli(*args)
    deadline = time.monotonic() + 240
    while len(checkpoints(output)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "run finished before it could be stopped:\n" + first.stdout.read()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stopped_at = saved_epochs(output)
    assert max(stopped_at) < 11
    resumed = run_cli("--output", str(output), "--resume")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    epochs = saved_epochs(output)
    # --resume starts after the newest complete checkpoint on disk: no epoch lost or redone.
    assert epochs == list(range(12)), f"killed after {stopped_at}, then saved {epochs}"
    assert json.loads((output / "metrics.json").read_text())["epoch"] == 11


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
        (["--config", str(DIGITS), "--set", "loss.tau_plus=1.5"], "loss.tau_plus"),
        (["--config", str(DIGITS), "--set", "data.name=imagenet"], "imagenet"),
        (["--resume", "--output", "/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_cli_mistakes_are_one_line(args, message):
    process = run_cli(*args)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out
