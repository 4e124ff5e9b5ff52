"""Faults, for real: a killed Train worker, an MLflow server that goes away, a diverging trial,
a pickled checkpoint. (A killed driver: tests/test_tune.py and tests/test_train.py.)"""

from __future__ import annotations

import functools
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from servers import MlflowServer, cli

from jdcl_ray.checkpoint import load_state
from jdcl_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_lt.yaml"


def write_space(folder: Path, name: str, epochs: int, space: dict, workers: int = 1) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "base": {
                    "config": str(DIGITS),
                    "set": {"run.epochs": epochs, "run.max_failures": 2},
                },
                "space": space,
                "search": {"algorithm": "random", "num_samples": 1, "max_concurrent_trials": 1},
                "scheduler": {"kind": "fifo"},
                "resources": {"workers": workers, "cpus_per_worker": 1},
            }
        )
    )
    return path


tune = functools.partial(cli, "tune")


def wait_for(condition, process: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"ended before {what}:\n" + process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def child_runs(db: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if "trial_id" in r.data.tags]


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, "epoch"))


def train_workers_under(root: int) -> list[int]:
    """PIDs of the Ray Train workers descended from process ``root`` (this search's Ray only)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    parent, command = {}, {}
    for line in table.splitlines():
        pid, ppid, args = (
            line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(), "")
        )
        parent[int(pid)], command[int(pid)] = int(ppid), args

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 1)
        return False

    return [pid for pid, args in command.items() if "ray::RayTrainWorker" in args and descends(pid)]


@pytest.mark.slow
def test_a_killed_train_worker_costs_at_most_one_epoch(tmp_path):
    epochs = 6
    space = write_space(
        tmp_path, "workerkill", epochs, {"loss.temperature": {"choice": [0.5]}}, workers=2
    )
    db, storage = tmp_path / "mlflow.db", tmp_path / "tune"
    search = tune(
        "--space", str(space), "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"
    )
    checkpoints = lambda: list(storage.glob("workerkill-*/trials/*/train/checkpoint_*/state.pt"))  # noqa: E731
    wait_for(lambda: len(checkpoints()) >= 2, search, 300, "two checkpoints")
    pids = train_workers_under(search.pid)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    log, _ = search.communicate(timeout=600)
    assert search.returncode == 0, log[-3000:]
    (child,) = child_runs(db, "workerkill")
    assert child.info.status == "FINISHED"
    # The MLflow history has every epoch once, though some were reported twice.
    assert epochs_logged(f"sqlite:///{db}", child.info.run_id) == list(range(epochs))
    results = next(storage.glob("workerkill-*/*/result.json")).read_text().splitlines()
    # One report per epoch, plus at most the one epoch that was being trained at the kill.
    assert epochs <= len(results) <= epochs + 1, len(results)


@pytest.mark.slow
def test_tracking_server_going_away_mid_run_keeps_training_and_says_so(tmp_path):
    epochs = 8
    space = write_space(tmp_path, "serverdown", epochs, {"loss.temperature": {"choice": [0.5]}})
    storage = tmp_path / "tune"
    server = MlflowServer(tmp_path / "mlflow.db", artifacts=tmp_path / "artifacts")
    search = tune("--space", str(space), "--storage", str(storage), "--tracking-uri", server.url)
    try:
        runs = lambda: child_runs(tmp_path / "mlflow.db", "serverdown")  # noqa: E731
        wait_for(
            lambda: runs() and len(epochs_logged(server.url, runs()[0].info.run_id)) >= 2,
            search,
            300,
            "two logged epochs",
        )
    finally:
        server.stop()
    log, _ = search.communicate(timeout=600)
    assert search.returncode == 0, log[-3000:]
    saved = list(storage.glob("serverdown-*/trials/*/train/checkpoint_*/state.pt"))
    assert {int(load_state(path.parent)["epoch"]) for path in saved} >= {epochs - 1}
    assert "could not log epoch" in log and "not logged" in log, log[-3000:]


def test_a_diverging_trial_errors_with_its_step_and_the_search_goes_on(tmp_path):
    space = write_space(tmp_path, "diverge", 2, {"optim.lr": {"grid": [0.002, 1e30]}})
    db, storage = tmp_path / "mlflow.db", tmp_path / "tune"
    search = tune(
        "--space", str(space), "--storage", str(storage), "--tracking-uri", f"sqlite:///{db}"
    )
    log, _ = search.communicate(timeout=600)
    assert search.returncode == 0, log[-3000:]
    statuses = sorted(
        (float(run.data.params["optim.lr"]), run.info.status) for run in child_runs(db, "diverge")
    )
    assert statuses == [(0.002, "FINISHED"), (1e30, "FAILED")]
    errors = list(storage.glob("diverge-*/*/error.txt"))
    assert len(errors) == 1
    assert (
        "non-finite loss at step" in errors[0].read_text()
        and "clustering=" in errors[0].read_text()
    )


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_payload_in_a_checkpoint_is_refused(tmp_path):
    with open(tmp_path / "state.pt", "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(UserError, match=r"state\.pt is not a weights-only checkpoint"):
        load_state(tmp_path)
    torch.save({"epoch": 1, "model": {"w": torch.zeros(2)}}, tmp_path / "state.pt")
    assert load_state(tmp_path)["epoch"] == 1


def test_uris_with_credentials_are_redacted_in_messages():
    from jdcl_ray.tracking import connect, redact

    assert (
        redact("https://alice:s3cret@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    )
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    with pytest.raises(UserError) as raised:
        connect("http://alice:s3cret@127.0.0.1:9")
    assert "s3cret" not in str(raised.value) and "***@127.0.0.1:9" in str(raised.value)


def test_shipped_files_hold_no_credentials():
    pattern = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key|secret_key\s*[:=]|password\s*[:=]|token\s*[:=]\s*\S{8,}",
        re.IGNORECASE,
    )
    files = [
        p
        for folder in ("configs", "cluster", "tune_spaces")
        for p in (ROOT / folder).glob("*.yaml")
    ]
    assert files
    leaks = [f"{p.name}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert leaks == []


def test_local_ray_dashboard_listens_on_loopback():
    import ray

    from jdcl_ray.runtime import init_ray

    try:
        init_ray(None)
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        assert url.split(":")[0] in ("127.0.0.1", "localhost"), url
    finally:
        ray.shutdown()
