"""The throughput suite: images/s of the batched augmentation against the conventional per-image
pipeline, of the engine's training step (with and without making its input), of an epoch under
Ray Train against the bare loop, and the cost of the losses by global batch; on a GPU also the
ResNet-18 step in fp32 and bf16. Every figure is measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jdcl_ray.augment import AugmentConfig, BatchAugment
from jdcl_ray.bench.common import machine, subsample
from jdcl_ray.checkpoint import saved_checkpoints
from jdcl_ray.config import Config, load_config
from jdcl_ray.data import ImageDataset, RunData, prepare_data
from jdcl_ray.engine import WorkerContext, fit, start_training, train_step
from jdcl_ray.losses import dcl_loss, ddc_loss
from jdcl_ray.runtime import init_ray


class PilViews(torch.utils.data.Dataset):
    """The conventional pipeline, as peers ship it: SimCLR's transforms applied per PIL image,
    two views per image, run in DataLoader worker processes."""

    def __init__(self, images: torch.Tensor, config: Any) -> None:
        from torchvision import transforms as T

        self.images = images.permute(0, 2, 3, 1).squeeze(-1).numpy()  # HWC or HW for PIL
        size = images.shape[-1]
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=config.crop_scale),
                T.RandomHorizontalFlip(config.flip_p),
                T.RandomApply([T.ColorJitter(*config.jitter)], p=config.jitter_p),
                T.RandomGrayscale(config.grayscale_p),
                T.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)


def conventional_batches(images: torch.Tensor, config: Any, batch: int, workers: int) -> Any:
    loader = torch.utils.data.DataLoader(
        PilViews(images, config),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    while True:
        yield from loader


def _rate(images_per_call: int, calls: int, run: Any) -> float:
    """Images per second of ``calls`` calls of ``run`` (after one warm-up call)."""
    run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return images_per_call * calls / (time.perf_counter() - started)


def synthetic_images(count: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (count, channels, side, side), dtype=torch.uint8, generator=generator
    )


def augmentation_throughput(channels: int, side: int, batch: int, calls: int, workers: int) -> dict:
    config = AugmentConfig()
    images = synthetic_images(batch * 4, channels, side)
    augment, generator = BatchAugment(config), torch.Generator().manual_seed(0)
    order = iter(range(10**9))

    def batched() -> None:
        start = (next(order) % 4) * batch
        augment.stacked_views(images[start : start + batch], generator)

    conventional = conventional_batches(images, config, batch, workers)
    batched_rate = _rate(batch, calls, batched)
    conventional_rate = _rate(batch, calls, lambda: next(conventional))
    return {
        "batched_img_s": batched_rate,
        "conventional_img_s": conventional_rate,
        "ratio": batched_rate / conventional_rate,
    }


def synthetic_run(config: Config, count: int) -> RunData:
    """``count`` random images of the size ``config``'s backbone expects, unlabelled."""
    channels, side = (1, 28) if config.model.backbone == "small_cnn" else (3, 32)
    images = ImageDataset(synthetic_images(count, channels, side), None, [], "synthetic")
    return RunData(train=images, eval=None, lt_indices=np.arange(count), class_order=[])


