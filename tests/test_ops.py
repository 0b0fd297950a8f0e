"""The PiX operator (pixify/ops/): semantics against a loop oracle written from the operator's definition, the fast
kernels against the reference path, gradients, tracing/compile/export, FLOPs and argument checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from pixify import ops
from pixify.ops import cpu_kernels, generic, inductor, module, planar
from pixify.ops import op as op_mod
from pixify.config import override
from pixify.ops import PiX, pick_or_mix, pick_or_mix_reference, pix, pix_groups, reference_mode


# ----------------------------------------------------------------------------------------------- oracle


def oracle(x, p, zeta, tau, channel_dim, g=None):
    """The operator's definition written as loops over (n, i), in float64.  Returns y and, with g, (grad_x, grad_p)."""
    cd = channel_dim % x.dim()
    xm = x.detach().double().movedim(cd, -1)  # (N, *spatial, C)
    n_, c = xm.shape[0], xm.shape[-1]
    groups = -(-c // zeta)
    p64 = p.detach().double()
    y = torch.zeros(*xm.shape[:-1], groups, dtype=torch.float64)
    gm = None if g is None else g.detach().double().movedim(cd, -1)
    gx = torch.zeros_like(xm)
    gp = torch.zeros(n_, groups, dtype=torch.float64)
    for n in range(n_):
        for i in range(groups):
            lo, hi = i * zeta, min(i * zeta + zeta, c)
            sub = xm[n, ..., lo:hi].reshape(-1, hi - lo)  # (pixels, |subset|)
            if p64[n, i] < tau:  # pick: the first channel holding the maximum
                first = torch.zeros(sub.shape[0], dtype=torch.long)
                fused = sub[:, 0].clone()
                for k in range(1, hi - lo):
                    better = sub[:, k] > fused  # strictly greater: ties keep the earlier channel
                    first[better] = k
                    fused[better] = sub[better, k]
            else:  # mix
                fused = sub.sum(1) / (hi - lo)
            y[n, ..., i] = (p64[n, i] * fused).reshape(y[n, ..., i].shape)
            if g is not None:
                gg = gm[n, ..., i].reshape(-1)
                gp[n, i] = (gg * fused).sum()
                gsub = torch.zeros_like(sub)
                if p64[n, i] < tau:
                    gsub[torch.arange(sub.shape[0]), first] = p64[n, i] * gg
                else:
                    gsub[:] = (p64[n, i] * gg / (hi - lo))[:, None]
                gx[n, ..., lo:hi] = gsub.reshape(gx[n, ..., lo:hi].shape)
    y = y.movedim(-1, cd)
    if g is None:
        return y
    return y, gx.movedim(-1, cd), gp


def make_x(shape, layout, kind="randn", cd=1, dtype=torch.float32):
    if kind == "randn":
        x = torch.randn(shape)
    elif kind == "int":  # many exact ties, including all-equal subsets
        x = torch.randint(-2, 3, shape).float()
    elif kind == "relu":  # ties at zero
        x = torch.randn(shape).relu()
    elif kind == "repeat":  # channel 1 repeats channel 0 (a tie inside the first subset everywhere)
        x = torch.randn(shape)
        x.select(cd, 1).copy_(x.select(cd, 0))
    else:
        raise AssertionError(kind)
    x = x.to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":  # a strided view: neither planar nor interleaved
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


def make_p(n, groups, tau=0.5, dtype=torch.float32):
    """Random probabilities with both decisions present and none within 0.05 of tau."""
    low = 0.01 + torch.rand(n, groups) * (tau - 0.06)
    high = tau + 0.05 + torch.rand(n, groups) * (0.94 - tau)
    p = torch.where(torch.rand(n, groups) < 0.5, low, high)
    p.view(-1)[0] = low.view(-1)[0]  # at least one pick
    p.view(-1)[-1] = high.view(-1)[-1]  # at least one mix
    return p.to(dtype)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny tensors: run single-threaded, so that no OpenMP barrier of a kernel that
    always goes parallel has to wait for a core on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def fast_everywhere(monkeypatch):
    """Use the CPU fast kernels even for the tiny test tensors."""
    monkeypatch.setattr(planar, "_FAST_MIN_NUMEL", 0)


# fast: the CPU kernels (planar / interleaved); generic: the device-independent code (what CUDA runs),
# generic_select: its CPU variant for large outputs; reference: the plain-PyTorch reference path
PATHS = ["fast", "generic", "generic_select", "reference"]


def run_path(path, x, p, zeta, tau, cd):
    if path == "reference":
        return pick_or_mix_reference(x, p, zeta, tau, cd)
    old = generic._CPU_SELECT_MIN_NUMEL
    generic._CPU_SELECT_MIN_NUMEL = 0 if path == "generic_select" else 1 << 62
    try:
        with override(fast_cpu=path == "fast"):
            return pick_or_mix(x, p, zeta, tau, cd)
    finally:
        generic._CPU_SELECT_MIN_NUMEL = old


CASES = [
    # (shape, zeta, channel_dim, layout)
    ((2, 8, 5, 6), 4, 1, "contig"),
    ((2, 10, 5, 7), 3, 1, "contig"),  # C not divisible: last subset has 1 channel
    ((2, 7, 4, 5), 4, 1, "contig"),  # last subset has 3 channels
    ((2, 10, 5, 7), 3, 1, "cl"),
    ((3, 7, 4, 5), 4, 1, "cl"),
    ((1, 12, 3, 4), 3, 1, "contig"),  # batch 1
    ((1, 12, 3, 4), 3, 1, "cl"),
    ((2, 6, 5, 5), 1, 1, "contig"),  # zeta = 1: the gate p·x
    ((2, 6, 5, 5), 1, 1, "cl"),
    ((2, 9, 10), 2, -1, "contig"),  # token layout N×L×C
    ((1, 5, 12), 5, -1, "contig"),
    ((2, 3, 4, 10), 4, -1, "contig"),  # N×H×W×C
    ((2, 6, 4, 5), 3, 1, "noncontig"),
    ((2, 3, 4, 4), 5, 1, "contig"),  # zeta > C: one short subset
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-z{c[1]}-cd{c[2]}-{c[3]}")
@pytest.mark.parametrize("kind", ["randn", "int"])
def test_against_oracle(fast_everywhere, path, case, kind):
    shape, zeta, cd, layout = case
    x = make_x(shape, layout, kind, cd).requires_grad_()
    c = shape[cd]
    groups = pix_groups(c, zeta)
    p = make_p(shape[0], groups).requires_grad_()
    y = run_path(path, x, p, zeta, 0.5, cd)
    g = torch.randn(y.shape)
    y_o, gx_o, gp_o = oracle(x, p, zeta, 0.5, cd, g)
    assert y.shape == y_o.shape
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_o, rtol=1e-5, atol=1e-6)
    gx, gp = torch.autograd.grad(y, (x, p), g)
    torch.testing.assert_close(gx.double(), gx_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), gp_o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("kind", ["int", "relu", "repeat"])
def test_ties_route_to_first_channel(fast_everywhere, path, layout, kind):
    x = make_x((2, 10, 6, 6), layout, kind).requires_grad_()
    p = torch.full((2, 4), 0.25).requires_grad_()  # everything picks
    y = run_path(path, x, p, 3, 0.5, 1)
    g = torch.rand(y.shape) + 0.5
    _, gx_o, gp_o = oracle(x, p, 3, 0.5, 1, g)
    gx, gp = torch.autograd.grad(y, (x, p), g)
    # every pick subset sends its whole gradient to exactly one channel per pixel
    nonzero_per_subset = (gx[:, :9].reshape(2, 3, 3, 6, 6) != 0).sum(2)
    assert int(nonzero_per_subset.max()) == 1
    torch.testing.assert_close(gx.double(), gx_o, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gp.double(), gp_o, rtol=1e-5, atol=1e-5)
    if kind == "repeat":  # channel 0 always wins the tie with channel 1
        assert torch.all(gx[:, 1] == 0)


def test_mix_gradient_divides_by_true_subset_size(fast_everywhere):
    x = torch.randn(1, 7, 3, 3, requires_grad=True)
    p = torch.full((1, 2), 0.8)  # mix; subsets of 4 and 3 channels
    y = pick_or_mix(x, p, 4)
    torch.testing.assert_close(y[0, 1], 0.8 * x[0, 4:].mean(0))
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx[0, :4], torch.full((4, 3, 3), 0.8 / 4))
    torch.testing.assert_close(gx[0, 4:], torch.full((3, 3, 3), 0.8 / 3))


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_output_can_be_modified_in_place(fast_everywhere, layout, path):
    # e.g. a ReLU(inplace=True) or an in-place batch norm right after PiX in a rewritten network
    x = make_x((2, 8, 4, 4), layout).requires_grad_()
    p = make_p(2, 2).requires_grad_()
    with override(fast_cpu=path == "fast"):
        y = pick_or_mix(x, p, 4)
        assert y._base is None
        z = torch.relu_(y)
        z.sum().backward()
    xr = x.detach().clone().requires_grad_()
    torch.relu(pick_or_mix_reference(xr, p.detach(), 4)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_zeta_one_is_the_gate():
    x = torch.randn(2, 5, 4, 4)
    p = torch.rand(2, 5)
    torch.testing.assert_close(pick_or_mix(x, p, 1), x * p[:, :, None, None])


def test_threshold_is_strict_for_pick():
    x = torch.tensor([[[1.0], [3.0]]])  # N=1, C=2, L=1
    assert pick_or_mix(x, torch.tensor([[0.5]]), 2, 0.5).item() == pytest.approx(0.5 * 2.0)  # p == tau: mix
    assert pick_or_mix(x, torch.tensor([[0.49]]), 2, 0.5).item() == pytest.approx(0.49 * 3.0)  # pick
    assert pick_or_mix(x, torch.tensor([[0.3]]), 2, 0.25).item() == pytest.approx(0.3 * 2.0)  # other tau


# ------------------------------------------------------------------------------------ fast == reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("channels,zeta", [(32, 4), (30, 4), (27, 2)])
def test_fast_equals_reference(fast_everywhere, dtype, layout, channels, zeta):
    x = make_x((3, channels, 24, 24), layout, "randn", dtype=dtype)
    assert planar._use_fast(x)
    groups = pix_groups(channels, zeta)
    p = make_p(3, groups, dtype=torch.float32)
    xf, pf = x.clone().requires_grad_(), p.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    y = pick_or_mix(xf, pf, zeta)
    yr = pick_or_mix_reference(xr, pr, zeta)
    assert y.dtype == dtype and y.shape == yr.shape
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    torch.testing.assert_close(y, yr, rtol=tol[0], atol=tol[1])
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    g = torch.randn(y.shape).to(dtype)
    gx, gp = torch.autograd.grad(y, (xf, pf), g)
    gxr, gpr = torch.autograd.grad(yr, (xr, pr), g)
    assert gx.stride() == x.stride()
    torch.testing.assert_close(gx, gxr, rtol=tol[0], atol=tol[1])
    # the pick gradient lands on the same channel
    assert torch.equal(gx != 0, gxr != 0)
    torch.testing.assert_close(gp, gpr, rtol=5 * tol[0], atol=tol[1] * 24 * 24)


@pytest.mark.parametrize("layout", ["contig", "cl"])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.6, 1.0])
def test_default_dispatch_large_input(layout, fraction):
    # above the default threshold the production dispatch takes the fast kernels; all-mix, mixed and
    # all-pick batches take different branches in them
    x = make_x((2, 64, 64, 66), layout)
    assert planar._use_fast(x)
    p = torch.where(torch.rand(2, 16) < fraction, 0.3, 0.7).requires_grad_()
    xg = x.clone().requires_grad_()
    y = pick_or_mix(xg, p, 4)
    yr = pick_or_mix_reference(x, p, 4)
    torch.testing.assert_close(y, yr)
    g = torch.randn(y.shape)
    gx, gp = torch.autograd.grad(y, (xg, p), g)
    xr = x.clone().requires_grad_()
    gxr, gpr = torch.autograd.grad(pick_or_mix_reference(xr, p, 4), (xr, p), g)
    torch.testing.assert_close(gx, gxr)
    torch.testing.assert_close(gp, gpr, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("channels", [64, 62])  # divisible by zeta, and a short last subset
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.6, 1.0])  # all mix, few picks, most pick, all pick
def test_inference_direct_path_equals_reference(mode, channels, fraction):
    # without autograd the kernels run directly, not through the custom op's dispatch
    x = make_x((2, channels, 64, 66), "contig")
    groups = pix_groups(channels, 4)
    p = torch.where(torch.rand(2, groups, generator=torch.Generator().manual_seed(3)) < fraction, 0.3, 0.7)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        assert op_mod._direct_ok(x, p)
        y = pick_or_mix(x, p, 4)
    torch.testing.assert_close(y, pick_or_mix_reference(x, p, 4))


