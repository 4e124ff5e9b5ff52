"""The GPU suite: every GPU figure of the product in one run, on a bare CUDA machine.

It imports torch, torchvision, numpy and the project's plain-PyTorch modules only (no Ray, no
MLflow), so it runs on a GPU machine with the working tree copied over (benchmarks/gpu/run.sh).
Sections, each written to ``DIR/gpu.json`` and ``DIR/gpu.md`` as soon as it ends, so that a run
cut off by its time limit keeps what it measured:

1. ``step``: the engine's joint training step (both views, DCL + the shipped clustering objective
   + the pooling update; ``engine.train_step``) in images/s for ResNet-18 (CIFAR stem) at 32 px,
   per batch and precision, channels-last; the input path's share of the step (batched
   augmentation on the device, ``throughput.step_throughput``), peak GPU memory, and the model
   FLOP utilisation against a measured bf16 matrix product.
2. ``loss``: the joint objective's forward + backward at global batches whose negatives grow as
   B², and its share of a step whose workers each run the model on ``--worker-batch`` images.
3. ``quality``: Fashion-MNIST-LT IR 10 padded to 32 px, ResNet-18, as many epochs of
   ``configs/fashion_lt.yaml`` as fit in the budget: CAA, NMI, kNN accuracy, cluster sizes.
4. ``compile``: the step of section 1 under ``torch.compile`` (``run.compile``), its compile time
   apart. Last, because a compile can take minutes.

``--smoke`` runs the same code on the CPU with tiny sizes and a small CNN (CI's fast lane).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jdcl_ray import metrics, objective
from jdcl_ray.bench.common import markdown_table, subsample
from jdcl_ray.bench.throughput import step_throughput, synthetic_run
from jdcl_ray.checkpoint import model_from_state
from jdcl_ray.config import Config, load_config
from jdcl_ray.data import RunData, prepare_data
from jdcl_ray.engine import (
    WorkerContext,
    autocast,
    embed,
    fit,
    start_training,
    train_epoch,
    train_step,
)
from jdcl_ray.errors import UserError
from jdcl_ray.models import build_model

STEP_CONFIG = "configs/cifar10_lt.yaml"  # the GPU recipe: ResNet-18, CIFAR stem, 32 px
QUALITY_CONFIG = "configs/fashion_lt.yaml"
QUALITY_SIDE = 32  # Fashion-MNIST's 28 px padded with background to the CIFAR stem's side


@dataclass(frozen=True)
class Sizes:
    """How big each section is: the GPU run's, or the CPU smoke test's."""

    backbone: str
    batches: tuple[int, ...]  # per-step batches of the joint step
    precisions: tuple[str, ...]
    steps: int  # timed steps per configuration (after warm-up)
    global_batches: tuple[int, ...]  # of the loss section
    worker_batch: int  # each worker's model batch when the loss share is computed
    quality_seconds: float  # the quality run's budget, its final evaluation included
    quality_images: int | None  # subsample the LT set (None: all of it)
    compile_backend: str  # inductor on the GPU; aot_eager on the CPU (no C++ build in CI)
    compile_batches: tuple[int, ...]
    compile_needs_s: float  # the time a compiled configuration is started with, at least
    matmul_side: int  # of the bf16 matrix product that gives the FLOP/s ceiling


GPU = Sizes(
    backbone="resnet18_cifar",
    batches=(512, 1024),
    precisions=("fp32", "bf16"),
    steps=15,
    global_batches=(1024, 4096, 16384),
    worker_batch=1024,
    quality_seconds=300.0,
    quality_images=None,
    compile_backend="inductor",
    compile_batches=(1024, 512),
    compile_needs_s=100.0,
    matmul_side=8192,
)
SMOKE = Sizes(
    backbone="small_cnn",
    batches=(16, 32),
    precisions=("fp32", "bf16"),
    steps=2,
    global_batches=(64, 128, 256),
    worker_batch=32,
    quality_seconds=25.0,
    quality_images=600,
    compile_backend="aot_eager",
    compile_batches=(16,),
    compile_needs_s=0.0,
    matmul_side=256,
)


# --- where it runs ----------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions, for the output's header."""
    import torchvision

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_convolutions=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, side: int, repeats: int = 10) -> float:
    """FLOP/s of a bf16 square matrix product: the ceiling the model FLOP utilisation is against
    (measured rather than a datasheet's, so that it is this machine's)."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (
        torch.randn(side, side, device=device, dtype=torch.bfloat16, generator=generator)
        for _ in range(2)
    )
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * side**3 * repeats / (time.perf_counter() - started)


def peak_memory(device: torch.device, measure: Callable[[], dict]) -> dict:
    """``measure()``'s result with the peak GPU memory it allocated (GiB; None on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = measure()
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        result["peak_memory_gib"] = None
    return result