def step_throughput(
    config: Config, device: torch.device, steps: int, workers: int, conventional: bool = True
) -> dict:
    """Images/s of the full step, of the model step on ready tensors, and of the model step fed by
    the conventional pipeline; also the share of the full step spent making its input. The step
    is the engine's (``train_step``) on ``optim.batch_size`` images, every loss term on."""
    batch = config.optim.batch_size
    data = synthetic_run(config, batch * 4)
    training = start_training(config, data, WorkerContext(0, 1, device), None)
    images = data.train.images.to(device)
    generator = torch.Generator(device).manual_seed(0)
    indices = torch.arange(len(images), device=device)
    epoch = max(config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def model_step(views: torch.Tensor, first: int = 0) -> None:
        train_step(training, views, indices[first : first + batch], epoch)

    ready = training.augment.stacked_views(images[:batch], generator)
    order = iter(range(10**9))
    input_time = [0.0]

    def full_step() -> None:
        start = (next(order) % 4) * batch
        begun = time.perf_counter()
        views = training.augment.stacked_views(images[start : start + batch], generator)
        sync()
        input_time[0] += time.perf_counter() - begun
        model_step(views, start)
        sync()

    def ready_step() -> None:
        model_step(ready)
        sync()

    # Alternate the two steps so that both see the same machine (load, clocks, caches).
    ready_step()
    full_step()
    spent = {"ready": 0.0, "full": 0.0}
    input_time[0] = 0.0
    for _ in range(steps):
        for name, step in (("ready", ready_step), ("full", full_step)):
            begun = time.perf_counter()
            step()
            spent[name] += time.perf_counter() - begun
    model_rate, full_rate = batch * steps / spent["ready"], batch * steps / spent["full"]
    result = {
        "model_only_img_s": model_rate,
        "full_step_img_s": full_rate,
        "full_vs_model_only": full_rate / model_rate,
        "input_share_of_full_step": input_time[0] / spent["full"],
    }
    if conventional:
        loader = conventional_batches(data.train.images, config.augment, batch, workers)

        def conventional_step() -> None:
            first, second = next(loader)  # shuffled: indices matter only to per-image state
            model_step(torch.cat([first, second]).to(device, non_blocking=True))
            sync()

        rate = _rate(batch, steps, conventional_step)
        result.update(conventional_img_s=rate, conventional_vs_model_only=rate / model_rate)
    return result


def ray_overhead(base: str, epochs: int, max_images: int) -> dict:
    """One epoch's images/s under Ray Train (1 worker, all cores) vs the same loop bare here."""
    cores = torch.get_num_threads()
    config = load_config(
        base,
        {
            "run": {
                "epochs": epochs,
                "workers": 1,
                "cpus_per_worker": cores,
                "keep_checkpoints": epochs,
            },
            "eval": {"every": epochs + 1},
        },
    )
    data = subsample(prepare_data(config), max_images, 0)
    rates: list[float] = []

    def note(metrics_: dict, _state: Any, _assignments: Any) -> None:
        rates.append(metrics_["images_per_s"])

    from jdcl_ray.train import run_training  # Ray: imported here, so that the GPU suite needs none

    fit(config, data, WorkerContext(0, 1, torch.device("cpu")), note, log=lambda _line: None)
    bare = float(np.mean(rates[1:] or rates))
    init_ray(None)
    with tempfile.TemporaryDirectory() as output:
        run_training(config, output, data)
        reported = [metrics_ for metrics_, _ in saved_checkpoints(output)]
    under_ray = float(
        np.mean([m["images_per_s"] for m in reported[1:]] or [reported[-1]["images_per_s"]])
    )
    startup, teardown = ray_worker_startup(cores)
    return {
        "bare_epoch_img_s": bare,
        "ray_epoch_img_s": under_ray,
        "ray_vs_bare": under_ray / bare,
        "worker_startup_s": startup,
        "worker_teardown_s": teardown,
        "epochs": epochs,
        "images": len(data.train.images),
    }


def _now() -> float:
    return time.time()


def ray_worker_startup(cores: float) -> tuple[float, float]:
    """Seconds from ``TorchTrainer.fit()`` to its worker function starting, and from its end
    to ``fit()`` returning (a 1-worker run whose function only returns the time)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as output:
        trainer = TorchTrainer(
            _now,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cores}),
            run_config=RunConfig(name="startup", storage_path=output),
        )
        called = time.time()
        started = trainer.fit().return_value
        returned = time.time()
    return started - called, returned - started


def _loss_inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """B images → 2B projections of 128, 2B assignments over 10 clusters, 2B hidden rows of 100."""
    generator = torch.Generator(device).manual_seed(0)
    shapes = ((batch, 128), (batch, 128), (2 * batch, 10), (2 * batch, 100))
    return tuple(
        torch.randn(*shape, device=device, generator=generator).requires_grad_() for shape in shapes
    )


def _loss_step(inputs: tuple[torch.Tensor, ...], device: torch.device) -> None:
    z1, z2, logits, hidden = inputs
    loss = dcl_loss(z1, z2, 0.5, 0.1) + ddc_loss(logits.softmax(1), hidden)["total"]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field_name} in /proc/self/status")


def loss_peak_child(batch: int) -> None:
    """In a fresh process (no allocator cache yet): peak RSS growth of one loss step, printed."""
    inputs = _loss_inputs(batch, torch.device("cpu"))
    before = _status_bytes("VmRSS")
    _loss_step(inputs, torch.device("cpu"))
    print(_status_bytes("VmHWM") - before)


def _cpu_loss_peak_mb(batch: int) -> float | None:
    code = f"from jdcl_ray.bench.throughput import loss_peak_child; loss_peak_child({batch})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None
    return int(done.stdout.strip().splitlines()[-1]) / 2**20


def loss_cost(global_batches: Iterable[int], device: torch.device, repeats: int) -> list[dict]:
    """Forward + backward time and peak memory of dcl_loss + ddc_loss at each global batch."""
    rows = []
    for batch in global_batches:
        inputs = _loss_inputs(batch, device)
        _loss_step(inputs, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(repeats):
            _loss_step(inputs, device)
        seconds = (time.perf_counter() - started) / repeats
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        else:
            peak = _cpu_loss_peak_mb(batch)
        rows.append({"global_batch": batch, "seconds": seconds, "peak_extra_mb": peak})
    return rows


def throughput(quick: bool, base: str) -> dict[str, Any]:
    """Every figure of the throughput suite, measured side by side in this one process."""
    device = torch.device("cpu")
    calls, steps = (3, 3) if quick else (20, 20)
    workers = min(2, torch.get_num_threads())
    small = load_config(base, {"optim": {"batch_size": 256}})
    result: dict[str, Any] = {
        "machine": machine(
            loader_workers=workers,
            cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        ),
        "augmentation": {
            "rgb32": augmentation_throughput(3, 32, 256, calls, workers),
            "grey28": augmentation_throughput(1, 28, 256, calls, workers),
        },
        "step": step_throughput(small, device, steps, workers),
        "ray": ray_overhead(base, 2 if quick else 4, 1024 if quick else 8192),
        "loss": loss_cost((512, 1024) if quick else (512, 1024, 4096), device, 1 if quick else 3),
        "gpu": None,
    }
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        gpu_config = load_config(
            base,
            {
                "model": {"backbone": "resnet18_cifar"},
                "augment": {"crop_scale": [0.08, 1.0]},
                "optim": {"batch_size": 512},
            },
        )
        gpu: dict[str, Any] = {}
        for precision in ("fp32", "bf16"):
            if precision == "fp32":
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            else:
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            gpu[precision] = step_throughput(
                gpu_config, cuda, steps * 3, workers, conventional=precision == "bf16"
            )
        gpu["loss"] = loss_cost((512, 1024, 4096), cuda, 5)
        result["gpu"] = gpu
    return result


def main(args: argparse.Namespace) -> int:
    """Every figure, printed as JSON (and written to ``--json``)."""
    figures = throughput(args.quick, args.base)
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0
