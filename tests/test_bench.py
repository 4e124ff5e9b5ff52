"""The quality study's --quick mode: real (tiny) runs of every method, ablation and OOD section."""

from __future__ import annotations

import json
import math

import pytest

from jdcl_ray.bench import METHODS, REPORTED, main
from jdcl_ray.errors import UserError


def test_quick_quality_study_has_every_section(tmp_path):
    raw, table = tmp_path / "quality.json", tmp_path / "quality.md"
    assert main(["quality", "--quick", "--json", str(raw), "--markdown", str(table)]) == 0
    result = json.loads(raw.read_text())
    assert [row["method"] for row in result["summary"]] == list(METHODS)
    for row in result["runs"]:
        assert 0 <= row["caa"] <= 1 and 0 <= row["nmi"] <= 1, row
        assert sum(row["predicted_sizes"]) == sum(row["true_sizes"]) > 0
        assert row["predicted_sizes"] == sorted(row["predicted_sizes"], reverse=True)
        if row["method"] != "kmeans_pixels":
            assert 0 < row["knn_acc"] <= 1
    for row in result["summary"]:
        for key in REPORTED:
            mean, std = row[key]
            assert (math.isnan(mean) and row["method"] == "kmeans_pixels" and key == "knn_acc") or (
                0 <= mean <= 1 and std >= 0
            ), (row["method"], key)
    assert {row["parameter"] for row in result["ablation"]} == {
        "loss.clustering_weight",
        "loss.temperature",
    }
    (ood,) = result["ood"]
    assert 0 <= ood["auroc"] <= 1 and ood["ood_images"] > 0 and ood["in_distribution_images"] > 0
    text = table.read_text()
    for heading in (
        "## Methods",
        "## Ablation",
        "## Out-of-distribution",
        "## Predicted cluster sizes",
    ):
        assert heading in text
    assert (tmp_path / "quality_caa.png").stat().st_size > 0
    assert (tmp_path / "quality_sizes.png").stat().st_size > 0


def positive_figures(value, path="") -> list[str]:
    """Paths of every figure in a JSON tree that is not a positive number."""
    if isinstance(value, dict):
        return [
            bad for key, item in value.items() for bad in positive_figures(item, f"{path}.{key}")
        ]
    if isinstance(value, list):
        return [
            bad for i, item in enumerate(value) for bad in positive_figures(item, f"{path}[{i}]")
        ]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    return [] if value > 0 and math.isfinite(value) else [f"{path} = {value}"]


def test_quick_throughput_reports_every_figure(tmp_path):
    import ray

    out = tmp_path / "throughput.json"
    try:
        assert main(["throughput", "--quick", "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    figures = json.loads(out.read_text())
    for section in ("rgb32", "grey28"):
        assert set(figures["augmentation"][section]) == {
            "batched_img_s",
            "conventional_img_s",
            "ratio",
        }
    assert {
        "model_only_img_s",
        "full_step_img_s",
        "full_vs_model_only",
        "input_share_of_full_step",
        "conventional_img_s",
        "conventional_vs_model_only",
    } <= set(figures["step"])
    assert {
        "bare_epoch_img_s",
        "ray_epoch_img_s",
        "ray_vs_bare",
        "worker_startup_s",
    } <= set(figures["ray"])
    assert [row["global_batch"] for row in figures["loss"]] == [512, 1024]
    assert all(row["peak_extra_mb"] is not None for row in figures["loss"])
    assert figures["gpu"] is None or "bf16" in figures["gpu"]
    assert positive_figures({k: v for k, v in figures.items() if k != "machine"}) == []


@pytest.mark.parametrize("option", ["--epochs", "--max-images"])
def test_a_budget_below_one_is_a_user_error(option):
    with pytest.raises(UserError, match=f"^{option} 0: expected a whole number >= 1$"):
        main(["quality", option, "0"])
