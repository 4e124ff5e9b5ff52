"""Ray Tune → Ray Train → MLflow, end to end: real Ray, real training on digits-LT, a real MLflow
sqlite store read back through a real ``mlflow server`` on 127.0.0.1 over its REST API."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import requests
import yaml
from servers import MlflowServer, cli

from jdcl_ray.config import load_config
from jdcl_ray.tracking import RESUMED_TAG, flatten
from jdcl_ray.tune import SEARCH_FILE, main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_lt.yaml"
EPOCHS = 2


def write_space(
    folder: Path, name: str, epochs: int = EPOCHS, scheduler: str = "asha", **search
) -> Path:
    space = {
        "name": name,
        "base": {
            "config": str(DIGITS),
            "set": {"run.epochs": epochs, "loss.prior_warmup_epochs": 1, "eval.every": 1},
        },
        "space": {
            "loss.temperature": {"uniform": [0.3, 0.6]},
            "loss.tau_plus": {"choice": [0.0, 0.1]},
            "loss.clustering_weight": {"loguniform": [0.5, 2.0]},
        },
        "search": {"algorithm": "random", "metric": "selection_score", "mode": "max", **search},
        "scheduler": (
            {"kind": "asha", "grace_period": 1, "reduction_factor": 2}
            if scheduler == "asha"
            else {"kind": scheduler}
        ),
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def quick_search(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    space = write_space(folder, "quick", num_samples=3, max_concurrent_trials=2)
    db = folder / "mlflow.db"
    code = main(
        [
            "--space", str(space),
            "--storage", str(folder / "tune"),
            "--tracking-uri", f"sqlite:///{db}",
        ]
    )  # fmt: skip
    ray.shutdown()
    assert code == 0
    server = MlflowServer(db)
    yield server, folder
    server.stop()


def test_search_is_one_parent_with_one_nested_child_per_trial(quick_search):
    server, folder = quick_search
    experiment = server.get("experiments/get-by-name", experiment_name="quick")["experiment"]
    runs = server.runs(experiment["experiment_id"])
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    children = [r for r in runs if "mlflow.parentRunId" in tags(r)]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    assert all(tags(c)["mlflow.parentRunId"] == parent["info"]["run_id"] for c in children)
    assert len({tags(c)["trial_id"] for c in children}) == 3
    # The parent holds the best trial and the table of all trials.
    parent_metrics = {m["key"] for m in parent["data"]["metrics"]}
    assert {"best/selection_score", "selection/pick_rank", "selection/trials"} <= parent_metrics
    listed = server.get("artifacts/list", run_id=parent["info"]["run_id"])
    assert "trials.csv" in {f["path"] for f in listed["files"]}
    trial_dirs = list((folder / "tune").glob(f"quick-*/{SEARCH_FILE}"))
    assert len(trial_dirs) == 1
    # Every trial points at its checkpoint; the best model is registered with its config.
    assert all(tags(c)["checkpoint"].rsplit("/", 1)[-1].startswith("checkpoint_") for c in children)
    registered = tags(parent)["registered_model"]
    name, version = registered.removeprefix("models:/").split("/")
    model = server.get("model-versions/get", name=name, version=version)["model_version"]
    version_tags = {t["key"]: t["value"] for t in model["tags"]}
    assert "loss:" in version_tags["config"] and version_tags["checkpoint"]
    best = next(c for c in children if c["info"]["run_id"] == model["run_id"])
    model_files = server.get("artifacts/list", run_id=best["info"]["run_id"], path="model")["files"]
    assert {f["path"] for f in model_files} >= {
        "model/state.pt",
        "model/metrics.json",
        "model/config.yaml",
    }


def test_child_runs_hold_config_metrics_per_epoch_and_tags(quick_search):
    server, _ = quick_search
    experiment = server.get("experiments/get-by-name", experiment_name="quick")["experiment"]
    children = [r for r in server.runs(experiment["experiment_id"]) if "trial_id" in tags(r)]
    expected_params = set(flatten(load_config(DIGITS).to_dict()))
    for child in children:
        run_id = child["info"]["run_id"]
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert set(params) == expected_params
        name = child["info"]["run_name"]
        assert name.startswith(f"t{float(params['loss.temperature']):.2f}-"), name
        child_tags = tags(child)
        for key in (
            "dataset",
            "imbalance_ratio",
            "num_clusters",
            "backbone",
            "seed",
            "git_revision",
            "world_size",
        ):
            assert child_tags.get(key), key
        assert child_tags["dataset"] == "digits" and child_tags["world_size"] == "1"
        epochs = [
            p["step"]
            for p in server.get("metrics/get-history", run_id=run_id, metric_key="epoch")["metrics"]
        ]
        finished = len(epochs)
        assert sorted(int(s) for s in epochs) == list(range(finished)) and finished >= 1
        # One point per finished epoch, for every metric; no Ray bookkeeping in the metrics.
        keys = {m["key"] for m in child["data"]["metrics"]}
        assert {"loss/total", "loss/dcl", "loss/clustering", "selection_score", "train/caa"} <= keys
        assert not keys & {"pid", "timestamp", "time_this_iter_s", "training_iteration"}
        for key in keys:
            history = server.get("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            assert sorted(int(p["step"]) for p in history) == list(range(finished)), key
        status = child["info"]["status"]
        # ASHA may stop trials after its grace period: those end KILLED, the others FINISHED.
        assert status == ("FINISHED" if finished == EPOCHS else "KILLED"), (status, finished)


def test_finished_trials_log_assignments_and_plots(quick_search):
    server, _ = quick_search
    experiment = server.get("experiments/get-by-name", experiment_name="quick")["experiment"]
    children = [r for r in server.runs(experiment["experiment_id"]) if "trial_id" in tags(r)]
    finished = [c for c in children if c["info"]["status"] == "FINISHED"]
    assert finished, "ASHA keeps at least one trial to the end"
    num_images = len(load_digits_lt_indices())
    for child in finished:
        run_id = child["info"]["run_id"]
        files = {f["path"] for f in server.get("artifacts/list", run_id=run_id)["files"]}
        assert {"config.yaml", "lt_indices.npy", "assignments.parquet", "plots"} <= files
        plots = {
            f["path"] for f in server.get("artifacts/list", run_id=run_id, path="plots")["files"]
        }
        assert plots == {
            "plots/cluster_sizes.png",
            "plots/confusion.png",
            "plots/class_accuracy.png",
        }
        response = requests.get(
            f"{server.url}/get-artifact",
            params={"path": "assignments.parquet", "run_uuid": run_id},
            timeout=30,
        )
        response.raise_for_status()
        table = pq.read_table(io.BytesIO(response.content))
        assert table.num_rows == num_images
        assert set(table.column_names) == {"index", "cluster", "confidence", "ood_score", "label"}
        clusters = table.column("cluster").to_numpy()
        assert clusters.min() >= 0 and clusters.max() < 10
        confidence = table.column("confidence").to_numpy()
        assert ((confidence >= 0) & (confidence <= 1)).all()


def load_digits_lt_indices():
    from jdcl_ray.data import prepare_data

    return prepare_data(load_config(DIGITS)).lt_indices


tune_cli = functools.partial(cli, "tune")


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_mid_search(tmp_path):
    """SIGKILL the driver once one trial has finished and the next one has checkpoints: the
    finished trial is not re-run, the interrupted one continues from its checkpoint."""
    from mlflow.tracking import MlflowClient

    epochs = 4  # FIFO: every trial runs them all, so the next trial has epochs to interrupt
    space = write_space(
        tmp_path, "resumable", epochs, "fifo", num_samples=3, max_concurrent_trials=1
    )
    storage, db = tmp_path / "tune", tmp_path / "mlflow.db"
    args = ["--space", str(space), "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"]

    def results(trial_id: str) -> list[dict]:
        """What Tune recorded of the trial's reports (one per epoch it received)."""
        found = list(storage.glob(f"resumable-*/run_trial_{trial_id}_*/result.json"))
        return [json.loads(line) for line in found[0].read_text().splitlines()] if found else []

    def trials() -> tuple[set[str], set[str]]:
        """(finished trials, unfinished trials with a checkpoint and a report Tune received)."""
        finished = {p.parent.name for p in storage.glob("resumable-*/trials/*/metrics.json")}
        saved = storage.glob("resumable-*/trials/*/train/checkpoint_*/metrics.json")
        started = {p.parents[2].name for p in saved} - finished
        return finished, {trial_id for trial_id in started if results(trial_id)}

    first = tune_cli(*args)
    deadline = time.monotonic() + 300
    finished, interrupted = trials()
    while not (finished and interrupted) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        finished, interrupted = trials()
    assert first.poll() is None, "search ended before it could be stopped:\n" + first.stdout.read()
    assert finished and interrupted, "no trial finished and no next trial saved in time"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
    first.wait()
    finished_trial = next(storage.glob(f"resumable-*/trials/{min(finished)}"))
    checkpoints_before = sorted(p.name for p in (finished_trial / "train").glob("checkpoint_*"))
    resumed = tune_cli(*args, "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("resumable")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # One child per trial, none left RUNNING, each with one point per epoch.
    assert len(children) == 3 == len([r for r in runs if "trial_id" in r.data.tags])
    for child in children.values():
        assert child.info.status in ("FINISHED", "KILLED"), child.info.status
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "epoch")]
        assert sorted(steps) == list(range(epochs))
    # The finished trial was not trained again.
    again = sorted(p.name for p in (finished_trial / "train").glob("checkpoint_*"))
    assert again == checkpoints_before
    # The interrupted trial continued from a checkpoint it had saved (not from scratch) and
    # finished all its epochs. (Tune's own result.json of a restored trial starts afresh, so it
    # can't tell; the run's tag can.)
    for trial_id in interrupted:
        resumed_from = int(children[trial_id].data.tags[RESUMED_TAG])
        assert 0 <= resumed_from < epochs
        summary = json.loads((finished_trial.parent / trial_id / "metrics.json").read_text())
        assert summary["epochs_done"] == epochs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", "tune_spaces/missing.yaml"], "tune_spaces/missing.yaml does not exist"),
        (
            ["--space", "tune_spaces/quickstart.yaml", "--tracking-uri", "http://127.0.0.1:9"],
            "MLflow tracking server http://127.0.0.1:9 is unreachable",
        ),
        (
            [
                "--space",
                "tune_spaces/quickstart.yaml",
                "--resume",
                "--storage",
                "/nonexistent/tune",
            ],
            "no search named 'quickstart' under --storage /nonexistent/tune",
        ),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, args, message):
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "jdcl_ray.tune",
            *args,
            *(
                ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
                if "--tracking-uri" not in args
                else []
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stdout + process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        process.stderr
    )


@pytest.mark.slow
def test_a_local_search_prints_no_harmless_ray_error_lines(tmp_path):
    """Ray started here: no preemption watcher per trial (its construction logs an error line),
    no placement-group cleaner or token notices; the summary is there."""
    space = write_space(tmp_path, "console", epochs=1, num_samples=2, max_concurrent_trials=2)
    process = subprocess.run(
        [sys.executable, "-m", "jdcl_ray.tune", "--space", str(space),
         "--storage", str(tmp_path / "tune"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip
    printed = process.stdout + process.stderr
    assert process.returncode == 0, printed[-3000:]
    assert "best trial" in printed
    for noise in ("PreemptionWatcher", "PlacementGroupCleaner", "Token authentication"):
        assert noise not in printed, noise
