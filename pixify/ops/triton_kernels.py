"""Triton kernels for the fused pick-or-mix step on CUDA (forward and backward).

The kernels take the canonical (N, C, S) view of the input (see ``ops``) with any strides, so planar
(contiguous NCHW, N×C×L) and channels-innermost memory (channels-last NCHW, N×L×C tokens) are both read
in place, and write outputs in the layout the caller allocated.  One program reduces a tile of
``BLOCK_G`` subsets × ``BLOCK_S`` positions of one sample: it reads each input element once, keeps the
max, its first arg-max and the sum in fp32 registers, and writes the (N, G, S) output (forward) or the
input gradient and per-tile partial sums of the ``p`` gradient (backward; summed on the host, so the
result does not depend on the order the tiles ran in).  Any C is handled: the last subset may be short.
For channels-innermost memory there is a second kernel, :func:`_pix_kernel_ci`, that loads whole runs of
contiguous channels; the setting ``triton_channels_inner`` (env ``PIXIFY_TRITON_CHANNELS_INNER``, :mod:`pixify.config`) chooses between them.

``ops`` calls :func:`forward` / :func:`backward` for CUDA tensors when :func:`available` is true.  With
``TRITON_INTERPRET=1`` set before triton is imported, the same kernel runs on CPU tensors in Triton's
interpreter: the tests check it that way on machines without a GPU (``tests/test_triton.py``).

NaN handling follows ``torch.max``: a NaN in a pick subset is its maximum (the first NaN is the arg-max);
a NaN in a mix subset makes its mean NaN.
"""

import contextlib
from typing import Any

import torch
from torch import Tensor

from ..config import PRIVATE_TORCH_OK, SETTINGS

try:  # triton ships with CUDA builds of torch on Linux; without it CUDA uses the generic kernels
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

# kernel annotations are evaluated (no ``from __future__ import annotations``): Triton and its interpreter
# recognise compile-time constants by the tl.constexpr annotation itself
constexpr = tl.constexpr if tl is not None else int

__all__ = ["available", "backward", "forward", "forward_phi"]

# dtypes the kernels read and write (reductions in fp32); others use ops' generic kernels
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# the kernels unroll their loop over a subset's zeta channels; larger zeta uses ops' generic kernels
MAX_ZETA = 64


def available(x: Tensor, zeta: int) -> bool:
    """Whether the Triton kernels take this tensor: CUDA, a supported dtype, zeta <= MAX_ZETA, Triton."""
    return triton is not None and x.is_cuda and x.dtype in DTYPES and zeta <= MAX_ZETA


def _p_of(p_ptr, z_ptr, w_ptr, n, gi, gmask, C, G, BLOCK_G: constexpr, BLOCK_C: constexpr, C_STEPS: constexpr,
          PHI: constexpr):
    """p (BLOCK_G,) in fp32 for the subsets gi of sample n: loaded from p (N, G), or with PHI computed here as
    sigmoid(φ · z) from the pooled context z (N, C, fp32) and φ (G, C, contiguous), accumulated in fp32 over
    C_STEPS steps of BLOCK_C channels (a constant trip count: Triton 3.6's interpreter cannot range() over
    a runtime int)."""
    if PHI:
        q = tl.zeros((BLOCK_G,), tl.float32)
        for step in range(C_STEPS):
            cc = step * BLOCK_C + tl.arange(0, BLOCK_C)
            cm = cc < C
            zc = tl.load(z_ptr + n * C + cc, mask=cm, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + gi[:, None] * C + cc[None, :], mask=gmask[:, None] & cm[None, :], other=0.0)
            q += tl.sum(wv.to(tl.float32) * zc[None, :], axis=1)
        p = 1.0 / (1.0 + tl.exp(-q))
    else:
        p = tl.load(p_ptr + n * G + gi, mask=gmask, other=1.0).to(tl.float32)
    return p


