"""What a finished search prints and records on its parent MLflow run: the table of its trials
(also ``trials.csv`` in the search's folder), the best trial, the number of clusters it picked
when the space searches ``model.num_clusters``, and, when the data has labels, how well the
label-free pick agrees with them."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from jdcl_ray import storage, tracking
from jdcl_ray.space import K_METRIC, NUM_CLUSTERS, SearchConfig, SearchSpace
from jdcl_ray.tracking import tracked

TABLE_FILE = "trials.csv"
STATUS_COLUMNS = ("caa", "nmi", "acc", "tail_acc")
TEXT_COLUMNS = ("name", "status", "trial")  # left-aligned; the numbers are right-aligned
LABEL_CHECK = "train/caa"  # judges the label-free pick when the data has labels


def summarize(
    results: Any, space: SearchSpace, client: Any, parent_run_id: str, folder: str
) -> dict[str, Any] | None:
    """Print every trial of Tune's ``results`` and the best one; log the table and the best trial
    to the parent run. Returns the best trial's metrics (None when no trial reported the metric)."""
    metric = space.search.metric
    rows = trial_rows(results, space)
    table = trials_csv(rows)
    storage.write_text(storage.join(folder, TABLE_FILE), table)
    tracked("the trials table", lambda: client.log_text(parent_run_id, table, TABLE_FILE))
    console = Console()
    if not console.is_terminal:
        console.width = 160
    console.print(trials_table(rows, space))
    best = best_trial(results, space.search)
    if best is None:
        console.print(f"no trial finished without error and reported {metric}")
        return None
    best_metrics = tracking.scalar_metrics(best.metrics)
    tracked("the best trial's summary", lambda: log_best(client, parent_run_id, best, best_metrics))
    console.print(f"best trial {best.metrics.get('trial_id')}: {best.config}")
    console.print(best_scores(best_metrics, metric))
    if space.searches_num_clusters:
        picked = best.config[NUM_CLUSTERS]
        tracked("the picked K", lambda: client.set_tag(parent_run_id, "num_clusters", str(picked)))
        console.print(picked_k(results, space.search, picked))
    agreement = selection_agreement(rows, metric, best_metrics)
    if agreement:
        selection = {f"selection/{k}": v for k, v in agreement.items()}
        tracked("the label check", lambda: tracking.log_metrics(client, parent_run_id, selection))
        console.print(label_check(agreement, metric))
    return best.metrics


def trial_rows(results: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: its id, run name, status, epochs, search metric and train scores."""
    metric = space.search.metric
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = metrics.get("epochs_done", 0)
        rows.append(
            {
                "trial": metrics.get("trial_id", ""),
                "name": tracking.trial_run_name(result.config or {}),
                "status": "ERROR"
                if result.error
                else ("DONE" if epochs >= space.epochs else "STOPPED"),
                "epochs": epochs,
                metric: metrics.get(metric),
                **{f"train/{k}": metrics.get(f"train/{k}") for k in STATUS_COLUMNS},
            }
        )
    return rows


def trials_csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def trials_table(rows: list[dict[str, Any]], space: SearchSpace) -> Table:
    search = space.search
    table = Table(title=f"search {space.name}: {len(rows)} trials ({search.metric}, {search.mode})")
    for column in rows[0] if rows else ():
        table.add_column(column, justify="left" if column in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    return table


def best_trial(results: Any, search: SearchConfig) -> Any | None:
    """The trial without error whose last report is best by the search metric, if any."""
    candidates = [
        result
        for result in results
        if result.error is None and search.metric in (result.metrics or {})
    ]
    if not candidates:
        return None
    pick = max if search.mode == "max" else min
    return pick(candidates, key=lambda result: result.metrics[search.metric])


def picked_k(results: Any, search: SearchConfig, picked: int) -> str:
    """The K the search picked, and the best search metric reached at each K it tried."""
    best_by_k: dict[int, float] = {}
    pick = max if search.mode == "max" else min
    for result in results:
        k, value = (
            (result.config or {}).get(NUM_CLUSTERS),
            (result.metrics or {}).get(search.metric),
        )
        if result.error is None and k is not None and value is not None:
            best_by_k[k] = pick(best_by_k.get(k, value), value)
    by_k = ", ".join(f"K={k}: {best_by_k[k]:.3f}" for k in sorted(best_by_k))
    why = (
        f"{K_METRIC}, the label-free score comparable across K (the default when "
        f"{NUM_CLUSTERS} is searched)"
        if search.metric == K_METRIC
        else search.metric
    )
    return f"number of clusters: picked K = {picked} ({NUM_CLUSTERS}) by {why}; {by_k}"


def log_best(client: Any, parent_run_id: str, best: Any, best_metrics: dict[str, float]) -> None:
    """The best trial's metrics (``best/...``), hyperparameters (``best.<key>``) and id."""
    tracking.log_metrics(client, parent_run_id, {f"best/{k}": v for k, v in best_metrics.items()})
    for key, value in (best.config or {}).items():
        client.log_param(parent_run_id, f"best.{key}", str(value))
    client.set_tag(parent_run_id, "best_trial", str(best.metrics.get("trial_id")))


def best_scores(best_metrics: dict[str, float], metric: str) -> str:
    shown = [
        metric,
        *(f"{split}/{k}" for split in ("train", "test") for k in STATUS_COLUMNS),
        "knn_acc",
    ]
    return ", ".join(f"{k} {best_metrics[k]:.3f}" for k in shown if k in best_metrics)


def selection_agreement(
    rows: list[dict[str, Any]], metric: str, best: dict[str, float]
) -> dict[str, float]:
    """How well the (label-free) search metric picked, judged by the labels when there are any:
    the pick's rank by train CAA and the rank correlation over all trials."""
    from scipy.stats import spearmanr

    pairs = [
        (row[metric], row[LABEL_CHECK])
        for row in rows
        if row.get(metric) is not None and row.get(LABEL_CHECK) is not None
    ]
    if metric == LABEL_CHECK or len(pairs) < 3 or LABEL_CHECK not in best:
        return {}
    scores, caas = np.array(pairs, dtype=float).T
    agreement = {
        "pick_rank": float(1 + np.sum(caas > best[LABEL_CHECK])),
        "trials": float(len(pairs)),
    }
    if scores.std() > 0 and caas.std() > 0:  # a rank correlation needs distinct values
        agreement["spearman"] = float(spearmanr(scores, caas).statistic)
    return agreement


def label_check(agreement: dict[str, float], metric: str) -> str:
    spearman = agreement.get("spearman", float("nan"))
    return (
        f"label check ({LABEL_CHECK}): the pick ranks {agreement['pick_rank']:.0f} of "
        f"{agreement['trials']:.0f} trials; Spearman({metric}, {LABEL_CHECK}) = {spearman:.2f}"
    )
