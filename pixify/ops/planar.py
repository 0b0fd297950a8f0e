"""The eager CPU backend for planar memory (contiguous NCHW, N×C×L).

With C divisible by zeta, one reduction over ``x.view(N*G, zeta, S)`` for all-mix/all-pick batches and a
second, partial one for mixed batches (``_planar_forward_even``); otherwise every (sample, subset) is a
block of contiguous channel rows of the table ``x.view(N*C, H*W)``. The mix blocks are reduced by
``embedding_bag`` (weighted sum, ``p/|subset|`` folded into the weights), the pick blocks by a CSR sparse ×
dense product under the ``amax`` reduction (``p`` folded into the sparse values; ``max(p·x) == p·max(x)``
exactly for p >= 0). Each reads only its own rows, so the input is read once in total. The backward uses
the first arg-max positions that the same sparse kernel records."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PRIVATE_TORCH_OK, SETTINGS
from .layout import _group_sizes


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
