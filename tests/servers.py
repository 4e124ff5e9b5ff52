"""Real services for the tests: an MLflow server and a two-node Ray cluster on this machine,
each started as its own process group and stopped by PID; the CLIs run as subprocesses.

Helpers a test module calls by name live here (an ordinary module to import); shared fixtures
live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_lt.yaml"


# Identity augmentation: an image's views then don't depend on which worker or batch slot drew it.
IDENTITY_VIEWS = [
    "augment.crop_scale=[1.0, 1.0]",
    "augment.flip_p=0.0",
    "augment.jitter_p=0.0",
    "augment.grayscale_p=0.0",
]


def cli(module: str, *args: str, **kwargs) -> subprocess.Popen:
    """``python -m jdcl_ray.<module> ARGS`` from the repository root, output merged, in a
    process group of its own (so a test can kill it and the Ray it started together)."""
    return subprocess.Popen(
        [sys.executable, "-m", f"jdcl_ray.{module}", *args],
        cwd=ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def sets(*items: str) -> list[str]:
    """``--set`` overrides for a CLI: ``sets("run.epochs=2")`` is ``["--set", "run.epochs=2"]``."""
    return [arg for item in items for arg in ("--set", item)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group led by ``process``, then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over a sqlite store, queried with its REST API."""

    def __init__(self, db: Path, artifacts: Path | None = None) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{db}",
                "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                "--workers", "1",
                *(["--artifacts-destination", str(artifacts)] if artifacts else []),
            ],
            # No GenAI job runner (eight more processes): these tests only track training runs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def get(self, endpoint: str, **params) -> dict:
        response = requests.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, endpoint: str, body: dict) -> dict:
        response = requests.post(f"{self.url}/api/2.0/mlflow/{endpoint}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def runs(self, experiment_id: str) -> list[dict]:
        return self.post(
            "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}
        ).get("runs", [])

    def stop(self) -> None:
        stop_group(self.process)


RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


class TwoNodeRay:
    """A Ray head (``ray start --head``) and a second node joining it, both on this machine,
    each with one CPU and its own custom resource; the head also holds TRAIN_DRIVER.

    Where mount namespaces are allowed, the second node runs in its own, with an empty tmpfs
    over ``hidden``: a folder the head sees and the second node doesn't, like a disk local to
    one machine of a real cluster.
    """

    def __init__(self, folder: Path) -> None:
        self.hidden: Path | None = folder / "hidden"
        self.hidden.mkdir()
        isolate = ["unshare", "--mount", "--propagation", "private"]
        if subprocess.run([*isolate, "true"], capture_output=True).returncode != 0:
            self.hidden, isolate = None, []
        subprocess.run(
            [BIN / "ray", "get-auth-token", "--generate"],
            env=RAY_ENV,
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []
        # Its own short temp dir (socket paths must stay short): its address file then can't
        # make a later plain ray.init() try to join this cluster after it is stopped.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp"))
        common = [
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        self._start(
            folder / "head.log",
            "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}", "--resources", json.dumps({"TRAIN_DRIVER": 1, "node_head": 1}),
            *common,
        )  # fmt: skip
        self._wait_for_nodes(1)
        self._start(
            folder / "second.log",
            f"--address={self.address}", "--resources", json.dumps({"node_second": 1}), *common,
            wrap=isolate,
        )  # fmt: skip
        self._wait_for_nodes(2)

    def _start(self, log: Path, *args: str, wrap: list[str] | None = None) -> None:
        command = [str(BIN / "ray"), "start", *args]
        if wrap:  # mount a tmpfs over `hidden` inside the namespace, then start the node there
            command = [
                *wrap,
                "sh",
                "-c",
                f'mount -t tmpfs none "{self.hidden}" && exec "$@"',
                "sh",
                *command,
            ]
        handle = open(log, "w")  # noqa: SIM115 - kept open for the process's life
        self.processes.append(
            subprocess.Popen(
                command,
                env=RAY_ENV,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def query(self, code: str, timeout: float = 120) -> str:
        """Run Python ``code`` in a driver connected to the cluster; its stdout."""
        script = f"import ray\nray.init(address={self.address!r}, logging_level='ERROR')\n{code}"
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=RAY_ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return done.stdout.strip()

    def _wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError("a Ray node process exited while starting")
            try:
                alive = self.query("print(sum(n['Alive'] for n in ray.nodes()))", timeout=60)
                if int(alive.splitlines()[-1]) >= count:
                    return
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes")

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_group(process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