@pytest.mark.parametrize("shape,zeta", [((2, 32, 40, 40), 4), ((3, 12, 17, 23), 3), ((1, 8, 9, 2), 2),
                                        ((2, 64, 7, 7), 8), ((2, 64, 9, 9), 32)])  # 32: the rolled backward
def test_compiled_kernels_any_shape_equal_reference(shape, zeta):
    """One kernel per (tau, dtype) serves every shape: forward and backward against the reference."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    x = make_x(shape, "contig")
    n, c = shape[:2]
    s = x[0, 0].numel()
    p = torch.rand(n, c // zeta, generator=torch.Generator().manual_seed(5))
    t4 = x.view(-1, zeta, s)
    got = inductor._compiled_even(t4, p.view(-1), 0.5)
    torch.testing.assert_close(got, pick_or_mix_reference(x, p, zeta).reshape(-1, s))
    g = torch.randn(t4.shape[0], s, generator=torch.Generator().manual_seed(6))
    gt, gp = inductor._compiled_even(t4, p.view(-1), 0.5, g)
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    gxr, gpr = torch.autograd.grad(pick_or_mix_reference(xr, pr, zeta), (xr, pr), g.view(n, -1, *shape[2:]))
    torch.testing.assert_close(gt.view(shape), gxr)
    torch.testing.assert_close(gp.view(p.shape), gpr, rtol=1e-5, atol=1e-4)
    unrolled = str(zeta) if zeta <= inductor._UNROLL_MAX_ZETA else ""  # unrolled, or rolled for a large zeta
    assert ("fwd" + unrolled, 0.5, torch.float32, torch.float32) in inductor._COMPILED["kernels"]
    assert ("bwd" + unrolled, 0.5, torch.float32, torch.float32, torch.float32) in inductor._COMPILED["kernels"]
    assert inductor._compiled_even(x.view(-1, zeta, s)[:1], p.view(-1)[:1], 0.5) is None  # a size-1 dim: eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_compiled_kernel_equals_reference(dtype, fraction):
    """The planar forward kernel (unrolled for zeta 4; half precision summed in fp32) against the reference."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    x = make_x((2, 32, 40, 40), "contig", dtype=dtype)
    p = torch.where(torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) < fraction, 0.3, 0.7)
    t4 = x.view(16, 4, 1600)
    got = inductor._compiled_even(t4, p.view(-1), 0.5)
    assert got is not None, "the compiled kernel did not build"
    want = pick_or_mix_reference(x, p, 4).reshape(16, 1600)
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])
    assert got.dtype == dtype and ("fwd4", 0.5, dtype, p.dtype) in inductor._COMPILED["kernels"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_channels_innermost_kernels_other_dtypes(dtype):
    """The channels-innermost kernels are built per dtype too: forward and backward against the reference."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    x = make_x((2, 32, 40, 40), "cl", dtype=dtype)
    p = make_p(2, 8, dtype=dtype)
    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    y, yr = pick_or_mix(xa, pa, 4), pick_or_mix_reference(xr, pr, 4)
    tol = {torch.float64: (1e-7, 1e-7), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    torch.testing.assert_close(y, yr, rtol=tol[0], atol=tol[1])
    g = torch.randn(y.shape, dtype=dtype)
    gx, gp = torch.autograd.grad(y, (xa, pa), g)
    gxr, gpr = torch.autograd.grad(yr, (xr, pr), g)
    torch.testing.assert_close(gx, gxr, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(gp, gpr, rtol=max(tol[0], 1e-5), atol=max(tol[1], 1e-4) * 40)
    assert ("cl-fwd4", 0.5, dtype, dtype) in inductor._COMPILED["kernels"]
    assert ("cl-bwd4", 0.5, dtype, dtype, dtype) in inductor._COMPILED["kernels"]


def test_compiled_backward_ties_route_to_first_channel():
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    x = torch.randint(0, 3, (2, 32, 40, 40), generator=torch.Generator().manual_seed(2)).float()
    assert x.numel() >= inductor._COMPILED_MIN_NUMEL
    p = torch.where(torch.rand(2, 8, generator=torch.Generator().manual_seed(4)) < 0.7, 0.3, 0.7)
    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    y, yr = pick_or_mix(xa, pa, 4), pick_or_mix_reference(xr, pr, 4)
    g = torch.rand(y.shape) + 0.5
    gx, gp = torch.autograd.grad(y, (xa, pa), g)
    gxr, gpr = torch.autograd.grad(yr, (xr, pr), g)
    assert ("bwd4", 0.5, torch.float32, torch.float32, torch.float32) in inductor._COMPILED["kernels"]  # it ran, unrolled
    assert torch.equal(gx, gxr)  # the same (first) arg-max channel, the same values
    torch.testing.assert_close(gp, gpr, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape,zeta,cd", [((2, 32, 40, 40), 4, 1), ((1, 24, 60, 50), 3, 1),  # batch 1: own build
                                           ((3, 700, 64), 2, 2), ((2, 64, 30, 30), 16, 1)])  # tokens; largest zeta
def test_channels_innermost_kernels_equal_reference(shape, zeta, cd, monkeypatch):
    """Channels-last NCHW and N×L×C tokens (channels innermost) have their own kernels: the generated ones,
    built per zeta, and in fp32 with zeta in cpu_kernels.ZETAS the hand-vectorised ones.  Forward and
    backward equal the reference, output and input gradient keep the layout."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    calls = []
    fwd, bwd = cpu_kernels.fused_interleaved, cpu_kernels.fused_interleaved_backward
    monkeypatch.setattr(cpu_kernels, "fused_interleaved", lambda *a: calls.append("fwd") or fwd(*a))
    monkeypatch.setattr(cpu_kernels, "fused_interleaved_backward", lambda *a: calls.append("bwd") or bwd(*a))
    x = make_x(shape, "cl" if len(shape) == 4 else "contig", kind="repeat", cd=cd)  # ties in every sample
    n, c = shape[0], shape[cd]
    p = make_p(n, c // zeta)
    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    y, yr = pick_or_mix(xa, pa, zeta, channel_dim=cd), pick_or_mix_reference(xr, pr, zeta, channel_dim=cd)
    torch.testing.assert_close(y, yr)
    g = torch.randn(y.shape)
    gx, gp = torch.autograd.grad(y, (xa, pa), g)
    gxr, gpr = torch.autograd.grad(yr, (xr, pr), g)
    torch.testing.assert_close(gx, gxr)  # ties: the first channel at the max, as the reference
    torch.testing.assert_close(gp, gpr, rtol=1e-5, atol=1e-4)
    batch = "/1" if n == 1 else ""
    f32 = torch.float32
    if zeta in cpu_kernels.ZETAS:
        assert calls == ["fwd", "bwd"]  # by hand
    else:
        assert not calls and (f"cl-fwd{zeta}{batch}", 0.5, f32, f32) in inductor._COMPILED["kernels"]
        assert (f"cl-bwd{zeta}{batch}", 0.5, f32, f32, f32) in inductor._COMPILED["kernels"]
    if len(shape) == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(pick_or_mix(x, p, zeta, channel_dim=cd), yr)  # the direct inference path


def test_compiled_kernel_failure_falls_back_once(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(inductor, "_build_kernel", broken)
    monkeypatch.setitem(inductor._COMPILED, "kernels", {})
    monkeypatch.setitem(inductor._COMPILED, "failed", {})
    x = make_x((2, 32, 40, 40), "contig")
    p = make_p(2, 8)
    with override(compiled_kernels=True):
        with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler\); using the eager kernels"):
            y = pick_or_mix(x, p, 4)
        torch.testing.assert_close(y, pick_or_mix_reference(x, p, 4))
        assert ops.compiled_kernels_enabled()  # only the kernel that failed is given up, with its reason:
        assert list(ops.compiled_kernel_failures().values()) == ["RuntimeError: no C++ compiler"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # not retried, not said again
            torch.testing.assert_close(pick_or_mix(x, p, 4), y)


def test_an_error_inside_a_built_kernel_is_not_swallowed(monkeypatch):
    def build(*a, **k):
        def kernel(*args):
            raise RuntimeError("kernel bug")
        return kernel

    monkeypatch.setattr(inductor, "_build_kernel", build)
    monkeypatch.setitem(inductor._COMPILED, "kernels", {})
    monkeypatch.setitem(inductor._COMPILED, "failed", {})
    with override(compiled_kernels=True), torch.no_grad(), pytest.raises(RuntimeError, match="kernel bug"):
        pick_or_mix(make_x((2, 32, 40, 40), "contig"), make_p(2, 8), 4)


def test_compiled_kernel_switches():
    with override(compiled_kernels=False):
        assert not ops.compiled_kernels_enabled()
        with override(compiled_kernels=True):  # nested blocks restore what they found
            assert ops.compiled_kernels_enabled()
            with ops.eager_kernels():
                assert not ops.compiled_kernels_enabled()
                assert inductor._compiled_even(torch.zeros(4, 2, 3), torch.zeros(4), 0.5) is None
            assert ops.compiled_kernels_enabled()
        assert not ops.compiled_kernels_enabled()


def test_settings_are_read_once_from_the_environment_and_checked(monkeypatch):
    from pixify.config import Settings

    monkeypatch.setenv("PIXIFY_COMPILED_KERNELS", "off")
    monkeypatch.setenv("PIXIFY_COMPILED_PIX", "op")
    s = Settings()
    assert s.compiled_kernels is False and s.compiled_pix == "op" and s.triton_channels_inner == "loop"
    with pytest.raises(TypeError, match="unknown pixify setting"):
        with override(colour="red"):
            pass
    with pytest.raises(ValueError, match="compiled_pix must be one of"):
        with override(compiled_pix="sometimes"):
            pass


def test_override_is_safe_across_threads():
    import threading

    errors = []

    def work():
        try:
            for _ in range(200):
                with ops.eager_kernels():
                    assert not ops.compiled_kernels_enabled()
        except AssertionError as e:  # pragma: no cover - what the test would report
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from pixify.config import SETTINGS

    assert not errors and SETTINGS.eager_depth == 0


@pytest.mark.parametrize("zeta", cpu_kernels.ZETAS)
@pytest.mark.parametrize("n,s,groups", [(2, 37, 16), (1, 5, 35), (3, 4, 3)])  # whole vectors, a tail, tail only
def test_channels_last_cpu_kernel_equals_reference(zeta, n, s, groups):
    """The hand-vectorised channels-innermost step and its backward on (N, S, C) against the reference: both
    branches, ties (an all-equal subset too), p exactly at tau (mixes), a NaN in a pick and in a mix
    subset, +-inf."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    c = groups * zeta
    g = torch.Generator().manual_seed(zeta * 100 + groups)
    x = torch.randint(-3, 4, (n, s, c), generator=g).float() * 0.5 + torch.rand(n, s, c, generator=g) * (
        torch.rand(n, s, c, generator=g) < 0.5)  # many ties, some not
    x[0, 0, :zeta] = 1.25  # an all-equal subset
    p = torch.rand(n, groups, generator=g)
    p[0, 0] = 0.5  # at tau: mix
    p[-1, -1], p[0, -1] = 0.2, 0.8  # a pick and a mix subset ...
    x[-1, -1, -zeta] = float("nan")  # ... each with a NaN (propagates through max and sum)
    x[0, -1, -zeta:] = float("nan")
    x[0, 1, zeta:2 * zeta] = float("inf")
    x[-1, 1, :zeta] = float("-inf")
    if not cpu_kernels.available(x, p.dtype, zeta):
        pytest.skip("the channels-last CPU kernel failed to build here")
    got = cpu_kernels.fused_interleaved(x, p, zeta, 0.5)
    assert got is not None and got.shape == (n, s, groups) and got.is_contiguous()
    want = pick_or_mix_reference(x, p, zeta, channel_dim=2)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[-1, -1, -1]) and torch.isnan(got[0, -1, -1])
    # another tau, read by the kernel at run time
    torch.testing.assert_close(cpu_kernels.fused_interleaved(x, p, zeta, 0.3),
                               pick_or_mix_reference(x, p, zeta, 0.3, channel_dim=2), equal_nan=True)
    # the backward: the first arg-max (the first NaN where there is one, as torch.max) of a pick subset, every
    # channel of a mix subset; p's gradient (NaN where a NaN is in the taken max or mean)
    gr = torch.randn(n, s, groups, generator=g)
    gx, gp = cpu_kernels.fused_interleaved_backward(x, p, gr, zeta, 0.5)
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    gxr, gpr = torch.autograd.grad(pick_or_mix_reference(xr, pr, zeta, channel_dim=2), (xr, pr), gr)
    assert gx.shape == x.shape and gp.shape == p.shape
    torch.testing.assert_close(gx, gxr)
    torch.testing.assert_close(gp, gpr, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_channels_last_cpu_kernel_takes_fp32_p_only(monkeypatch):
    """A float64 p is compared with tau in float64 by the reference: the generated kernel (keyed by p's
    dtype) runs instead of the hand-vectorised one, whose comparison is in fp32."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    calls = []
    real = cpu_kernels.fused_interleaved
    monkeypatch.setattr(cpu_kernels, "fused_interleaved", lambda *a: calls.append(a) or real(*a))
    x = make_x((2, 32, 40, 40), "cl")
    p = make_p(2, 8, dtype=torch.float64)
    with torch.no_grad():
        y = pick_or_mix(x, p, 4)
        assert not calls
        torch.testing.assert_close(y, pick_or_mix_reference(x, p, 4))
        pick_or_mix(x, p.float(), 4)
        assert len(calls) == 1


def test_channels_last_cpu_kernel_failure_falls_back_once(monkeypatch):
    """A channels-last kernel that cannot be built warns once; the generated kernels then run, and agree."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")

    def broken():
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(cpu_kernels, "_kernel", broken)
    monkeypatch.setitem(cpu_kernels._STATE, "failed", False)
    x = make_x((2, 32, 40, 40), "cl")
    p = make_p(2, 8)
    m = PiX(32, 4)
    with torch.no_grad():
        m.weight.normal_()
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match=r"channels-last PiX CPU kernel is unavailable here"):
            y = pick_or_mix(x, p, 4)
        assert not cpu_kernels.available(x.permute(0, 2, 3, 1).flatten(1, 2), p.dtype, 4)  # not retried
        torch.testing.assert_close(y, pick_or_mix_reference(x, p, 4))
        torch.testing.assert_close(m(x), pix_reference_of(m, x))


def pix_reference_of(m, x):
    with reference_mode():
        return m(x)


def test_direct_path_only_when_nobody_watches():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x, p = torch.rand(1, 8, 4, 4), torch.rand(1, 2)
    assert op_mod._direct_ok(x, p)
    assert not op_mod._direct_ok(x.requires_grad_(), p)  # autograd needs the op's backward
    with torch.no_grad():
        assert op_mod._direct_ok(x, p)
        with FlopCounterMode(display=False):
            assert not op_mod._direct_ok(x, p)
    fm = FakeTensorMode()
    fx_, fp = fm.from_tensor(x.detach()), fm.from_tensor(p)
    assert not op_mod._direct_ok(fx_, fp)  # a tensor subclass
    with fm:
        assert not op_mod._direct_ok(fx_, fp)


# -------------------------------------------------------------------------------------------- gradcheck


def _far_weight(groups, channels):
    # x is positive with mean ~1, so logits ≈ ±3: p ≈ 0.05 (pick) or 0.95 (mix), far from tau
    sign = torch.tensor([(-1.0) ** i for i in range(groups)], dtype=torch.float64)
    return (sign[:, None] * 3.0 / channels).expand(groups, channels).clone()


@pytest.mark.parametrize("path", ["fast", "generic", "reference"])
@pytest.mark.parametrize(
    "shape,zeta,cd,layout",
    [((2, 7, 2, 3), 3, 1, "contig"), ((1, 8, 3, 3), 4, 1, "cl"), ((2, 5, 4), 2, -1, "contig"), ((1, 4, 2, 2), 1, 1, "contig")],
)
def test_gradcheck_pix(fast_everywhere, path, shape, zeta, cd, layout):
    x = (torch.rand(shape, dtype=torch.float64) + 0.5)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[cd]
    groups = pix_groups(c, zeta)
    w = _far_weight(groups, c).requires_grad_()
    p = torch.sigmoid(x.detach().mean([d for d in range(1, x.dim()) if d != cd % x.dim()]) @ w.detach().T)
    assert (p - 0.5).abs().min() > 0.3 and (p < 0.5).any() and (p >= 0.5).any()

    def fn(x, w):
        if path == "reference":
            with reference_mode():
                return pix(x, w, zeta, 0.5, cd)
        with override(fast_cpu=path == "fast"):
            return pix(x, w, zeta, 0.5, cd)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ module & pix


def test_module_attributes_and_zero_init():
    m = PiX(10, 3)
    assert (m.channels, m.zeta, m.tau, m.channel_dim) == (10, 3, 0.5, 1)
    assert m.groups == m.out_channels == 4
    assert m.weight.shape == (4, 10) and torch.count_nonzero(m.weight) == 0
    assert "zeta=3" in repr(m) and "out_channels=4" in repr(m)
    x = torch.randn(2, 10, 5, 5)
    # zero φ: p = 0.5 = tau, every subset mixes
    y = m(x)
    expected = torch.cat([x[:, :9].reshape(2, 3, 3, 5, 5).mean(2), x[:, 9:]], dim=1) * 0.5
    torch.testing.assert_close(y, expected)


def test_pix_matches_manual_composition():
    m = PiX(12, 4)
    nn.init.normal_(m.weight)
    x = torch.randn(3, 12, 6, 5)
    p = torch.sigmoid(x.mean((2, 3)) @ m.weight.T)
    torch.testing.assert_close(m(x), pick_or_mix_reference(x, p, 4))
    # token layout
    mt = PiX(12, 4, channel_dim=-1)
    mt.weight.data.copy_(m.weight.data)
    xt = x.flatten(2).transpose(1, 2).contiguous()  # (N, L, C)
    torch.testing.assert_close(mt(xt), m(x).flatten(2).transpose(1, 2))


def test_pix_low_precision_input_with_fp32_weight():
    m = PiX(16, 4)
    nn.init.normal_(m.weight)
    x = torch.randn(2, 16, 8, 8)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=3e-2, atol=3e-2)


def test_pix_fp16_pooling_does_not_overflow():
    x = torch.full((1, 8, 64, 64), 30.0, dtype=torch.float16)  # summed in fp16, the map would be inf
    x[:, ::2] = 10.0
    w = torch.full((2, 8), 0.01, dtype=torch.float16)
    w[1] = -0.01  # p = sigmoid(±1.6): one group mixes, the other picks
    y = pix(x, w, 4)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), pix(x.float(), w.float(), 4), rtol=2e-3, atol=2e-3)


def test_reference_mode_switches_path(monkeypatch):
    calls = []
    real = ops.pick_or_mix_reference
    monkeypatch.setattr(op_mod, "pick_or_mix_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, p = torch.randn(1, 4, 2, 2), torch.rand(1, 2)
    pick_or_mix(x, p, 2)
    assert calls == []
    with reference_mode():
        with reference_mode():
            pick_or_mix(x, p, 2)
        pick_or_mix(x, p, 2)
    pick_or_mix(x, p, 2)
    assert calls == [1, 1]


# ------------------------------------------------------------------------------ fx / compile / export


class Tiny(nn.Module):
    def __init__(self, zeta=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.pix = PiX(10, zeta)
        self.head = nn.Conv2d(pix_groups(10, zeta), 5, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.pix.weight.copy_(torch.randn(self.pix.weight.shape, generator=g))

    def forward(self, x):
        # the in-place ReLU after PiX is deliberate (the output must be an ordinary, modifiable tensor)
        return self.head(torch.relu_(self.pix(torch.relu(self.conv(x)))))


def test_fx_symbolic_trace():
    m = Tiny().eval()
    gm = torch.fx.symbolic_trace(m)
    pix_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.pix]
    assert len(pix_nodes) == 1
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), m(x))


def test_compile_fullgraph_inductor_inference():
    m = Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x))


def test_compile_fullgraph_training_matches_eager():
    m = Tiny()
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    out_c = cm(x)
    (gc,) = torch.autograd.grad(out_c.square().sum(), m.pix.weight)
    out_e = m(x)
    (ge,) = torch.autograd.grad(out_e.square().sum(), m.pix.weight)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gc, ge)
    assert gc.abs().sum() > 0


@pytest.mark.parametrize("strict", [False, True])  # strict: traced by dynamo, as torch.compile is
def test_torch_export(strict):
    m = Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(m, (x,), strict=strict)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.pixify.pick_or_mix.default in targets
    x2 = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ep.module()(x2), m(x2))
    # decomposed into standard ops
    ep_ref = ep.run_decompositions(ops.pix_decompositions())
    targets = {n.target for n in ep_ref.graph.nodes if n.op == "call_function"}
    assert torch.ops.pixify.pick_or_mix.default not in targets
    torch.testing.assert_close(ep_ref.module()(x2), m(x2))


def test_onnx_export_reference_mode(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (needed by the dynamo exporter)")
    m = Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with reference_mode():
        prog = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    path = tmp_path / "pix.onnx"
    prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops_used = {n.op_type for n in model.graph.node}
    assert {"ReduceMax", "Where", "Less"} <= ops_used
    assert not any(n.domain == "pixify" for n in model.graph.node)
    # the exported program computes the same thing
    torch.testing.assert_close(prog.exported_program.module()(x), m(x))


# ------------------------------------------------------------------------------------------------ flops


def test_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode

    m = PiX(12, 4)
    x = torch.randn(2, 12, 5, 5)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ops.pix_flop_formulas()) as fc:
        m(x)
    pix_flops = 2 * x.numel()  # one compare/add per input element = 1 MAC
    phi_flops = 2 * 2 * 12 * 3  # (N×C) @ (C×G)
    assert fc.get_total_flops() == pix_flops + phi_flops
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.pixify.pick_or_mix] == pix_flops


# -------------------------------------------------------------------------------------------- bad args


@pytest.mark.parametrize("zeta", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_zeta(zeta):
    with pytest.raises(ValueError, match="zeta"):
        PiX(8, zeta)
    with pytest.raises(ValueError, match="zeta"):
        pix_groups(8, zeta)
    with pytest.raises(ValueError, match="zeta"):
        pick_or_mix(torch.randn(1, 8, 2, 2), torch.rand(1, 4), zeta)


@pytest.mark.parametrize("tau", [0, 0.0, 1, 1.2, -0.1, float("nan")])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        PiX(8, 2, tau=tau)
    with pytest.raises(ValueError, match="tau"):
        pick_or_mix(torch.randn(1, 8, 2, 2), torch.rand(1, 4), 2, tau)


def test_bad_channels_and_shapes():
    from pixify.errors import PixifyError

    with pytest.raises(ValueError, match="channels"):
        PiX(0, 2)
    with pytest.raises(PixifyError, match="channel_dim"):
        PiX(8, 2, channel_dim=0)
    with pytest.raises(ValueError, match="p must have shape"):
        pick_or_mix(torch.randn(1, 8, 2, 2), torch.rand(1, 3), 2)
    with pytest.raises(ValueError, match="weight must have shape"):
        pix(torch.randn(1, 8, 2, 2), torch.zeros(4, 7), 2)


def test_groups():
    assert pix_groups(256, 4) == 64
    assert pix_groups(10, 3) == 4
    assert pix_groups(7, 4) == 2
    assert pix_groups(5, 1) == 5
    assert pix_groups(3, 8) == 1
    assert all(pix_groups(c, z) == math.ceil(c / z) for c in range(1, 40) for z in range(1, 9))


@pytest.mark.parametrize("shape,zeta,layout", [((1, 256, 28, 28), 4, "contig"), ((2, 128, 30, 30), 2, "contig"),
                                               ((3, 64, 1000), 8, "contig"), ((2, 512, 16, 16), 32, "contig"),
                                               ((1, 256, 28, 28), 4, "cl"),
                                               ((2, 120, 30, 30), 3, "cl"), ((2, 900, 96), 4, "tokens")])
def test_whole_pix_kernel_equals_reference(shape, zeta, layout):
    """fp32 inference runs pooling, φ, sigmoid and the fused step as one compiled kernel (batch 1 has its
    own, as the trace specialises it; channels innermost, one per zeta); it equals the reference and keeps
    the input's layout, and training never takes it."""
    if not ops.compiled_kernels_enabled():
        pytest.skip("compiled kernels disabled (PIXIFY_COMPILED_KERNELS=0)")
    torch.manual_seed(0)
    cd = 2 if layout == "tokens" else 1
    m = PiX(shape[cd], zeta, channel_dim=cd)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(shape).relu()
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert module._whole_ok(x, m.weight)
        y = m(x)
        with reference_mode():
            yr = m(x)
    if layout == "contig":
        # unrolled for its zeta, or rolled (any zeta) above _UNROLL_MAX_ZETA
        kind = "pix" + (str(zeta) if zeta <= inductor._UNROLL_MAX_ZETA else "") + ("/1" if shape[0] == 1 else "")
        assert (kind, 0.5, torch.float32, torch.float32) in inductor._COMPILED["kernels"]
    elif zeta in cpu_kernels.ZETAS:  # channels innermost: ATen pooling, φ, the hand-vectorised step
        assert cpu_kernels._STATE["kernel"] is not None
    else:
        kind = f"cl-pix{zeta}" + ("/1" if shape[0] == 1 else "")
        assert (kind, 0.5, torch.float32, torch.float32) in inductor._COMPILED["kernels"]
    z = x.mean(2 if cd == 1 else 1).flatten(1) if x.dim() == 3 else x.flatten(2).mean(2)
    p = torch.sigmoid(z @ m.weight.T)
    assert 0.1 < float((p < 0.5).float().mean()) < 0.9  # both branches taken
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert not module._whole_ok(x, m.weight)  # grad mode, and φ requires grad: the custom op path
    assert not module._whole_ok(x.to(torch.float64), m.weight.double())


def test_counting_macs_compiles_no_kernel(monkeypatch):
    """count_macs runs one forward under FlopCounterMode (the custom-op path): it takes the eager kernels,
    since building a CPU kernel would cost seconds for that one pass, and counts PiX by its formula."""
    from pixify.metrics import count_macs

    def no_build(*a, **k):
        raise AssertionError("count_macs built a kernel")

    monkeypatch.setattr(inductor, "_build_kernel", no_build)
    monkeypatch.setitem(inductor._COMPILED, "kernels", {})  # nothing built yet in this test's view
    monkeypatch.setitem(inductor._COMPILED, "failed", {})  # restored afterwards, whatever happens here
    m = nn.Sequential(PiX(64, 4), nn.Conv2d(16, 8, 1, bias=False))
    macs, out = count_macs(m, torch.randn(2, 64, 32, 32), return_output=True)
    # one per PiX input element, φ (C x G per sample), the conv
    assert macs == 2 * 64 * 32 * 32 + 2 * 64 * 16 + 2 * 16 * 8 * 32 * 32
    assert out.shape == (2, 8, 32, 32) and not inductor._COMPILED["failed"]


def test_whole_pix_non_dense_input_takes_the_op_path(monkeypatch):
    """A strided view (neither planar nor channels innermost) skips the whole-operator kernel without
    copying for it, and still equals the reference."""
    calls = []
    monkeypatch.setattr(module, "_compiled_pix", lambda *a, **k: calls.append(a) or None)
    torch.manual_seed(0)
    m = PiX(64, 4)
    with torch.no_grad():
        m.weight.normal_()
    x = make_x((2, 64, 40, 40), "noncontig")
    with torch.inference_mode():
        assert module._whole_ok(x, m.weight)
        y = m(x)
        with reference_mode():
            yr = m(x)
    assert calls == []
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_an_untested_torch_release_runs_on_public_apis_only(monkeypatch):
    """On a torch release the fast paths were not tested with, they stay off and PiX is still exact."""
    from pixify import config

    assert config.PRIVATE_TORCH_OK == (config._torch_release() in config.TESTED_TORCH)
    for m in (inductor, planar, op_mod):
        monkeypatch.setattr(m, "PRIVATE_TORCH_OK", False)
    monkeypatch.setattr(cpu_kernels, "PRIVATE_TORCH_OK", False)

    def no_build(*a, **k):
        raise AssertionError("a private-API kernel was built")

    monkeypatch.setattr(inductor, "_build_kernel", no_build)
    monkeypatch.setitem(inductor._COMPILED, "kernels", {})
    assert not ops.compiled_kernels_enabled()
    x = make_x((2, 64, 40, 40), "contig").requires_grad_()
    p = make_p(2, 16).requires_grad_()
    assert not op_mod._direct_ok(x.detach(), p.detach()) and not planar._use_fast(x)
    y = pick_or_mix(x, p, 4)
    g = torch.randn_like(y)
    y.backward(g)
    xr, pr = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    yr = pick_or_mix_reference(xr, pr, 4)
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(p.grad, pr.grad)
