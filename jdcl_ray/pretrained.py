"""Where a model's first weights come from (``model.init``), so that a run can start from
features someone already learnt instead of from random weights:

- ``random``: the layers' own initialisation;
- a weights file: a ``.pt``/``.pth`` state dict (loaded with ``weights_only=True``; a wrapping
  ``{"state_dict": ...}`` or ``{"model": ...}`` and DDP's ``module.`` prefixes are taken off)
  or a ``.safetensors`` file — the backbone's weights, bare (``conv1.weight``, as torchvision
  saves them) or under ``backbone.``;
- ``torchvision:WEIGHTS``, e.g. ``torchvision:ResNet18_Weights.IMAGENET1K_V1``: that file from
  the local torch cache (no network is assumed: a missing file is a one-line error saying where
  to put it);
- an earlier jdcl-ray run: a checkpoint folder or a run folder (its newest checkpoint). Its
  backbone, and its projection and clustering heads when ``model.init_heads`` is true. (An
  MLflow run id is resolved to its checkpoint folder by the edges, ``tracking``.)

Key mismatches are one-line errors naming the missing and unexpected keys. A first convolution
saved for 3 channels is summed over its input channels for 1-channel images (a grey image seen
as three equal channels gives the same response), and a 1-channel one is spread over 3.
Plain PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from jdcl_ray import storage
from jdcl_ray.checkpoint import STATE_FILE, find_checkpoint, load_state
from jdcl_ray.errors import UserError
from jdcl_ray.models import JointModel

RANDOM = "random"
TORCHVISION = "torchvision:"
BACKBONE = "backbone."
HEADS = ("projection.", "clustering.")
WEIGHT_FILES = (".pt", ".pth", ".safetensors")
# torchvision's ImageNet classifier: the heads replace it, so a ResNet file's fc.* is not used.
CLASSIFIER = "fc."
SHOWN = 3  # keys named in a mismatch error


class InitialWeights(NamedTuple):
    """A state dict in the joint model's names (``backbone.…``, maybe the heads'), and where it
    came from, as the run's params and tags record it."""

    state: dict[str, Tensor]
    source: str


def _unwrap(values: object, where: str) -> dict[str, Tensor]:
    """The tensors of a saved state dict, out of the wrappers training scripts put around it."""
    for key in ("state_dict", "model"):
        if isinstance(values, dict) and isinstance(values.get(key), dict):
            values = values[key]
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in values.items()
    ):
        raise UserError(f"model.init {where}: expected a state dict (names → tensors)")
    return {key.removeprefix("module."): value for key, value in values.items()}


def _in_model_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare backbone's keys under ``backbone.``; a jdcl-ray model's as they are."""
    if any(key.startswith(BACKBONE) for key in state):
        return state
    return {BACKBONE + key: value for key, value in state.items() if not key.startswith(CLASSIFIER)}


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path)), str(path))
        except SafetensorError as error:
            raise UserError(f"model.init {path}: not a safetensors file ({error})") from None
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(
            f"model.init {path}: not a weights-only torch state dict ({reason})"
        ) from None
    return _unwrap(values, str(path))


def _torchvision_file(spec: str) -> Path:
    import torchvision

    name = spec.removeprefix(TORCHVISION)
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.init = {spec!r}: {name!r} is not a torchvision weights name: expected e.g. "
            "torchvision:ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise UserError(
            f"model.init = {spec!r}: {path} is not there and no download is made: fetch "
            f"{weights.url} to that path (or set TORCH_HOME)"
        )
    return path


def read_initial_weights(spec: str, heads: bool = False) -> InitialWeights | None:
    """The weights ``model.init`` names (None for ``random``); ``heads``: keep an earlier run's
    projection and clustering heads too."""
    if spec == RANDOM:
        return None
    if spec.startswith(TORCHVISION):
        path = _torchvision_file(spec)
        return InitialWeights(_in_model_names(_read_file(path)), f"{spec} ({path})")
    location = storage.resolve(spec)
    if Path(spec).suffix in WEIGHT_FILES:
        if not Path(location).is_file():
            raise UserError(f"model.init {spec}: no such file: expected a weights file")
        return InitialWeights(_in_model_names(_read_file(Path(location))), spec)
    if not storage.exists(location):
        raise UserError(
            f"model.init = {spec!r}: expected 'random', torchvision:WEIGHTS, a weights file "
            f"({', '.join(WEIGHT_FILES)}), an earlier run's folder or checkpoint, or an MLflow run id"
        )
    checkpoint = find_checkpoint(location, "model.init")
    model = _unwrap(load_state(checkpoint), storage.join(checkpoint, STATE_FILE))
    keep = (BACKBONE, *HEADS) if heads else (BACKBONE,)
    state = {key: value for key, value in model.items() if key.startswith(keep)}
    return InitialWeights(state, f"{checkpoint} ({'backbone and heads' if heads else 'backbone'})")


def _adapted(key: str, saved: Tensor, wanted: Tensor, source: str) -> Tensor:
    """``saved`` in ``wanted``'s shape: a first convolution's input channels 3 → 1 (summed) or
    1 → 3 (spread); any other difference is an error."""
    if saved.shape == wanted.shape:
        return saved
    same_but_channels = (
        saved.ndim == wanted.ndim == 4
        and saved.shape[0] == wanted.shape[0]
        and saved.shape[2:] == wanted.shape[2:]
    )
    if same_but_channels and (saved.shape[1], wanted.shape[1]) == (3, 1):
        return saved.sum(dim=1, keepdim=True)
    if same_but_channels and (saved.shape[1], wanted.shape[1]) == (1, 3):
        return saved.expand(-1, 3, -1, -1) / 3
    raise UserError(
        f"model.init {source}: {key} has shape {tuple(saved.shape)}, the model's "
        f"{tuple(wanted.shape)}: expected weights of the same model.backbone"
    )


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def apply_initial_weights(model: JointModel, weights: InitialWeights) -> None:
    """Load ``weights`` into ``model``: every backbone tensor (and every head tensor, when they
    hold heads) must be there, and nothing else."""
    own = model.state_dict()
    prefixes = (
        (BACKBONE, *HEADS) if any(k.startswith(HEADS) for k in weights.state) else (BACKBONE,)
    )
    wanted = [key for key in own if key.startswith(prefixes)]
    missing = [key for key in wanted if key not in weights.state]
    unexpected = [key for key in weights.state if key not in own]
    if missing or unexpected:
        parts = [f"missing {_listed(missing)}"] if missing else []
        parts += [f"unexpected {_listed(unexpected)}"] if unexpected else []
        raise UserError(
            f"model.init {weights.source}: {'; '.join(parts)}: expected the weights of "
            "model.backbone as this config builds it"
        )
    loaded = {
        key: _adapted(key, weights.state[key], own[key], weights.source).to(own[key].dtype)
        for key in wanted
    }
    model.load_state_dict(loaded, strict=False)