# --- 1. the joint step ------------------------------------------------------------------------


def step_config(sizes: Sizes, batch: int, precision: str, compiled: bool = False) -> Config:
    return load_config(
        STEP_CONFIG,
        {
            "model": {"backbone": sizes.backbone},
            "optim": {"batch_size": batch},
            "run": {
                "precision": precision,
                "compile": compiled,
                "compile_backend": sizes.compile_backend,
                "workers": 1,
            },
        },
    )


def step_flops(config: Config, device: torch.device) -> float:
    """FLOPs of one joint step per image (both views, forward and backward, every loss term),
    counted by PyTorch's FlopCounterMode on one step of ``optim.batch_size`` images."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = config.optim.batch_size
    data = synthetic_run(config, batch)
    training = start_training(config, data, WorkerContext(0, 1, device), None)
    images = data.train.images.to(device)
    views = training.augment.stacked_views(images, torch.Generator(device).manual_seed(0))
    indices = torch.arange(batch, device=device)
    epoch = max(config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(training, views, indices, epoch)
    return counter.get_total_flops() / batch


def measure_step(
    config: Config, device: torch.device, steps: int, peak_flops: float | None
) -> dict[str, Any]:
    """One configuration of the joint step: images/s on ready views and with the device-side
    augmentation, the input's share, peak memory, per-step seconds and FLOP utilisation."""
    begun = time.perf_counter()
    result = peak_memory(
        device, lambda: step_throughput(config, device, steps, workers=0, conventional=False)
    )
    batch = config.optim.batch_size
    timed = steps * batch * (1 / result["model_only_img_s"] + 1 / result["full_step_img_s"])
    result["first_calls_s"] = time.perf_counter() - begun - timed  # build, warm-up, compile
    result["step_s"] = batch / result["model_only_img_s"]
    if peak_flops:
        flops = step_flops(config, device)
        result["flops_per_image"] = flops
        result["mfu"] = flops * result["full_step_img_s"] / peak_flops
    return result


def step_section(sizes: Sizes, device: torch.device, peak_flops: float | None) -> list[dict]:
    rows = []
    for precision in sizes.precisions:
        for batch in sizes.batches:
            config = step_config(sizes, batch, precision)
            row = {"batch": batch, "precision": precision, "compiled": False}
            rows.append({**row, **measure_step(config, device, sizes.steps, peak_flops)})
    return rows


# --- 2. the loss terms ------------------------------------------------------------------------


