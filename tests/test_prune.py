"""Prune mode: PiX(ζ) in front of dense layers fed by an activation, consumers shrunk to
ceil(C/ζ) inputs with folded weights; depthwise/grouped convs, residual adds and concats keep working."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import pixify
from pixify.errors import PixifyError, RuleError
from pixify.rewrite import PiXBlock, fold_layer
from pixify.rules import parse_rules


def _seeded(fn, *args, **kwargs):
    torch.manual_seed(0)
    return fn(*args, **kwargs).eval()


class TinyVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32),  # fed by a pool of a ReLU: a prune point
            nn.Conv2d(32, 16, 1), nn.ReLU(),  # fed by a BN, not an activation: left alone
            nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),  # grouped: never shrunk
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _sites(report, action="prune"):
    return {s.name: s for s in report.sites if s.action == action}


def test_prune_points_on_a_vgg_like_model():
    model = _seeded(TinyVGG)
    x = torch.randn(2, 3, 16, 16)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    sites = _sites(report)
    assert set(sites) == {"features.2", "features.5", "features.11"}, sorted(sites)
    assert report.zeta == "auto" and all(s.zeta == 2 for s in sites.values())  # auto means ζ = 2 in prune mode
    misses = {(n.name, n.reason) for n in report.near_misses}
    assert any(name == "features.0" and "stem" in r or "activation" in r for name, r in misses)
    assert any(name == "features.7" and "activation" in r for name, r in misses)
    assert any(name == "features.9" and "groups=4" in r for name, r in misses)
    block = converted.features[2]
    assert isinstance(block, PiXBlock) and block.layer.in_channels == 8 and block.layer.out_channels == 32
    assert converted.features[5].layer.in_channels == 16
    assert block.layer.kernel_size == (3, 3) and block.layer.padding == (1, 1)
    assert isinstance(converted.features[9], nn.Conv2d) and converted.features[9].groups == 4
    assert converted.fc is not model.fc and isinstance(converted.fc, nn.Linear)  # head untouched (copied)
    assert converted(x).shape == (2, 10)
    for s in sites.values():
        assert s.macs_after < s.macs_before and s.macs_saved > 0
    assert report.macs_after < report.macs_before


def test_zeta_is_an_integer_everywhere():
    model = _seeded(TinyVGG)
    x = torch.randn(1, 3, 16, 16)
    converted, report = pixify.convert(model, mode="prune", zeta=4, example_input=x)
    assert converted.features[2].layer.in_channels == 4  # 16 → ceil(16/4)
    assert converted.features[5].layer.in_channels == 8  # 32 → ceil(32/4)
    with pytest.raises(PixifyError):
        pixify.convert(model, mode="prune", zeta=1.5, example_input=x)
    _, report = pixify.convert(model, mode="prune", zeta=16, example_input=x)
    skipped = _sites(report, "skip")
    assert "features.2" in skipped and "nothing left" in skipped["features.2"].reason


def test_preset_is_squeeze_only():
    with pytest.raises(PixifyError, match="squeeze"):
        pixify.convert(_seeded(TinyVGG), mode="prune", preset="paper", example_input=torch.randn(1, 3, 16, 16))


def test_fold_is_exact_when_subsets_agree():
    """At initialisation (φ = 0: every group mixes with p = 0.5) PiX + folded consumer equals the original
    consumer whenever the channels of each subset are equal."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 7, 3, padding=1, stride=2)
    base = torch.randn(2, 4, 9, 9).relu()
    x = base.repeat_interleave(3, dim=1)  # subsets of ζ=3 channels agree
    block = PiXBlock(pixify.PiX(12, 3), fold_layer(conv, 3))
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), rtol=1e-5, atol=1e-5)
    lin = nn.Linear(10, 6)
    t = torch.randn(2, 5, 5).repeat_interleave(2, dim=-1)  # tokens N×L×C, subsets of 2 agree
    block = PiXBlock(pixify.PiX(10, 2, channel_dim=-1), fold_layer(lin, 2))
    with torch.no_grad():
        torch.testing.assert_close(block(t), lin(t), rtol=1e-5, atol=1e-5)


