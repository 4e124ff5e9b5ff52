"""The quality study's --quick mode: real (tiny) runs of every method, ablation and OOD section."""

from __future__ import annotations

import json
import math

from jdcl_ray.bench import METHODS, REPORTED, main


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