def objective_inputs(
    config: Config, global_batch: int, own_images: int, device: torch.device
) -> tuple[objective.GlobalBatch, Any, objective.State]:
    """A global batch of the joint model's outputs (random, with gradients) as one worker with
    ``own_images`` of them sees it, the pooled statistics and the objective's state refreshed on
    random features, at the model's widths."""
    model = build_model(config, 3, QUALITY_SIDE).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, QUALITY_SIDE, QUALITY_SIDE))
    generator = torch.Generator().manual_seed(0)

    def rows(width: int) -> torch.Tensor:
        return torch.randn(global_batch, 2, width, generator=generator)

    projections = F.normalize(rows(out.projections.shape[1]), dim=2)
    logits = rows(config.model.num_clusters)
    features = rows(out.features.shape[1])
    pooled = model.pooling.statistics()
    clustering = objective.clustering_objective(config.loss.clustering)
    state = objective.initial_state(config, global_batch, features.shape[2])
    epoch = max(config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs)
    if clustering.refresh is not None:
        seen = objective.TrainingSet(features[:, 0], logits[:, 0].softmax(1))
        state = clustering.refresh(seen, state, pooled, config, epoch).state
    batch = objective.GlobalBatch(
        projections=projections.to(device).requires_grad_(),
        assignments=logits.softmax(2).to(device).requires_grad_(),
        hidden=rows(out.cluster_hidden.shape[1]).to(device).requires_grad_(),
        features=features.to(device).requires_grad_() if clustering.reads_features else None,
        indices=torch.arange(global_batch, device=device),
        own=slice(0, own_images),
    )
    pooled = type(pooled)(*(value.to(device) for value in pooled))
    return batch, pooled, {key: value.to(device) for key, value in state.items()}


def objective_seconds(
    config: Config, global_batch: int, own_images: int, device: torch.device, repeats: int
) -> float:
    """Seconds of the joint objective's forward and backward on a global batch, as a worker with
    ``own_images`` of it computes it after the gather (``objective.joint_objective`` under the
    step's autocast: DCL on its own anchors, the clustering objective on the whole batch)."""
    batch, pooled, state = objective_inputs(config, global_batch, own_images, device)
    epoch = max(config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs)

    def once() -> None:
        with autocast(device, config.run.precision):
            losses = objective.joint_objective(batch, pooled, state, config, epoch)
        losses["total"].backward()

    once()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def loss_section(sizes: Sizes, device: torch.device, repeats: int) -> list[dict]:
    """The objective's time at each global batch, and its share of a step in which each worker
    runs the model on ``worker_batch`` images and the objective after the gather (DCL on its own
    images' anchors against every negative, the clustering objective on the whole batch):
    share = loss(G) / (step(b) − loss(b) + loss(G)), the step measured here too."""
    config = step_config(sizes, sizes.worker_batch, "auto")
    step_s = measure_step(config, device, sizes.steps, None)["step_s"]
    own = sizes.worker_batch
    local_loss_s = objective_seconds(config, own, own, device, repeats)
    rows = []
    for global_batch in sizes.global_batches:
        seconds = peak_memory(
            device,
            lambda g=global_batch: {"s": objective_seconds(config, g, own, device, repeats)},
        )
        model_s = max(step_s - local_loss_s, 0.0)
        rows.append(
            {
                "global_batch": global_batch,
                "workers": global_batch // sizes.worker_batch,
                "objective_s": seconds["s"],
                "objective_peak_memory_gib": seconds["peak_memory_gib"],
                "worker_step_s": model_s + seconds["s"],
                "share_of_step": seconds["s"] / (model_s + seconds["s"]),
            }
        )
    return rows


# --- 3. quality -------------------------------------------------------------------------------


def padded(data: RunData, side: int) -> RunData:
    """Images padded with background (0) to ``side`` px: Fashion-MNIST at the CIFAR stem's size."""

    def pad(images: torch.Tensor) -> torch.Tensor:
        extra = side - images.shape[-1]
        before = extra // 2
        return F.pad(images, (before, extra - before, before, extra - before))

    train = replace(data.train, images=pad(data.train.images))
    if data.eval is None or data.eval is data.train:
        return replace(data, train=train, eval=train if data.eval is data.train else None)
    return replace(data, train=train, eval=replace(data.eval, images=pad(data.eval.images)))


