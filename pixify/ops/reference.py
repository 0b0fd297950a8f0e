"""The reference: plain differentiable PyTorch, exportable, the oracle every backend is proven equal to."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..config import SETTINGS, _entered, override
from .args import _check_channel_dim, _check_p, _check_tau, _check_zeta, _norm_dim


def reference_mode() -> contextlib.AbstractContextManager[None]:
    """Inside, :func:`pick_or_mix` and :func:`pix` use the pure-PyTorch reference path.

    Use it for ``torch.onnx.export`` (the graph then contains only standard aten ops) and for
    equality tests.  Nesting is allowed.
    """
    return _entered("reference_depth")


def _reference_active() -> bool:
    return SETTINGS.reference_depth > 0


def _fast_paths(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Internal: enable/disable the CPU fast kernels (tests compare both)."""
    return override(fast_cpu=enabled)


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
