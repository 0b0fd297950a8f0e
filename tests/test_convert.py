import copy

import pytest
import timm
import torch
from torch import nn

import pixify
from pixify import PiX, PiXBlock, PixifyError
from pixify.graph import example_input_for
from pixify.rewrite import plan_sites


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False).eval()


def test_resnet50_auto_is_fifteen_pure_sites(resnet50):
    model, rep = pixify.convert(resnet50, zeta="auto")
    assert (rep.count("pure"), rep.count("hybrid"), rep.count("skip")) == (15, 0, 0)
    assert 0.76 <= rep.macs_ratio <= 0.78, rep.macs_ratio
    assert rep.macs_before == pytest.approx(4.09e9, rel=0.01)
    # the bottleneck's norm and activation went into PiX; the original is untouched
    assert isinstance(model.layer1[1].conv1, PiX) and isinstance(model.layer1[1].bn1, nn.Identity)
    assert isinstance(model.layer1[1].act1, nn.Identity)
    assert isinstance(resnet50.layer1[1].conv1, nn.Conv2d)
    # ratio-1, expansion and strided 1x1 convs are near-misses with reasons, the head is never touched
    reasons = {n.name: n.reason for n in rep.near_misses}
    assert "not a squeeze" in reasons["layer1.0.conv1"]
    assert "stride" in reasons["layer2.0.downsample.0"]
    assert isinstance(model.fc, nn.Linear) and isinstance(model.conv1, nn.Conv2d)


def test_resnet50_paper_preset_has_sixteen_sites(resnet50):
    model, rep = pixify.convert(resnet50, preset="paper")
    assert rep.count("pure") == 16 and rep.count("hybrid") == 0
    zetas = {s.name: s.zeta for s in rep.sites}
    assert zetas["layer1.0.conv1"] == 1 and zetas["layer2.0.conv1"] == 2 and zetas["layer3.0.conv1"] == 2
    assert zetas["layer4.0.conv1"] == 2 and zetas["layer1.1.conv1"] == 4 and zetas["layer3.4.conv1"] == 4


def test_resnet50_zeta2_is_three_pure_twelve_hybrid(resnet50):
    model, rep = pixify.convert(resnet50, zeta=2)
    assert (rep.count("pure"), rep.count("hybrid")) == (3, 12)
    blk = model.layer1[1].conv1
    assert isinstance(blk, PiXBlock) and blk.pix.zeta == 2 and blk.layer.in_channels == 128
    assert isinstance(model.layer1[1].bn1, nn.BatchNorm2d)  # hybrid keeps norm and activation


def test_zeta_larger_than_ratio_is_skipped_with_reason(resnet50):
    _, rep = pixify.convert(resnet50, zeta=8, example_input=torch.randn(1, 3, 64, 64))
    assert rep.count("skip") == 15
    assert all("ζ=8 > ratio" in s.reason for s in rep.sites)


def test_converted_timm_model_stays_a_timm_model(resnet50):
    model, _ = pixify.convert(resnet50, zeta="auto")
    assert type(model) is type(resnet50)
    assert model.pretrained_cfg == resnet50.pretrained_cfg
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 2048, 2, 2)
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "resnext50_32x4d", "efficientnet_b0",
                                  "mobilenetv3_large_100", "densenet121"])
def test_zoo_models_convert_forward_backward(spec):
    model, src = pixify.create_model(spec, pretrained=False)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref_shape = model(x).shape
    conv, rep = pixify.convert(model, example_input=x[:1], source=src, inplace=True)
    assert rep.count("pure") + rep.count("hybrid") > 0
    assert rep.macs_after < rep.macs_before
    conv.train()
    y = conv(x)
    assert y.shape == ref_shape
    y.square().mean().backward()
    pix = [m for m in conv.modules() if isinstance(m, PiX)]
    assert pix and all(m.weight.grad is not None for m in pix)


def test_squeeze_excitation_convs_are_not_sites():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    _, rep = pixify.convert(model, example_input=torch.randn(1, 3, 64, 64), inplace=True)
    se = [n for n in rep.near_misses if n.name.endswith("se.conv_reduce")]
    assert se and all("spatial size 1" in n.reason for n in se)
    assert not any(".se." in s.name for s in rep.sites)
    # 144->40 has no exact integer zeta: auto makes it a hybrid at floor(3.6) = 3
    hyb = {s.c_in: s.zeta for s in rep.sites if s.action == "hybrid"}
    assert hyb.get(144) == 3


class Squeeze(nn.Module):
    def __init__(self, c_in=12, c_out=4, bias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, c_in, 3, padding=1)
        self.act0 = nn.ReLU()
        self.squeeze = nn.Conv2d(c_in, c_out, 1, bias=bias)
        self.head = nn.Conv2d(c_out, 5, 1)

    def forward(self, x):
        return self.head(self.squeeze(self.act0(self.stem(x))))


