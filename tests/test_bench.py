"""The benchmark suites: the quality study's --quick mode (real, tiny runs of every method,
ablation and OOD section), its screening mode (variants, plugin objectives), and the throughput
suite's --quick mode."""

from __future__ import annotations

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from servers import DIGITS

from jdcl_ray import objective
from jdcl_ray.bench import main
from jdcl_ray.bench.quality import FULL_METHOD, METHODS, PIXEL_BASELINES, REPORTED
from jdcl_ray.errors import UserError
from jdcl_ray.losses import ddc_loss

OBJECTIVES = "benchmarks/research/objectives.py"  # relative to the repository root


@pytest.mark.slow
def test_quick_quality_study_has_every_section(tmp_path):
    raw, table = tmp_path / "quality.json", tmp_path / "quality.md"
    assert main(["quality", "--quick", "--json", str(raw), "--markdown", str(table)]) == 0
    result = json.loads(raw.read_text())
    assert [row["method"] for row in result["summary"]] == list(METHODS)
    for row in result["runs"]:
        assert 0 <= row["caa"] <= 1 and 0 <= row["nmi"] <= 1, row
        assert sum(row["predicted_sizes"]) == sum(row["true_sizes"]) > 0
        assert row["predicted_sizes"] == sorted(row["predicted_sizes"], reverse=True)
        if row["method"] not in PIXEL_BASELINES:
            assert 0 < row["knn_acc"] <= 1
    for row in result["summary"]:
        for key in REPORTED:
            mean, std = row[key]
            assert (math.isnan(mean) and row["method"] in PIXEL_BASELINES and key == "knn_acc") or (
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


@pytest.fixture
def product_registry():
    """Research plugins loaded by a test are unloaded after it: other tests see the product's
    clustering objectives only."""
    registered = dict(objective.CLUSTERING_OBJECTIVES)
    modules = set(sys.modules)
    yield
    objective.CLUSTERING_OBJECTIVES.clear()
    objective.CLUSTERING_OBJECTIVES.update(registered)
    for name in set(sys.modules) - modules:
        if name.startswith("jdcl_ray_plugin_"):
            del sys.modules[name]


def test_screening_trains_each_variant_with_its_plugin_objective(tmp_path, product_registry):
    variants = tmp_path / "variants.yaml"
    warm = "loss.clustering_warmup_epochs: 0, loss.prior_warmup_epochs: 0"
    variants.write_text(
        f"plugins: [{OBJECTIVES}]\n"
        "variants:\n"
        f"  ddc: {{{warm}}}\n"
        f"  prior_l2: {{loss.clustering: ddc_prior_l2, {warm}}}\n"
    )
    jsonl, dump = tmp_path / "screen.jsonl", tmp_path / "features"
    before = copy.deepcopy(METHODS)
    budget = ["--base", str(DIGITS), "--epochs", "2", "--max-images", "200", "--ratios", "10"]
    outputs = ["--jsonl", str(jsonl), "--dump-features", str(dump)]
    assert main(["quality", "--variants", str(variants), *budget, *outputs]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(row["name"], row["ir"], row["seed"]) for row in rows] == [
        ("ddc", 10, 0),
        ("prior_l2", 10, 0),
    ]
    for row in rows:
        for key in (
            "head_caa",
            "head_acc",
            "tail",
            "km_caa",
            "km_acc",
            "knn",
            "dcl",
            "clustering",
            "wall",
        ):
            assert math.isfinite(row[key]), (row["name"], key)
        assert 0 <= row["head_caa"] <= 1 and 0 < row["knn"] <= 1 and row["dcl"] > 0
        assert sum(row["sizes"]) == 200 and row["sizes"] == sorted(row["sizes"], reverse=True)
    assert rows[1]["overrides"]["loss.clustering"] == "ddc_prior_l2"
    # The same first step (π is uniform before the first pooling update), then L2 differs.
    assert rows[0]["clustering"] != rows[1]["clustering"]
    assert before == METHODS and METHODS[FULL_METHOD]["loss"] == {"prior": "pooled"}
    features = np.load(dump / "prior_l2_ir10_s0.npz")
    assert {key: features[key].shape[0] for key in features} == {
        "h": 200,
        "hidden": 200,
        "A": 200,
        "z": 200,
        "labels": 200,
        "pi": 10,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plugins: [benchmarks/research/nope.py]\nvariants: {a: {}}", "plugin 'benchmarks/"),
        ("variants: {a: {loss.temprature: 0.5}}", "variant 'a': 'loss.temprature' is not a"),
        ("variants: {a: {temperature: 0.5}}", "variant 'a': 'temperature' is not a config key"),
        ("variants: {a: {loss.temperature: -1}}", "variant 'a': config key 'loss.temperature'"),
        ("variants: {a: {run.epochs: 3}}", "variant 'a': 'run.epochs' is set by the study"),
        ("variants: {a: {loss.clustering: ddc_prior_l2}}", "is not a clustering objective"),
        ("variant: {a: {}}", "key 'variant' is unknown"),
        ("variants: {}", "'variants' = {}: expected a mapping"),
    ],
)
def test_a_bad_variants_file_is_a_one_line_error(tmp_path, product_registry, text, message):
    variants = tmp_path / "variants.yaml"
    variants.write_text(text + "\n")
    with pytest.raises(UserError) as error:
        main(["quality", "--variants", str(variants), "--base", str(DIGITS)])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"{variants}: ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jsonl", "x.jsonl"], "--jsonl needs --variants"),
        (["--variants", "v.yaml", "--json", "x.json"], "--json is the study's"),
    ],
)
def test_options_of_the_other_mode_are_a_user_error(options, message):
    with pytest.raises(UserError, match=f"^{message}"):
        main(["quality", *options])


def test_the_research_l2_is_ddc_l2_weighted_per_cluster(product_registry):
    from jdcl_ray.bench.screen import load_plugin

    research = load_plugin(OBJECTIVES, DIGITS)
    generator = torch.Generator().manual_seed(0)
    assignments = torch.randn(12, 4, generator=generator, dtype=torch.float64).softmax(1)
    hidden = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    n = len(assignments)
    naive = sum(
        float(weights[k] * assignments[a, k] * assignments[b, k])
        for a in range(n)
        for b in range(n)
        for k in range(4)
        if a != b
    ) / (n * (n - 1))
    assert float(research.weighted_l2(assignments, weights)) == pytest.approx(naive, rel=1e-6)
    uniform = research.ddc_terms(assignments, hidden, torch.ones(4))
    expected = ddc_loss(assignments, hidden)
    for term in ("l1", "l2", "l3", "total"):
        assert float(uniform[term]) == pytest.approx(float(expected[term]), rel=1e-6), term
    assert float(research.ddc_terms(assignments, hidden, None)["l2"]) == 0
    pi = torch.tensor([0.4, 0.4, 0.2, 0.0])  # floored at 0.01, renormalised
    floored = torch.tensor([0.4, 0.4, 0.2, 0.01]) / 1.01
    assert torch.allclose(research.prior_weights(pi, 1.0), 1 / (4 * floored))
    assert torch.allclose(research.prior_weights(torch.full((4,), 0.25), 0.5), torch.ones(4))
    assert load_plugin(OBJECTIVES, DIGITS) is research  # imported (and registered) once
