"""Per-submodule fallback: a model that does not trace as a whole is converted inside the
children that do, and every part that could not be analysed is reported with the tracer's reason."""

from __future__ import annotations

import torch
from torch import nn

import pixify
from pixify.graph import trace


class Squeeze(nn.Module):
    """A traceable block: 1×1 squeeze conv → BN → ReLU, then a 3×3 conv fed by that activation."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(c_out, c_in, 3, padding=1)

    def forward(self, x):
        return x + self.conv(self.act(self.bn(self.reduce(x))))


class Gated(nn.Module):
    """Does not trace: its forward branches on a tensor value; its children trace."""

    def __init__(self, c: int):
        super().__init__()
        self.a = Squeeze(c, c // 2)
        self.b = Squeeze(c, c // 4)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.stem_act = nn.ReLU()
        self.block1 = Squeeze(32, 16)
        self.block2 = Squeeze(32, 8)
        self.gated = Gated(32)
        self.proj = nn.Conv2d(32, 16, 1)  # a lone squeeze conv used directly by the untraced forward
        self.unused = Squeeze(16, 8)  # never called
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        x = self.block1(x)
        # data-dependent control flow around traceable blocks: torch.fx cannot trace this
        steps = int(x.abs().mean().item() * 3) % 2 + 1
        for _ in range(steps):
            x = self.block2(x)
        x = self.gated(x)
        x = self.proj(x)
        return self.fc(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return DataDependent().eval()


def test_top_level_does_not_trace():
    try:
        trace(_model())
    except Exception:
        return
    raise AssertionError("the test model was meant not to trace")


def test_converted_inside_traceable_children():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    converted, report = pixify.convert(model, example_input=x)
    names = {s.name: s for s in report.sites}
    for site in ("block1.reduce", "block2.reduce", "proj"):
        assert site in names and names[site].action == "pure", (site, sorted(names))
    # only the branch the example input takes can be analysed; the other is reported, not guessed
    taken = "a" if "gated.a.reduce" in names else "b"
    other = "b" if taken == "a" else "a"
    assert f"gated.{taken}.reduce" in names and f"gated.{other}.reduce" not in names
    assert any(u.name == f"gated.{other}" and "not called" in u.reason for u in report.untraced)
    assert "unused.reduce" not in names
    assert isinstance(converted.block1.reduce, pixify.PiX)
    assert isinstance(converted.block1.bn, nn.Identity)  # absorbed follower
    assert isinstance(getattr(converted.gated, taken).reduce, pixify.PiX)
    assert isinstance(converted.proj, pixify.PiX)
    assert isinstance(converted.stem, nn.Conv2d)  # the stem is never touched
    # both branches of the data-dependent forward still run
    with torch.no_grad():
        for sign in (1.0, -1.0):
            assert converted(sign * x.abs()).shape == (2, 10)


def test_untraced_parts_reported_with_the_tracers_reason():
    _, report = pixify.convert(_model(), example_input=torch.randn(1, 3, 16, 16))
    untraced = {u.name: u.reason for u in report.untraced}
    assert "" in untraced and "gated" in untraced
    assert "Proxy" in untraced[""]  # int(x.abs().mean().item() * 3): the tracer's own words
    assert "TraceError" in untraced["gated"] and "control flow" in untraced["gated"], untraced["gated"]
    for name in ("", "gated"):
        assert "children are analysed separately" in untraced[name]
    assert "unused" in untraced and "not called" in untraced["unused"]
    # children that traced are not listed
    for name in ("block1", "block2", "proj"):
        assert name not in untraced


def test_fallback_prune_mode_and_round_trip(tmp_path):
    model = _model()
    x = torch.randn(1, 3, 16, 16)
    converted, report = pixify.convert(model, mode="prune", example_input=x)
    pruned = {s.name for s in report.sites if s.action == "prune"}
    # inside traced children, the 3×3 conv fed by the block's ReLU is a prune point
    assert {"block1.conv", "block2.conv"} <= pruned
    assert "gated.a.conv" in pruned or "gated.b.conv" in pruned
    assert isinstance(converted.block1.conv, pixify.PiXBlock)
    assert converted.block1.conv.layer.in_channels == 8  # 16 → ceil(16/2)
    path = tmp_path / "dd.safetensors"
    pixify.save(converted, path)
    loaded = pixify.load(path, model=_model())
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), loaded(x))


def test_json_report_lists_untraced():
    report = pixify.inspect(_model(), example_input=torch.randn(1, 3, 16, 16))
    data = report.to_json()
    assert any(u["name"] == "" and u["reason"] for u in data["untraced"])


class Masked(nn.Module):
    """``forward(x, mask=None)`` branches on an optional argument and iterates over its blocks."""

    def __init__(self, untraceable: bool):
        super().__init__()
        self.untraceable = untraceable
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Squeeze(16, 8), Squeeze(16, 4))
        self.fc = nn.Linear(16, 10)

    def forward(self, x, mask=None):
        x = self.stem(x)
        if mask is not None:
            x = x * mask
        if self.untraceable:
            x = x * float(x.std())  # a Python number from a tensor: fx cannot trace this
        for blk in self.blocks:  # the container is iterated over, never called
            x = blk(x)
        return self.fc(x.mean((2, 3)))


def test_optional_arguments_are_traced_with_their_defaults():
    torch.manual_seed(0)
    _, report = pixify.convert(Masked(False).eval(), example_input=torch.randn(1, 3, 8, 8))
    assert report.untraced == []
    assert {s.name for s in report.sites} == {"blocks.0.reduce", "blocks.1.reduce"}


def test_iterated_containers_are_searched():
    torch.manual_seed(0)
    model = Masked(True).eval()
    x = torch.randn(1, 3, 8, 8)
    converted, report = pixify.convert(model, example_input=x)
    assert [u.name for u in report.untraced] == [""]
    assert {s.name for s in report.sites} == {"blocks.0.reduce", "blocks.1.reduce"}
    with torch.no_grad():
        assert converted(x).shape == (1, 10)
