"""The reference: plain differentiable PyTorch, exportable, the oracle every backend is proven equal to."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..config import SETTINGS, _entered
from .args import _check_channel_dim, _check_p, _check_tau, _check_zeta, _norm_dim


def reference_mode() -> contextlib.AbstractContextManager[None]:
    """Inside, :func:`pick_or_mix` and :func:`pix` use the pure-PyTorch reference path.

    Use it for ``torch.onnx.export`` (the graph then contains only standard aten ops) and for
    equality tests.  Nesting is allowed.
    """
    return _entered("reference_depth")


def export_mode() -> contextlib.AbstractContextManager[None]:
    """Inside, :func:`pick_or_mix` and :func:`pix` use :func:`pick_or_mix_export`, the formulation for
    exported graphs (ONNX, ``torch.export``).  Nesting is allowed."""
    return _entered("export_depth")


def _reference_active() -> bool:
    """Reference or export mode: a plain-PyTorch formulation, no kernels."""
    return SETTINGS.reference_depth > 0 or SETTINGS.export_depth > 0


def _export_active() -> bool:
    return SETTINGS.export_depth > 0


def pick_or_mix_reference(
    x: Tensor, p: Tensor, zeta: int, tau: float = 0.5, channel_dim: int = 1
) -> Tensor:
    """The fused pick-or-mix step written with standard differentiable PyTorch ops.

    ``torch.max(dim)`` (not ``amax``) gives the pick values so that autograd routes the gradient to the
    first arg-max only; the pick/mix select happens on the G-channel output, never on the input.
    """
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    cd = _norm_dim(_check_channel_dim(channel_dim), x.dim())
    _check_p(x, p, zeta, cd)
    xm = x.movedim(cd, -1)  # (N, *spatial, C)
    c = xm.shape[-1]
    gf, r = divmod(c, zeta)
    maxes, means = [], []
    if gf:
        main = xm[..., : gf * zeta].unflatten(-1, (gf, zeta))
        maxes.append(main.max(dim=-1).values)
        means.append(main.mean(dim=-1))
    if r:
        tail = xm[..., gf * zeta :]
        maxes.append(tail.max(dim=-1, keepdim=True).values)
        means.append(tail.mean(dim=-1, keepdim=True))
    mx = maxes[0] if len(maxes) == 1 else torch.cat(maxes, dim=-1)
    mn = means[0] if len(means) == 1 else torch.cat(means, dim=-1)
    bshape = (p.shape[0],) + (1,) * (xm.dim() - 2) + (p.shape[1],)
    pick = (p < tau).reshape(bshape)
    fused = torch.where(pick, mx, mn)
    y = fused * p.to(x.dtype).reshape(bshape)
    return y.movedim(-1, cd)


def pick_or_mix_export(x: Tensor, p: Tensor, zeta: int, tau: float = 0.5, channel_dim: int = 1) -> Tensor:
    """The forward step as an exported graph wants it: equal to :func:`pick_or_mix_reference` for finite
    inputs, but without moving the channel dimension (no full-size transposes): the subsets are a reshape of
    the channel axis, reduced over one axis (max, and a sum whose 1/|subset| goes into its coefficient); the
    pick/mix decision is taken on the small (N, G) tensor as two coefficients, ``a`` (``p`` where the subset
    picks, else 0) and ``b`` (``p/|subset|`` where it mixes, else 0), and the output is ``max·a + sum·b``.
    Two broadcast multiplies and an add run faster in ONNX Runtime than an output-sized select with a
    broadcast condition and a multiply (ResNet-50 ``--zeta auto``, batch 8, randomised A/B: 0.95–0.97
    against 0.97–1.02 of the original, see docs/deploy.md).  The price: a subset whose branch is not taken still enters as 0 times
    its value, so an infinite sum or max there gives NaN where the reference gives the other branch.
    Forward only (an exported graph is for inference)."""
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    cd = _norm_dim(_check_channel_dim(channel_dim), x.dim())
    _check_p(x, p, zeta, cd)
    c = x.shape[cd]
    gf, r = c // zeta, c % zeta
    mx, sm = [], []
    if gf:
        main = x if not r else x.narrow(cd, 0, gf * zeta)
        main = main.unflatten(cd, (gf, zeta))  # (..., G, zeta, ...)
        mx.append(main.amax(dim=cd + 1))
        sm.append(main.sum(dim=cd + 1))
    if r:
        tail = x.narrow(cd, gf * zeta, r)
        mx.append(tail.amax(dim=cd, keepdim=True))
        sm.append(tail.sum(dim=cd, keepdim=True))
    mx_t = mx[0] if len(mx) == 1 else torch.cat(mx, dim=cd)
    sm_t = sm[0] if len(sm) == 1 else torch.cat(sm, dim=cd)
    sizes = torch.full((p.shape[1],), float(zeta), dtype=p.dtype, device=p.device)
    if r:
        sizes[-1] = float(r)
    pick = p < tau  # (N, G): decided on the small tensor
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    shape = [1] * x.dim()
    shape[0], shape[cd] = p.shape[0], p.shape[1]
    a = torch.where(pick, p, zero).to(x.dtype).reshape(shape)
    b = torch.where(pick, zero, p / sizes).to(x.dtype).reshape(shape)
    return mx_t * a + sm_t * b
