"""Config: load, override, validate — every rule stops with one line naming the key."""

from pathlib import Path

import pytest

from jdcl_ray.config import Config, load_config, parse_overrides, save_config
from jdcl_ray.errors import UserError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_overrides_apply_with_yaml_types():
    config = load_config(
        None, ["loss.temperature=0.2", "augment.crop_scale=[0.3, 1]", "run.workers=2"]
    )
    assert config.loss.temperature == 0.2
    assert config.augment.crop_scale == (0.3, 1.0)
    assert config.run.workers == 2
    assert Config().loss.temperature == 0.5  # defaults untouched


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["loss.temperature=0"], "loss.temperature", "0"),
        (["loss.temperature=-0.5"], "loss.temperature", "-0.5"),
        (["loss.tau_plus=1.0"], "loss.tau_plus", "1.0"),
        (["loss.tau_plus=-0.1"], "loss.tau_plus", "-0.1"),
        (["data.imbalance_ratio=0.5"], "data.imbalance_ratio", "0.5"),
        (["model.num_clusters=1"], "model.num_clusters", "1"),
        (["model.clustering_backbone_grad=1.5"], "model.clustering_backbone_grad", "1.5"),
        (["run.workers=0"], "run.workers", "0"),
        (["optim.batch_size=255", "run.workers=2"], "optim.batch_size", "255"),
        (["loss.prior=adaptive"], "loss.prior", "adaptive"),
        (["data.profile=linear"], "data.profile", "linear"),
        (["optim.lr=0"], "optim.lr", "0"),
        (["augment.crop_scale=[0.9, 0.1]"], "augment.crop_scale", "0.9"),
        (["loss.temprature=0.2"], "loss.temprature", "unknown"),
        (["modle.num_clusters=3"], "modle", "unknown"),
        (["loss.temperature=warm"], "loss.temperature", "warm"),
        (["run.workers=1.5"], "run.workers", "1.5"),
        (["run.use_gpu=maybe"], "run.use_gpu", "maybe"),
        (["run.precision=fp16"], "run.precision", "fp16"),
        (["run.compile=sometimes"], "run.compile", "sometimes"),
        (["augment.jitter=[0.4, 0.4]"], "augment.jitter", "0.4"),
    ],
)
def test_bad_values_name_the_key_and_value(overrides, key, value):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    message = str(error.value)
    assert key in message and value in message
    assert "\n" not in message


def test_bad_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=r"nope\.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss:\n  temperature: [0.5\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML at line \d+"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(listed)
    section = tmp_path / "section.yaml"
    section.write_text("loss: 3\n")
    with pytest.raises(UserError, match="section 'loss'"):
        load_config(section)


def test_malformed_set_is_rejected():
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides(["loss.temperature"])