def quality_config(sizes: Sizes, fashion_root: Path, epochs: int, batch: int) -> Config:
    return load_config(
        QUALITY_CONFIG,
        {
            "data": {"root": str(fashion_root)},
            "model": {"backbone": sizes.backbone},
            "optim": {"batch_size": batch},
            "run": {"epochs": epochs, "checkpoint_every": epochs, "workers": 1},
            "eval": {"every": epochs},
        },
    )


def epochs_that_fit(config: Config, data: RunData, device: torch.device, seconds: float) -> dict:
    """How many epochs fit in ``seconds``: one probe epoch of the real configuration (its
    clustering terms and refresh on) timed, the final evaluation's time estimated from an
    embedding of the training set."""
    training = start_training(config, data, WorkerContext(0, 1, device), None)
    epoch = max(config.loss.clustering_warmup_epochs, config.loss.prior_warmup_epochs)
    train_epoch(training, epoch)  # warm-up: cuDNN autotuning, first allocations
    synchronize(device)
    started = time.perf_counter()
    train_epoch(training, epoch)
    synchronize(device)
    epoch_s = time.perf_counter() - started
    started = time.perf_counter()
    embed(training.model, data.train.images, device)
    evaluation_s = 25 * (time.perf_counter() - started) + 0.1 * seconds  # k-means, kNN, OOD
    epochs = max(int((seconds - evaluation_s) / epoch_s), 1)
    return {"epochs": epochs, "probe_epoch_s": epoch_s, "evaluation_reserve_s": evaluation_s}


def quality_section(
    sizes: Sizes, device: torch.device, fashion_root: Path, seconds: float, log: Callable
) -> dict[str, Any]:
    """The shipped Fashion-MNIST-LT recipe on ResNet-18 for as many epochs as fit in ``seconds``
    (the head's CAA beside the config's assignment rule, k-means on the features)."""
    begun = time.perf_counter()
    batch = sizes.batches[0]
    probe_config = quality_config(sizes, fashion_root, 1, batch)
    data = padded(subsample(prepare_data(probe_config), sizes.quality_images, 0), QUALITY_SIDE)
    plan = epochs_that_fit(probe_config, data, device, seconds - (time.perf_counter() - begun))
    config = quality_config(sizes, fashion_root, plan["epochs"], batch)
    final: dict[str, Any] = {}

    def keep(_metrics: dict, state: dict | None, _assignments: Any) -> None:
        if state is not None:
            final.update(state)

    started = time.perf_counter()
    last = fit(config, data, WorkerContext(0, 1, device), keep, log=log)
    wall_s = time.perf_counter() - started
    result = {
        **plan,
        "images": len(data.train.images),
        "batch": batch,
        "side": QUALITY_SIDE,
        "backbone": sizes.backbone,
        "assign": config.eval.assign,
        "clustering": config.loss.clustering,
        "wall_s": wall_s,
        **{key: value for key, value in last.items() if not key.startswith("loss/")},
    }
    result["head"] = head_metrics(config, data, model_from_state(final), device)
    return result


def head_metrics(
    config: Config, data: RunData, model: torch.nn.Module, device: torch.device
) -> dict[str, Any]:
    """The clustering head's own CAA/NMI and sizes on the training set (argmax of A)."""
    model = model.to(device, memory_format=torch.channels_last)
    clusters = embed(model, data.train.images, device)["assignments"].argmax(1).numpy()
    found = metrics.cluster_metrics(
        data.train.labels, clusters, config.model.num_clusters, class_order=data.class_order
    )
    sizes = np.bincount(clusters, minlength=config.model.num_clusters)
    return {
        "caa": found["caa"],
        "nmi": found["nmi"],
        "predicted_sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()),
    }


# --- 4. torch.compile -------------------------------------------------------------------------