def test_hybrid_fold_is_exact_when_subset_channels_agree():
    """The folded layer computes Σ_c W_c · mean(subset): exact when a subset's channels are equal."""
    torch.manual_seed(0)
    m = Squeeze(12, 2).eval()
    conv, rep = pixify.convert(m, zeta=3, example_input=torch.randn(1, 3, 8, 8))
    (site,) = [s for s in rep.sites if s.name == "squeeze"]
    assert site.action == "hybrid" and site.zeta == 3
    base = torch.randn(2, 4, 8, 8).relu()
    x = base.repeat_interleave(3, dim=1)  # channels [0,1,2] equal, [3,4,5] equal, ...
    with torch.no_grad():
        want = m.head(m.squeeze(x))
        got = conv.head(conv.squeeze(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_short_last_subset_gets_exact_zeta():
    m = Squeeze(10, 4).eval()  # ceil(10/3) == 4: pure at zeta 3, last subset holds one channel
    conv, rep = pixify.convert(m, example_input=torch.randn(1, 3, 8, 8))
    (site,) = [s for s in rep.sites if s.name == "squeeze"]
    assert (site.action, site.zeta) == ("pure", 3)
    assert conv(torch.randn(2, 3, 8, 8)).shape == (2, 5, 8, 8)


def test_custom_module_stem_and_head_untouched():
    m = Squeeze(12, 4)
    conv, rep = pixify.convert(m, example_input=torch.randn(1, 3, 8, 8))
    assert [s.name for s in rep.sites] == ["squeeze"]
    assert isinstance(conv.head, nn.Conv2d) and isinstance(conv.stem, nn.Conv2d)
    assert "classifier head" in {n.name: n.reason for n in rep.near_misses}["head"]


def test_plan_auto_rules():
    from pixify.graph import Candidate
    from pixify.rules import builtin_rules

    rule = [r for r in builtin_rules() if r.name == "conv1x1-squeeze"][0]

    def cand(ci, co):
        return Candidate("x", rule, "conv2d", ci, co, 49, (1, ci, 7, 7), 1)

    recs = plan_sites([cand(256, 64), cand(160, 128), cand(1000, 128), cand(96, 40)], "auto", 0.5)
    assert [(r.action, r.zeta) for r in recs] == [("pure", 4), ("skip", None), ("hybrid", 7), ("hybrid", 2)]
    assert "ratio 1.25" in recs[1].reason


@pytest.mark.parametrize("zeta", [0, -1, 1.5, "x", "", None])
def test_bad_zeta_is_a_user_error(zeta):
    with pytest.raises(PixifyError, match="zeta"):
        pixify.convert(Squeeze(), zeta=zeta)


@pytest.mark.parametrize("tau", [0, 1, 1.2, -0.1, "abc", float("nan")])
def test_bad_tau_is_a_user_error(tau):
    with pytest.raises(PixifyError, match="tau"):
        pixify.convert(Squeeze(), tau=tau)


def test_user_rule_file_restricts_sites(tmp_path, resnet50):
    f = tmp_path / "only_layer3.toml"
    f.write_text('''
[[rule]]
name = "layer3-only"
description = "squeezes in layer3"
mode = "squeeze"
priority = 500
pattern = ["conv2d", "norm?", "act?"]
kernel_size = 1
groups = 1
stride = 1
min_ratio = 1.0
min_spatial = 2
include = ["layer3.*"]
''')
    _, rep = pixify.convert(resnet50, rules=[f], example_input=torch.randn(1, 3, 64, 64))
    by_rule = {}
    for s in rep.sites:
        by_rule.setdefault(s.rule, []).append(s.name)
    assert sorted(by_rule["layer3-only"]) == [f"layer3.{i}.conv1" for i in range(6)]
    assert len(by_rule["conv1x1-squeeze"]) == 9


def test_example_input_comes_from_pretrained_cfg():
    m = timm.create_model("resnet18", pretrained=False)
    assert example_input_for(m).shape == (1, *m.pretrained_cfg["input_size"])


def test_inspect_does_not_modify_and_reports_costs(resnet50):
    before = copy.deepcopy(resnet50.state_dict())
    rep = pixify.inspect(resnet50, zeta=2, example_input=torch.randn(1, 3, 64, 64))
    assert rep.count("hybrid") == 12 and rep.params_after > 0 and rep.macs_after < rep.macs_before
    assert all(torch.equal(before[k], v) for k, v in resnet50.state_dict().items())
    assert isinstance(resnet50.layer1[1].conv1, nn.Conv2d)


def test_calibration_fits_and_measures_agreement_on_held_out_images():
    torch.manual_seed(0)
    m = timm.create_model("resnet26", pretrained=False, num_classes=10).eval()
    calib = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    conv, rep = pixify.convert(m, zeta=2, calibration=calib, example_input=calib[0][:1])
    assert rep.agreement_on == "2 held-out calibration images"  # a quarter of the 8; the rest fits the sites
    assert 0.0 <= rep.agreement["top1_agreement"] <= 100.0 and rep.agreement["rel_logit_error"] >= 0
    assert rep.init["fit_images"] == 6 and rep.init["kept"] in rep.init["candidates"]
    assert rep.init["agreement_after"] >= rep.init["agreement_before"]
    untouched = conv.layer1[0].bn3  # a norm no fit touched keeps the original's statistics
    assert torch.equal(untouched.running_mean, m.layer1[0].bn3.running_mean)
