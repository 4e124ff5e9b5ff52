"""What the benchmark suites share: the in-process training run, the budget's subsample, the
machine's description, markdown tables and matplotlib figures."""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jdcl_ray.config import Config
from jdcl_ray.data import RunData
from jdcl_ray.engine import WorkerContext, fit
from jdcl_ray.errors import UserError
from jdcl_ray.pretrained import read_initial_weights


def positive(option: str, value: int) -> int:
    if value < 1:
        raise UserError(f"{option} {value}: expected a whole number >= 1")
    return value


def machine(**extra: Any) -> dict[str, Any]:
    """Where the figures were measured."""
    return {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), **extra}


def subsample(data: RunData, limit: int | None, seed: int) -> RunData:
    """At most ``limit`` training images (a seeded draw) and evaluation images (the first)."""
    if limit is None or len(data.train.images) <= limit:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data.train.images), limit, replace=False))
    evaluation = data.eval
    if evaluation is not None and evaluation is not data.train and len(evaluation.images) > limit:
        evaluation = evaluation.subset(np.arange(limit))
    return replace(
        data, train=data.train.subset(keep), eval=evaluation, lt_indices=data.lt_indices[keep]
    )


def train_once(config: Config, data: RunData) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit in this process (the GPU when there is one); the last epoch's metrics and the final
    training state (a checkpoint's ``state.pt``)."""
    final: dict[str, Any] = {}

    def keep_state(_metrics: dict, state: dict | None, _assignments: Any) -> None:
        if state is not None:
            final.update(state)

    ctx = WorkerContext(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    initial = read_initial_weights(config.model.init, config.model.init_heads)
    last = fit(config, data, ctx, keep_state, log=lambda _line: None, initial=initial)
    return last, final


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path