def compile_section(
    sizes: Sizes, device: torch.device, eager: list[dict], peak_flops: float | None, deadline: float
) -> list[dict]:
    """The bf16 step compiled (``run.compile``), its first calls (the compile) timed apart; a
    batch is skipped, and says so, when less than ``compile_needs_s`` is left before the
    deadline. FLOPs per image are the eager step's (the same arithmetic)."""
    rows = []
    for batch in sizes.compile_batches:
        row: dict[str, Any] = {"batch": batch, "precision": "bf16", "compiled": True}
        if deadline - time.monotonic() < sizes.compile_needs_s:
            rows.append({**row, "skipped": "too little time left in the run's budget"})
            continue
        config = step_config(sizes, batch, "bf16", compiled=True)
        row.update(backend=sizes.compile_backend, **measure_step(config, device, sizes.steps, None))
        flops = next(
            (
                e.get("flops_per_image")
                for e in eager
                if (e["batch"], e["precision"]) == (batch, "bf16")
            ),
            None,
        )
        if flops and peak_flops:
            row.update(flops_per_image=flops, mfu=flops * row["full_step_img_s"] / peak_flops)
        rows.append(row)
    return rows


# --- the run ----------------------------------------------------------------------------------


SECTIONS = ("step", "loss", "quality", "compile")


def markdown(result: dict[str, Any]) -> str:
    """The figures as tables, with the environment on top."""
    env = result.get("environment", {})
    lines = [
        "# GPU suite (`python -m jdcl_ray.bench gpu`)",
        "",
        f"Measured {result.get('started', '?')} on {env.get('gpu', env.get('device', '?'))}: "
        f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}, Python {env.get('python')}. "
        f"bf16 matrix product ({result.get('matmul_side')}³): "
        f"{_tflops(result.get('matmul_flops'))} TFLOP/s, the ceiling of the MFU column.",
        "",
    ]
    steps = result.get("step", []) + [r for r in result.get("compile", []) if "skipped" not in r]
    if steps:
        backbone = result.get("sizes", {}).get("backbone")
        lines += [f"## The joint training step ({backbone}, 32 px, channels-last)", ""]
        lines += markdown_table(
            [
                "batch",
                "precision",
                "compiled",
                "img/s (full step)",
                "img/s (ready views)",
                "input share",
                "peak GiB",
                "MFU",
                "first calls s",
            ],
            [
                [
                    r["batch"],
                    r["precision"],
                    r["compiled"],
                    f"{r['full_step_img_s']:,.0f}",
                    f"{r['model_only_img_s']:,.0f}",
                    f"{r['input_share_of_full_step']:.1%}",
                    _number(r.get("peak_memory_gib"), ".2f"),
                    _number(r.get("mfu"), ".1%"),
                    f"{r['first_calls_s']:.1f}",
                ]
                for r in steps
            ],
        )
        lines += [
            "",
            "An image is two views, forward and backward; 'first calls' is the model's "
            "build, warm-up and (compiled) compile time.",
            "",
        ]
    for row in result.get("compile", []):
        if "skipped" in row:
            lines += [f"- compiled step at batch {row['batch']}: skipped ({row['skipped']})", ""]
    if result.get("loss"):
        lines += ["## The loss terms' share of a step", ""]
        lines += markdown_table(
            ["global batch", "workers", "objective s (fwd+bwd)", "its peak GiB", "share of step"],
            [
                [
                    r["global_batch"],
                    r["workers"],
                    f"{r['objective_s'] * 1e3:.1f} ms",
                    _number(r["objective_peak_memory_gib"], ".2f"),
                    f"{r['share_of_step']:.1%}",
                ]
                for r in result["loss"]
            ],
        )
        lines += [""]
    quality = result.get("quality")
    if quality:
        head = quality["head"]
        lines += [
            f"## Quality: Fashion-MNIST-LT IR 10, {quality['backbone']} at 32 px",
            "",
            f"{quality['epochs']} epochs of {quality['images']} images in {quality['wall_s']:.0f} s "
            f"(batch {quality['batch']}, objective {quality['clustering']}, "
            f"assignment {quality['assign']}):",
            "",
        ]
        lines += markdown_table(
            [
                "rule",
                "train CAA",
                "train NMI",
                "test CAA",
                "test NMI",
                "kNN",
                "pixels' kNN",
                "empty clusters",
            ],
            [
                [
                    quality["assign"],
                    *(
                        _number(quality.get(k), ".3f")
                        for k in (
                            "train/caa",
                            "train/nmi",
                            "test/caa",
                            "test/nmi",
                            "knn_acc",
                            "knn_acc_pixels",
                        )
                    ),
                    quality.get("empty_clusters"),
                ],
                [
                    "head",
                    _number(head["caa"], ".3f"),
                    _number(head["nmi"], ".3f"),
                    "",
                    "",
                    "",
                    "",
                    head["empty_clusters"],
                ],
            ],
        )
        lines += [
            "",
            f"Sizes, true: {quality.get('true_sizes')}; predicted ({quality['assign']}): "
            f"{quality.get('predicted_sizes')}; head: {head['predicted_sizes']}.",
            "",
        ]
    for section, error in result.get("errors", {}).items():
        lines += [f"- section {section} failed: `{error.splitlines()[-1]}`"]
    return "\n".join(lines) + "\n"


