"""The Pick-or-Mix (PiX) operator.

Input ``x`` has a batch dimension 0 and a channel dimension ``channel_dim`` of size ``C``; every other
dimension is "spatial" (``H×W`` for NCHW, ``L`` for ``N×L×C`` tokens).  With a sampling factor ``zeta``
there are ``G = ceil(C / zeta)`` contiguous channel subsets ``[i*zeta, min(i*zeta + zeta, C))``.

``pix``:  ``z = mean of x over the spatial dims`` (N×C), ``p = sigmoid(z @ weight.T)`` (N×G), then the
fused *pick-or-mix* step: per sample ``n`` and subset ``i``

* ``p[n, i] <  tau``: pick -- ``y = p · max over the subset``
* ``p[n, i] >= tau``: mix  -- ``y = p · mean over the subset`` (the true subset size, also for a short
  last subset)

Gradients are exact for the branch taken: pick sends ``p·g`` to the first arg-max channel, mix sends
``p·g/|subset|`` to every member, ``p`` receives ``sum over pixels of g·fused``; nothing flows through the
threshold.

Implementation layout
---------------------
* ``pixify::pick_or_mix`` and ``pixify::pick_or_mix_backward`` are ``torch.library`` custom ops (fake
  kernels for compile/export, autograd registered), so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` see one opaque node; for ``torch.fx.symbolic_trace`` :func:`pix` and
  :func:`pick_or_mix` are leaf functions (one ``call_function`` node).  Exception: ``torch.compile`` of
  inference traces the reference formulation instead, for inductor to generate and fuse (setting ``compiled_pix``).
* Inference without autograd calls the kernels directly (no custom-op dispatch) when nothing watches
  the dispatcher (see ``_direct_ok``).
* Their kernels pick the fastest exact path at run time:

  - CPU, contiguous NCHW / N×C×L, C divisible by zeta, at least ``_COMPILED_MIN_NUMEL`` elements: a
    kernel that inductor generates from :func:`_fused_even` / :func:`_fused_even_backward` (a
    vectorised C++/OpenMP loop that reads the input once), compiled ahead of time on first use with
    symbolic sizes (``torch._inductor.standalone_compile``; cached on disk by torch, shared by all
    shapes) and called without dynamo's per-call guards.  For fp32 inference :func:`pix` runs the whole
    operator (pooling, φ, sigmoid, fused step) as one such kernel call (``_compiled_pix``).
    ``PIXIFY_COMPILED_KERNELS=0`` or :func:`eager_kernels` turns them off; if they cannot be built (no
    C++ compiler) the eager kernels below run, after one warning.
  - CPU, channels innermost (channels-last NCHW, N×L×C tokens), C divisible by zeta <= 16: the same
    for :func:`_fused_interleaved` / :func:`_fused_interleaved_backward` / :func:`_pix_interleaved`, one
    build per zeta.  Inductor does not vectorise their stride-zeta loads: the forward takes about 4
    passes (8x256x56x56, zeta 4), the backward about 13 (still faster than the eager kernel below).  So
    in fp32 with zeta 2, 4, 8 or 16 hand-vectorised C++ kernels run instead (:mod:`pixify.cpu_kernels`,
    built with inductor's toolchain: the forward about one pass, the backward about four), and fp32
    inference pools with ATen, applies φ and runs the forward one.
    Under ``torch.compile`` the forward op is ``flexible_layout``, so it takes the channels-last
    activations that inductor's layout optimisation makes without a copy back to NCHW.

  - CPU, "planar" memory (contiguous NCHW / N×C×L) and at least ``_FAST_MIN_NUMEL`` elements, eager:
    with C divisible by zeta, one reduction over ``x.view(N*G, zeta, S)`` for all-mix/all-pick batches
    and a second, partial one for mixed batches (``_planar_forward_even``); otherwise every
    (sample, subset) is a block of contiguous channel rows of the table ``x.view(N*C, H*W)``.  The mix
    blocks are reduced by ``embedding_bag`` (weighted sum, ``p/|subset|`` folded into the weights), the
    pick blocks by a CSR sparse × dense product under the ``amax`` reduction (``p`` folded into the
    sparse values; ``max(p·x) == p·max(x)`` exactly for p >= 0).  Each reads only its own rows, so the
    input is read once in total, nothing input-sized is gathered, and no select is built at all.  The
    backward uses the first arg-max positions that the same sparse kernel records.
  - CPU, "interleaved" memory (channels_last NCHW, N×L×C tokens): channels are innermost; the group max
    comes from ``max_pool1d``, the group sum from a small block-diagonal matmul, then an output-sized
    select (reads the input twice).
  - CUDA (fp32, fp16, bf16; any layout, any C) with Triton installed: one Triton kernel
    (:mod:`pixify.triton_kernels`) for the forward and one for the backward, each reading the input once.
  - anything else (other dtypes, CUDA without Triton, small CPU tensors): the generic formulation -- two
    grouped reductions and an output-sized select (never a select over the full-size input); backward
    with ``torch.max`` indices.
* :func:`pick_or_mix_reference` is plain differentiable PyTorch used for ONNX export and equality tests;
  :func:`reference_mode` makes :func:`pick_or_mix` / :func:`pix` use it.  ``torch.onnx.export``
  (dynamo) needs it (or :func:`pix_decompositions` applied to an ExportedProgram): the exporter has no
  translation for the custom op.
* Double backward (``create_graph=True`` through PiX) is not supported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels, triton_kernels
from .config import PRIVATE_TORCH_OK, SETTINGS, _entered, override
from .errors import PixifyError

__all__ = [
    "PiX",
    "PixArgumentError",
    "compiled_kernels_enabled",
    "eager_kernels",
    "pick_or_mix",
    "pick_or_mix_reference",
    "pix",
    "pix_decompositions",
    "pix_flop_formulas",
    "pix_groups",
    "reference_mode",
]


# ----------------------------------------------------------------------------------------------------
# argument checking


class PixArgumentError(PixifyError, ValueError):
    """A bad PiX argument (zeta, tau, channels, channel_dim); a ``ValueError`` and a ``PixifyError``."""


def _check_zeta(zeta: Any) -> int:
    if type(zeta) is int and zeta >= 1:  # the common case first: these run on every call
        return zeta
    if isinstance(zeta, bool) or not isinstance(zeta, numbers.Integral):
        raise PixArgumentError(f"zeta must be an integer >= 1, got {zeta!r}")
    if zeta < 1:
        raise PixArgumentError(f"zeta must be an integer >= 1, got {zeta!r}")
    return int(zeta)


def _check_tau(tau: Any) -> float:
    if type(tau) is float and 0.0 < tau < 1.0:
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise PixArgumentError(f"tau must be a number strictly between 0 and 1, got {tau!r}")
    tau = float(tau)
    if not (0.0 < tau < 1.0):  # also rejects nan
        raise PixArgumentError(f"tau must be a number strictly between 0 and 1, got {tau!r}")
    return tau


def _check_channels(channels: Any) -> int:
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise PixArgumentError(f"channels must be an integer >= 1, got {channels!r}")
    return int(channels)


def _check_channel_dim(channel_dim: Any) -> int:
    if type(channel_dim) is int and channel_dim != 0:
        return channel_dim
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral) or channel_dim == 0:
        raise PixArgumentError(
            f"channel_dim must be a non-zero integer (dimension 0 is the batch), got {channel_dim!r}"
        )
    return int(channel_dim)


def pix_groups(channels: int, zeta: int) -> int:
    """Number of PiX output channels ``G = ceil(channels / zeta)``."""
    channels = _check_channels(channels)
    zeta = _check_zeta(zeta)
    return -(-channels // zeta)


def _norm_dim(channel_dim: int, ndim: int) -> int:
    cd = channel_dim + ndim if channel_dim < 0 else channel_dim
    if ndim < 2 or not (1 <= cd < ndim):
        raise PixArgumentError(
            f"channel_dim={channel_dim} is not a non-batch dimension of a {ndim}-d input "
            "(PiX needs at least a batch and a channel dimension)"
        )
    return cd


def _check_p(x: Tensor, p: Tensor, zeta: int, cd: int) -> None:
    n, c = x.shape[0], x.shape[cd]
    g = -(-c // zeta)
    if p.dim() != 2 or p.shape[0] != n or p.shape[1] != g:
        raise PixArgumentError(
            f"p must have shape (N, G) = ({n}, {g}) for an input with {c} channels and zeta={zeta}, "
            f"got {tuple(p.shape)}"
        )


# ----------------------------------------------------------------------------------------------------
# reference mode / path switches

# Below this many input elements the generic code is used on CPU too (the index bookkeeping of the
# fast kernels costs more than it saves there; measured crossover ~0.4-0.8 M elements on 2 cores).
_FAST_MIN_NUMEL = 1 << 19
# The generic backward needs torch.max indices, which are slow on CPU: the fast backward kernels pay
# off much earlier than the forward ones.
_FAST_MIN_NUMEL_BWD = 1 << 15
# Planar forward: from this fraction of picking (sample, subset) pairs on, the sparse amax kernel
# writes the whole output and the mix sums are put into it (else the other way round).
_PLANAR_PICK_BASE = 0.4
# Planar forward with C divisible by zeta: up to this picking fraction the pick blocks are gathered
# and reduced on their own (≈ 1 + 3f input reads); above it amax runs everywhere and the mix blocks are
# summed again by embedding_bag (2 - f reads).
_EVEN_GATHER_PICK_MAX = 0.25
# Planar forward, C divisible by zeta: from this many input elements on, the compiled kernel is used
# (see _compiled_even); below, its call overhead is not worth it.
_COMPILED_MIN_NUMEL = 1 << 16
# Generic code on CPU: outputs at least this large use the min/max select instead of torch.where.
_CPU_SELECT_MIN_NUMEL = 1 << 16


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


# ----------------------------------------------------------------------------------------------------
# reference path (plain differentiable PyTorch; exportable)


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


# ----------------------------------------------------------------------------------------------------
# memory layouts
#
# Kernels work on a canonical 3-d view t = (N, C, S) of the input (S = product of the spatial dims):
#   planar:      t is contiguous                      (contiguous NCHW, N×C×L)
#   interleaved: t.transpose(1, 2) is contiguous      (channels_last NCHW, N×L×C, N×H×W×C)
#   anything else is copied to planar first.
# Outputs and input gradients are produced dense in the same layout, so a channels_last network stays
# channels_last.  The fake kernels use the same rule, so real and fake strides agree.

_PLANAR, _INTERLEAVED = 0, 1


def _moved(x: Tensor, cd: int, to: int) -> Tensor:
    return x if cd == to else x.movedim(cd, to)


def _layout_of(x: Tensor, cd: int) -> int:
    dense = _dense_canon(x, cd)
    return _PLANAR if dense is None else dense[1]  # neither: planar after a copy


def _spatial_numel(shape: Any, cd: int) -> Any:
    s = 1
    for d in range(1, len(shape)):
        if d != cd:
            s = s * shape[d]
    return s


def _dense_canon(x: Tensor, cd: int) -> tuple[Tensor, int] | None:
    """(N, C, S) view of x (planar: contiguous; interleaved: transposed-contiguous) and its layout, or
    None for an input that is neither."""
    n, c = x.shape[0], x.shape[cd]
    s = _spatial_numel(x.shape, cd)
    xm = _moved(x, cd, 1)
    if xm.is_contiguous():
        return xm.view(n, c, s), _PLANAR
    xl = _moved(x, cd, x.dim() - 1)
    if xl.is_contiguous():
        return xl.view(n, s, c).transpose(1, 2), _INTERLEAVED
    return None


def _canon(x: Tensor, cd: int) -> tuple[Tensor, int]:
    """:func:`_dense_canon`, copying an input that is neither layout to planar."""
    dense = _dense_canon(x, cd)
    if dense is None:
        n, c, s = x.shape[0], x.shape[cd], _spatial_numel(x.shape, cd)
        return _moved(x, cd, 1).contiguous().view(n, c, s), _PLANAR
    return dense


def _uncanon(t3: Tensor, shape: Any, cd: int, layout: int) -> Tensor:
    """Inverse of :func:`_canon` for an (N, K, S) tensor dense in ``layout``: x's dimension order."""
    nd = len(shape)
    k = t3.shape[1]
    sp = [shape[d] for d in range(1, nd) if d != cd]
    if layout == _INTERLEAVED:
        return _moved(t3.transpose(1, 2).view(shape[0], *sp, k), nd - 1, cd)
    return _moved(t3.view(shape[0], k, *sp), 1, cd)