def _pix_kernel(x_ptr, p_ptr, z_ptr, w_ptr, g_ptr, o_ptr, gp_ptr, C, G, S, sxn, sxc, sxs, sgn, sgg, sgs,
                son, soc, sos, tau, ZETA: constexpr, BLOCK_G: constexpr, BLOCK_S: constexpr,
                BLOCK_C: constexpr, C_STEPS: constexpr, PHI: constexpr, BACKWARD: constexpr):
    """Forward: o (N, G, S) = the output.  Backward: o (N, C, S) = the input gradient for g (N, G, S),
    and gp (N, G, programs along S) = per-tile partial sums of the p gradient.  p comes from p (N, G), or
    with PHI (forward only) computed from the pooled context z and φ (:func:`_p_of`)."""
    n = tl.program_id(2).to(tl.int64)  # 64-bit offsets: a batch may hold more than 2**31 elements
    sb = tl.program_id(0)
    gi = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    si = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    gmask = gi < G
    mask = gmask[:, None] & (si < S)[None, :]
    size_i = tl.maximum(tl.minimum(C - gi * ZETA, ZETA), 1)  # >= 1 also in masked lanes
    size = size_i.to(tl.float32)
    # one read of every input element: max, first arg-max and sum of each subset, in fp32
    xb = x_ptr + n * sxn + (gi * ZETA)[:, None] * sxc + si[None, :] * sxs
    mx = tl.full((BLOCK_G, BLOCK_S), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_G, BLOCK_S), tl.int32)
    acc = tl.zeros((BLOCK_G, BLOCK_S), tl.float32)
    for j in tl.static_range(ZETA):
        m = mask & (size_i > j)[:, None]
        v = tl.load(xb + j * sxc, mask=m, other=float("-inf")).to(tl.float32)
        # strictly greater keeps the first arg-max; a NaN wins once and then stays (as torch.max)
        better = (v > mx) | ((v != v) & (mx == mx))
        mx = tl.where(better, v, mx)
        arg = tl.where(better, j, arg)
        acc += tl.where(m, v, 0.0)
    p = _p_of(p_ptr, z_ptr, w_ptr, n, gi, gmask, C, G, BLOCK_G, BLOCK_C, C_STEPS, PHI)
    pick = p < tau
    coef = tl.where(pick, p, p / size)
    if BACKWARD:
        g = tl.load(g_ptr + n * sgn + gi[:, None] * sgg + si[None, :] * sgs, mask=mask, other=0.0)
        g = g.to(tl.float32)
        # the p gradient: sum over positions of g * fused (the max for pick, the mean for mix)
        fused = tl.where(mask, tl.where(pick[:, None], mx, acc / size[:, None]), 0.0)  # no -inf outside
        part = tl.sum(g * fused, axis=1)
        tl.store(gp_ptr + (n * G + gi) * tl.num_programs(0) + sb, part, mask=gmask)
        # the input gradient: p*g to the first arg-max (pick), p*g/|subset| to every member (mix)
        gc = g * coef[:, None]
        ob = o_ptr + n * son + (gi * ZETA)[:, None] * soc + si[None, :] * sos
        for j in tl.static_range(ZETA):
            val = tl.where(pick[:, None] & (arg != j), 0.0, gc)
            tl.store(ob + j * soc, val.to(o_ptr.dtype.element_ty), mask=mask & (size_i > j)[:, None])
    else:
        y = tl.where(pick[:, None], mx, acc) * coef[:, None]
        ob = o_ptr + n * son + gi[:, None] * soc + si[None, :] * sos
        tl.store(ob, y.to(o_ptr.dtype.element_ty), mask=mask)


def _pix_kernel_ci(x_ptr, p_ptr, z_ptr, w_ptr, g_ptr, o_ptr, gp_ptr, C, G, S, sxn, sxc, sxs, sgn, sgg, sgs,
                   son, soc, sos, tau, ZETA: constexpr, ZP: constexpr, BLOCK_G: constexpr, BLOCK_S: constexpr,
                   BLOCK_C: constexpr, C_STEPS: constexpr, PHI: constexpr, BACKWARD: constexpr):
    """:func:`_pix_kernel` for channels-innermost memory: one (BLOCK_S, BLOCK_G, ZP) load whose last two axes
    are BLOCK_G consecutive subsets of ZETA contiguous channels (ZP: ZETA rounded up to a power of two), so
    the loads are contiguous along the channels, instead of ZETA loads of stride ZETA."""
    n = tl.program_id(2).to(tl.int64)  # 64-bit offsets: a batch may hold more than 2**31 elements
    sb = tl.program_id(0)
    gi = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    si = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    jj = tl.arange(0, ZP)
    gmask = gi < G
    mask = (si < S)[:, None] & gmask[None, :]  # (S, G)
    size_i = tl.maximum(tl.minimum(C - gi * ZETA, ZETA), 1)
    size = size_i.to(tl.float32)
    m3 = mask[:, :, None] & (jj[None, None, :] < size_i[None, :, None])
    ch = gi[None, :, None] * ZETA + jj[None, None, :]
    v = tl.load(x_ptr + n * sxn + si[:, None, None] * sxs + ch * sxc, mask=m3, other=float("-inf"))
    v = v.to(tl.float32)
    # max, first arg-max (the first NaN if any, as torch.max) and sum over the last axis
    isnan = v != v
    anynan = tl.max(isnan.to(tl.int32), axis=2) > 0
    mx = tl.max(tl.where(isnan, float("-inf"), v), axis=2)
    mx = tl.where(anynan, float("nan"), mx)
    cand = tl.where(anynan[:, :, None], isnan, v == mx[:, :, None])
    arg = tl.min(tl.where(cand, jj[None, None, :], ZP), axis=2)
    acc = tl.sum(tl.where(m3, v, 0.0), axis=2)
    p = _p_of(p_ptr, z_ptr, w_ptr, n, gi, gmask, C, G, BLOCK_G, BLOCK_C, C_STEPS, PHI)
    pick = p < tau
    coef = tl.where(pick, p, p / size)
    if BACKWARD:
        g = tl.load(g_ptr + n * sgn + gi[None, :] * sgg + si[:, None] * sgs, mask=mask, other=0.0)
        g = g.to(tl.float32)
        fused = tl.where(mask, tl.where(pick[None, :], mx, acc / size[None, :]), 0.0)
        part = tl.sum(g * fused, axis=0)
        tl.store(gp_ptr + (n * G + gi) * tl.num_programs(0) + sb, part, mask=gmask)
        gc = g * coef[None, :]
        keep = (~pick[None, :, None]) | (jj[None, None, :] == arg[:, :, None])
        val = tl.where(keep, gc[:, :, None], 0.0)
        tl.store(o_ptr + n * son + si[:, None, None] * sos + ch * soc, val.to(o_ptr.dtype.element_ty), mask=m3)
    else:
        y = tl.where(pick[None, :], mx, acc) * coef[None, :]
        ob = o_ptr + n * son + gi[None, :] * soc + si[:, None] * sos
        tl.store(ob, y.to(o_ptr.dtype.element_ty), mask=mask)


