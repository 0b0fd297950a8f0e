"""The eager CPU backend for channels-innermost memory (channels_last NCHW, N×L×C tokens): the group max from
``max_pool1d``, the group sum from a small block-diagonal matmul, then an output-sized select."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import _coef


_BLOCK_SUM: dict[tuple, Tensor] = {}


def _block_sum_matrix(zeta: int, dtype: torch.dtype, device: torch.device, block: int) -> Tensor:
    key = (zeta, dtype, str(device), block)
    w = _BLOCK_SUM.get(key)
    if w is None:
        w = _BLOCK_SUM[key] = torch.block_diag(*([torch.ones(zeta, 1, dtype=dtype, device=device)] * block))
    return w


def _interleaved_sums(u: Tensor, zeta: int) -> Tensor:
    """u (N, S, C) contiguous -> subset sums (N, S, G)."""
    n, s, c = u.shape
    gf, r = divmod(c, zeta)
    parts = []
    if gf:
        main = u[..., : gf * zeta]
        if u.dtype in (torch.float32, torch.float64):
            # times a block-diagonal ones matrix: one read of u, vectorised by the BLAS
            block = next(b for b in (8, 4, 2, 1) if gf % b == 0)
            w = _block_sum_matrix(zeta, u.dtype, u.device, block)
            parts.append((main.reshape(-1, block * zeta) @ w).view(n, s, gf))
        else:  # reduced precision: accumulate in float32
            parts.append(main.unflatten(-1, (gf, zeta)).sum(-1))
    if r:
        parts.append(u[..., gf * zeta :].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _interleaved_max(u: Tensor, zeta: int) -> Tensor:
    """u (N, S, C) contiguous -> subset maxima (N, S, G); ceil_mode gives the short last subset."""
    n, s, c = u.shape
    return F.max_pool1d(u.reshape(n * s, 1, c), zeta, zeta, ceil_mode=True).view(n, s, -1)


def _limits(pick: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Bounds for :func:`_select`, shaped like ``pick``: hi = +inf on pick / -inf on mix, lo the opposite."""
    inf = torch.full(pick.shape, float("inf"), dtype=dtype, device=pick.device)
    hi = torch.where(pick, inf, -inf)
    return hi, -hi


def _select(mx: Tensor, sm: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    """Per (sample, subset): mx where pick else sm -- exact (also for ±inf), and, unlike torch.where,
    vectorised on CPU: max(min(mx, hi), min(sm, lo)).  Overwrites and returns ``mx``."""
    torch.minimum(mx, hi, out=mx)
    torch.minimum(sm, lo, out=sm)
    return torch.maximum(mx, sm, out=mx)


def _interleaved_forward(t: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor:
    """t (N, C, S) with t.transpose(1, 2) contiguous -> out (N, G, S) in the same layout."""
    u = t.transpose(1, 2)
    n, s, c = u.shape
    pick = p < tau
    coef = _coef(p, pick, c, zeta, u.dtype)[:, None, :]
    n_pick = int(pick.sum())
    if n_pick == 0:
        fused = _interleaved_sums(u, zeta)
    elif n_pick == pick.numel():
        fused = _interleaved_max(u, zeta)
    else:
        hi, lo = _limits(pick, u.dtype)
        fused = _select(_interleaved_max(u, zeta), _interleaved_sums(u, zeta), hi[:, None, :], lo[:, None, :])
    return fused.mul_(coef).transpose(1, 2)


def _interleaved_backward(g3: Tensor, t: Tensor, p: Tensor, zeta: int, tau: float) -> tuple[Tensor, Tensor]:
    """Exact gradients for the interleaved layout (same rules as the planar kernel)."""
    u = t.transpose(1, 2)  # (N, S, C) contiguous
    gu = g3.transpose(1, 2)  # (N, S, G) contiguous
    n, s, c = u.shape
    dt = u.dtype
    pick = p < tau
    any_pick = bool(pick.any())
    coef = _coef(p, pick, c, zeta, dt)  # (N, G)
    hi, lo = _limits(pick, dt)
    hi, lo = hi[:, None, :], lo[:, None, :]
    mx = _interleaved_max(u, zeta) if any_pick else None
    sm = _interleaved_sums(u, zeta) if not bool(pick.all()) else None
    if mx is None:
        fused = sm
    elif sm is None:
        fused = mx
    else:
        fused = _select(mx.clone(), sm, hi, lo)
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    # dp = sum_s g * fused, where fused is max (pick) or sum/|subset| (mix)
    unit = _coef(torch.ones_like(p), pick, c, zeta, acc)  # 1 for pick, 1/|subset| for mix
    grad_p = torch.linalg.vecdot(gu.to(acc), fused.to(acc), dim=1) * unit
    vals = gu * coef[:, None, :]  # (N, S, G)
    grad = torch.empty_like(u)
    gf, r = divmod(c, zeta)
    if not any_pick:  # every member of every subset gets p·g/|subset|
        if gf:
            grad[..., : gf * zeta].unflatten(-1, (gf, zeta)).copy_(vals[..., :gf, None].expand(n, s, gf, zeta))
        if r:
            grad[..., gf * zeta :].copy_(vals[..., gf:].expand(n, s, r))
        return grad.transpose(1, 2), grad_p.to(p.dtype)
    thr = torch.minimum(mx, hi)  # the max for pick subsets, -inf (every member matches) for mix
    mixb = (~pick)[:, None, :]
    blocks = []
    if gf:
        blocks.append((slice(0, gf), zeta, grad[..., : gf * zeta].unflatten(-1, (gf, zeta)),
                       u[..., : gf * zeta].unflatten(-1, (gf, zeta))))
    if r:
        blocks.append((slice(gf, gf + 1), r, grad[..., gf * zeta :].unsqueeze(-2), u[..., gf * zeta :].unsqueeze(-2)))
    for gsl, size, gblk, ublk in blocks:
        tb, vb, mb = thr[..., gsl], vals[..., gsl], mixb[..., gsl]
        avail = None
        for k in range(size):
            sel = torch.ge(ublk[..., k], tb)  # == max for pick members, always for mix members
            if avail is not None:
                sel.logical_and_(avail)
            if k + 1 < size:  # pick subsets: only the first member at the max
                avail = sel.logical_not() if avail is None else avail.logical_xor_(sel)
                avail.logical_or_(mb)
            torch.mul(vb, sel, out=gblk[..., k])
    return grad.transpose(1, 2), grad_p.to(p.dtype)
