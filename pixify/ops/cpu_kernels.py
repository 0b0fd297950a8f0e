"""Hand-vectorised C++ kernels for the fused pick-or-mix step on channels-innermost CPU memory.

For channels-last NCHW and N×L×C token inputs, the ζ channels of a subset are adjacent in memory, so the
step reduces groups of ζ consecutive floats.  Inductor generates that loop with one scalar load per channel
(it does not vectorise the stride-ζ access): about 4× a pass over the input forward, 13× backward.  These
kernels load ζ whole vectors of one position's channels and separate the subsets in registers with
``at::vec::deinterleave2``, so that each vector lane holds one subset: the forward (log2 ζ rounds of
pairwise max and sum) takes about one pass; the backward (the channels separated in order, to find the
first arg-max, and the gradients put back with ``interleave2``) about four.

They are fp32, for ζ in :data:`ZETAS` and C divisible by ζ; everything else keeps the inductor-generated
kernels.  They are one source built with inductor's own C++ toolchain (``CppPythonBindingsCodeCache``: the
compiler, flags, OpenMP runtime and vector headers that inductor uses for its kernels; about a second, then
cached on disk), on first use.  Where that fails pixify warns once and uses the generated kernels.  ``ops``
calls :func:`fused_interleaved` / :func:`fused_interleaved_backward` when :func:`available`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..config import PRIVATE_TORCH_OK

__all__ = ["ZETAS", "available", "fused_interleaved", "fused_interleaved_backward"]

ZETAS = (2, 4, 8, 16)

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
namespace {
using Vec = at::vec::Vectorized<float>;

// x: Z vectors, a run of Z * Vec::size() consecutive channels.  On return mx[0] / sm[0] hold the max / sum of
// each group of Z consecutive channels, group i in lane i.  Each round splits pairs of vectors into their
// even and odd elements and combines them, halving the group size and the number of vectors.
template <int Z>
inline void reduce_groups(Vec* mx, Vec* sm) {
    for (int count = Z; count > 1; count /= 2) {
        for (int j = 0; j < count / 2; ++j) {
            auto m = at::vec::deinterleave2(mx[2 * j], mx[2 * j + 1]);
            auto s = at::vec::deinterleave2(sm[2 * j], sm[2 * j + 1]);
            mx[j] = at::vec::maximum(std::get<0>(m), std::get<1>(m));  // NaN-propagating, as torch.max
            sm[j] = std::get<0>(s) + std::get<1>(s);
        }
    }
}

// out (N, S, G) = per position, p * max of each subset where p < tau, else p * mean;  x (N, S, C), p (N, G)
template <int Z>
void fused(const float* x, const float* p, float* out, float tau, int64_t n, int64_t s, int64_t c) {
    constexpr int64_t V = Vec::size();
    const int64_t g = c / Z;
    const int64_t gv = g / V * V;  // subsets handled V at a time; the rest one by one
    const float inv = 1.0f / Z;
    #pragma omp parallel for
    for (int64_t r = 0; r < n * s; ++r) {
        const float* xr = x + r * c;
        const float* pr = p + (r / s) * g;
        float* orow = out + r * g;
        for (int64_t g0 = 0; g0 < gv; g0 += V) {
            Vec mx[Z], sm[Z];
            for (int j = 0; j < Z; ++j) {
                mx[j] = Vec::loadu(xr + g0 * Z + j * V);
                sm[j] = mx[j];
            }
            reduce_groups<Z>(mx, sm);
            const Vec pv = Vec::loadu(pr + g0);
            Vec::blendv(sm[0] * (pv * Vec(inv)), mx[0] * pv, pv < Vec(tau)).store(orow + g0);
        }
        for (int64_t gi = gv; gi < g; ++gi) {
            const float* xg = xr + gi * Z;
            float m = xg[0], sum = xg[0];
            for (int j = 1; j < Z; ++j) {
                m = (xg[j] > m || xg[j] != xg[j]) ? xg[j] : m;  // a NaN wins and stays
                sum += xg[j];
            }
            const float pp = pr[gi];
            orow[gi] = pp < tau ? m * pp : sum * (pp * inv);
        }
    }
}

template <int Z>
struct Split {
    // v: Z vectors, a run of Z * V consecutive channels;  c[k]: channel k of each of the V subsets
    static inline void run(const Vec* v, Vec* c) {
        Vec e[Z / 2], o[Z / 2], ce[Z / 2], co[Z / 2];
        for (int j = 0; j < Z / 2; ++j) std::tie(e[j], o[j]) = at::vec::deinterleave2(v[2 * j], v[2 * j + 1]);
        Split<Z / 2>::run(e, ce);
        Split<Z / 2>::run(o, co);
        for (int k = 0; k < Z / 2; ++k) { c[2 * k] = ce[k]; c[2 * k + 1] = co[k]; }
    }
    // the inverse: c[k] per channel back to the run of channels v
    static inline void merge(const Vec* c, Vec* v) {
        Vec e[Z / 2], o[Z / 2], ce[Z / 2], co[Z / 2];
        for (int k = 0; k < Z / 2; ++k) { ce[k] = c[2 * k]; co[k] = c[2 * k + 1]; }
        Split<Z / 2>::merge(ce, e);
        Split<Z / 2>::merge(co, o);
        for (int j = 0; j < Z / 2; ++j) std::tie(v[2 * j], v[2 * j + 1]) = at::vec::interleave2(e[j], o[j]);
    }
};
template <>
struct Split<1> {
    static inline void run(const Vec* v, Vec* c) { c[0] = v[0]; }
    static inline void merge(const Vec* c, Vec* v) { v[0] = c[0]; }
};

// gx (N, S, C): p * g to the first arg-max channel of a pick subset (the first NaN if any, as torch.max),
// p * g / Z to every channel of a mix subset;  gp (N, G) = sum over positions of g * (max or mean)
template <int Z>
void backward(const float* x, const float* p, const float* g, float* gx, float* gp, float tau, int64_t n,
              int64_t s, int64_t c) {
    constexpr int64_t V = Vec::size();
    const int64_t gs = c / Z;
    const int64_t blocks = (gs + V - 1) / V;
    const float inv = 1.0f / Z;
    #pragma omp parallel for
    for (int64_t task = 0; task < n * blocks; ++task) {
        const int64_t ni = task / blocks, g0 = (task % blocks) * V;
        const float* pr = p + ni * gs;
        if (g0 + V <= gs) {
            const Vec pv = Vec::loadu(pr + g0);
            const Vec pick = pv < Vec(tau);
            const Vec coef = Vec::blendv(pv * Vec(inv), pv, pick);
            const Vec zero(0.0f);
            Vec acc(0.0f);
            for (int64_t si = 0; si < s; ++si) {
                const int64_t r = ni * s + si;
                Vec v[Z], ch[Z], gr[Z];
                for (int j = 0; j < Z; ++j) v[j] = Vec::loadu(x + r * c + g0 * Z + j * V);
                Split<Z>::run(v, ch);
                Vec mx = ch[0], sm = ch[0];
                for (int k = 1; k < Z; ++k) { mx = at::vec::maximum(mx, ch[k]); sm = sm + ch[k]; }
                const Vec gv = Vec::loadu(g + r * gs + g0);
                acc = acc + gv * Vec::blendv(sm * Vec(inv), mx, pick);
                const Vec gc = gv * coef;
                const Vec nan = mx != mx;  // lanes whose subset holds a NaN: its first NaN is the arg-max
                Vec open = zero == zero;   // lanes whose arg-max channel is still to be found (all bits set)
                for (int k = 0; k < Z; ++k) {
                    const Vec hit = Vec::blendv(ch[k] == mx, ch[k] != ch[k], nan) & open;
                    open = open ^ hit;
                    gr[k] = Vec::blendv(gc, Vec::blendv(zero, gc, hit), pick);
                }
                Split<Z>::merge(gr, v);
                for (int j = 0; j < Z; ++j) v[j].store(gx + r * c + g0 * Z + j * V);
            }
            acc.store(gp + ni * gs + g0);
        } else {
            for (int64_t gi = g0; gi < gs; ++gi) {
                const float pp = pr[gi];
                const bool pick = pp < tau;
                const float coef = pick ? pp : pp * inv;
                float acc = 0.0f;
                for (int64_t si = 0; si < s; ++si) {
                    const int64_t r = ni * s + si;
                    const float* xg = x + r * c + gi * Z;
                    float* gxg = gx + r * c + gi * Z;
                    int arg = 0;
                    float m = xg[0], sum = xg[0];
                    for (int j = 1; j < Z; ++j) {
                        if (m == m && (xg[j] > m || xg[j] != xg[j])) { m = xg[j]; arg = j; }
                        sum += xg[j];
                    }
                    const float gg = g[r * gs + gi];
                    acc += gg * (pick ? m : sum * inv);
                    for (int j = 0; j < Z; ++j) gxg[j] = (!pick || j == arg) ? gg * coef : 0.0f;
                }
                gp[ni * gs + gi] = acc;
            }
        }
    }
}
}  // namespace

// The forward (out = the output; g and gp unused) or with backward != 0 the backward (out = the input
// gradient for the output gradient g, gp = the p gradient).  tau comes as a one-element tensor: the Python
// binding takes only pointers and 64-bit integers.
extern "C" void kernel(const float* x, const float* p, const float* g, float* out, float* gp, const float* tau,
                       const int64_t n, const int64_t s, const int64_t c, const int64_t zeta,
                       const int64_t backward_) {
    const float t = tau[0];
    switch (zeta * 2 + (backward_ != 0)) {
        case 4: fused<2>(x, p, out, t, n, s, c); break;
        case 8: fused<4>(x, p, out, t, n, s, c); break;
        case 16: fused<8>(x, p, out, t, n, s, c); break;
        case 32: fused<16>(x, p, out, t, n, s, c); break;
        case 5: backward<2>(x, p, g, out, gp, t, n, s, c); break;
        case 9: backward<4>(x, p, g, out, gp, t, n, s, c); break;
        case 17: backward<8>(x, p, g, out, gp, t, n, s, c); break;
        case 33: backward<16>(x, p, g, out, gp, t, n, s, c); break;
    }
}
"""

