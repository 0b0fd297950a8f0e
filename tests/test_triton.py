"""The Triton kernels of PiX (pixify/ops/triton_kernels.py) against the reference path.

They run on CUDA.  Without a GPU, ``test_triton_kernels_in_interpreter`` runs this file again in a
subprocess under Triton's interpreter (``TRITON_INTERPRET=1``), where the same kernels take CPU tensors
and ``ops`` is made to route CPU tensors to them; the other tests are skipped in the outer run.
"""

import os
import subprocess
import sys

import pytest
import torch
from timm.models.resnet import Bottleneck, ResNet

import pixify
from pixify import ops
from pixify.ops import args, layout, triton_kernels
from pixify.config import SETTINGS
from pixify.ops import pick_or_mix, pick_or_mix_reference
from conftest import randomize_pix

INTERPRET = os.environ.get("PIXIFY_TEST_TRITON_INTERPRET") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available() and triton_kernels.triton is not None:
    DEVICE = "cuda"
else:
    DEVICE = None

needs_kernels = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (the interpreter run covers these)")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def calls(monkeypatch):
    """Count the Triton kernel launches (and, in the interpreter, route CPU tensors to them)."""
    seen = {"forward": 0, "backward": 0}
    fwd, fwd_phi, bwd = triton_kernels.forward, triton_kernels.forward_phi, triton_kernels.backward

    def forward(*a, **k):
        seen["forward"] += 1
        return fwd(*a, **k)

    def forward_phi(*a, **k):  # the forward launch of pix() for inference (p computed in the kernel)
        seen["forward"] += 1
        return fwd_phi(*a, **k)

    def backward(*a, **k):
        seen["backward"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(triton_kernels, "forward", forward)
    monkeypatch.setattr(triton_kernels, "forward_phi", forward_phi)
    monkeypatch.setattr(triton_kernels, "backward", backward)
    if INTERPRET:
        monkeypatch.setattr(triton_kernels, "available",
                            lambda x, zeta: x.dtype in triton_kernels.DTYPES and zeta <= triton_kernels.MAX_ZETA)
    return seen


def make(layout, n, c, spatial, dtype, ties):
    """x in the given memory layout; returns (x, channel_dim)."""
    if ties:  # few distinct values: many ties for the arg-max, exact in every dtype
        base = torch.randint(-3, 4, (n, c, *spatial)).to(torch.float64)
    else:
        base = torch.randn(n, c, *spatial, dtype=torch.float64)
    x = base.to(dtype)
    if layout == "nchw":
        return x.to(DEVICE), 1
    if layout == "channels_last":
        return x.to(DEVICE).contiguous(memory_format=torch.channels_last), 1
    if layout == "tokens":  # N×L×C, channels innermost
        return x.flatten(2).transpose(1, 2).contiguous().to(DEVICE), -1
    if layout == "strided":  # neither layout: every other column
        wide = torch.cat([x, x], dim=-1).to(DEVICE)
        return wide[..., ::2], 1
    raise ValueError(layout)


def layout_of(t, cd):
    return layout._layout_of(t, args._norm_dim(cd, t.dim()))


CASES = [  # (channels, zeta): divisible, a short last subset, odd zeta, zeta 1, one subset
    (16, 4), (13, 4), (10, 3), (6, 1), (5, 8),
]


# channels-innermost memory has two kernels (the setting triton_channels_inner): test both
LAYOUTS = ["nchw", "channels_last/loop", "channels_last/tile", "tokens/loop", "tokens/tile", "strided"]


@pytest.fixture
def variant(monkeypatch):
    def use(layout):
        name, _, kind = layout.partition("/")
        monkeypatch.setattr(SETTINGS, "triton_channels_inner", kind or "loop")
        return name
    return use


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c,zeta", CASES)
def test_forward_backward_match_reference(calls, variant, c, zeta, layout, dtype):
    layout = variant(layout)
    x, cd = make(layout, 3, c, (5, 7), dtype, ties=(c == 13))
    g = -(-c // zeta)
    p = torch.rand(3, g, device=DEVICE)
    p[0, 0], p[1, 0] = 0.2, 0.8  # both branches in every case
    xr = x.detach().double().requires_grad_()
    pr = p.double().requires_grad_()
    want = pick_or_mix_reference(xr, pr, zeta, 0.5, cd)
    grad = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    want.backward(grad)

    xg = x.detach().requires_grad_()
    pg = p.clone().requires_grad_()
    plan = ops.explain(xg, p=pg, zeta=zeta, channel_dim=cd)
    assert (plan.forward, plan.backward) == ("triton", "triton"), plan
    got = pick_or_mix(xg, pg, zeta, 0.5, cd)
    got.backward(grad.to(dtype))
    assert calls == {"forward": 1, "backward": 1}
    ran = ops.last_backend()
    assert (ran["forward"], ran["backward"]) == ("triton", "triton")
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(pg.grad.double(), pr.grad, rtol=tol * 10, atol=tol * 10)
    assert got.dtype == dtype and xg.grad.dtype == dtype and pg.grad.dtype == p.dtype
    if layout != "strided":  # the output and the gradient keep the input's layout
        if g > 1:  # with one output channel both layouts are the same strides
            assert layout_of(got, cd) == layout_of(x, cd)
        assert xg.grad.stride() == x.stride()


@needs_kernels
def test_ties_send_the_gradient_to_the_first_maximum(calls):
    x = torch.tensor([[[1.0], [3.0], [3.0], [2.0]]], device=DEVICE)  # N=1, C=4, S=1
    x.requires_grad_()
    p = torch.tensor([[0.1]], device=DEVICE)  # pick
    y = pick_or_mix(x, p, 4, 0.5)
    y.backward(torch.ones_like(y))
    assert y.item() == pytest.approx(0.3)
    assert x.grad.flatten().tolist() == pytest.approx([0.0, 0.1, 0.0, 0.0])


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "tokens/loop", "tokens/tile"])
def test_nan_inf_and_ties_follow_the_reference(calls, variant, layout):
    x = torch.randn(2, 8, 3)
    x[0, 1, 0] = float("nan")  # pick subset 0 of sample 0: the maximum is NaN
    x[0, 2, 0] = float("nan")  # ... twice: the gradient goes to the first
    x[1, 5, 1] = float("nan")  # mix subset 1 of sample 1: the mean is NaN
    x[0, 4:8, 2] = float("-inf")  # a pick subset of -inf only: the first channel is its arg-max
    x[0, 0:4, 1] = 2.0  # a pick subset of ties
    x[0, 4:8, 1] = torch.tensor([1.0, 5.0, 5.0, -1.0])
    x = x.to(DEVICE)
    cd = 1
    if variant(layout) == "tokens":
        x, cd = x.transpose(1, 2).contiguous(), -1
    x.requires_grad_()
    p = torch.tensor([[0.1, 0.2], [0.9, 0.7]], device=DEVICE, requires_grad=True)
    got = pick_or_mix(x, p, 4, 0.5, cd)
    xr = x.detach().double().requires_grad_()
    pr = p.detach().double().requires_grad_()
    want = pick_or_mix_reference(xr, pr, 4, 0.5, cd)
    torch.testing.assert_close(got.double(), want, equal_nan=True)
    g = torch.randn(got.shape, dtype=torch.float64, device=DEVICE)
    got.backward(g.float())
    want.backward(g)
    torch.testing.assert_close(x.grad.double(), xr.grad, equal_nan=True)
    torch.testing.assert_close(p.grad.double(), pr.grad, equal_nan=True)
    assert calls == {"forward": 1, "backward": 1}


