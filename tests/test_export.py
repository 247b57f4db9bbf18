"""Export contract: ``backbone.safetensors`` loads into a plain torchvision / timm model unchanged.

A fresh model built only from ``backbone.yaml`` with the public libraries must give features
identical to the source backbone, and ``eval.load`` must reload the export exactly.
"""

from __future__ import annotations

import timm
import torch
import torchvision
import yaml
from safetensors.torch import load_file
from torch import nn

from eval.load import file_sha256, load_backbone, random_init_like, weights_sha256
from pretrain.backbones import Backbone, BackboneConfig, build_backbone
from pretrain.export import export_backbone


def perturbed(cfg: BackboneConfig) -> Backbone:
    """A backbone whose weights and BN running statistics are far from their initial values."""
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return backbone.eval()


def plain_resnet(spec: dict) -> nn.Module:
    """A torchvision ResNet built from ``backbone.yaml`` alone (the README's recipe)."""
    net = getattr(torchvision.models, spec["torchvision_name"])()
    net.fc = nn.Identity()
    if spec["backbone"]["cifar_stem"]:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def plain_timm(spec: dict) -> nn.Module:
    return timm.create_model(spec["timm_name"], **spec["timm_kwargs"])


def export_and_rebuild(backbone: Backbone, tmp_path, build) -> tuple[nn.Module, dict]:
    out = export_backbone(backbone, tmp_path / "export")
    spec = yaml.safe_load((out / "backbone.yaml").read_text())
    net = build(spec)
    net.load_state_dict(load_file(str(out / "backbone.safetensors")))  # strict
    return net.eval(), spec


def test_resnet18_cifar_export_loads_into_plain_torchvision(tmp_path):
    source = perturbed(BackboneConfig(name="resnet18", cifar_stem=True))
    net, spec = export_and_rebuild(source, tmp_path, plain_resnet)
    assert spec["family"] == "resnet" and spec["embed_dim"] == 512
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = source(x)
        assert expected.shape == (4, 512)
        assert torch.equal(net(x), expected)


def test_vit_tiny_export_loads_into_plain_timm(tmp_path):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4)
    source = perturbed(cfg)
    net, spec = export_and_rebuild(source, tmp_path, plain_timm)
    assert spec["timm_kwargs"]["img_size"] == 32 and spec["timm_kwargs"]["patch_size"] == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = source(x)
        assert expected.shape == (2, 192)
        assert torch.equal(net(x), expected)


def test_eval_load_reloads_export_exactly(tmp_path):
    source = perturbed(BackboneConfig(name="resnet18", cifar_stem=True))
    out = export_backbone(source, tmp_path / "run" / "export")
    x = torch.randn(2, 3, 32, 32)
    for path in (out, out / "backbone.safetensors"):  # directory or the weights file
        loaded, name = load_backbone(str(path))
        assert name == "run/export"
        with torch.inference_mode():
            assert torch.equal(loaded.eval()(x), source(x))
    assert weights_sha256(out) == file_sha256(out / "backbone.safetensors")
    assert len(weights_sha256(out)) == 64


def test_random_init_baseline_is_seeded_and_differs_from_trained():
    source = perturbed(BackboneConfig(name="resnet18", cifar_stem=True))
    a, b = random_init_like(source, seed=0), random_init_like(source, seed=0)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.net.conv1.weight, source.net.conv1.weight)
    assert a.cfg == source.cfg and a.cfg is not source.cfg
