"""Memory layouts.

Kernels work on a canonical 3-d view t = (N, C, S) of the input (S = product of the spatial dims):

- planar: t is contiguous (contiguous NCHW, N×C×L);
- interleaved: t.transpose(1, 2) is contiguous (channels_last NCHW, N×L×C, N×H×W×C);
- anything else is copied to planar first.

Outputs and input gradients are produced dense in the same layout, so a channels_last network stays
channels_last. The fake kernels use the same rule, so real and fake strides agree."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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


def _own(t: Tensor) -> Tensor:
    """The same tensor without a view ``_base``: a custom op output that autograd sees as a view
    (of our own scratch tensor) could not be modified in place afterwards (e.g. ReLU(inplace=True))."""
    return t.detach() if t._base is not None else t


def _kernel_output(out: Tensor, t: Tensor, layout: int) -> Tensor:
    """A compiled kernel's output ((N*G, S) planar, (N, S, G) channels innermost) as (N, G, S) in t's layout."""
    n, _, s = t.shape
    return out.view(n, -1, s) if layout == _PLANAR else out.view(n, s, -1).transpose(1, 2)


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
