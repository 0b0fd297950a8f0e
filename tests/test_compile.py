"""torch.compile of a converted model: one graph (no breaks on PiX) and the same outputs as eager."""
import pytest
import torch
from timm.models.resnet import Bottleneck, ResNet

import pixify
from pixify.config import SETTINGS
from conftest import randomize_pix


def small_resnet():
    torch.manual_seed(0)
    return ResNet(block=Bottleneck, layers=[1, 1, 1, 1], stem_width=16, in_chans=3, num_classes=10).eval()


@pytest.mark.parametrize("zeta", [2, pytest.param("auto", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(zeta):
    model = small_resnet()
    conv, rep = pixify.convert(model, zeta=zeta, example_input=torch.randn(1, 3, 32, 32))
    assert rep.count("pure") + rep.count("hybrid") == 3
    randomize_pix(conv).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        want = conv(x)
        got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_pix_takes_channels_last_activations(monkeypatch):
    """Inductor makes convolution outputs channels-last (its layout optimisation); PiX (a flexible_layout
    custom op) takes them as they are, without a copy back to the NCHW strides seen while tracing, and
    gives a channels-last output, equal to eager."""
    from pixify.ops import op as op_mod

    seen = []
    real = op_mod._forward_impl

    def spy(x, *args):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()))
        return real(x, *args)

    monkeypatch.setattr(op_mod, "_forward_impl", spy)
    monkeypatch.setattr(SETTINGS, "compiled_pix", "op")  # the op, as in training (inference decomposes by default)
    torch.manual_seed(0)
    pix = pixify.PiX(32, 4)
    with torch.no_grad():
        pix.weight.normal_()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), pix,
                                torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 48, 48)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_layout_optimization=True), torch.no_grad():
        got = torch.compile(model, fullgraph=True)(x)
        assert seen == [(True, False)], seen  # once, channels-last
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy,grad,want_op", [
    ("decompose", False, False),  # inference: inductor sees PiX's standard ops
    ("decompose", True, True),  # training: the custom op and its backward kernels
    ("op", False, True),
])
def test_compiled_inference_traces_pix_as_standard_ops(monkeypatch, policy, grad, want_op):
    monkeypatch.setattr(SETTINGS, "compiled_pix", policy)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    pix = pixify.PiX(12, 4)
    with torch.no_grad():
        pix.weight.normal_()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 1), pix)
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
        want = model(x)
    targets = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    op = torch.ops.pixify.pick_or_mix
    assert bool(targets & {op, op.default}) == want_op, targets
    torch.testing.assert_close(got, want)