# With TRITON_INTERPRET=1 in the environment (before triton is imported), triton.jit gives the interpreted
# kernel, which runs on CPU tensors: the tests check the kernels that way on machines without a GPU.
_p_of = triton.jit(_p_of) if triton is not None else None  # the kernels call it by this global name
_KERNEL = triton.jit(_pix_kernel) if triton is not None else None
_KERNEL_CI = triton.jit(_pix_kernel_ci) if triton is not None else None

# Which kernel takes channels-innermost memory: "loop" (_pix_kernel, measured on an H200: about 1.1 TB/s
# at 64x256x56x56 fp16, a third of the planar case) or "tile" (_pix_kernel_ci: contiguous loads, proven
# equal in the tests but not yet timed on a GPU; examples/gpu_kernels.py times both): the setting
# triton_channels_inner (pixify.config).


def _config(t: Tensor, zeta: int, g: int) -> tuple[Any, dict[str, int], tuple[int, int, int]]:
    """(kernel, its tile constants, grid) for t (N, C, S) in its memory layout."""
    n, _, s = t.shape
    if t.stride(1) == 1 and s > 1:  # channels innermost
        if SETTINGS.triton_channels_inner == "tile":
            zp = triton.next_power_of_2(zeta)
            bg = max(1, min(triton.next_power_of_2(g), 256 // zp))  # up to 256 contiguous channels
            bs = max(1, min(triton.next_power_of_2(s), 4096 // (bg * zp)))
            grid = (triton.cdiv(s, bs), triton.cdiv(g, bg), n)
            return _KERNEL_CI, {"ZETA": zeta, "ZP": zp, "BLOCK_G": bg, "BLOCK_S": bs}, grid
        bg = min(triton.next_power_of_2(g), 64)  # long along the groups
        bs = min(max(2048 // bg, 1), triton.next_power_of_2(s))
    else:  # planar: long along the positions, about 2048 outputs per program
        bs = min(triton.next_power_of_2(s), 256)
        bg = min(max(2048 // bs, 1), triton.next_power_of_2(g))
    return _KERNEL, {"ZETA": zeta, "BLOCK_G": bg, "BLOCK_S": bs}, (triton.cdiv(s, bs), triton.cdiv(g, bg), n)


def _block_c(c: int, bg: int) -> int:
    """Channels per step of the φ loop (:func:`_p_of`): up to 4096 φ elements per step (BLOCK_G × BLOCK_C)."""
    return max(16, min(triton.next_power_of_2(c), 4096 // bg))


# Launch cache: the compiled kernel's own runner for each exact argument signature.  Triton's JIT launch
# (kernel[grid](...)) works out the kernel's specialisation from every argument on every call; measured on an
# H200's host (two runs) at 21-30 µs a call against 9-14 µs for the compiled kernel's runner, where the whole
# 1×1 convolution that PiX replaces costs 14-23 µs.  A specialisation depends only on the argument dtypes,
# the integer values and whether each pointer is 16-byte aligned, so a key made of exactly those (plus the
# kernel, its constants, the grid and the device) finds a kernel compiled for the same specialisation.
_RUNNERS: dict[tuple, Any] = {}
_RUNNERS_MAX = 4096
# False after a triton whose compiled kernel has no runner, or with a torch (and so a triton) release the
# runners were not tested with: JIT launches only
_USE_RUNNERS = PRIVATE_TORCH_OK


def _launch(kernel: Any, grid: tuple[int, int, int], ptrs: list[Tensor], scalars: list[Any], meta: dict[str, Any],
            t: Tensor) -> None:
    """kernel[grid](*ptrs, *scalars, **meta), through the launch cache on CUDA."""
    global _USE_RUNNERS
    with _on(t):
        if not (t.is_cuda and _USE_RUNNERS):  # CPU tensors: the interpreter (tests), no compiled kernel
            kernel[grid](*ptrs, *scalars, **meta)
            return
        key = (id(kernel), grid, t.device.index, *meta.values(), *scalars,
               *[(a.dtype, a.data_ptr() % 16 == 0) for a in ptrs])
        found = _RUNNERS.get(key)
        if found is not None:
            runner, consts = found
            runner(*ptrs, *scalars, *consts)
            return
        compiled = kernel[grid](*ptrs, *scalars, **meta)
        try:  # the runner takes every parameter in order, the constants included
            consts = [meta[name] for name in kernel.arg_names[len(ptrs) + len(scalars):]]
            runner = compiled[grid]
        except Exception:  # pragma: no cover - another triton API: keep the JIT launch
            _USE_RUNNERS = False
            return
        if len(_RUNNERS) >= _RUNNERS_MAX:
            _RUNNERS.clear()
        _RUNNERS[key] = (runner, consts)


def _on(t: Tensor) -> Any:
    """Triton launches on the current CUDA device: make it t's (CPU tensors: the interpreter in tests)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def forward(t: Tensor, p: Tensor, zeta: int, tau: float, out: Tensor) -> Tensor:
    """out (N, G, S) = pick-or-mix of t (N, C, S) given p (N, G); any strides; returns out."""
    n, c, s = t.shape
    g = p.shape[1]
    if n == 0 or s == 0 or g == 0:
        return out
    p = p.contiguous()
    kernel, meta, grid = _config(t, zeta, g)
    _launch(kernel, grid, [t, p, t, t, t, out, out], [c, g, s, *t.stride(), 0, 0, 0, *out.stride(), float(tau)],
            {**meta, "BLOCK_C": 16, "C_STEPS": 1, "PHI": False, "BACKWARD": False}, t)
    return out


def forward_phi(t: Tensor, z: Tensor, w: Tensor, zeta: int, tau: float, out: Tensor) -> Tensor:
    """out (N, G, S) = pick-or-mix of t (N, C, S) with p = sigmoid(z @ w.T) computed in the kernel, from the
    pooled context z (N, C) and φ w (G, C), in fp32: the whole PiX operator for inference after the pooling,
    in one launch.  Returns out."""
    n, c, s = t.shape
    g = w.shape[0]
    if n == 0 or s == 0 or g == 0:
        return out
    z = z.float().contiguous()
    w = w.contiguous()
    kernel, meta, grid = _config(t, zeta, g)
    bc = _block_c(c, meta["BLOCK_G"])
    _launch(kernel, grid, [t, t, z, w, t, out, out], [c, g, s, *t.stride(), 0, 0, 0, *out.stride(), float(tau)],
            {**meta, "BLOCK_C": bc, "C_STEPS": triton.cdiv(c, bc), "PHI": True, "BACKWARD": False}, t)
    return out


def backward(grad: Tensor, t: Tensor, p: Tensor, zeta: int, tau: float, grad_t: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_t (N, C, S) filled in place, grad_p (N, G) fp32) for the gradient ``grad`` (N, G, S)."""
    n, c, s = t.shape
    g = p.shape[1]
    if n == 0 or s == 0 or g == 0:
        return grad_t.zero_(), torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    p = p.contiguous()
    kernel, meta, grid = _config(t, zeta, g)
    parts = torch.empty((n, g, grid[0]), dtype=torch.float32, device=t.device)
    _launch(kernel, grid, [t, p, t, t, grad, grad_t, parts],
            [c, g, s, *t.stride(), *grad.stride(), *grad_t.stride(), float(tau)],
            {**meta, "BLOCK_C": 16, "C_STEPS": 1, "PHI": False, "BACKWARD": True}, t)
    return grad_t, parts.sum(2)
