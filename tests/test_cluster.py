"""The cluster files, validated by Ray's own checks, and a real two-node Ray cluster on this
machine: a search whose 2-worker trial spreads over both nodes, checkpoints in shared storage,
tracked in an MLflow server on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config
from servers import RAY_ENV, MlflowServer, TwoNodeRay

ROOT = Path(__file__).resolve().parents[1]
GPU_YAML = ROOT / "cluster" / "gpu.yaml"
KUBERAY_YAML = ROOT / "cluster" / "kuberay.yaml"


def validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_gpu_yaml_passes_rays_own_validation():
    config = yaml.safe_load(GPU_YAML.read_text())
    validate(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["TRAIN_DRIVER"] == 1 and head["resources"]["CPU"] == 0
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert len(gpu_types) >= 2
    assert any("InstanceMarketOptions" in t["node_config"] for t in gpu_types)
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    # Only SSH is open from outside; the dashboard binds to the head's loopback.
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "TRAIN_DRIVER" in start
    assert "mlflow server" in start and "0.0.0.0" not in start
    setup = " ".join(config["setup_commands"])
    assert "torch==2.14.1" in setup


def broken_without_resources(config: dict) -> dict:
    del config["available_node_types"]["gpu_a10g_x4"]["resources"]
    return config


def broken_head_type(config: dict) -> dict:
    config["head_node_type"] = "head_that_does_not_exist"
    return config


def broken_fractional_resource(config: dict) -> dict:
    config["available_node_types"]["head"]["resources"]["TRAIN_DRIVER"] = 0.5
    return config


@pytest.mark.parametrize(
    "breakage", [broken_without_resources, broken_head_type, broken_fractional_resource]
)
def test_broken_gpu_yaml_is_rejected(breakage):
    config = breakage(yaml.safe_load(GPU_YAML.read_text()))
    with pytest.raises((ValueError, KeyError, ValidationError)):
        validate(config)


def test_kuberay_yaml_has_head_and_gpu_workers_on_the_same_image():
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY_YAML.read_text())}
    assert {"RayCluster", "RayJob"} <= set(documents)
    cluster = documents["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    head = cluster["spec"]["headGroupSpec"]
    assert "TRAIN_DRIVER" in head["rayStartParams"]["resources"]
    assert head["serviceType"] == "ClusterIP"
    workers = cluster["spec"]["workerGroupSpecs"]
    gpu_limits = [
        container["resources"]["limits"].get("nvidia.com/gpu")
        for group in workers
        for container in group["template"]["spec"]["containers"]
    ]
    assert gpu_limits and all(int(limit) >= 1 for limit in gpu_limits)
    images = {
        container["image"]
        for spec in [head["template"]["spec"]] + [g["template"]["spec"] for g in workers]
        for container in spec["containers"]
    }
    assert images == {yaml.safe_load(GPU_YAML.read_text())["docker"]["image"]}
    assert "jdcl_ray.tune" in documents["RayJob"]["spec"]["entrypoint"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    cluster = TwoNodeRay(folder)
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_a_search_spreads_its_trial_over_two_nodes(two_nodes, tmp_path):
    space = tmp_path / "two_nodes.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "base": {
                    "config": str(ROOT / "configs" / "digits_lt.yaml"),
                    "set": {"run.epochs": 2, "run.placement_strategy": "STRICT_SPREAD"},
                },
                "space": {"loss.temperature": {"choice": [0.5]}},
                "search": {"algorithm": "random", "num_samples": 1},
                "scheduler": {"kind": "fifo"},
                "resources": {"workers": 2, "cpus_per_worker": 1},
            }
        )
    )
    shared = tmp_path / "shared"
    server = MlflowServer(tmp_path / "mlflow.db", artifacts=tmp_path / "artifacts")
    try:
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable, "-m", "jdcl_ray.tune", "--space", str(space),
                "--address", two_nodes.address, "--storage", str(shared),
                "--tracking-uri", server.url,
            ],
            cwd=ROOT, env=RAY_ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        print(f"two-node search: {elapsed:.0f} s")
        # Checkpoints are in the shared storage folder.
        checkpoints = list(shared.glob("two_nodes-*/trials/*/train/checkpoint_*/state.pt"))
        assert checkpoints
        # The trial is a FINISHED child of the search's parent run in the server on 127.0.0.1.
        experiment = server.get("experiments/get-by-name", experiment_name="two_nodes")
        runs = server.runs(experiment["experiment"]["experiment_id"])
        children = [r for r in runs if any(t["key"] == "trial_id" for t in r["data"]["tags"])]
        assert [c["info"]["status"] for c in children] == ["FINISHED"]
        child_tags = {t["key"]: t["value"] for t in children[0]["data"]["tags"]}
        assert child_tags["world_size"] == "2"
        files = server.get("artifacts/list", run_id=children[0]["info"]["run_id"])["files"]
        assert "assignments.parquet" in {f["path"] for f in files}
    finally:
        server.stop()
    # The two Train workers ran on different nodes. (The address is explicit: without it the
    # state API refuses to choose when another Ray runs on this machine.)
    nodes = two_nodes.query(
        "import json\nfrom ray.util.state import list_actors\n"
        f"actors = list_actors(address={two_nodes.address!r}, "
        "filters=[('class_name', '=', 'RayTrainWorker')], limit=100)\n"
        "print(json.dumps(sorted({a.node_id for a in actors})))",
    )
    assert len(json.loads(nodes.splitlines()[-1])) == 2


def test_a_folder_the_second_node_cannot_see_is_refused(two_nodes, tmp_path):
    if two_nodes.hidden is None:
        pytest.skip(
            "no mount namespaces here (unshare needs root): can't hide a folder from a node"
        )
    storage = two_nodes.hidden / "storage"
    done = subprocess.run(
        [
            sys.executable, "-m", "jdcl_ray.tune", "--space", str(ROOT / "tune_spaces" / "quickstart.yaml"),
            "--address", two_nodes.address, "--storage", str(storage),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=ROOT, env=RAY_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"--storage {storage} is a local folder that Ray nodes" in error[0]
    assert not list(storage.glob(".jdcl-shared-*")), "the marker file is cleaned up"
