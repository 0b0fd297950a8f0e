"""The generic backend: device independent, any dtype and layout: two grouped reductions and an output-sized
select (never a select over the full-size input); backward with ``torch.max`` indices."""

from __future__ import annotations

import torch
from torch import Tensor

from .interleaved import _limits, _select
from .layout import _coef, _grouped


# Generic code on CPU: outputs at least this large use the min/max select instead of torch.where.
_CPU_SELECT_MIN_NUMEL = 1 << 16


def _generic_forward(t: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor:
    """(N, G, S) for any (N, C, S) t: grouped amax and sum, an output-sized select, the p scale."""
    pick = p < tau
    coef = _coef(p, pick, t.shape[1], zeta, t.dtype)[:, :, None]
    if zeta == 1:
        return t * coef
    # torch.where is not vectorised on CPU (several ns per element): for large outputs select with
    # min/max instead and skip a reduction that no subset needs
    cpu = t.device.type == "cpu" and t.shape[0] * t.shape[2] * pick.shape[1] >= _CPU_SELECT_MIN_NUMEL
    res, start = [], 0
    for blk in _grouped(t, zeta)[0]:
        g = blk.shape[1]
        pk = pick[:, start : start + g]
        if cpu:
            n_pick = int(pk.sum())
            if n_pick == 0:
                res.append(blk.sum(2))
            elif n_pick == pk.numel():
                res.append(blk.amax(2))
            else:
                hi, lo = _limits(pk, t.dtype)
                res.append(_select(blk.amax(2), blk.sum(2), hi[:, :, None], lo[:, :, None]))
        else:
            res.append(torch.where(pk[:, :, None], blk.amax(2), blk.sum(2)))
        start += g
    fused = res[0] if len(res) == 1 else torch.cat(res, dim=1)
    return fused.mul_(coef)


def _generic_backward(g3: Tensor, t: Tensor, p: Tensor, zeta: int, tau: float) -> tuple[Tensor, Tensor]:
    """Exact gradients with ``torch.max`` indices (first arg-max).  Returns (grad_t (N,C,S), grad_p)."""
    pick = p < tau
    pc = p.to(t.dtype)
    if zeta == 1:
        gp = (g3 * t).sum(2, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
        return g3 * pc[:, :, None], gp.to(p.dtype)
    parts, sizes = _grouped(t, zeta)
    grads, fused_all, start = [], [], 0
    for blk, size in zip(parts, sizes):
        g = blk.shape[1]
        pk = pick[:, start : start + g]
        gg = g3[:, start : start + g]
        vals, idx = blk.max(dim=2)
        fused = torch.where(pk[:, :, None], vals, blk.mean(2))
        fused_all.append(fused)
        coef = torch.where(pk, pc[:, start : start + g], pc[:, start : start + g] / size)
        gpx = gg * coef[:, :, None]  # (N, g, S)
        ar = torch.arange(size, device=t.device).view(1, 1, size, 1)
        sel = (ar == idx.unsqueeze(2)) | ~pk[:, :, None, None]
        grads.append((gpx.unsqueeze(2) * sel).flatten(1, 2) if size > 1 else gpx.unsqueeze(2).flatten(1, 2))
        start += g
    grad_t = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
    fused = fused_all[0] if len(fused_all) == 1 else torch.cat(fused_all, dim=1)
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    grad_p = (g3.to(acc or g3.dtype) * fused.to(acc or fused.dtype)).sum(2)
    return grad_t, grad_p.to(p.dtype)
