import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pixify
from pixify.checkpoint import FORMAT_VERSION
from pixify.errors import CheckpointError, PixifyError

from conftest import randomize_pix


def _round_trip(tmp_path, spec, zeta, size=64):
    model, src = pixify.create_model(spec, pretrained=False)
    conv, rep = pixify.convert(model, zeta=zeta, source=src, example_input=torch.randn(1, 3, size, size),
                               inplace=True)
    randomize_pix(conv)
    conv.eval()
    path = tmp_path / "m.safetensors"
    pixify.save(conv, path)
    loaded = pixify.load(path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(conv(x), loaded(x))
    assert type(loaded) is type(conv)
    return loaded, rep


@pytest.mark.parametrize("spec,zeta", [("resnet26", 2), ("efficientnet_b0", "auto"),
                                       ("torchvision:mobilenet_v3_small", "auto")])
def test_round_trip_is_bit_identical(tmp_path, spec, zeta):
    loaded, rep = _round_trip(tmp_path, spec, zeta)
    recipe = loaded.pixify_recipe
    assert recipe["format_version"] == FORMAT_VERSION and recipe["pixify_version"] == pixify.__version__
    assert recipe["zeta"] == zeta and recipe["tau"] == 0.5
    assert [s["name"] for s in recipe["sites"]] == [s.name for s in rep.sites if s.action != "skip"]
    assert recipe["source"]["library"] == ("torchvision" if spec.startswith("torchvision") else "timm")
    assert recipe["rules"] and all(len(r["sha256"]) == 16 for r in recipe["rules"])


@pytest.mark.parametrize("spec", ["test_vit", "test_vit_relpos"])
def test_round_trip_of_models_with_truncated_normal_init_and_computed_buffers(tmp_path, spec):
    # trunc_normal_ init, which the rebuild for loading skips, and (test_vit_relpos) non-persistent buffers
    # (relative position indices), which it must still compute: the loaded model agrees bit for bit
    import timm

    if not timm.is_model(spec):
        pytest.skip(f"timm {timm.__version__} has no {spec}")
    _round_trip(tmp_path, spec, "auto", size=160)


def test_load_leaves_the_random_state_alone(tmp_path):
    # the rebuilt model's weights are all loaded next, so loading draws no random init: a user's seeded run
    # is not shifted by loading a checkpoint (and a large model loads several times faster)
    model, src = pixify.create_model("resnet26", pretrained=False)
    conv, _ = pixify.convert(model, zeta=2, source=src, example_input=torch.randn(1, 3, 64, 64))
    path = tmp_path / "m.safetensors"
    pixify.save(conv, path)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    loaded = pixify.load(path)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, a), (_, b) in zip(conv.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_teacher_from_a_weights_file_is_those_weights(tmp_path):
    from pixify.training import load_teacher

    model, src = pixify.create_model("resnet26", pretrained=False, seed=5)
    wpath = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(wpath))
    conv, _ = pixify.convert(model, zeta=2, source=src, example_input=torch.randn(1, 3, 64, 64))
    teacher = load_teacher(conv.pixify_recipe, str(wpath))
    assert not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))


def test_skipped_random_init_zeroes_the_draws_and_keeps_the_rest():
    from pixify.sources import _NoRandomInit

    with _NoRandomInit():
        lin = nn.Linear(8, 4)
        t = nn.init.trunc_normal_(torch.empty(5, 5), std=0.02)
        r = torch.empty(3).normal_()
        idx = torch.arange(6).view(2, 3) * 2  # computed values are untouched
    assert not lin.weight.any() and not lin.bias.any() and lin.weight.requires_grad
    assert not t.any() and not r.any()
    assert idx.tolist() == [[0, 2, 4], [6, 8, 10]]
    assert not torch._C._is_torch_function_mode_enabled()


def test_a_constructor_that_fails_without_its_draws_is_built_normally(monkeypatch):
    from pixify import sources

    calls = []

    def build(library, name, pretrained, kwargs, cfg=None):
        calls.append(torch._C._is_torch_function_mode_enabled())
        if calls[-1]:
            raise RuntimeError("this constructor checks its random weights")
        return nn.Linear(2, 2)

    monkeypatch.setattr(sources, "_build", build)
    assert isinstance(sources._build_for_loading("timm", "x", {}), nn.Linear)
    assert calls == [True, False]


