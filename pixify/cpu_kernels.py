"""A hand-vectorised C++ kernel for the fused pick-or-mix step on channels-innermost CPU memory.

For channels-last NCHW and N×L×C token inputs, the ζ channels of a subset are adjacent in memory, so the
step reduces groups of ζ consecutive floats.  Inductor generates that loop with one scalar load per channel
(it does not vectorise the stride-ζ access): about 4× a pass over the input.  This kernel loads ζ whole
vectors of one position's channels and separates the groups in registers with ``at::vec::deinterleave2``
(log2 ζ rounds of pairwise max and sum), so each vector lane ends up holding one subset: about one pass.

It is fp32, forward only (inference and the custom op's forward), for ζ in :data:`ZETAS` and C divisible by
ζ; everything else keeps the inductor-generated kernels.  It is built with inductor's own C++ toolchain
(``CppPythonBindingsCodeCache``: the compiler, flags, OpenMP runtime and vector headers that inductor uses
for its kernels; about a second, then cached on disk), on first use.  Where it cannot be built it warns once
and pixify uses the generated kernels.  ``ops`` calls :func:`fused_interleaved` when :func:`available`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["ZETAS", "available", "fused_interleaved"]

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
}  // namespace

// tau comes as a one-element tensor: the Python binding takes only pointers and 64-bit integers
extern "C" void kernel(const float* x, const float* p, float* out, const float* tau, const int64_t n,
                       const int64_t s, const int64_t c, const int64_t zeta) {
    switch (zeta) {
        case 2: fused<2>(x, p, out, tau[0], n, s, c); break;
        case 4: fused<4>(x, p, out, tau[0], n, s, c); break;
        case 8: fused<8>(x, p, out, tau[0], n, s, c); break;
        case 16: fused<16>(x, p, out, tau[0], n, s, c); break;
    }
}
"""

_ARGTYPES = ["const float*", "const float*", "float*", "const float*", "const int64_t", "const int64_t",
             "const int64_t", "const int64_t"]

# the built kernel (None until first use) and whether building it failed here
_STATE: dict[str, Any] = {"kernel": None, "failed": False}
_TAUS: dict[float, Tensor] = {}


def available(t3: Tensor, zeta: int) -> bool:
    """Whether :func:`fused_interleaved` takes t3 (N, S, C): fp32 on CPU, zeta in :data:`ZETAS` dividing C,
    and the kernel has not failed to build here.  (Whether compiled kernels are allowed at all is the
    caller's test, ``ops.compiled_kernels_enabled``.)"""
    return (
        not _STATE["failed"]
        and zeta in ZETAS
        and t3.dtype == torch.float32
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


def fused_interleaved(t3: Tensor, p: Tensor, zeta: int, tau: float) -> Tensor | None:
    """The fused step on t3 (N, S, C) given p (N, G): (N, S, G), contiguous.  None when the kernel cannot be
    built here (reported once; the caller then uses another kernel)."""
    try:
        kernel = _kernel()
    except Exception as e:  # noqa: BLE001 - any toolchain failure means "use the generated kernels"
        _STATE["failed"] = True
        warnings.warn(f"pixify: the channels-last PiX CPU kernel is unavailable here ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using the generated kernels",
                      RuntimeWarning, stacklevel=2)
        return None
    n, s, c = t3.shape
    t3 = t3.contiguous()
    p = p.to(torch.float32).contiguous()
    out = torch.empty((n, s, c // zeta), dtype=torch.float32)
    tau_t = _TAUS.get(tau)
    if tau_t is None:
        tau_t = _TAUS[tau] = torch.tensor([tau], dtype=torch.float32)
    kernel(t3, p, out, tau_t, n, s, c, zeta)
    return out