_ARGTYPES = ["const float*", "const float*", "const float*", "float*", "float*", "const float*", "const int64_t",
             "const int64_t", "const int64_t", "const int64_t", "const int64_t"]

# the built kernel (None until first use) and whether building it failed here
_STATE: dict[str, Any] = {"kernel": None, "failed": False}
_TAUS: dict[float, Tensor] = {}


def available(t3: Tensor, p_dtype: torch.dtype, zeta: int) -> bool:
    """Whether the kernels take t3 (N, S, C) with p of ``p_dtype``: both fp32 (the reference compares p with
    tau in p's dtype), on CPU, zeta in :data:`ZETAS` dividing C, and they have not failed to build here.
    (Whether compiled kernels are allowed at all is the caller's test, ``ops.compiled_kernels_enabled``.)"""
    return (
        not _STATE["failed"]
        and PRIVATE_TORCH_OK  # built through inductor's C++ code cache
        and zeta in ZETAS
        and t3.dtype == torch.float32
        and p_dtype == torch.float32
        and t3.device.type == "cpu"
        and t3.dim() == 3
        and t3.shape[2] % zeta == 0
    )


def _kernel() -> Any:
    k = _STATE["kernel"]
    if k is None:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        k = _STATE["kernel"] = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, _SOURCE)
    return k


