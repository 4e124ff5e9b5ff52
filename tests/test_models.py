"""Models: shapes of the joint networks, the statistics pooling block against its formulas."""

import pytest
import torch

from jdcl_ray.models import (
    GlobalBatchNorm,
    JointModel,
    StatisticsPooling,
    build_backbone,
    use_global_batchnorm,
)


@pytest.mark.parametrize(
    ("backbone", "channels", "size", "features"),
    [("small_cnn", 1, 8, 128), ("small_cnn", 3, 28, 128), ("resnet18_cifar", 3, 32, 512)],
)
def test_joint_model_shapes(backbone, channels, size, features):
    model = JointModel(backbone, channels, num_clusters=7)
    out = model(torch.rand(4, channels, size, size))
    assert out.features.shape == (4, features)
    assert out.projections.shape == (4, 128)
    torch.testing.assert_close(out.projections.norm(dim=1), torch.ones(4))
    assert out.assignments.shape == (4, 7)
    torch.testing.assert_close(out.assignments.sum(1), torch.ones(4))
    assert out.cluster_hidden.shape == (4, 100)


def test_resnet_imagenet_stem_accepts_grey_images():
    net, features = build_backbone("resnet18", 1)
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, features)


def test_pooling_matches_the_weighted_formulas():
    torch.manual_seed(0)
    assignments = torch.softmax(torch.randn(50, 3), dim=1)
    features = torch.randn(50, 4)
    pooling = StatisticsPooling(3, 4, momentum=0.1)
    pooling.update(assignments, features)
    for k in range(3):
        weights = assignments[:, k]
        count = weights.sum()
        mean = (weights[:, None] * features).sum(0) / count
        var = (weights[:, None] * (features - mean) ** 2).sum(0) / count
        torch.testing.assert_close(pooling.cardinality[k], count)
        torch.testing.assert_close(pooling.mean[k], mean)
        torch.testing.assert_close(pooling.var[k], var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooling.proportions(), assignments.sum(0) / 50)


def test_pooling_is_an_ema_and_lives_in_the_state_dict():
    pooling = StatisticsPooling(2, 2, momentum=0.25)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pooling.update(one_hot, torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    pooling.update(one_hot, torch.tensor([[8.0, 8.0], [4.0, 4.0]]))
    torch.testing.assert_close(pooling.mean[0], torch.tensor([2.0, 2.0]))  # 0.75·0 + 0.25·8
    torch.testing.assert_close(pooling.mean[1], torch.tensor([4.0, 4.0]))
    copy = StatisticsPooling(2, 2)
    copy.load_state_dict(pooling.state_dict())
    torch.testing.assert_close(copy.mean, pooling.mean)
    assert int(copy.num_updates) == 2


def test_global_batchnorm_equals_batchnorm_on_one_worker():
    torch.manual_seed(2)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    converted = use_global_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    )
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], GlobalBatchNorm)
    x = torch.randn(8, 1, 6, 6)
    torch.testing.assert_close(converted(x), plain(x))
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)


def _backbone_grads(scale: float) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    torch.manual_seed(0)
    model = JointModel("small_cnn", 1, num_clusters=4, clustering_backbone_grad=scale)
    out = model(torch.rand(6, 1, 8, 8))
    (out.assignments * torch.arange(4.0)).sum().backward()  # the clustering network's loss only
    return out.assignments.detach(), [p.grad for p in model.backbone.parameters()]


def test_clustering_backbone_grad_scales_only_what_the_head_sends_to_the_backbone():
    joint, full = _backbone_grads(1.0)
    half_assignments, half = _backbone_grads(0.5)
    detached_assignments, none = _backbone_grads(0.0)
    torch.testing.assert_close(half_assignments, joint)  # the forward pass is unchanged
    torch.testing.assert_close(detached_assignments, joint)
    assert any(g.abs().sum() > 0 for g in full)
    for g_full, g_half in zip(full, half, strict=True):
        torch.testing.assert_close(g_half, 0.5 * g_full)
    assert all(g is None or not g.any() for g in none)
