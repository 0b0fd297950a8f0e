"""torch.compile of a converted model: one graph (no breaks on PiX) and the same outputs as eager."""
import pytest
import torch
from timm.models.resnet import Bottleneck, ResNet

import pixify
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