@needs_kernels
def test_zeta_above_the_unroll_limit_uses_the_generic_kernels(calls):
    zeta = triton_kernels.MAX_ZETA + 1
    x = torch.randn(2, 2 * zeta, 3, device=DEVICE)
    p = torch.tensor([[0.1, 0.9], [0.7, 0.3]], device=DEVICE)
    torch.testing.assert_close(pick_or_mix(x, p, zeta, 0.5), pick_or_mix_reference(x, p, zeta, 0.5))
    assert calls == {"forward": 0, "backward": 0}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c,zeta", [(16, 4), (13, 4), (10, 3), (300, 4)])  # 300: more channels than a φ step
def test_pix_inference_computes_p_in_the_kernel(calls, variant, c, zeta, layout, dtype):
    """pix() for inference: the pooling plus one launch that computes p = sigmoid(φ · z) itself, against
    the float64 reference (φ in the input's dtype, as in a converted half-precision model)."""
    layout = variant(layout)
    x, cd = make(layout, 3, c, (5, 7), dtype, ties=(c == 13))
    g = -(-c // zeta)
    w = (torch.randn(g, c, dtype=torch.float64) * 4 / c**0.5).to(dtype).to(DEVICE)
    with ops.reference_mode():
        want = ops.pix(x.double(), w.double(), zeta, 0.5, cd)
    with torch.no_grad():
        got = ops.pix(x, w, zeta, 0.5, cd)
        again = ops.pix(x, w, zeta, 0.5, cd) if DEVICE == "cuda" else got  # the launch cache (CUDA only)
    assert calls == {"forward": 2 if DEVICE == "cuda" else 1, "backward": 0}
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert torch.equal(again, got) and got.dtype == dtype
    if layout != "strided" and g > 1:  # the output keeps the input's layout
        assert layout_of(got, cd) == layout_of(x, cd)


@needs_kernels
def test_pix_inference_with_phi_on_another_device_is_an_error(calls):
    """φ must be on x's device: the kernel would otherwise read foreign memory; the general path raises."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA device")
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    with torch.no_grad(), pytest.raises(RuntimeError):
        ops.pix(x, torch.zeros(2, 8), 4)
    assert calls["forward"] == 0


@needs_kernels
def test_empty_batch(calls):
    x = torch.randn(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    p = torch.rand(0, 2, device=DEVICE, requires_grad=True)
    y = pick_or_mix(x, p, 4, 0.5)
    assert y.shape == (0, 2, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and p.grad.shape == p.shape


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last/loop", "channels_last/tile"])
def test_large_tensor_many_tiles(calls, variant, dtype, layout):
    x = torch.randn(8, 256, 56, 56, device=DEVICE).to(dtype)
    if variant(layout) == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.rand(8, 64, device=DEVICE)
    x.requires_grad_()
    got = pick_or_mix(x, p, 4, 0.5)
    want = pick_or_mix_reference(x.detach().double(), p.double(), 4, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    got.backward(torch.ones_like(got))
    assert calls == {"forward": 1, "backward": 1}


def decisive_pix(model):
    """φ rows of alternating sign (±1/C): the PiX inputs are ReLU outputs (z >= 0), so p = sigmoid(±mean z)
    is away from tau (and from 0 and 1) and no pick/mix decision flips between eager and compiled rounding."""
    from pixify.ops import PiX

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PiX):
                sign = torch.ones(m.weight.shape[0], 1)
                sign[1::2] = -1
                m.weight.copy_(sign.expand_as(m.weight) / m.weight.shape[1])
    return model


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=cuda_only)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
# decompose on CPU: tests/test_compile.py
@pytest.mark.parametrize("policy", ["op", pytest.param("decompose", marks=cuda_only)])
def test_compile_fullgraph_matches_eager(calls, monkeypatch, dtype, channels_last, policy):
    """torch.compile(fullgraph=True) of a converted ResNet matches eager, with PiX as the custom op (through
    the Triton kernel; CPU tensors in the interpreter run) or decomposed for inductor (the setting compiled_pix)."""
    monkeypatch.setattr(SETTINGS, "compiled_pix", policy)
    torch.manual_seed(0)
    model = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], stem_width=16, num_classes=10).eval()
    conv, rep = pixify.convert(model, zeta=2, example_input=torch.randn(1, 3, 32, 32))
    assert rep.count("pure") + rep.count("hybrid") == 3
    conv = decisive_pix(randomize_pix(conv)).eval().to(DEVICE, dtype)
    x = torch.randn(4, 3, 32, 32, device=DEVICE, dtype=dtype)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)
    # TF32 off: eager and inductor pick different convolution algorithms and layouts, whose TF32 rounding
    # differs by about 1e-3 per layer
    # eager_kernels: in the interpreter run, keep CPU fp32 inference off its own generated whole-PiX kernel
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False), ops.eager_kernels():
        before = calls["forward"]
        want = conv(x).double()
        eager = calls["forward"] - before
        got = compiled(x).double()
        compiled_calls = calls["forward"] - before - eager
        compiled(x)  # a second call: launches seen only in the first came from compiling, not from the graph
        second = calls["forward"] - before - eager - compiled_calls
    assert eager == 3, eager
    assert (compiled_calls, second) == ((3, 3) if policy == "op" else (0, 0)), (  # one launch per PiX site
        f"Triton launches in the first and second compiled call: {compiled_calls}, {second} (torch {torch.__version__})")
    err = ((got - want).norm() / want.norm()).item()
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


@pytest.mark.skipif(INTERPRET, reason="this is the outer run")
@pytest.mark.skipif(triton_kernels.triton is None, reason="triton is not installed")
# with a GPU the tests above run the compiled kernels; the interpreter is the stand-in for machines without one
@pytest.mark.skipif(DEVICE == "cuda", reason="the kernels ran compiled on the GPU above")
def test_triton_kernels_in_interpreter():
    """The kernel tests above, on CPU tensors under Triton's interpreter (a subprocess: the interpreter
    must be chosen before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PIXIFY_TEST_TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, "test_triton.py"),
         "-k", "not in_interpreter"],
        env=env, cwd=os.path.dirname(here), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
