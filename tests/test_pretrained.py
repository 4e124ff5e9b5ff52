"""model.init: a run starts from a weights file, torchvision's cached weights or an earlier run,
and model.freeze_backbone_epochs keeps that backbone as it came (jdcl_ray/pretrained.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from jdcl_ray.checkpoint import save_checkpoint
from jdcl_ray.config import Config, load_config
from jdcl_ray.data import prepare_data
from jdcl_ray.engine import WorkerContext, embed, fit
from jdcl_ray.errors import UserError
from jdcl_ray.models import build_model
from jdcl_ray.pretrained import apply_initial_weights, read_initial_weights

ROOT = Path(__file__).resolve().parents[1]
CPU = WorkerContext(0, 1, torch.device("cpu"))


def config(**model: object) -> Config:
    return load_config(ROOT / "configs" / "digits_lt.yaml", {"model": model})


def resnet_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 with random weights, saved as torchvision saves its own."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():  # running statistics unlike a fresh model's, to be seen
        if key.endswith("running_mean"):
            value.normal_()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def started(config: Config, in_channels: int, spec: str) -> torch.nn.Module:
    model = build_model(config, in_channels, 8)
    weights = read_initial_weights(spec, config.model.init_heads)
    assert weights is not None
    apply_initial_weights(model, weights)
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_from_a_state_dict_file_equals_the_file(tmp_path, suffix):
    saved = resnet_file(tmp_path / f"resnet18{suffix}")
    model = started(config(backbone="resnet18"), 3, str(tmp_path / f"resnet18{suffix}"))
    backbone = model.backbone.state_dict()
    assert set(backbone) == set(saved) - {"fc.weight", "fc.bias"}  # torchvision's classifier
    for key, value in backbone.items():
        assert torch.equal(value, saved[key]), key


def test_a_one_channel_model_from_a_three_channel_file(tmp_path):
    saved = resnet_file(tmp_path / "resnet18.pth")
    model = started(config(backbone="resnet18"), 1, str(tmp_path / "resnet18.pth"))
    conv = model.backbone.conv1.weight
    assert conv.shape == (64, 1, 7, 7)
    torch.testing.assert_close(conv, saved["conv1.weight"].sum(1, keepdim=True))
    # A grey image seen as three equal channels: the same first-layer response.
    grey = torch.rand(2, 1, 32, 32)
    three = torch.nn.functional.conv2d(grey.expand(-1, 3, -1, -1), saved["conv1.weight"])
    torch.testing.assert_close(torch.nn.functional.conv2d(grey, conv), three)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])


def one_line_error(match: str, action, *args) -> None:
    with pytest.raises(UserError, match=match) as caught:
        action(*args)
    assert "\n" not in str(caught.value)


def test_wrong_files_are_one_line_errors(tmp_path):
    resnet_file(tmp_path / "resnet18.pt")
    one_line_error(
        r"missing backbone\.0\.weight.*unexpected backbone\.conv1",
        started,
        config(backbone="small_cnn"),
        1,
        str(tmp_path / "resnet18.pt"),
    )
    one_line_error(
        r"backbone\.conv1\.weight has shape \(64, 3, 7, 7\)",
        started,
        config(backbone="resnet18_cifar"),
        3,
        str(tmp_path / "resnet18.pt"),
    )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    one_line_error(
        "junk.pt: not a weights-only torch state dict",
        read_initial_weights,
        str(tmp_path / "junk.pt"),
    )
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(
        "junk.safetensors: not a safetensors file",
        read_initial_weights,
        str(tmp_path / "junk.safetensors"),
    )
    one_line_error("missing.pt: no such file", read_initial_weights, str(tmp_path / "missing.pt"))
    one_line_error(
        "expected 'random', torchvision:WEIGHTS",
        read_initial_weights,
        str(tmp_path / "no_such_run"),
    )


def test_torchvision_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    spec = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(UserError, match=f"{cached} is not there.*download.pytorch.org"):
        read_initial_weights(spec)
    with pytest.raises(UserError, match="'Nope' is not a torchvision weights name"):
        read_initial_weights("torchvision:Nope")
    cached.parent.mkdir(parents=True)
    saved = resnet_file(cached)
    model = started(config(backbone="resnet18"), 3, spec)
    assert torch.equal(
        model.backbone.layer4[1].bn2.running_mean, saved["layer4.1.bn2.running_mean"]
    )


def train_digits(tmp_path: Path, folder: str, **overrides: object) -> tuple[Config, dict]:
    """A short in-process digits run that saves its last checkpoint in ``tmp_path/folder``."""
    values = {"run": {"epochs": 2}, "eval": {"every": 2}}
    for key, value in overrides.items():
        values.setdefault(key.split("__")[0], {})[key.split("__")[1]] = value
    run_config = load_config(ROOT / "configs" / "digits_lt.yaml", values)
    data = prepare_data(run_config)
    final: dict = {}

    def report(metrics: dict, state: dict | None, assignments: dict | None) -> None:
        if state is not None:
            (tmp_path / folder).mkdir(exist_ok=True)
            save_checkpoint(tmp_path / folder, state, metrics, assignments)
            final.update(state)

    initial = read_initial_weights(run_config.model.init, run_config.model.init_heads)
    fit(run_config, data, CPU, report, log=lambda _: None, initial=initial)
    return run_config, final


def test_an_earlier_run_gives_its_backbone_and_optionally_its_heads(tmp_path):
    run_config, state = train_digits(tmp_path, "first")
    images = prepare_data(run_config).train.images[:64]
    earlier = build_model(run_config, 1, 8)
    earlier.load_state_dict(state["model"])
    for heads in (False, True):
        model = started(config(init_heads=heads), 1, str(tmp_path / "first"))
        torch.testing.assert_close(
            embed(model, images, CPU.device)["features"],
            embed(earlier, images, CPU.device)["features"],
        )
        same_head = torch.equal(model.clustering.logits.weight, earlier.clustering.logits.weight)
        assert same_head == heads


@pytest.mark.parametrize("frozen", [2, 1])
def test_freeze_backbone_epochs_leaves_the_backbone_as_initialised(tmp_path, frozen):
    torch.manual_seed(0)
    first = build_model(config(), 1, 8)
    torch.save({"model": first.state_dict()}, tmp_path / "start.pt")
    _, state = train_digits(
        tmp_path,
        "run",
        model__init=str(tmp_path / "start.pt"),
        model__freeze_backbone_epochs=frozen,
    )
    after = state["model"]
    unchanged = all(
        torch.equal(value, after[f"backbone.{key}"])
        for key, value in first.backbone.state_dict().items()
    )
    assert unchanged == (frozen == 2)  # 2 of 2 epochs frozen; with 1, the second epoch trains it
    assert not torch.equal(first.clustering.logits.weight, after["clustering.logits.weight"])


def test_bad_freeze_epochs_is_a_config_error():
    with pytest.raises(UserError, match=r"model\.freeze_backbone_epochs"):
        config(freeze_backbone_epochs=-1)


def test_train_cli_rejects_a_bad_init_before_ray_starts(tmp_path):
    from jdcl_ray.train import main

    config_file = str(ROOT / "configs" / "digits_lt.yaml")
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(UserError, match=r"nope\.pt: no such file"):
        main(["--config", config_file, "--set", f"model.init={missing}", "--output", str(tmp_path)])
    assert not (tmp_path / "train").exists()
