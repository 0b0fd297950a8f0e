"""The fitted initialisation, per-site costs and budgeted site choice (pixify.recovery), on small models.

Random weights prove the structure here; tests/test_realweights.py asks the same questions of real
ImageNet weights and real photographs."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import pixify
from pixify.cli import main as cli_main
from pixify.metrics import _logits
from pixify.recovery import (Budget, SiteCost, agreement, choose_sites, fit_sites, initialise, keep_norm,
                             parse_budget, site_costs, site_options, split_batches)
from pixify.rewrite import apply_sites


@pytest.fixture(scope="module")
def small():
    """A small timm ResNet with trained-looking statistics: random weights, batch norms fed real-ish
    batches, so the layers are not at their zero-init residual start."""
    torch.manual_seed(0)
    model = timm.create_model("resnet26", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    batches = [torch.randn(6, 3, 32, 32).abs() for _ in range(4)]
    return model, batches


def test_fit_reduces_every_sites_error_in_one_teacher_pass(small):
    model, batches = small
    _, report = pixify.convert(model, zeta=2, example_input=batches[0][:1])
    records = keep_norm(report.sites)
    student = apply_sites(copy.deepcopy(model), records).eval()
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        fits = fit_sites(student, model, records, batches)
    finally:
        h.remove()
    assert len(calls) == len(batches)  # one pass of the teacher, whatever the number of sites
    kinds = {f["fit"] for f in fits}
    assert {"layer", "affine"} <= kinds, kinds
    for f in fits:
        if f["fit"] == "layer":
            assert f["rel_error"] < f["rel_error_before"], f
        if f["fit"] == "affine":
            assert 0 <= f["rel_error"] <= 1.0 + 1e-6, f  # an affine map fitted by least squares beats a constant
    # a norm holding a fitted affine map keeps the statistics of what it reads, so that a training step
    # (batch statistics) computes nearly what evaluation (running statistics) does
    rec = next(r for r in records if r.action == "pure" and r.kept)
    norm = student.get_submodule(rec.kept[0])
    seen = {}
    hook = norm.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        student(torch.cat(batches))
    hook.remove()
    x = seen["x"]
    assert torch.allclose(norm.running_mean, x.mean((0, 2, 3)), rtol=0.05, atol=1e-3)
    assert torch.allclose(norm.running_var, x.var((0, 2, 3), unbiased=False), rtol=0.05, atol=1e-3)


def test_consumer_refit_for_pure_sites_without_norm(small):
    model, batches = small
    converted, report = pixify.convert(model, zeta="auto", example_input=batches[0][:1])
    fits = fit_sites(converted, model, report.sites, batches)
    assert any(f["fit"] == "consumer" for f in fits)
    for f in fits:
        if f["fit"] == "consumer":
            assert f["rel_error"] < f["rel_error_before"]


@pytest.mark.parametrize("zeta", ["auto", pytest.param(2, marks=pytest.mark.slow)])
def test_initialisation_never_lowers_agreement_random_resnet(zeta):
    """The case that went from 100 % to 0 %: a random-weight timm ResNet whose batch norms were all reset."""
    torch.manual_seed(0)
    teacher = timm.create_model("resnet26").eval()
    converted, report = pixify.convert(teacher, zeta=zeta, example_input=torch.randn(1, 3, 64, 64))
    batches = [torch.randn(6, 3, 64, 64) for _ in range(4)]  # 24 images
    fit, held = split_batches(batches)
    with torch.no_grad():
        ref = [_logits(teacher(b)) for b in held]
    before = agreement(converted, ref, held)
    info = initialise(converted, teacher, report.sites, fit, held)
    after = agreement(converted, ref, held)
    assert after["top1_agreement"] >= before["top1_agreement"]
    assert info["agreement_after"] == after["top1_agreement"] and info["kept"] in info["candidates"]


def test_finetune_initialisation_never_lowers_agreement(tmp_path):
    from test_finetune import _write_images

    torch.manual_seed(0)
    model = timm.create_model("resnet26")
    _write_images(tmp_path / "data", 24, None, seed=0)
    converted, _ = pixify.convert(model, example_input=torch.randn(1, 3, 32, 32))
    res = pixify.finetune(converted, tmp_path / "data", teacher=model, out=tmp_path / "run", steps=1, batch_size=8,
                          workers=0, calib_images=24, check_images=False, progress=False, lr=1e-6)
    assert res.init["calib_agreement"] >= res.init["calib_agreement_converted"]


def test_parse_budget():
    assert parse_budget("agreement=99") == Budget(agreement=99.0)
    assert parse_budget("agreement=0.99") == Budget(agreement=99.0)
    assert parse_budget("macs=0.8") == Budget(macs=0.8)
    assert parse_budget("agreement=95,macs=0.9") == Budget(agreement=95.0, macs=0.9)
    for bad in ("speed=2", "agreement=", "macs=1.5", "agreement=120", ""):
        with pytest.raises(pixify.PixifyError):
            parse_budget(bad)


def test_choose_sites_within_budget():
    costs = [SiteCost("a", "pure", 4, 100, 99.0, 0.05), SiteCost("a", "hybrid", 2, 50, 99.9, 0.01),
             SiteCost("b", "pure", 4, 80, 90.0, 0.3), SiteCost("c", "hybrid", 2, 10, 99.5, 0.02)]
    chosen = choose_sites(costs, Budget(agreement=98.0), macs_total=1000)
    assert len({c.name for c in chosen}) == len(chosen)  # one option per site
    assert "b" not in {c.name for c in chosen}  # alone it loses 10 points: over the budget
    assert sum(100 - c.agreement for c in chosen) <= 2.0
    assert choose_sites(costs, Budget(agreement=100.0), 1000) == []
    by_macs = choose_sites(costs, Budget(macs=0.95), 1000)
    assert sum(c.macs_saved for c in by_macs) >= 50


@pytest.mark.slow
def test_convert_with_calibration_and_budget_round_trips(small, tmp_path):
    model, batches = small
    converted, report = pixify.convert(model, zeta=2, calibration=batches, budget="agreement=50",
                                       example_input=batches[0][:1])
    sel = report.selection
    assert sel["budget"] == {"agreement": 50.0} and sel["costs"]
    assert {s.name for s in report.sites if s.action != "skip"} == set(sel["chosen"])
    assert sel["checks"][-1]["agreement"] >= 50.0 or not sel["chosen"]
    assert report.init["kept"] in report.init["candidates"]
    assert "held-out" in report.agreement_on
    pixify.save(converted, tmp_path / "b.safetensors")
    recipe = pixify.read_recipe(tmp_path / "b.safetensors")
    assert recipe["selection"]["budget"] == {"agreement": 50.0} and "costs" not in recipe["selection"]
    again = pixify.load(tmp_path / "b.safetensors")  # kept norms are part of the recipe: a strict load
    x = batches[1]
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), again(x))


@pytest.mark.slow
def test_inspect_with_calibration_measures_every_option(small):
    model, batches = small
    report = pixify.inspect(model, zeta="auto", calibration=batches, example_input=batches[0][:1])
    costs = report.selection["costs"]
    options = site_options(report.sites)
    assert len(costs) == len(options) > report.count("pure")  # pure sites also offer a hybrid at ζ=2
    for c in costs:
        assert 0 <= c["agreement"] <= 100 and c["rel_logit_error"] >= 0 and c["macs_saved"] > 0
    direct = site_costs(model, options[:1], *split_batches(batches))
    assert direct[0].agreement == costs[0]["agreement"]


def test_budget_without_data_is_refused(small):
    model, batches = small
    with pytest.raises(pixify.PixifyError, match="calibration"):
        pixify.convert(model, budget="agreement=90")
    assert cli_main(["convert", "resnet26", "--no-pretrained", "--budget", "agreement=90", "-o", "x.safetensors"]) == 2


def test_cli_data_budget_and_remembered_preprocessing(tmp_path, capsys):
    from test_finetune import _write_images

    _write_images(tmp_path / "imgs", 12, None, seed=3)
    out = tmp_path / "r.safetensors"
    args = ["convert", "resnet26", "--no-pretrained", "--input-size", "3,32,32", "--data", str(tmp_path / "imgs"),
            "--calib-images", "12", "--budget", "agreement=1", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
            "--interpolation", "bilinear", "-o", str(out), "--json"]
    assert cli_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["selection"]["costs"] and data["init"]["kept"]
    recipe = pixify.read_recipe(out)
    assert recipe["data_config"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                     "interpolation": "bilinear", "input_size": [3, 32, 32]}
    from pixify.data import resolve_data_config

    cfg = resolve_data_config(pixify.load(out))  # what finetune, eval and bench use
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.25, 0.25) and cfg["interpolation"] == "bilinear"
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert cli_main(["inspect", "resnet26", "--no-pretrained", "--input-size", "3,32,32", "--data",
                     str(tmp_path / "imgs"), "--calib-images", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"]["costs"]
    assert cli_main(["convert", "resnet26", "--no-pretrained", "--std", "0", "-o", str(tmp_path / "s.safetensors")]) == 2
    assert not (tmp_path / "s.safetensors").exists()


def test_reordering_keeps_the_function_and_pairs_channels_that_pool_well():
    """Channels between a dense layer and the layer PiX reads for are reordered so that each pooled pair
    loses little; the network computes the same function. Duplicated filters must end up paired."""
    from types import SimpleNamespace

    from pixify.reorder import reorder_sites

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        w = torch.randn(4, 3, 3, 3)
        net[0].weight.copy_(w[[0, 1, 2, 3, 0, 1, 2, 3]])  # channel c and c+4 are the same filter
        net[0].bias.copy_(torch.zeros(8))
        net[3].weight.copy_(torch.ones(8, 1, 3, 3) / 9)
        net[3].bias.zero_()
    net.eval()
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        before = net(x[0])
    info = reorder_sites(net, [SimpleNamespace(name="6", zeta=2, channel_dim=1, action="prune")], x)
    assert info["reordered"] == ["6"]
    with torch.no_grad():
        torch.testing.assert_close(net(x[0]), before, rtol=1e-5, atol=1e-5)
        rows = net[0].weight.reshape(8, -1)
        for i in range(0, 8, 2):  # every consecutive pair is one duplicated filter
            torch.testing.assert_close(rows[i], rows[i + 1])