class _ChecksItsDraws(nn.Module):
    """A constructor that refuses weights its init did not draw (all zeros)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)
        assert self.fc.weight.abs().sum() > 0, "the init drew nothing"

    def forward(self, x):
        return self.fc(x)


def test_a_real_library_constructor_that_rejects_zeroed_draws_is_built_normally():
    import timm
    from timm.models import register_model

    from pixify import sources

    name = "pixify_test_checks_its_draws"
    if not timm.is_model(name):
        def pixify_test_checks_its_draws(pretrained=False, num_classes=3, **library_kwargs):
            return _ChecksItsDraws(num_classes)  # timm's own arguments (pretrained_cfg, cache_dir) dropped
        register_model(pixify_test_checks_its_draws)
    model = sources.build_architecture("timm", name, {"num_classes": 5}, no_init=True)
    assert model.fc.out_features == 5 and model.fc.weight.abs().sum() > 0
    with pytest.raises(PixifyError, match="cannot build"):  # a real rejection still is one
        sources.build_architecture("timm", name, {"num_classes": "five"}, no_init=True)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.squeeze(self.stem(x).relu())).mean((2, 3)))


def test_custom_module_round_trip_needs_the_fresh_model(tmp_path):
    conv, _ = pixify.convert(Tiny(), example_input=torch.randn(1, 3, 8, 8))
    randomize_pix(conv).eval()
    path = tmp_path / "tiny.safetensors"
    pixify.save(conv, path)
    with pytest.raises(PixifyError, match="user module"):
        pixify.load(path)
    loaded = pixify.load(path, model=Tiny())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(conv(x), loaded(x))


def test_weights_file_is_recorded_with_its_sha256(tmp_path):
    model, _ = pixify.create_model("resnet26", pretrained=False, seed=3)
    wpath = tmp_path / "orig.pth"
    torch.save(model.state_dict(), wpath)
    again, src = pixify.create_model("resnet26", weights=wpath)
    assert src.weights == "file:orig.pth" and len(src.sha256) == 64  # the name, never the machine's path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a pickled object (not a plain state dict) is refused, nothing is unpickled
    bad = tmp_path / "obj.pth"
    torch.save({"model": model}, bad)
    with pytest.raises(PixifyError, match="state dict"):
        pixify.create_model("resnet26", weights=bad)


def _saved(tmp_path):
    conv, _ = pixify.convert(Tiny(), example_input=torch.randn(1, 3, 8, 8))
    path = tmp_path / "ok.safetensors"
    pixify.save(conv, path)
    return path


def test_truncated_checkpoint(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        t = tmp_path / f"cut{cut}.safetensors"
        t.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a readable safetensors"):
            pixify.load(t, model=Tiny())


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a pixify checkpoint"):
        pixify.load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        pixify.load(junk)
    with pytest.raises(CheckpointError, match="not found"):
        pixify.load(tmp_path / "missing.safetensors")


def _rewrite_recipe(path, change):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["pixify"])
    change(recipe)
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "pixify": json.dumps(recipe)})


def test_future_format_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    _rewrite_recipe(path, lambda r: r.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade pixify"):
        pixify.load(path, model=Tiny())


def test_recipe_that_no_longer_reproduces_the_weights(tmp_path):
    path = _saved(tmp_path)

    def change(r):
        r["sites"][0]["c_in"] = 32

    _rewrite_recipe(path, change)
    with pytest.raises(CheckpointError, match="recipe does not apply"):
        pixify.load(path, model=Tiny())


def test_save_is_atomic(tmp_path, monkeypatch):
    conv, _ = pixify.convert(Tiny(), example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(PixifyError, match="does not exist"):
        pixify.save(conv, tmp_path / "nope" / "m.safetensors")
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_model", boom)
    with pytest.raises(PixifyError, match="cannot write .*disk full"):
        pixify.save(conv, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
