"""A model converted from Python records where it came from, verified, so that ``pixify.load(path)`` alone
rebuilds it; hub models rebuild offline; checkpoints carry no absolute path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import pixify
from pixify.provenance import identify


def _round_trip(model: nn.Module, path: Path, x: torch.Tensor, **convert_kw) -> nn.Module:
    converted, report = pixify.convert(model, **convert_kw)
    assert report.source_note == "", report.source_note
    with warnings.catch_warnings():
        warnings.simplefilter("error", pixify.PixifyWarning)  # a verified source saves without a warning
        pixify.save(converted, path)
    again = pixify.load(path)
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), again(x))
    return again


def test_readme_snippet_timm_resnet50(tmp_path):
    model = timm.create_model("resnet50", pretrained=False)
    converted, report = pixify.convert(model, zeta="auto")
    assert report.count("pure") == 15
    pixify.save(converted, tmp_path / "r50_pix.safetensors")
    again = pixify.load(tmp_path / "r50_pix.safetensors")
    assert type(again) is type(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), again(x))
        again.forward_features(x[:1])
    src = again.pixify_recipe["source"]
    assert (src["library"], src["name"], src["kwargs"], src["weights"]) == ("timm", "resnet50", {}, "module")


def test_timm_constructor_kwargs_are_recorded(tmp_path):
    model = timm.create_model("resnet26", num_classes=10, in_chans=1, drop_path_rate=0.1)
    again = _round_trip(model, tmp_path / "r.safetensors", torch.randn(2, 1, 64, 64))
    assert again.pixify_recipe["source"]["kwargs"] == {"num_classes": 10, "in_chans": 1, "drop_path_rate": 0.1}
    assert again.pixify_recipe["input_shape"][1] == 1  # the example input follows the stem's channels


def test_timm_resnet18_one_channel(tmp_path):
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    _round_trip(model, tmp_path / "r18.safetensors", torch.randn(2, 1, 224, 224), zeta=2)


def test_torchvision_auto_and_explicit(tmp_path):
    x = torch.randn(1, 3, 224, 224)
    again = _round_trip(torchvision.models.resnet50(), tmp_path / "a.safetensors", x)
    assert again.pixify_recipe["source"]["name"] == "resnet50"
    model = torchvision.models.resnet50(num_classes=10)
    again = _round_trip(model, tmp_path / "b.safetensors", x, source="torchvision:resnet50")
    assert again.pixify_recipe["source"]["kwargs"] == {"num_classes": 10}


def test_wrong_explicit_source_is_refused():
    with pytest.raises(pixify.PixifyError, match="does not rebuild this model"):
        pixify.convert(torchvision.models.resnet50(num_classes=10), source="torchvision:resnet101")
    with pytest.raises(pixify.PixifyError, match="pixify.Source"):
        pixify.convert(torchvision.models.resnet50(), source=42)


def test_unverifiable_model_warns_at_save_and_loads_with_model(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))

    converted, report = pixify.convert(Net(), example_input=torch.randn(1, 3, 16, 16))
    assert "not a timm or torchvision model" in report.source_note
    with pytest.warns(pixify.PixifyWarning, match=r"pixify.load will need model=Net\(...\)") as rec:
        pixify.save(converted, tmp_path / "n.safetensors")
    assert "\n" not in str(rec[0].message)
    with pytest.raises(pixify.CheckpointError, match="model=Net"):
        pixify.load(tmp_path / "n.safetensors")
    again = pixify.load(tmp_path / "n.safetensors", model=Net())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(converted.eval()(x), again(x))


def test_timm_model_built_by_its_class_is_not_claimed():
    from timm.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5)
    source, why = identify(model)
    assert source.library == "custom" and why


def _fake_hub(home: Path, repo: str) -> nn.Module:
    """A model repository in the layout huggingface_hub's cache reads offline (refs/main → snapshot)."""
    from safetensors.torch import save_file

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    model = timm.create_model("resnet26", num_classes=7, in_chans=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({
        "architecture": "resnet26", "num_classes": 7, "model_args": {"in_chans": 1},
        "pretrained_cfg": {"input_size": [1, 64, 64], "mean": [0.5], "std": [0.25], "crop_pct": 1.0,
                           "interpolation": "bilinear"}}))
    return model


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    home = tmp_path / "hf"
    original = _fake_hub(home, "acme/tiny-resnet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return home, original


@pytest.mark.parametrize("how", ["pixify", "timm"])
def test_hf_hub_checkpoint_loads_without_the_hub(tmp_path, hub_home, how):
    import shutil

    home, original = hub_home
    if how == "pixify":
        model, source = pixify.create_model("hf-hub:acme/tiny-resnet")
        converted, _ = pixify.convert(model, source=source)
    else:
        model = timm.create_model("hf-hub:acme/tiny-resnet", pretrained=True)
        converted, report = pixify.convert(model)
        assert report.source_note == ""
    assert torch.equal(model.state_dict()["fc.weight"], original.state_dict()["fc.weight"])  # the hub's weights
    path = tmp_path / "hub_pix.safetensors"
    pixify.save(converted, path)
    src = pixify.read_recipe(path)["source"]
    assert (src["name"], src["hub"], src["kwargs"].get("in_chans")) == ("resnet26", "acme/tiny-resnet", 1)
    shutil.rmtree(home)  # no hub, no cache: the recipe alone rebuilds the architecture
    again = pixify.load(path)
    assert again.pretrained_cfg["mean"] == (0.5,) or list(again.pretrained_cfg["mean"]) == [0.5]
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), again(x))


