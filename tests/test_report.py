"""report: every plot of a real tiny run, drawn, readable, and logged to its MLflow run."""

from __future__ import annotations

import pytest
from PIL import Image
from servers import DIGITS

from jdcl_ray import tracking
from jdcl_ray.config import load_config
from jdcl_ray.errors import UserError
from jdcl_ray.report import main

PLOTS = {
    "cluster_sizes.png",
    "confusion.png",
    "class_accuracy.png",
    "embedding_map.png",
    "examples.png",
    "ood_histogram.png",
}


def test_every_plot_is_drawn_and_logged(trained, tmp_path, mlflow_store):
    uri, client, experiment = mlflow_store
    parent = tracking.start_parent(client, experiment, "search", {})
    run_id, _ = tracking.child_run(client, experiment, parent, "t1", "trial", load_config(DIGITS))
    client.set_tag(run_id, tracking.CHECKPOINT_TAG, str(trained))
    output = tmp_path / "report"
    assert main(["--run", run_id, "--output", str(output), "--tracking-uri", uri]) == 0
    assert {path.name for path in output.iterdir()} == PLOTS
    for name in PLOTS:
        with Image.open(output / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    logged = {item.path for item in client.list_artifacts(run_id, "report")}
    assert logged == {f"report/{name}" for name in PLOTS}


def test_a_run_without_a_checkpoint_is_a_user_error(tmp_path, mlflow_store):
    uri, client, experiment = mlflow_store
    run_id = client.create_run(experiment).info.run_id
    with pytest.raises(UserError, match=f"MLflow run {run_id} has no 'checkpoint' tag"):
        main(["--run", run_id, "--output", str(tmp_path), "--tracking-uri", uri])
    with pytest.raises(UserError, match="--run 'runs/x' is not a folder, an MLflow run id"):
        main(["--run", "runs/x", "--tracking-uri", uri])


def test_a_run_folder_is_drawn_without_mlflow(trained, tmp_path):
    output = tmp_path / "report"
    assert main(["--run", str(trained), "--output", str(output)]) == 0
    assert {path.name for path in output.iterdir()} == PLOTS