def _number(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _tflops(value: float | None) -> str:
    return "?" if value is None else f"{value / 1e12:.0f}"


def run_suite(
    sizes: Sizes,
    output: Path,
    fashion_root: Path,
    budget_s: float,
    log: Callable,
    sections: tuple[str, ...] = SECTIONS,
) -> dict:
    """The sections in order, each written out as it ends; a failing section is recorded with
    its traceback and the next one runs."""
    deadline = time.monotonic() + budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sizes": sizes.__dict__,
        "environment": environment(device),
        "matmul_side": sizes.matmul_side,
        "matmul_flops": matmul_flops(device, sizes.matmul_side),
        "errors": {},
    }

    def write() -> None:
        (output / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
        (output / "gpu.md").write_text(markdown(result))

    peak = result["matmul_flops"]
    work: dict[str, Callable[[], Any]] = {
        "step": lambda: step_section(sizes, device, peak),
        "loss": lambda: loss_section(sizes, device, repeats=max(sizes.steps // 3, 1)),
        "quality": lambda: quality_section(
            sizes,
            device,
            fashion_root,
            min(sizes.quality_seconds, deadline - time.monotonic() - sizes.compile_needs_s / 4),
            log,
        ),
        "compile": lambda: compile_section(sizes, device, result.get("step", []), peak, deadline),
    }
    write()
    for section in (name for name in SECTIONS if name in sections):
        begun = time.perf_counter()
        log(f"[gpu suite] {section} ...")
        try:
            result[section] = work[section]()
        except Exception:  # a section's failure must not lose the others' figures
            result["errors"][section] = traceback.format_exc()
            log(result["errors"][section])
        result.setdefault("section_s", {})[section] = time.perf_counter() - begun
        write()
        log(f"[gpu suite] {section} done in {time.perf_counter() - begun:.0f} s")
    return result


def main(args: argparse.Namespace) -> int:
    sizes = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        raise UserError(
            "bench gpu: torch sees no CUDA device: run it on a GPU machine, or pass --smoke"
        )
    wants_data = "quality" in args.sections
    if wants_data and not (args.fashion_root / "train-images-idx3-ubyte.gz").is_file():
        raise UserError(
            f"--fashion-root {args.fashion_root} holds no train-images-idx3-ubyte.gz: expected "
            "Fashion-MNIST's four .gz files (benchmarks/gpu/README.md)"
        )
    budget = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 480.0)
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "gpu.log").open("a") as log_file:

        def log(line: str) -> None:
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        sections = tuple(args.sections)
        result = run_suite(sizes, args.output, args.fashion_root, budget, log, sections)
    print(markdown(result))
    return 1 if result["errors"] else 0