def _empty_canon(ref: Tensor, n: Any, k: Any, s: Any, layout: int) -> Tensor:
    if layout == _INTERLEAVED:
        return ref.new_empty((n, s, k)).transpose(1, 2)
    return ref.new_empty((n, k, s))


def _as_layout(t3: Tensor, layout: int) -> Tensor:
    """Make an (N, K, S) tensor dense in the given canonical layout (no copy when it already is)."""
    if layout == _INTERLEAVED:
        return t3.transpose(1, 2).contiguous().transpose(1, 2)
    return t3.contiguous()


def _group_sizes(c: int, zeta: int, device: torch.device) -> Tensor:
    g = -(-c // zeta)
    sizes = torch.full((g,), zeta, dtype=torch.int64, device=device)
    if c % zeta:
        sizes[-1] = c % zeta
    return sizes


def _coef(p: Tensor, pick: Tensor, c: int, zeta: int, dtype: torch.dtype) -> Tensor:
    """(N, G) multiplier of the raw reduction: p for pick (max), p/|subset| for mix (sum)."""
    pc = p.to(dtype)
    r = c % zeta
    if r == 0:
        return torch.where(pick, pc, pc * (1.0 / zeta))
    inv = torch.full((p.shape[1],), 1.0 / zeta, dtype=dtype, device=p.device)
    inv[-1] = 1.0 / r
    return torch.where(pick, pc, pc * inv)


# ----------------------------------------------------------------------------------------------------
# generic kernels (any device, any dtype): two grouped reductions + an output-sized select


def _grouped(t: Tensor, zeta: int) -> tuple[list[Tensor], list[int]]:
    """Split (N, C, S) into (N, g, size, S) blocks of equal subset size (the main part, the tail)."""
    c = t.shape[1]
    gf, r = divmod(c, zeta)
    parts, sizes = [], []
    if gf:
        parts.append(t[:, : gf * zeta].unflatten(1, (gf, zeta)) if r else t.unflatten(1, (gf, zeta)))
        sizes.append(zeta)
    if r:
        parts.append(t[:, gf * zeta :].unsqueeze(1))
        sizes.append(r)
    return parts, sizes


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


# ----------------------------------------------------------------------------------------------------
# CPU fast kernels


_FAST_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _use_fast(x: Tensor, min_numel: int | None = None) -> bool:
    return (
        SETTINGS.fast_cpu
        and PRIVATE_TORCH_OK  # the planar kernels reduce with aten._sparse_mm_reduce_impl
        and x.device.type == "cpu"
        and x.dtype in _FAST_DTYPES
        and x.numel() >= (_FAST_MIN_NUMEL if min_numel is None else min_numel)
        and not x.is_quantized
    )


class _Static:
    """Per (N, C, zeta, device) index tables of the planar kernels (cached; they do not depend on p).

    Bag ``b = n*G + i`` (sample n, subset i) is the set of rows ``n*C + i*zeta + [0, size_i)`` of the
    table ``t.view(N*C, S)``.
    """

    def __init__(self, n: int, c: int, zeta: int, device: torch.device):
        self.n, self.c, self.zeta = n, c, zeta
        self.gf, self.r = divmod(c, zeta)
        self.g = self.gf + (1 if self.r else 0)
        self.nb = n * self.g
        ar = torch.arange(zeta, device=device)
        sizes = _group_sizes(c, zeta, device).repeat(n)  # (NB,)
        self.sizes = sizes
        bags = torch.arange(self.nb, device=device)
        start = (bags // self.g) * c + (bags % self.g) * zeta
        self.bag_rows = start[:, None] + ar  # (NB, zeta), padded past the end of a short tail subset
        self.valid = None if self.r == 0 else ar[None, :] < sizes[:, None]
        self.full_crow = torch.arange(0, self.nb * zeta + 1, zeta, device=device)
        # int32 CSR indices make the sparse amax kernel markedly faster
        self.idx32 = n * c < 2**31 - 1
        self.bag_rows32 = self.bag_rows.to(torch.int32) if self.idx32 else self.bag_rows
        self.full_crow32 = self.full_crow.to(torch.int32) if self.idx32 else self.full_crow
        self._inv: dict[torch.dtype, Tensor] = {}

    def inv_sizes(self, dtype: torch.dtype) -> Tensor:
        inv = self._inv.get(dtype)
        if inv is None:
            inv = self._inv[dtype] = (1.0 / self.sizes.to(torch.float64)).to(dtype)
        return inv


_STATIC_CACHE: dict[tuple, _Static] = {}


def _static(n: int, c: int, zeta: int, device: torch.device) -> _Static:
    key = (n, c, zeta, str(device))
    st = _STATIC_CACHE.get(key)
    if st is None:
        if len(_STATIC_CACHE) >= 64:
            _STATIC_CACHE.clear()
        st = _STATIC_CACHE[key] = _Static(n, c, zeta, device)
    return st


_CSR_WARNED = False


def _csr(crow: Tensor, col: Tensor, vals: Tensor, size: tuple[int, int]) -> Tensor:
    global _CSR_WARNED
    if _CSR_WARNED:
        return torch.sparse_csr_tensor(crow, col, vals, size=size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns once that sparse CSR support is "beta"
        out = torch.sparse_csr_tensor(crow, col, vals, size=size, check_invariants=False)
    _CSR_WARNED = True
    return out


class _Plan:
    """Decisions for one call of the planar kernels.

    Mix bags are reduced with ``embedding_bag`` (weighted sum), pick bags with a CSR sparse-dense
    product under the ``amax`` reduction; both read only the rows of their own bags, so the input is
    read once in total and nothing input-sized is gathered or selected.
    """

    def __init__(self, t: Tensor, p: Tensor, zeta: int, tau: float):
        n, c, s = t.shape
        self.t, self.s = t, s
        self.st = st = _static(n, c, zeta, t.device)
        self.nb, self.g = st.nb, st.g
        pf = p.reshape(-1)
        self.pick = pick = pf < tau
        pc = pf.to(t.dtype)
        # multiplier of the fused value: p for pick, p/|subset| for mix (the mean folded in)
        self.coef = torch.where(pick, pc, pc * st.inv_sizes(t.dtype))
        self.pick_ids = pick.nonzero().view(-1)
        self.n_pick = int(self.pick_ids.numel())
        self.n_mix = self.nb - self.n_pick
        self._mix_ids: Tensor | None = None

    @property
    def mix_ids(self) -> Tensor:
        if self._mix_ids is None:
            self._mix_ids = (~self.pick).nonzero().view(-1)
        return self._mix_ids

    @property
    def table(self) -> Tensor:
        return self.t.view(-1, self.s)

    def _rows(self, ids: Tensor, weights: Tensor, int32: bool = False) -> tuple[Tensor, Tensor]:
        """Table rows of the bags ``ids`` (concatenated in bag order) and each row's bag weight."""
        st = self.st
        rows = (st.bag_rows32 if int32 else st.bag_rows).index_select(0, ids)
        w = weights.index_select(0, ids)[:, None].expand(-1, st.zeta)
        if st.valid is None:
            return rows.view(-1), w.reshape(-1)
        valid = st.valid.index_select(0, ids)
        return rows[valid], w[valid]

    def mix_sums(self, weights: Tensor, all_bags: bool) -> Tensor:
        """Weighted sums of the mix bags (weights: (NB,) per bag, t.dtype).

        all_bags: output (NB, S) with zero rows for the pick bags; else compact (M, S) in mix-bag order.
        """
        st, ids = self.st, self.mix_ids
        idx, psw = self._rows(ids, weights)
        if all_bags:
            lengths = st.sizes.masked_fill(self.pick, 0)
            offsets = lengths.cumsum(0).sub_(lengths)
        elif st.r == 0:
            offsets = st.full_crow[: ids.numel()]
        else:
            lengths = st.sizes.index_select(0, ids)
            offsets = lengths.cumsum(0).sub_(lengths)
        return F.embedding_bag(idx, self.table, offsets, mode="sum", per_sample_weights=psw)

    def pick_csr(self, weights: Tensor, all_bags: bool = False) -> tuple[Tensor, Tensor]:
        """CSR matrix selecting the rows of the pick bags, entries = the bag's weight: (P, N*C), or
        with ``all_bags`` (NB, N*C) with empty rows for the mix bags."""
        st, ids = self.st, self.pick_ids
        col, vals = self._rows(ids, weights, int32=st.idx32)
        k = ids.numel()
        if all_bags:
            crow = torch.zeros(self.nb + 1, dtype=col.dtype, device=ids.device)
            torch.cumsum(st.sizes.masked_fill(~self.pick, 0), 0, dtype=col.dtype, out=crow[1:])
            k = self.nb
        elif st.r == 0:
            crow = st.full_crow32[: k + 1]
        else:
            crow = torch.zeros(k + 1, dtype=col.dtype, device=ids.device)
            torch.cumsum(st.sizes.index_select(0, ids), 0, dtype=col.dtype, out=crow[1:])
        return _csr(crow, col, vals, (k, st.n * st.c)), col

    def pick_maxima(self, weights: Tensor, all_bags: bool = False) -> Tensor:
        """weight · max over each pick bag (weights >= 0, so max(w·x) == w·max(x) exactly): (P, S), or
        (NB, S) with zero rows for the mix bags."""
        a, _ = self.pick_csr(weights, all_bags)
        return torch.ops.aten._sparse_mm_reduce_impl(a, self.table, "amax")[0]

    def pick_argmax(self) -> tuple[Tensor, Tensor]:
        """(P, S) maxima of the pick bags and, per pixel, the CSR position of the first arg-max."""
        a, _ = self.pick_csr(torch.ones(self.nb, dtype=self.t.dtype, device=self.t.device))
        with torch.enable_grad():
            # the reduction kernel records arg-max positions (first on ties) only for a dense input that
            # requires grad; the tiny autograd node it creates is dropped with the result
            dense = self.table.detach().requires_grad_(True)
            m, arg = torch.ops.aten._sparse_mm_reduce_impl(a, dense, "amax")
        return m.detach(), arg

    def pick_rows(self, arg: Tensor) -> Tensor:
        """Table rows of the CSR positions ``arg`` (from :meth:`pick_argmax`; consumed)."""
        ids = self.pick_ids
        if self.st.r == 0:
            # position j = k*zeta + member of the k-th pick bag  ->  row ids[k]*zeta + member
            delta = (ids - torch.arange(ids.numel(), device=ids.device)) * self.st.zeta
            return arg.add_(delta[:, None])
        col, _ = self._rows(ids, self.coef)
        return col[arg]

    def put_mix(self, grad: Tensor, ids: Tensor, vals: Tensor) -> None:
        """grad (N*C, S): every member row of bag ids[k] gets vals[k] (K, S)."""
        st = self.st
        if st.r == 0:
            grad.view(self.nb, st.zeta, self.s).index_put_((ids,), vals.unsqueeze(1))
        else:
            rows, src = self._rows(ids, torch.arange(self.nb, device=ids.device))
            # src holds bag ids; map them to positions in ``ids``
            pos = torch.empty(self.nb, dtype=torch.int64, device=ids.device)
            pos[ids] = torch.arange(ids.numel(), device=ids.device)
            grad.index_put_((rows,), vals.index_select(0, pos[src]))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (K, S) tensors, accumulated in at least float32."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.linalg.vecdot(a, b)


def _planar_forward(t: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor:
    """t (N, C, S) contiguous -> (N, G, S) contiguous."""
    if t.shape[1] % zeta == 0:
        return _planar_forward_even(t, p, zeta, tau)
    return _planar_forward_bags(t, p, zeta, tau)


def _planar_forward_even(t: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor:
    """C divisible by zeta: every (sample, subset) is a contiguous (zeta, S) block of ``t.view(N*G, zeta, S)``.

    All-mix and all-pick batches are one reduction over that view (a single read of the input) and a
    scale of the output.  Mixed batches reduce the whole view with the kind that most subsets need and
    redo the others: with ``f`` the picking fraction, the cheaper of ``amax`` everywhere + the mix
    blocks' sums by ``embedding_bag`` (reads ``2 - f`` inputs) and the sums everywhere + ``amax`` of the
    gathered pick blocks (about ``1 + 3f``).
    """
    n, c, s = t.shape
    g = c // zeta
    nb = n * g
    t4 = t.view(nb, zeta, s)
    pf = p.reshape(nb)
    pick = pf < tau
    n_pick = int(pick.sum())
    pc = pf.to(t.dtype)
    if n_pick <= _EVEN_GATHER_PICK_MAX * nb:  # sums everywhere (all-mix: nothing else)
        out = t4.sum(1).mul_((pc * (1.0 / zeta))[:, None])
        if n_pick:
            ids = pick.nonzero().view(-1)
            out.index_copy_(0, ids, t4.index_select(0, ids).amax(1).mul_(pc.index_select(0, ids)[:, None]))
    else:  # amax everywhere (all-pick: nothing else)
        out = t4.amax(1).mul_(pc[:, None])
        if n_pick == nb:
            return out.view(n, g, s)
        ids = (~pick).nonzero().view(-1)
        rows = (ids[:, None] * zeta + torch.arange(zeta, device=t.device)).view(-1)
        w = (pc.index_select(0, ids) * (1.0 / zeta)).repeat_interleave(zeta)
        offsets = torch.arange(0, rows.numel(), zeta, device=t.device)
        out.index_copy_(0, ids, F.embedding_bag(rows, t.view(-1, s), offsets, mode="sum", per_sample_weights=w))
    return out.view(n, g, s)


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


# the planar kernels are unrolled over the rows of a subset (one build per zeta) up to this zeta
_UNROLL_MAX_ZETA = 16

# the generated kernels built so far, by (kind, tau, dtypes); "failed": the ones that could not be built
# here, with the reason (only that kernel is given up: the others are still tried)
_COMPILED: dict[str, Any] = {"kernels": {}, "failed": {}}


def eager_kernels() -> contextlib.AbstractContextManager[None]:
    """Inside, PiX never uses (or compiles) the generated CPU kernel: e.g. for one-off forward passes,
    where its one-time compilation would cost more than it saves.  Nesting is allowed."""
    return _entered("eager_depth")


def compiled_kernels_enabled() -> bool:
    """Whether the generated CPU kernels may be used: not disabled (``PIXIFY_COMPILED_KERNELS=0``,
    :func:`pixify.config.override`), not inside :func:`eager_kernels`.  A kernel that failed to build here
    is skipped on its own (:func:`compiled_kernel_failures`)."""
    return SETTINGS.fast_cpu and SETTINGS.eager_depth == 0 and SETTINGS.compiled_kernels and PRIVATE_TORCH_OK


def compiled_kernel_failures() -> dict[str, str]:
    """The generated kernels that could not be built in this process, by kind, with the reason."""
    return {f"{k[0]} (tau {k[1]}, {', '.join(str(d).replace('torch.', '') for d in k[2:])})": why
            for k, why in _COMPILED["failed"].items()}


def _import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (which inductor needs to build a CPU kernel) with its logger
    silenced: on import, a CUDA build of torch on a machine without a GPU warns "No CUDA runtime is
    found, using CUDA_HOME=...", noise for our users."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(old)


def _build_kernel(kind: str, tau: float, dtypes: tuple[torch.dtype, ...]) -> Callable[..., Any]:
    """Inductor's C++/OpenMP kernel at one tau and input dtypes, for any shape, traced with symbolic sizes
    and compiled ahead of time (``torch._inductor.standalone_compile``).  ``kind``:

    * planar memory (channels outside the pixels): "fwd" :func:`_fused_even`; "bwd"
      :func:`_fused_even_backward`; "pix" :func:`_pix_even` ("pix/1" for batch size 1, which the trace
      specialises); each with a zeta after it ("fwd4", "pix4/1") unrolled over the rows of a subset for
      that zeta, without for any zeta;
    * channels innermost (channels-last NCHW, N×L×C tokens), each built for one zeta and with a batch-1
      build apart, as the batch is a dimension of their inputs: "cl-fwd<zeta>" :func:`_fused_interleaved`,
      "cl-bwd<zeta>" :func:`_fused_interleaved_backward`, "cl-pix<zeta>" :func:`_pix_interleaved`
      ("cl-fwd4/1": zeta 4, batch 1).

    Calling the artifact skips dynamo's per-call frame evaluation and guards, about 0.15 ms per call in a
    network, which dominated PiX at batch 1.  Nothing checks the inputs at call time: the callers pass only
    contiguous tensors with every size >= 2 (the trace assumes sizes other than 0 and 1), except the batch
    size of the batch-1 builds."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _import_cpp_extension_quietly()
    # Example sizes: distinct and >= 2, so that none is specialised or tied to another (duck sizing), and
    # of a network's order, as inductor takes them as size hints when it plans the loops.
    # The batch of a planar "pix" build is 17, above any unrolled zeta, which a dimension of its input is.
    nb, z, s, g = 509, 3, 3137, 167
    base, _, batch = kind.partition("/")
    n = 1 if batch == "1" else 17 if base.startswith("pix") else 2
    # "<kind><zeta>": unrolled for zeta; channels innermost, every kind is built for one zeta
    stem = base.rstrip("0123456789")
    unroll = int(base[len(stem):]) if stem != base else None
    base = stem
    zz = unroll or z
    # impl: no annotations, else make_fx copies them into the traced code as string globals, which
    # inductor's cache cannot key (it then warns with a traceback and does not cache the kernel)
    if base == "pix":
        ex = [torch.zeros(n, g, zz, s, dtype=dtypes[0]), torch.zeros(g, g * zz, dtype=dtypes[1])]

        def impl(t5, w):  # type: ignore[no-untyped-def]
            return _pix_even(t5, w, tau, unroll)
    elif base == "fwd":
        ex = [torch.zeros(nb, zz, s, dtype=dtypes[0]), torch.zeros(nb, dtype=dtypes[1])]

        def impl(t4, p):  # type: ignore[no-untyped-def]
            return _fused_even(t4, p, tau, unroll)
    elif base == "bwd":
        ex = [torch.zeros(nb, zz, s, dtype=dtypes[0]), torch.zeros(nb, dtype=dtypes[1]),
              torch.zeros(nb, s, dtype=dtypes[2])]

        def impl(t4, p, g2):  # type: ignore[no-untyped-def]
            return _fused_even_backward(t4, p, g2, tau, unroll)
    elif base.startswith("cl-") and unroll is None:
        raise ValueError(f"kernel kind {kind!r}: channels-innermost kernels are built for one zeta")
    elif base == "cl-pix":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(g, g * zz, dtype=dtypes[1])]

        def impl(t3, w):  # type: ignore[no-untyped-def]
            return _pix_interleaved(t3, w, tau, unroll)
    elif base == "cl-fwd":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(n, g, dtype=dtypes[1])]

        def impl(t3, p):  # type: ignore[no-untyped-def]
            return _fused_interleaved(t3, p, tau, unroll)
    elif base == "cl-bwd":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(n, g, dtype=dtypes[1]),
              torch.zeros(n, s, g, dtype=dtypes[2])]

        def impl(t3, p, g3):  # type: ignore[no-untyped-def]
            return _fused_interleaved_backward(t3, p, g3, tau, unroll)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    # Built outside inference mode even when first needed inside it: the kernel built under
    # inference_mode ran at half the speed (8x256x56x56: 2.1 against 1.0 ms).
    with torch.inference_mode(False), torch.no_grad():
        ex = [e.clone() for e in ex]
        gm = make_fx(impl, tracing_mode="symbolic")(*ex)
        return torch._inductor.standalone_compile(gm, ex)


def _compiled_even(t4: Tensor, p: Tensor, tau: float, grad: Tensor | None = None) -> Any:
    """:func:`_fused_even` as a generated kernel (inductor writes a vectorised C++/OpenMP loop that reads
    the input once: about one pass, where the eager kernels need 1.5-2.5), built on first use per tau and
    dtype (a few seconds; torch caches the code on disk, so later processes load it in about two) and shared
    by every shape.  None when it does not apply (a size below 2) or is unavailable: the eager kernels run
    instead, and a build failure (no C++ compiler, say) is reported once and not retried.

    With ``grad`` (NB, S): the backward kernel (:func:`_fused_even_backward`), returning (grad_t4, grad_p).
    """
    if not compiled_kernels_enabled() or min(t4.shape) < 2:
        return None
    args = [t4.contiguous(), p.contiguous()] + ([] if grad is None else [grad.contiguous()])
    z = t4.shape[1]
    kind = ("fwd" if grad is None else "bwd") + (str(z) if z <= _UNROLL_MAX_ZETA else "")
    return _run_kernel(kind, tau, args)


def _compiled_cl(t3: Tensor, p: Tensor, zeta: int, tau: float, grad: Tensor | None = None) -> Any:
    """:func:`_compiled_even` for channels-innermost memory: t3 (N, S, C), p (N, G) -> (N, S, G)
    (:func:`_fused_interleaved`), or with ``grad`` (N, S, G) the gradients (N, S, G, zeta) and (N, G).
    Built per zeta (up to ``_UNROLL_MAX_ZETA``) and for batch 1 apart.  In fp32 the hand-vectorised
    kernels run instead where they apply (:mod:`pixify.cpu_kernels`; the input gradient then comes as
    (N, S, C), the same memory)."""
    if not compiled_kernels_enabled() or min(t3.shape[1:]) < 2 or zeta > _UNROLL_MAX_ZETA:
        return None
    if cpu_kernels.available(t3, p.dtype, zeta):
        if grad is None:
            out = cpu_kernels.fused_interleaved(t3, p, zeta, tau)
        else:
            out = cpu_kernels.fused_interleaved_backward(t3, p, grad, zeta, tau)
        if out is not None:
            return out
    args = [t3.contiguous(), p.contiguous()] + ([] if grad is None else [grad.contiguous()])
    kind = ("cl-fwd" if grad is None else "cl-bwd") + str(zeta) + ("/1" if t3.shape[0] == 1 else "")
    return _run_kernel(kind, tau, args)


def _compiled_pix(t: Tensor, w: Tensor, tau: float, zeta: int | None = None) -> Tensor | None:
    """The whole operator as one generated kernel call (inference): pooling, φ, sigmoid and the fused step
    without a Python round trip between them.  w (G, C) of t's dtype; t contiguous, planar
    (N, G, zeta, S) (:func:`_pix_even`, returns (N*G, S)) or, given ``zeta``, channels innermost (N, S, C)
    (:func:`_pix_interleaved`, returns (N, S, G)).  Channels innermost, where the hand-vectorised step
    applies, it is three calls instead: ATen's pooling, φ with its sigmoid, and that step."""
    if not compiled_kernels_enabled() or min(t.shape[1:]) < 2:
        return None
    if zeta is None:
        kind = "pix" + (str(t.shape[2]) if t.shape[2] <= _UNROLL_MAX_ZETA else "")
    elif cpu_kernels.available(t, w.dtype, zeta):  # the pooling (ATen), φ with its sigmoid, the hand step
        with torch.no_grad():
            p = torch.sigmoid(F.linear(t.mean(1), w))
        return _compiled_cl(t, p, zeta, tau)  # which uses the generated step if the hand one fails to build
    elif zeta <= _UNROLL_MAX_ZETA:
        kind = f"cl-pix{zeta}"
    else:
        return None
    return _run_kernel(kind + ("/1" if t.shape[0] == 1 else ""), tau, [t, w.contiguous()])


def _run_kernel(kind: str, tau: float, args: list[Tensor]) -> Any:
    """Run the generated kernel ``kind``, building it on first use.  A build that fails (no C++ compiler,
    say) gives up that kernel alone, says so once, and the eager kernels run instead; an error while a
    built kernel runs is raised as it is."""
    key = (kind, float(tau), *(a.dtype for a in args))
    kernels = _COMPILED["kernels"]
    fn = kernels.get(key)
    if fn is None:
        if key in _COMPILED["failed"]:
            return None
        try:
            fn = kernels[key] = _build_kernel(key[0], key[1], key[2:])
        except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure means "use the eager kernels"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _COMPILED["failed"][key] = reason
            warnings.warn(f"pixify: the compiled PiX CPU kernel {kind} is unavailable here ({reason}); using the "
                          "eager kernels", RuntimeWarning, stacklevel=2)
            return None
    with torch.no_grad():
        return fn(*args)


def _planar_forward_bags(t: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor:
    """Any C (a short last subset): embedding_bag for the mix bags, sparse amax for the pick bags."""
    plan = _Plan(t, p, zeta, tau)
    if plan.n_pick == 0:
        out = plan.mix_sums(plan.coef, all_bags=True)
    elif plan.n_mix == 0:
        out = plan.pick_maxima(plan.coef)
    elif plan.n_pick >= _PLANAR_PICK_BASE * plan.nb:
        # one kernel writes every output row (zeros for the other kind), the other kind is put on top
        # (the sparse kernel writes empty rows more cheaply than embedding_bag; the put costs per row)
        out = plan.pick_maxima(plan.coef, all_bags=True)
        out.index_put_((plan.mix_ids,), plan.mix_sums(plan.coef, all_bags=False))
    else:
        out = plan.mix_sums(plan.coef, all_bags=True)
        out.index_put_((plan.pick_ids,), plan.pick_maxima(plan.coef))
    return out.view(plan.st.n, plan.g, plan.s)


def _planar_backward(g3: Tensor, t: Tensor, p: Tensor, zeta: int, tau: float) -> tuple[Tensor, Tensor]:
    """Returns (grad_t (N, C, S) contiguous, grad_p (N, G)).

    dp: mix bags dot g with their means (embedding_bag), pick bags with their maxima (sparse amax).
    dx: mix bags broadcast p·g/|subset| to their members; pick bags send p·g to the first arg-max,
    whose position the sparse amax kernel records, with one scatter.
    """
    plan = _Plan(t, p, zeta, tau)
    st = plan.st
    nb, s = plan.nb, plan.s
    g2 = g3.reshape(nb, s)
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    grad_p = torch.empty(nb, dtype=acc, device=t.device)
    # every row is written by the mix part or is a pick row that is zero except at its arg-max
    grad = (torch.zeros if plan.n_pick else torch.empty)((st.n * st.c, s), dtype=t.dtype, device=t.device)
    if plan.n_mix:
        ids = plan.mix_ids
        gm = torch.index_select(g2, 0, ids, out=g2.new_empty((ids.numel(), s)))
        means = plan.mix_sums(st.inv_sizes(t.dtype), all_bags=False)
        grad_p[ids] = _rowdot(gm, means)
        plan.put_mix(grad, ids, gm.mul_(plan.coef[ids][:, None]))  # p·g/|subset| to every member
    if plan.n_pick:
        ids = plan.pick_ids
        m, arg = plan.pick_argmax()
        gp = torch.index_select(g2, 0, ids, out=g2.new_empty((ids.numel(), s)))
        grad_p[ids] = _rowdot(gp, m)
        grad.scatter_(0, plan.pick_rows(arg), gp.mul_(plan.coef[ids][:, None]))  # p·g to the first arg-max
    return grad.view(st.n, st.c, s), grad_p.view(st.n, st.g).to(p.dtype)


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


# ----------------------------------------------------------------------------------------------------
# dispatch inside the custom ops


def _own(t: Tensor) -> Tensor:
    """The same tensor without a view ``_base``: a custom op output that autograd sees as a view
    (of our own scratch tensor) could not be modified in place afterwards (e.g. ReLU(inplace=True))."""
    return t.detach() if t._base is not None else t


def _compiled_view(x: Tensor, t: Tensor, zeta: int, layout: int) -> Tensor | None:
    """The view of t (N, C, S) that the compiled kernels take -- planar (N*G, zeta, S), channels innermost
    (N, S, C) -- or None where they do not apply (zeta 1, C not divisible by zeta, not a CPU fast-path
    tensor, too small)."""
    n, c, s = t.shape
    if zeta > 1 and c % zeta == 0 and _use_fast(x, _COMPILED_MIN_NUMEL):
        return t.view(n * (c // zeta), zeta, s) if layout == _PLANAR else t.transpose(1, 2)
    return None


def _kernel_output(out: Tensor, t: Tensor, layout: int) -> Tensor:
    """A compiled kernel's output ((N*G, S) planar, (N, S, G) channels innermost) as (N, G, S) in t's layout."""
    n, _, s = t.shape
    return out.view(n, -1, s) if layout == _PLANAR else out.view(n, s, -1).transpose(1, 2)


def _forward_impl(x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> Tensor:
    cd = _norm_dim(channel_dim, x.dim())
    x = x.detach()
    p = p.detach()
    t, layout = _canon(x, cd)
    if triton_kernels.available(x, zeta):
        out3 = _empty_canon(x, t.shape[0], p.shape[1], t.shape[2], layout)
        return _own(_uncanon(triton_kernels.forward(t, p, zeta, tau, out3), x.shape, cd, layout))
    t4 = _compiled_view(x, t, zeta, layout)
    if t4 is None:
        out = None
    elif layout == _PLANAR:
        out = _compiled_even(t4, p.reshape(-1), tau)
    else:
        out = _compiled_cl(t4, p, zeta, tau)
    if out is not None:
        return _own(_uncanon(_kernel_output(out, t, layout), x.shape, cd, layout))
    if zeta > 1 and _use_fast(x):
        if layout == _PLANAR:
            out3 = _planar_forward(t, p, zeta, tau)
        else:
            out3 = _interleaved_forward(t, p, zeta, tau)
    else:
        out3 = _as_layout(_generic_forward(t, p, zeta, tau), layout)
    return _own(_uncanon(out3, x.shape, cd, layout))


def _backward_impl(
    grad: Tensor, x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int
) -> tuple[Tensor, Tensor]:
    cd = _norm_dim(channel_dim, x.dim())
    x, p, grad = x.detach(), p.detach(), grad.detach()
    t, layout = _canon(x, cd)
    if triton_kernels.available(x, zeta):  # the kernel reads the gradient with any strides
        gt = _empty_canon(x, t.shape[0], t.shape[1], t.shape[2], layout)
        gt, gp = triton_kernels.backward(_canon(grad, cd)[0], t, p, zeta, tau, gt)
        return _own(_uncanon(gt, x.shape, cd, layout)), _own(gp.to(p.dtype))
    g3 = _as_layout(_canon(grad, cd)[0], layout)
    t4 = _compiled_view(x, t, zeta, layout)
    res = None
    if t4 is not None and layout == _PLANAR:
        res = _compiled_even(t4, p.reshape(-1), tau, g3.reshape(t4.shape[0], -1))
    elif t4 is not None:
        res = _compiled_cl(t4, p, zeta, tau, g3.transpose(1, 2))
    if res is not None:
        gt, gp = res
        gt = gt.view(t.shape) if layout == _PLANAR else gt.view(t.shape[0], t.shape[2], -1).transpose(1, 2)
        return _own(_uncanon(gt, x.shape, cd, layout)), _own(gp.view(p.shape).to(p.dtype).contiguous())
    if zeta > 1 and _use_fast(x, min(_FAST_MIN_NUMEL, _FAST_MIN_NUMEL_BWD)):
        if layout == _PLANAR:
            gt, gp = _planar_backward(g3, t, p, zeta, tau)
        else:
            gt, gp = _interleaved_backward(g3, t, p, zeta, tau)
    else:
        gt, gp = _generic_backward(g3, t, p, zeta, tau)
    return _own(_uncanon(_as_layout(gt, layout), x.shape, cd, layout)), _own(gp.to(p.dtype).contiguous())


# ----------------------------------------------------------------------------------------------------
# custom ops


_FLEXIBLE = tuple(t for t in [getattr(torch._C.Tag, "flexible_layout", None)] if t is not None)  # torch >= 2.5

# flexible_layout (the forward): under torch.compile inductor passes x in the layout it chose (channels-last
# activations, with its layout optimisation for convolutions) instead of copying it back to the strides
# seen while tracing; the kernels take planar and channels-innermost memory alike, and the fake kernel
# gives the output the input's layout, as the real one does.  The backward keeps the default (the traced
# strides): its generated channels-innermost kernel was far slower than inductor's copy to NCHW plus the
# planar one (8x256x56x56, zeta 4: 29 ms, against 2 ms for the planar kernel).  The hand-vectorised one
# (cpu_kernels, fp32) takes 3.8 ms there, but tagging the backward flexible_layout still made a compiled
# conv -> PiX -> conv training step at that size slower (312-350 against 273-285 ms, one run each).


@torch.library.custom_op("pixify::pick_or_mix", mutates_args=(), tags=_FLEXIBLE)
def _pick_or_mix_op(x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> Tensor:
    return _forward_impl(x, p, zeta, tau, channel_dim)


@_pick_or_mix_op.register_fake
def _(x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> Tensor:
    cd = _norm_dim(channel_dim, x.dim())
    layout = _layout_of(x, cd)
    g = -(-x.shape[cd] // zeta)
    out3 = _empty_canon(x, x.shape[0], g, _spatial_numel(x.shape, cd), layout)
    return _own(_uncanon(out3, x.shape, cd, layout))


@torch.library.custom_op("pixify::pick_or_mix_backward", mutates_args=())
def _pick_or_mix_backward_op(
    grad: Tensor, x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad, x, p, zeta, tau, channel_dim)


@_pick_or_mix_backward_op.register_fake
def _(grad: Tensor, x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> tuple[Tensor, Tensor]:
    cd = _norm_dim(channel_dim, x.dim())
    layout = _layout_of(x, cd)
    gt = _empty_canon(x, x.shape[0], x.shape[cd], _spatial_numel(x.shape, cd), layout)
    return _own(_uncanon(gt, x.shape, cd, layout)), p.new_empty(p.shape)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, p, zeta, tau, channel_dim = inputs
    ctx.save_for_backward(x, p)
    ctx.zeta, ctx.tau, ctx.channel_dim = zeta, tau, channel_dim


def _backward(ctx: Any, grad: Tensor):
    x, p = ctx.saved_tensors
    gx, gp = torch.ops.pixify.pick_or_mix_backward(grad, x, p, ctx.zeta, ctx.tau, ctx.channel_dim)
    return (
        gx if ctx.needs_input_grad[0] else None,
        gp if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


_pick_or_mix_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public functional API


def pick_or_mix(x: Tensor, p: Tensor, zeta: int, tau: float = 0.5, channel_dim: int = 1) -> Tensor:
    """The fused pick-or-mix step given the probabilities ``p`` (N×G).

    Runs the ``pixify::pick_or_mix`` custom op (fastest exact kernel for the device/layout), or the
    reference path inside :func:`reference_mode`.
    """
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    channel_dim = _check_channel_dim(channel_dim)
    _check_p(x, p, zeta, _norm_dim(channel_dim, x.dim()))
    if _reference_active() or _decomposed_under_compile(x, p):
        return pick_or_mix_reference(x, p, zeta, tau, channel_dim)
    if _direct_ok(x, p):
        return _forward_impl(x, p, zeta, tau, channel_dim)
    return torch.ops.pixify.pick_or_mix(x, p, zeta, tau, channel_dim)


# Under torch.compile, for inference (no gradient wanted), PiX is traced as its reference formulation, so
# that inductor generates it and fuses it with its neighbours, instead of calling the custom op.  Measured on
# CPU (pixify bench resnet50 --zeta auto --threads 2 --compile, fp32): batch 1 1.01 -> 0.82-0.85, batch 8
# 0.93 -> 0.865; the op's per-call cost showed at batch 1.  Training keeps the op (decomposed, its compiled
# step measured 1.14 against 0.93), and so does torch.export.  PIXIFY_COMPILED_PIX=op (any value other than
# "decompose"; pixify.config's compiled_pix) keeps the op for inference too; on a GPU neither has been measured yet.


def _is_exporting() -> bool:
    """Whether torch.export is tracing.  Reads the flag behind ``torch.compiler.is_exporting()`` rather than
    calling it: torch 2.11's dynamo folds that call to True under torch.compile as well (measured), which
    kept the custom op in compiled inference graphs there.  False where torch has no such flag (< 2.5)."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def _decomposed_under_compile(x: Tensor, p: Tensor) -> bool:
    return (
        SETTINGS.compiled_pix == "decompose"
        and torch.compiler.is_compiling()
        and not _is_exporting()
        and not (torch.is_grad_enabled() and (x.requires_grad or p.requires_grad))
    )


def _direct_ok(x: Tensor, p: Tensor) -> bool:
    """True when the custom op's kernel may be called directly: plain eager tensors, no gradient
    wanted, nobody watching the dispatcher (torch.compile/export, fake tensors, FlopCounterMode and
    other dispatch or function modes still see the one ``pixify::pick_or_mix`` op).  This saves the
    custom-op dispatch on every inference call."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo folds it, and cannot trace the private calls
        and type(x) is Tensor
        and type(p) is Tensor
        and not (torch.is_grad_enabled() and (x.requires_grad or p.requires_grad))
        and PRIVATE_TORCH_OK
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


def _whole_ok(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`pix` may try the one compiled kernel (:func:`_compiled_pix`): fp32 inference (no
    gradient wanted, nobody watching the dispatcher) with φ in the same dtype.  fp32 only, so that the
    pooled context is summed in the same precision as on the eager path.  Whether the kernel takes x
    (zeta, C divisible by zeta, device, size) is :func:`_compiled_view`'s test, which :func:`pix` applies next."""
    return (
        not torch.compiler.is_compiling()  # first, as in _direct_ok
        and x.dim() >= 3
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and _plain_inference(x, weight)
    )


def _plain_inference(x: Tensor, weight: Tensor) -> bool:
    """The part of :func:`_whole_ok` and :func:`_triton_inference_ok` that is about the call rather than
    the kernel: reference mode off, φ a plain tensor or parameter, no gradient wanted from φ or x, nobody
    watching the dispatcher (:func:`_direct_ok`)."""
    return (
        not _reference_active()
        and type(weight) in (Tensor, nn.Parameter)
        and not (torch.is_grad_enabled() and weight.requires_grad)
        and _direct_ok(x, x)
    )


def _triton_inference_ok(x: Tensor, weight: Tensor, zeta: int) -> bool:
    """Whether :func:`pix` may run as the pooling plus one Triton launch (:func:`_pix_triton`): a tensor the
    Triton kernels take, φ on its device in a dtype they read, and a plain inference call
    (:func:`_plain_inference`)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo must not trace the private calls
        and triton_kernels.available(x, zeta)
        and weight.dtype in triton_kernels.DTYPES
        and weight.device == x.device
        and _plain_inference(x, weight)
    )


def _pix_triton(x: Tensor, weight: Tensor, zeta: int, tau: float, cd: int) -> Tensor:
    """PiX for inference on CUDA in two launches: the pooling (in fp32) and one Triton kernel that computes
    p = sigmoid(φ · z) and the pick-or-mix step.  Eager inference on a GPU is mostly host time, launch by
    launch; this replaces the linear, sigmoid and custom-op dispatch of the general path."""
    if x.dim() == 4 and cd == 1:  # NCHW, contiguous or channels-last: fewer steps than the general case
        n, c, h, w = x.shape
        fmt = (torch.contiguous_format if x.is_contiguous()
               else torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None)
        if fmt is not None:
            out = torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
            t = x.view(n, c, h * w)
            triton_kernels.forward_phi(t, t.mean(2, dtype=torch.float32), weight, zeta, tau,
                                        out.view(n, weight.shape[0], h * w))
            return out
    t, layout = _canon(x, cd)
    out3 = _empty_canon(x, t.shape[0], weight.shape[0], t.shape[2], layout)
    triton_kernels.forward_phi(t, t.mean(2, dtype=torch.float32), weight, zeta, tau, out3)
    return _own(_uncanon(out3, x.shape, cd, layout))


def pix(x: Tensor, weight: Tensor, zeta: int, tau: float = 0.5, channel_dim: int = 1) -> Tensor:
    """The full PiX operator: global mean pooling, ``p = sigmoid(z @ weight.T)``, pick-or-mix.

    ``weight`` is φ with shape (G, C).  φ runs in ``weight``'s dtype (the pooled context is cast to it),
    except for inference on CUDA, where one Triton kernel computes it in fp32.
    """
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    channel_dim = _check_channel_dim(channel_dim)
    cd = _norm_dim(channel_dim, x.dim())
    c = x.shape[cd]
    g = -(-c // zeta)
    if weight.dim() != 2 or weight.shape[0] != g or weight.shape[1] != c:
        raise PixArgumentError(
            f"weight must have shape (G, C) = ({g}, {c}) for {c} input channels and zeta={zeta}, "
            f"got {tuple(weight.shape)}"
        )
    if _triton_inference_ok(x, weight, zeta):
        return _pix_triton(x, weight, zeta, tau, cd)
    dense = _dense_canon(x, cd) if _whole_ok(x, weight) else None  # a strided x is not copied for it
    if dense is not None:
        t, layout = dense
        t4 = _compiled_view(x, t, zeta, layout)
        if t4 is not None:
            if layout == _PLANAR:
                out = _compiled_pix(t4.view(t.shape[0], g, zeta, -1), weight, tau)
            else:
                out = _compiled_pix(t4, weight, tau, zeta)
            if out is not None:
                return _own(_uncanon(_kernel_output(out, t, layout), x.shape, cd, layout))
    dims = [d for d in range(1, x.dim()) if d != cd]
    if not dims:
        z = x
    elif x.dtype in (torch.float16, torch.bfloat16) or not (torch.is_grad_enabled() and x.requires_grad):
        # one reduction (one launch on a GPU); it accumulates half precision in fp32 and divides before
        # rounding, where an fp16 sum over a large map would overflow (64×64 of 30.0)
        z = x.mean(dim=dims)
    else:
        # sum · (1/S) rather than mean: the sum's backward is a stride-0 view of the (N, C) gradient, so
        # autograd adds it to the pick-or-mix input gradient without materialising another full tensor
        z = x.sum(dim=dims) * (1.0 / _spatial_numel(x.shape, cd))
    p = torch.sigmoid(F.linear(z.to(weight.dtype), weight))
    return pick_or_mix(x, p, zeta, tau, channel_dim)


# fx: keep pix / pick_or_mix as single call_function nodes when tracing modules that call them here.
torch.fx.wrap("pix")
torch.fx.wrap("pick_or_mix")


class PiX(nn.Module):
    """Pick-or-Mix: ``channels`` -> ``ceil(channels / zeta)`` channels with a (G, C) weight φ.

    ``reset_parameters`` initialises φ to **zero**: then ``p = sigmoid(0) = 0.5 = tau`` for every
    sample and subset, so every subset *mixes* -- a deterministic start equal to ``0.5 · mean``, which the
    rewriter compensates for by folding a scale of ``1 / 0.5`` into the following layer.
    """

    def __init__(
        self,
        channels: int,
        zeta: int,
        tau: float = 0.5,
        channel_dim: int = 1,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = _check_channels(channels)
        self.zeta = _check_zeta(zeta)
        self.tau = _check_tau(tau)
        self.channel_dim = _check_channel_dim(channel_dim)
        self.groups = -(-self.channels // self.zeta)
        self.out_channels = self.groups
        self.weight = nn.Parameter(torch.empty(self.groups, self.channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero φ: p = 0.5 = tau, every subset mixes (see the class docstring)."""
        with torch.no_grad():
            self.weight.zero_()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, zeta={self.zeta}, "
            f"tau={self.tau}, channel_dim={self.channel_dim}"
        )

    def forward(self, x: Tensor) -> Tensor:
        return pix(x, self.weight, self.zeta, self.tau, self.channel_dim)


# ----------------------------------------------------------------------------------------------------
# FLOP counting / decompositions


def _pick_or_mix_flops(x_shape, p_shape, zeta, tau, channel_dim, *args, out_shape=None, **kwargs) -> int:
    # one compare-or-add per input element, counted as one MAC = 2 FLOPs
    return 2 * math.prod(x_shape)


def _pick_or_mix_backward_flops(g_shape, x_shape, p_shape, zeta, tau, channel_dim, *args, out_shape=None, **kwargs) -> int:
    # one compare-or-scale per input element (the input gradient), counted like the forward
    return 2 * math.prod(x_shape)


def pix_flop_formulas() -> dict:
    """``custom_mapping`` for :class:`torch.utils.flop_counter.FlopCounterMode`.

    Keys are the ``pixify::pick_or_mix`` / ``pixify::pick_or_mix_backward`` overload packets (what the
    counter looks up) and their ``.default`` overloads.  The pick-or-mix step counts ``2 · numel(x)`` FLOPs (one MAC per input element), forward and
    backward; φ is an ordinary matmul that the counter already counts.
    """
    # FlopCounterMode looks formulas up by overload *packet*; the overloads are listed as well so that
    # the counter never tries to decompose the ops.
    fwd, bwd = torch.ops.pixify.pick_or_mix, torch.ops.pixify.pick_or_mix_backward
    return {
        fwd: _pick_or_mix_flops,
        fwd.default: _pick_or_mix_flops,
        bwd: _pick_or_mix_backward_flops,
        bwd.default: _pick_or_mix_backward_flops,
    }


def _pick_or_mix_decomposition(x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> Tensor:
    return pick_or_mix_reference(x, p, zeta, tau, channel_dim)


def pix_decompositions() -> dict:
    """Decomposition table replacing ``pixify::pick_or_mix`` by the reference ops, e.g.
    ``torch.export.export(m, args).run_decompositions(pix_decompositions())`` before ONNX export."""
    return {torch.ops.pixify.pick_or_mix.default: _pick_or_mix_decomposition}