def test_resnet_bottleneck_interiors_and_round_trip(tmp_path):
    model = _seeded(timm.create_model, "test_resnet")
    x = torch.randn(1, 3, 64, 64)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    sites = _sites(report)
    assert any(n.endswith(".conv2") for n in sites) and any(n.endswith(".conv3") for n in sites)
    assert not any(n.startswith("conv1.0") or n == "fc" for n in sites)  # stem and head untouched
    converted.train()
    out = converted(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000)
    path = tmp_path / "r.safetensors"
    pixify.save(converted, path)
    recipe = pixify.read_recipe(path)
    assert recipe["mode"] == "prune" and all(s["action"] == "prune" for s in recipe["sites"])
    # a recipe of a user-built timm model re-applies to a fresh instance
    loaded = pixify.load(path, model=timm.create_model("test_resnet"))
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))


def test_mobilenet_pointwise_depthwise_and_residuals():
    model = _seeded(torchvision.models.mobilenet_v2, width_mult=0.5)
    x = torch.randn(2, 3, 64, 64)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    sites = _sites(report)
    assert sites, "no prune points found"
    for name in sites:  # the projection 1×1 convs (fed by the depthwise conv's ReLU6)
        layer = model.get_submodule(name)
        assert layer.kernel_size == (1, 1) and layer.groups == 1
    for name, m in converted.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels == m.groups  # depthwise convs untouched
    assert converted(x).shape == (2, 1000)


def test_densenet_concat_inputs():
    model = _seeded(torchvision.models.DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16,
                    bn_size=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    sites = _sites(report)
    assert any(n.endswith("conv1") for n in sites) and any(n.endswith("conv2") for n in sites)
    assert converted(x).shape == (2, 5)


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_token_layout_linears(name):
    """Transformer MLPs (N×L×C) and ConvNeXt's channels-last MLP (N×H×W×C): fc2 is fed by the GELU."""
    model = _seeded(timm.create_model, name)
    x = torch.randn(2, 3, 64, 64)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    sites = _sites(report)
    assert sites and all(n.endswith("mlp.fc2") for n in sites), sorted(sites)
    for n, s in sites.items():
        assert s.channel_dim == -1 and s.kind == "linear"
        block = converted.get_submodule(n)
        assert block.pix.channel_dim == -1 and block.layer.in_features == math.ceil(s.c_in / 2)
    seen = []
    first = converted.get_submodule(next(iter(sites)))
    first.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    assert converted(x).shape == (2, 1000)
    assert len(seen[0]) == (4 if name == "test_convnext" else 3)  # N×H×W×C or N×L×C


def test_inspect_lists_prune_points_with_macs_saved():
    report = pixify.inspect(_seeded(TinyVGG), mode="prune", example_input=torch.randn(1, 3, 16, 16))
    data = report.to_json()
    assert data["mode"] == "prune" and data["counts"]["prune"] == 3
    assert all(s["macs_before"] > s["macs_after"] for s in data["sites"] if s["action"] == "prune")
    json.dumps(data)


def test_cli_inspect_prune(capsys):
    from pixify.cli import main

    rc = main(["inspect", "test_resnet", "--mode", "prune", "--input-size", "3,64,64", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["prune"] > 0 and data["macs_ratio"] < 1


def test_prune_rules_are_validated():
    base = 'name = "p"\ndescription = "d"\nmode = "prune"\n'
    parse_rules('[[rule]]\n' + base + 'pattern = ["conv2d"]\ninput_from_act = true\nauto_zeta = 3\n')
    with pytest.raises(RuleError, match="no followers"):
        parse_rules('[[rule]]\n' + base + 'pattern = ["conv2d", "norm?"]\n')
    with pytest.raises(RuleError, match="auto_zeta"):
        parse_rules('[[rule]]\n' + base + 'pattern = ["conv2d"]\nauto_zeta = 0\n')
    with pytest.raises(RuleError, match="input_from_act"):
        parse_rules('[[rule]]\n' + base + 'pattern = ["conv2d"]\ninput_from_act = "yes"\n')


def test_rule_auto_zeta_and_include():
    rule = {"name": "only-last", "description": "prune the last conv at ζ 4", "mode": "prune",
            "pattern": ["conv2d"], "input_from_act": True, "auto_zeta": 4, "include": ["features.11"],
            "priority": 500}
    model = _seeded(TinyVGG)
    from pixify.rules import _validate

    r = _validate(rule, "<test>", lambda k: None)
    converted, report = pixify.convert(model, mode="prune", rules=[r], example_input=torch.randn(1, 3, 16, 16))
    sites = _sites(report)
    assert sites["features.11"].zeta == 4 and sites["features.11"].rule == "only-last"
    assert sites["features.2"].zeta == 2
