"""The backend table of the PiX step: for every CPU backend, inputs that route to it, proof that it is the
one that ran (``pixify.ops.last_backend``) and that ``pixify.ops.explain`` predicted it, and equality with
the reference forward and backward. (The Triton backend's test is in tests/test_triton.py.)"""

from __future__ import annotations

import pytest
import torch

from pixify import ops
from pixify.config import override
from pixify.ops import cpu_kernels, inductor, pick_or_mix, pick_or_mix_reference


def _inputs(shape, layout, zeta, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.rand(shape[0], -(-shape[1] // zeta), generator=g)
    p[0, 0], p[-1, -1] = 0.2, 0.8  # both branches
    return x, p


CASES = [
    # backend, shape, layout, zeta, settings
    ("generic", (2, 10, 4, 5), "contiguous", 3, {}),
    ("planar", (2, 64, 96, 96), "contiguous", 4, {"compiled_kernels": False}),
    ("interleaved", (2, 64, 96, 96), "channels_last", 4, {"compiled_kernels": False}),
    ("inductor", (2, 32, 40, 40), "contiguous", 4, {"compiled_kernels": True}),
    ("cpp", (2, 32, 40, 40), "channels_last", 4, {"compiled_kernels": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_backend_runs_where_explain_says_and_equals_the_reference(case):
    name, shape, layout, zeta, settings = case
    with override(**settings):
        x, p = _inputs(shape, layout, zeta)
        xg, pg = x.clone().requires_grad_(), p.clone().requires_grad_()
        plan = ops.explain(xg, p=pg, zeta=zeta)
        if name in ("inductor", "cpp") and plan.forward != name:
            pytest.skip(f"{name} is not available here: {plan.passed_forward.get(name)}")
        assert (plan.forward, plan.backward) == (name, name), str(plan)
        assert plan.entry == "the pixify::pick_or_mix custom op"  # a gradient is wanted
        y = pick_or_mix(xg, pg, zeta)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        ran = ops.last_backend()
        assert (ran["forward"], ran["backward"]) == (name, name)
    xr, pr = x.double().requires_grad_(), p.double().requires_grad_()
    yr = pick_or_mix_reference(xr, pr, zeta)
    yr.backward(g.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pg.grad.double(), pr.grad, rtol=1e-4, atol=1e-4)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_explain_lists_why_each_earlier_backend_was_passed_over():
    x, p = _inputs((2, 10, 4, 5), "contiguous", 3)
    plan = ops.explain(x, p=p, zeta=3, backward=True)
    assert plan.forward == "generic"
    assert list(plan.passed_forward) == ["triton", "cpp", "inductor", "planar", "interleaved"]
    assert "CUDA" in plan.passed_forward["triton"] or "Triton" in plan.passed_forward["triton"]
    assert "channels-innermost" in plan.passed_forward["planar"] or "elements" in plan.passed_forward["planar"]
    text = str(plan)
    assert "forward: generic" in text and "passed over triton" in text


def test_explain_reports_the_entry_paths():
    x, p = _inputs((2, 10, 4, 5), "contiguous", 2)
    with ops.reference_mode():
        assert ops.explain(x, p=p, zeta=2).entry == "the reference (reference_mode)"
    with torch.no_grad():
        assert ops.explain(x, p=p, zeta=2).entry == "a direct kernel call"
    m = ops.PiX(64, 4)
    with torch.no_grad(), override(compiled_kernels=True):
        plan = ops.explain(torch.randn(2, 64, 40, 40), m.weight, 4)
    if inductor.compiled_kernels_enabled():
        assert plan.entry.startswith("pix: the whole operator as one generated kernel")
    with override(compiled_kernels=False):
        plan = ops.explain(torch.randn(2, 64, 40, 40), m.weight, 4)
    assert plan.entry.startswith("pix: pooling and φ, then") and plan.forward == "generic"


def test_whole_operator_kernel_is_recorded_when_it_runs():
    m = ops.PiX(64, 4)
    with torch.no_grad():
        m.weight.normal_()
        x = torch.randn(2, 64, 40, 40)
        with override(compiled_kernels=True):
            if not inductor.compiled_kernels_enabled():
                pytest.skip("compiled kernels are not available here")
            ops.dispatch._LAST.clear()
            y = m(x)
        assert ops.last_backend().get("pix") == "whole-kernel"
        with ops.reference_mode():
            torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


def test_a_backend_that_fails_to_build_hands_over_to_the_next(monkeypatch):
    """A build failure disables that backend alone (its reason shown by explain); the next one runs."""
    def broken(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_kernels, "_kernel", broken)
    monkeypatch.setitem(cpu_kernels._STATE, "failed", False)
    monkeypatch.setitem(cpu_kernels._STATE, "kernel", None)
    with override(compiled_kernels=True):
        x, p = _inputs((2, 32, 40, 40), "channels_last", 4)
        if ops.explain(x, p=p, zeta=4, backward=False).forward != "cpp":
            pytest.skip("the cpp backend is not available here")
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="no compiler"):
            y = pick_or_mix(x, p, 4)
        assert ops.last_backend()["forward"] == "inductor"
        plan = ops.explain(x, p=p, zeta=4, backward=False)
        assert plan.forward == "inductor" and "failed to build" in plan.passed_forward["cpp"]
    torch.testing.assert_close(y, pick_or_mix_reference(x, p, 4))