def _run(t3: Tensor, p: Tensor, zeta: int, tau: float, grad: Tensor | None) -> tuple[Tensor, Tensor] | None:
    try:
        kernel = _kernel()
    except Exception as e:  # noqa: BLE001 - any toolchain failure means "use the generated kernels"
        _STATE["failed"] = True
        warnings.warn(f"pixify: the channels-last PiX CPU kernel is unavailable here ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using the generated kernels",
                      RuntimeWarning, stacklevel=3)
        return None
    n, s, c = t3.shape
    t3 = t3.contiguous()
    p = p.contiguous()
    tau_t = _TAUS.get(tau)
    if tau_t is None:
        tau_t = _TAUS[tau] = torch.tensor([tau], dtype=torch.float32)
    if grad is None:
        out = torch.empty((n, s, c // zeta), dtype=torch.float32)
        kernel(t3, p, t3, out, out, tau_t, n, s, c, zeta, 0)
        return out, out
    grad = grad.to(torch.float32).contiguous()
    gt = torch.empty((n, s, c), dtype=torch.float32)
    gp = torch.empty((n, c // zeta), dtype=torch.float32)
    kernel(t3, p, grad, gt, gp, tau_t, n, s, c, zeta, 1)
    return gt, gp


def fused_interleaved(t3: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor | None:
    """The fused step on t3 (N, S, C) given p (N, G): (N, S, G), contiguous.  None when the kernel cannot be
    built here (reported once; the caller then uses another kernel)."""
    res = _run(t3, p, zeta, tau, None)
    return None if res is None else res[0]


def fused_interleaved_backward(t3: Tensor, p: Tensor, grad: Tensor, zeta: int,
                               tau: float) -> tuple[Tensor, Tensor] | None:
    """Gradients of :func:`fused_interleaved` for the output gradient ``grad`` (N, S, G): the input's
    (N, S, C) and p's (N, G, fp32), as the reference's: the first arg-max channel of a pick subset (its
    first NaN, if any, as ``torch.max``) gets p·g, every channel of a mix subset p·g/zeta, and p the sum
    over positions of g times the max or mean.  None where the kernel cannot be built."""
    return _run(t3, p, zeta, tau, grad)