def test_checkpoint_has_no_absolute_path_and_a_moved_folder_finetunes(tmp_path):
    """``--weights FILE`` records the file's name and digest; the teacher is found next to the checkpoint."""
    import shutil

    from pixify.cli import main as cli

    from test_finetune import FAST, KWARGS, _write_images

    work = tmp_path / "a"
    work.mkdir()
    torch.manual_seed(0)
    original = timm.create_model("resnet50", **KWARGS)
    from safetensors.torch import save_file

    save_file(original.state_dict(), str(work / "orig.safetensors"))
    args = [f"--model-arg={k}={json.dumps(v)}" for k, v in KWARGS.items()]
    assert cli(["convert", "resnet50", "--weights", str(work / "orig.safetensors"), *args, "--input-size",
                "3,32,32", "-o", str(work / "pix.safetensors"), "--json"]) == 0
    meta = json.dumps(pixify.read_recipe(work / "pix.safetensors"))
    assert str(tmp_path) not in meta and "/" not in json.dumps(pixify.read_recipe(work / "pix.safetensors")["source"])
    _write_images(tmp_path / "data", 4, 3, seed=0)
    moved = tmp_path / "elsewhere"
    shutil.move(str(work), str(moved))
    assert cli(["finetune", str(moved / "pix.safetensors"), "--data", str(tmp_path / "data"), "--out",
                str(moved / "ft"), "--steps", "1", *FAST]) == 0
    log = (moved / "ft" / "log.jsonl").read_text()
    assert str(tmp_path) not in log
    assert cli(["eval", str(moved / "ft" / "checkpoint.safetensors"), "--data", str(tmp_path / "data"),
                "--workers", "0", "--no-check-images", "--json"]) == 0
    (moved / "orig.safetensors").unlink()
    with pytest.raises(pixify.PixifyError, match="orig.safetensors.*are not in"):
        pixify.finetune(moved / "pix.safetensors", tmp_path / "data", out=moved / "ft2", steps=1, batch_size=8,
                        workers=0, check_images=False, progress=False)
    assert not (moved / "ft2").exists()


def test_positional_key_map(tmp_path):
    from safetensors.torch import save_file

    from pixify.sources import create_model

    torch.manual_seed(0)
    model = timm.create_model("resnet26", num_classes=4)
    renamed = {f"t{i:03d}_{k.replace('.', '_')}": v for i, (k, v) in enumerate(model.state_dict().items())
               if not k.endswith("num_batches_tracked")}
    save_file(renamed, str(tmp_path / "other.safetensors"))
    with pytest.raises(pixify.PixifyError) as exc:
        create_model("resnet26", weights=tmp_path / "other.safetensors", kwargs={"num_classes": 4})
    msg = str(exc.value)
    assert "missing (" in msg and "unexpected (" in msg and len(msg) < 600 and "\n" not in msg
    again, src = create_model("resnet26", weights=tmp_path / "other.safetensors", kwargs={"num_classes": 4},
                              key_map="positional")
    assert src.key_map == "positional"
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(pixify.PixifyError, match="positional"):
        create_model("resnet50", weights=tmp_path / "other.safetensors", key_map="positional")


def test_public_api_is_the_readme():
    assert callable(pixify.finetune) and callable(pixify.evaluate)
    import importlib

    importlib.import_module("pixify.training")  # importing the module must not replace the function
    assert callable(pixify.finetune) and callable(pixify.evaluate)


def test_user_rules_file_is_recorded_by_name(tmp_path):
    rules = tmp_path / "mine.toml"
    rules.write_text('[[rule]]\nname = "mine"\ndescription = "x"\nmode = "squeeze"\npriority = 500\n'
                     'pattern = ["conv2d", "norm?", "act?"]\nkernel_size = 1\nmin_ratio = 1.0\n'
                     'include = ["layer3.*"]\n')
    converted, _ = pixify.convert(timm.create_model("resnet26"), rules=[rules],
                                  example_input=torch.randn(1, 3, 64, 64))
    text = json.dumps(converted.pixify_recipe)
    assert "mine.toml" in text and str(tmp_path) not in text
