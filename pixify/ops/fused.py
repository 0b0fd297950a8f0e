"""The fused formulations that inductor turns into the generated CPU kernels (:mod:`.inductor`): the whole
step per subset in one expression, planar (``_fused_even``) and channels innermost (``_fused_interleaved``),
with their backwards and the whole-operator versions (``_pix_even``, ``_pix_interleaved``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


# the planar kernels are unrolled over the rows of a subset (one build per zeta) up to this zeta
_UNROLL_MAX_ZETA = 16


def _fused_even(t4: Tensor, p: Tensor, tau: float, zeta: int | None = None) -> Tensor:
    """What the compiled kernel computes (and the compiler fuses into one loop over t4 (NB, zeta, S)):
    per bag, p·max over its rows where p < tau, else p·mean.

    With ``zeta`` (a Python int equal to ``t4.shape[1]``) the rows are unrolled, so that every step is
    pointwise over (NB, S): the generated loop then reads the zeta rows and writes the output once, where
    the two reductions over the small middle dimension each stored a full-size buffer first (8×256×56×56,
    zeta 4: about 1.4 against 2.0 ms).  Half precision is summed in fp32, as the reduction does."""
    pc = p.to(t4.dtype)[:, None]
    pick = (p < tau)[:, None]
    if zeta is None:
        return torch.where(pick, t4.amax(1) * pc, t4.sum(1) * (pc / t4.shape[1]))
    acc = torch.float32 if t4.dtype in (torch.float16, torch.bfloat16) else t4.dtype
    mx, sm = _rows_max_sum(t4.unbind(1), acc)
    return torch.where(pick, mx * pc, (sm * (pc.to(acc) / zeta)).to(t4.dtype))


def _rows_max_sum(rows: tuple[Tensor, ...], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Element-wise max and sum (in ``acc``) of the rows of a subset: pointwise steps, as the unrolled
    kernels need them."""
    mx, sm = rows[0], rows[0].to(acc)
    for r in rows[1:]:
        mx, sm = torch.maximum(mx, r), sm + r.to(acc)
    return mx, sm


def _fused_even_backward(t4: Tensor, p: Tensor, g2: Tensor, tau: float,
                         zeta: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_fused_even` (what the compiled backward kernel computes): pick bags send
    p·g to the first arg-max row, mix bags p·g/zeta to every row; p gets sum over pixels of g·fused.

    With ``zeta`` (a Python int equal to ``t4.shape[1]``) the rows are unrolled: every step is then a
    pointwise op over (NB, S), which inductor vectorises, where its arg-max over the small middle
    dimension ran about 20x slower than one pass over the input (8x256x56x56, zeta 4: 42 against 2.1 ms).
    "First arg-max" is then the first row equal to the maximum (the same, except for NaN inputs)."""
    pick, pc = (p < tau)[:, None], p.to(t4.dtype)[:, None]
    if zeta is not None:
        return _unrolled_backward(t4.unbind(1), pick, pc, g2, zeta, 1)
    mx, sm = t4.amax(1), t4.sum(1)
    z = t4.shape[1]
    gg, grad_p = _grads_given_fused(torch.where(pick, mx, sm / z), pick, pc, g2, z)
    first = torch.arange(z, device=t4.device)[None, :, None] == t4.argmax(1)[:, None, :]
    zero = torch.zeros((), dtype=t4.dtype, device=t4.device)
    return torch.where(first | ~pick[:, :, None], gg[:, None, :], zero), grad_p


def _grads_given_fused(fused: Tensor, pick: Tensor, pc: Tensor, g: Tensor, z: Any) -> tuple[Tensor, Tensor]:
    """(p·g for pick bags and p·g/z for mix bags, grad_p = sum over the pixels (dim 1) of g·fused)."""
    acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    return g * torch.where(pick, pc, pc / z), (g.to(acc) * fused.to(acc)).sum(1)


def _unrolled_backward(rows: tuple[Tensor, ...], pick: Tensor, pc: Tensor, g: Tensor, zeta: int,
                       dim: int) -> tuple[Tensor, Tensor]:
    """The backward of the fused step from the ``zeta`` rows of every subset (each the output's shape):
    every step pointwise.  The input gradient stacks the rows' gradients at ``dim``."""
    mx, sm = _rows_max_sum(rows, rows[0].dtype)
    gg, grad_p = _grads_given_fused(torch.where(pick, mx, sm / zeta), pick, pc, g, zeta)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    mix = ~pick
    free = mx == mx  # where the arg-max row is still to be found (all True; mix bags take gg anyway)
    grads = []
    for r in rows:
        hit = free & (r == mx)
        grads.append(torch.where(hit | mix, gg, zero))
        free = free & ~hit
    return torch.stack(grads, dim), grad_p


def _fused_interleaved(t3: Tensor, p: Tensor, tau: float, zeta: int) -> Tensor:
    """:func:`_fused_even` for channels-innermost memory (channels-last NCHW, N×L×C tokens): t3 (N, S, C)
    contiguous, p (N, G) -> (N, S, G).  ``zeta`` is a Python int, so that the compiled kernel knows the
    size of the innermost reduction (symbolic, it ran 3x slower)."""
    n, s, c = t3.shape
    t4 = t3.view(n, s, c // zeta, zeta)
    pc = p.to(t3.dtype)[:, None, :]
    return torch.where((p < tau)[:, None, :], t4.amax(3) * pc, t4.sum(3) * (pc / zeta))


def _fused_interleaved_backward(t3: Tensor, p: Tensor, g3: Tensor, tau: float,
                                zeta: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`_fused_interleaved` (g3 (N, S, G)), unrolled over the ``zeta`` rows:
    (N, S, G, zeta) and (N, G)."""
    n, s, c = t3.shape
    rows = t3.view(n, s, c // zeta, zeta).unbind(3)
    return _unrolled_backward(rows, (p < tau)[:, None, :], p.to(t3.dtype)[:, None, :], g3, zeta, 3)


def _pix_even(t5: Tensor, w: Tensor, tau: float, zeta: int | None = None) -> Tensor:
    """The whole PiX operator for C divisible by zeta, on t5 = x.view(N, G, zeta, S): pooling, φ, sigmoid
    and :func:`_fused_even` (unrolled given ``zeta``), as :func:`pix` computes them (what the compiled
    inference kernel runs)."""
    n, g, z, s = t5.shape
    p = torch.sigmoid(F.linear(t5.sum(3).reshape(n, g * z) * (1.0 / s), w))
    return _fused_even(t5.reshape(n * g, z, s), p.reshape(n * g), tau, zeta)


def _pix_interleaved(t3: Tensor, w: Tensor, tau: float, zeta: int) -> Tensor:
    """:func:`_pix_even` for channels-innermost memory: t3 = x (N, S, C) -> (N, S, G)."""
    p = torch.sigmoid(F.linear(t3.sum(1) * (1.0 / t3.shape[1]), w))
    return _fused_interleaved(t3, p, tau, zeta)
