"""Fixtures shared by several test modules (pytest finds them here; nothing imports this file).

Helpers a test calls by name (``cli``, ``sets``, the servers) are in servers.py. The package is
imported inside the fixtures, so a module mid-change breaks only the tests that use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import DIGITS

TINY_EPOCHS = 8  # enough for the OOD score to tell noise from digits


def train_tiny(output: Path) -> Path:
    """digits-LT for a few epochs in this process (no Ray), checkpoints laid out as Train does;
    the final checkpoint folder."""
    import torch

    from jdcl_ray.checkpoint import save_checkpoint
    from jdcl_ray.config import load_config
    from jdcl_ray.data import prepare_data
    from jdcl_ray.engine import WorkerContext, fit

    config = load_config(DIGITS, [f"run.epochs={TINY_EPOCHS}", "run.checkpoint_every=4"])

    def report(metrics: dict, state: dict | None, assignments: dict | None) -> None:
        if state is None:
            return
        folder = output / "train" / f"checkpoint_{metrics['epoch']:06d}"
        folder.mkdir(parents=True)
        save_checkpoint(folder, state, metrics, assignments)

    torch.set_num_threads(2)
    fit(config, prepare_data(config), WorkerContext(0, 1, torch.device("cpu")), report, log=print)
    return output / "train" / f"checkpoint_{TINY_EPOCHS - 1:06d}"


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The final checkpoint folder of a tiny run (its run folder is two levels up), trained once
    per session for every module that asks (test_predict, test_report)."""
    return train_tiny(tmp_path_factory.mktemp("run"))


@pytest.fixture
def mlflow_store(request, tmp_path):
    """A fresh sqlite MLflow store (no server): its URI, a client, and the id of an experiment
    named after the test module ("predict" for test_predict.py)."""
    from jdcl_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.connect(uri)
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    return uri, client, tracking.experiment_id(client, name)
