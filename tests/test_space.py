"""Search-space files: every rule gives one line naming the file and the key; valid files load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray import tune

from jdcl_ray.errors import UserError
from jdcl_ray.space import load_space, tune_distribution

ROOT = Path(__file__).resolve().parents[1]
VALID = {
    "base": {"config": str(ROOT / "configs" / "digits_lt.yaml"), "set": {"run.epochs": 6}},
    "space": {
        "loss.temperature": {"uniform": [0.2, 0.7]},
        "loss.tau_plus": {"choice": [0.0, 0.1]},
        "loss.clustering_weight": {"loguniform": [0.3, 3.0]},
        "optim.batch_size": {"quniform": [64, 256, 64]},
    },
    "search": {"algorithm": "random", "num_samples": 3, "metric": "selection_score"},
    "scheduler": {"kind": "asha", "grace_period": 2},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def changed(path: str, value) -> dict:
    """VALID with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    values = copy.deepcopy(VALID)
    *parents, leaf = path.split("/")
    node = values
    for part in parents:
        node = node[part]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return values


def test_valid_space_loads_with_resources_applied(tmp_path):
    space = load_space(write(tmp_path, VALID))
    assert space.name == "space"
    assert [p.key for p in space.parameters] == list(VALID["space"])
    assert space.epochs == 6
    assert space.base["run"]["cpus_per_worker"] == 1
    assert space.num_trials == 3
    config = space.trial_config({"loss.temperature": 0.3, "optim.batch_size": 128})
    assert config.loss.temperature == 0.3 and config.optim.batch_size == 128
    assert config.run.epochs == 6


def test_integer_keys_sample_integers(tmp_path):
    space = load_space(write(tmp_path, VALID))
    batch = next(p for p in space.parameters if p.key == "optim.batch_size")
    sampler = tune_distribution(batch)
    values = {sampler.sample() for _ in range(20)}
    assert all(isinstance(v, int) and v % 64 == 0 and 64 <= v <= 256 for v in values)


def test_grid_counts_trials(tmp_path):
    values = changed("space/loss.prior", {"grid": ["fixed", "pooled"]})
    space = load_space(write(tmp_path, values))
    assert space.num_trials == 6
    assert tune_distribution(space.parameters[-1]) == tune.grid_search(["fixed", "pooled"])


def test_shipped_spaces_load():
    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        space = load_space(path)
        assert space.parameters, path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (changed("extra", 1), "section 'extra' is unknown"),
        (changed("base/config", "configs/missing.yaml"), "'base.config' = 'configs/missing.yaml'"),
        (changed("base/colour", 1), "'base.colour' is unknown"),
        (changed("base/set", {"loss.temprature": 0.2}), "loss.temprature"),
        (changed("space", {}), "section 'space' must map"),
        (changed("space/loss.temprature", {"uniform": [0.1, 0.5]}), "space key 'loss.temprature'"),
        (changed("space/loss.temperature", {"gaussian": [0.1, 0.5]}), "distribution 'gaussian'"),
        (changed("space/loss.temperature", {"uniform": [0.1], "choice": [1]}), "exactly one"),
        (changed("space/loss.temperature", {"uniform": [0.5, 0.1]}), "low 0.5 must be below"),
        (changed("space/loss.temperature", {"uniform": [0.1]}), "uniform needs [low, high]"),
        (changed("space/loss.temperature", {"uniform": ["a", "b"]}), "as numbers"),
        (changed("space/loss.clustering_weight", {"loguniform": [0.0, 1.0]}), "bounds must be > 0"),
        (changed("space/loss.temperature", {"quniform": [0.1, 0.5, 0]}), "step q must be > 0"),
        (changed("space/loss.tau_plus", {"choice": []}), "choice needs a non-empty list"),
        (changed("space/loss.tau_plus", {"grid": []}), "grid needs a non-empty list"),
        (changed("space/loss.tau_plus", {"uniform": [0.0, 1.5]}), "loss.tau_plus"),
        (changed("space/loss.prior", {"choice": ["fixed", "learned"]}), "'learned'"),
        (changed("space/optim.lr", {"choice": ["fast"]}), "optim.lr"),
        (changed("search/algorithm", "bayes"), "search.algorithm"),
        (changed("search/num_samples", 0), "search.num_samples"),
        (changed("search/max_concurrent_trials", 0), "search.max_concurrent_trials"),
        (changed("search/metric", "accuracy"), "search.metric"),
        (changed("search/mode", "maximum"), "search.mode"),
        (changed("search/colour", 1), "'search.colour' is unknown"),
        (changed("scheduler/kind", "pbt"), "scheduler.kind"),
        (changed("scheduler/grace_period", 0), "scheduler.grace_period"),
        (changed("scheduler/reduction_factor", 1), "scheduler.reduction_factor"),
        (changed("scheduler/max_epochs", 99), "scheduler.max_epochs"),
        (changed("resources/workers", 0), "resources.workers"),
        (changed("resources/cpus_per_worker", 0), "resources.cpus_per_worker"),
        (changed("resources/gpus_per_worker", -1), "resources.gpus_per_worker"),
        (changed("resources/workers", 3), "not divisible by run.workers"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(tmp_path, values, message):
    path = write(tmp_path, values)
    with pytest.raises(UserError) as raised:
        load_space(path)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(str(path)), text
    assert message in text, text


def test_optuna_refuses_a_grid(tmp_path):
    values = changed("search/algorithm", "optuna")
    values["space"]["loss.prior"] = {"grid": ["fixed", "pooled"]}
    with pytest.raises(UserError, match="optuna"):
        load_space(write(tmp_path, values))


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("space:\n  loss.temperature: {uniform: [0.1, 0.5]\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML at line"):
        load_space(path)
