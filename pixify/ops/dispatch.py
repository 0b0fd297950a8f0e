"""Which backend runs the pick-or-mix step: one ordered table.

Every backend says whether it takes a call (``None``) or why not (a reason), and has a forward and a
backward. The first backend in :data:`BACKENDS` that takes a call runs it; :func:`explain` gives the
choice and every reason, and :func:`last_backend` what actually ran last (the tests check both). A
backend whose kernel fails to build returns nothing the first time (its reason is kept and shown by
``explain`` afterwards) and the next one in the table runs; an error raised while a kernel runs is never
swallowed.

Order (fastest exact first):

- ``triton``: CUDA tensors (fp32, fp16, bf16; any layout, any C), one Triton kernel each way;
- ``cpp``: CPU, channels innermost, fp32, ζ ∈ {2, 4, 8, 16} dividing C: hand-vectorised C++ kernels;
- ``inductor``: CPU, C divisible by ζ, ≥ 64 Ki elements: kernels inductor generates ahead of time;
- ``planar`` / ``interleaved``: CPU eager kernels for the two memory layouts, from 512 Ki input elements
  (forward) or 32 Ki (backward);
- ``generic``: everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from . import cpu_kernels, inductor, planar, triton_kernels
from .generic import _generic_backward, _generic_forward
from .interleaved import _interleaved_backward, _interleaved_forward
from .layout import _PLANAR, _as_layout, _canon, _empty_canon, _kernel_output, _own, _uncanon
from .args import _norm_dim

__all__ = ["Backend", "BACKENDS", "backend_for", "last_backend"]

_LAST: dict[str, str] = {}


class _Call:
    """One call of the step, in the canonical layout: t (N, C, S) and p (N, G)."""

    __slots__ = ("x", "p", "zeta", "tau", "cd", "t", "layout", "grad", "_view")

    def __init__(self, x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int, grad: Tensor | None = None):
        self.cd = _norm_dim(channel_dim, x.dim())
        self.x, self.p = x.detach(), p.detach()
        self.zeta, self.tau = zeta, tau
        self.t, self.layout = _canon(self.x, self.cd)
        self.grad = None if grad is None else grad.detach()
        self._view: Tensor | None | bool = False  # not worked out yet

    def compiled_view(self) -> Tensor | None:
        """The view the generated kernels take (:func:`inductor._compiled_view`), worked out once per call."""
        if self._view is False:
            self._view = inductor._compiled_view(self.x, self.t, self.zeta, self.layout)
        return self._view

    def output(self, out3: Tensor) -> Tensor:
        return _own(_uncanon(out3, self.x.shape, self.cd, self.layout))

    def input_grad(self, gt: Tensor) -> Tensor:
        return _own(_uncanon(gt, self.x.shape, self.cd, self.layout))


@dataclass(frozen=True)
class Backend:
    """A row of the table: ``supports(call, backward)`` is None when it takes the call, else the reason."""

    name: str
    supports: Callable[[_Call, bool], str | None]
    forward: Callable[[_Call], Tensor | None]
    backward: Callable[[_Call], tuple[Tensor, Tensor] | None]


# ---------------------------------------------------------------------------------------------- triton

def _triton_supports(c: _Call, backward: bool) -> str | None:
    if triton_kernels.available(c.x, c.zeta):
        return None
    if triton_kernels.triton is None:
        return "Triton is not installed"
    if not c.x.is_cuda:
        return "not a CUDA tensor"
    if c.x.dtype not in triton_kernels.DTYPES:
        return f"{c.x.dtype} is not one of its dtypes"
    if c.zeta > triton_kernels.MAX_ZETA:
        return f"zeta {c.zeta} > {triton_kernels.MAX_ZETA}"
    return "unavailable"


def _triton_forward(c: _Call) -> Tensor:
    out3 = _empty_canon(c.x, c.t.shape[0], c.p.shape[1], c.t.shape[2], c.layout)
    return c.output(triton_kernels.forward(c.t, c.p, c.zeta, c.tau, out3))


def _triton_backward(c: _Call) -> tuple[Tensor, Tensor]:
    gt = _empty_canon(c.x, c.t.shape[0], c.t.shape[1], c.t.shape[2], c.layout)
    gt, gp = triton_kernels.backward(_canon(c.grad, c.cd)[0], c.t, c.p, c.zeta, c.tau, gt)  # any strides
    return c.input_grad(gt), _own(gp.to(c.p.dtype))


# ----------------------------------------------------------------------------------- compiled (CPU)

def _compiled_common(c: _Call) -> str | None:
    if not inductor.compiled_kernels_enabled():
        return "compiled kernels are off (setting compiled_kernels, eager_kernels(), or an untested torch)"
    if c.x.device.type != "cpu":
        return "not a CPU tensor"
    if c.zeta < 2 or c.t.shape[1] % c.zeta:
        return f"C={c.t.shape[1]} is not a multiple of zeta {c.zeta} >= 2"
    if c.compiled_view() is None:
        return f"fewer than {inductor._COMPILED_MIN_NUMEL} elements, or not a fast-path dtype"
    return None


def _cpp_supports(c: _Call, backward: bool) -> str | None:
    why = _compiled_common(c)
    if why:
        return why
    if c.layout == _PLANAR:
        return "planar memory (it takes channels innermost)"
    t3 = c.t.transpose(1, 2)
    if min(t3.shape[1:]) < 2:
        return "a size below 2"
    if cpu_kernels._STATE["failed"]:
        return "failed to build here (see the warning)"
    if not cpu_kernels.available(t3, c.p.dtype, c.zeta):
        return f"needs fp32 and zeta in {cpu_kernels.ZETAS}"
    return None


def _cpp_forward(c: _Call) -> Tensor | None:
    out = cpu_kernels.fused_interleaved(c.t.transpose(1, 2), c.p, c.zeta, c.tau)
    return None if out is None else c.output(_kernel_output(out, c.t, c.layout))


def _cpp_backward(c: _Call) -> tuple[Tensor, Tensor] | None:
    g3 = _as_layout(_canon(c.grad, c.cd)[0], c.layout)
    res = cpu_kernels.fused_interleaved_backward(c.t.transpose(1, 2), c.p, g3.transpose(1, 2), c.zeta, c.tau)
    return None if res is None else _compiled_grads(c, res)


def _inductor_supports(c: _Call, backward: bool) -> str | None:
    why = _compiled_common(c)
    if why:
        return why
    t4 = c.compiled_view()
    if min(t4.shape) < 2 if c.layout == _PLANAR else min(t4.shape[1:]) < 2:
        return "a size below 2"
    if c.layout != _PLANAR and c.zeta > inductor._UNROLL_MAX_ZETA:
        return f"channels innermost with zeta > {inductor._UNROLL_MAX_ZETA}"
    failed = inductor.failure_for(c.t, c.p, c.zeta, c.tau, c.layout, backward)
    return f"its kernel failed to build here ({failed})" if failed else None


def _inductor_forward(c: _Call) -> Tensor | None:
    t4 = c.compiled_view()
    if c.layout == _PLANAR:
        out = inductor._compiled_even(t4, c.p.reshape(-1), c.tau)
    else:
        out = inductor._compiled_generated_cl(t4, c.p, c.zeta, c.tau)
    return None if out is None else c.output(_kernel_output(out, c.t, c.layout))


def _inductor_backward(c: _Call) -> tuple[Tensor, Tensor] | None:
    t4 = c.compiled_view()
    g3 = _as_layout(_canon(c.grad, c.cd)[0], c.layout)
    if c.layout == _PLANAR:
        res = inductor._compiled_even(t4, c.p.reshape(-1), c.tau, g3.reshape(t4.shape[0], -1))
    else:
        res = inductor._compiled_generated_cl(t4, c.p, c.zeta, c.tau, g3.transpose(1, 2))
    return None if res is None else _compiled_grads(c, res)


def _compiled_grads(c: _Call, res: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    gt, gp = res
    t = c.t
    gt = gt.view(t.shape) if c.layout == _PLANAR else gt.view(t.shape[0], t.shape[2], -1).transpose(1, 2)
    return c.input_grad(gt), _own(gp.view(c.p.shape).to(c.p.dtype).contiguous())


# --------------------------------------------------------------------------------------- eager (CPU)

def _eager_supports(layout: int) -> Callable[[_Call, bool], str | None]:
    def supports(c: _Call, backward: bool) -> str | None:
        if c.layout != layout:
            return "planar memory" if c.layout == _PLANAR else "channels-innermost memory"
        if c.zeta < 2:
            return "zeta 1"
        limit = min(planar._FAST_MIN_NUMEL, planar._FAST_MIN_NUMEL_BWD) if backward else planar._FAST_MIN_NUMEL
        if not planar._use_fast(c.x, limit):
            return (f"not a CPU tensor of {limit} or more elements in a fast-path dtype"
                    + ("" if planar.SETTINGS.fast_cpu else " (setting fast_cpu is off)"))
        return None
    return supports


def _planar_forward(c: _Call) -> Tensor:
    return c.output(planar._planar_forward(c.t, c.p, c.zeta, c.tau))


def _planar_backward(c: _Call) -> tuple[Tensor, Tensor]:
    g3 = _as_layout(_canon(c.grad, c.cd)[0], c.layout)
    gt, gp = planar._planar_backward(g3, c.t, c.p, c.zeta, c.tau)
    return c.input_grad(_as_layout(gt, c.layout)), _own(gp.to(c.p.dtype).contiguous())


def _interleaved_fwd(c: _Call) -> Tensor:
    return c.output(_interleaved_forward(c.t, c.p, c.zeta, c.tau))


def _interleaved_bwd(c: _Call) -> tuple[Tensor, Tensor]:
    g3 = _as_layout(_canon(c.grad, c.cd)[0], c.layout)
    gt, gp = _interleaved_backward(g3, c.t, c.p, c.zeta, c.tau)
    return c.input_grad(_as_layout(gt, c.layout)), _own(gp.to(c.p.dtype).contiguous())


def _generic_fwd(c: _Call) -> Tensor:
    return c.output(_as_layout(_generic_forward(c.t, c.p, c.zeta, c.tau), c.layout))


def _generic_bwd(c: _Call) -> tuple[Tensor, Tensor]:
    g3 = _as_layout(_canon(c.grad, c.cd)[0], c.layout)
    gt, gp = _generic_backward(g3, c.t, c.p, c.zeta, c.tau)
    return c.input_grad(_as_layout(gt, c.layout)), _own(gp.to(c.p.dtype).contiguous())


BACKENDS: list[Backend] = [
    Backend("triton", _triton_supports, _triton_forward, _triton_backward),
    Backend("cpp", _cpp_supports, _cpp_forward, _cpp_backward),
    Backend("inductor", _inductor_supports, _inductor_forward, _inductor_backward),
    Backend("planar", _eager_supports(_PLANAR), _planar_forward, _planar_backward),
    Backend("interleaved", _eager_supports(1 - _PLANAR), _interleaved_fwd, _interleaved_bwd),
    Backend("generic", lambda c, backward: None, _generic_fwd, _generic_bwd),
]


def backend_for(call: _Call, backward: bool) -> tuple[Backend, dict[str, str]]:
    """The backend that takes ``call``, and the reasons of those before it that did not."""
    passed: dict[str, str] = {}
    for b in BACKENDS:
        why = b.supports(call, backward)
        if why is None:
            return b, passed
        passed[b.name] = why
    raise AssertionError("no backend took the call")  # generic takes every call


def _run(call: _Call, backward: bool):
    for b in BACKENDS:
        if b.supports(call, backward) is None:
            res = (b.backward if backward else b.forward)(call)
            if res is not None:  # None: its kernel could not be built here (reason kept); the next one runs
                _LAST["backward" if backward else "forward"] = b.name
                return res
    raise AssertionError("no backend ran the call")


def _forward_impl(x: Tensor, p: Tensor, zeta: int, tau: float, channel_dim: int) -> Tensor:
    return _run(_Call(x, p, zeta, tau, channel_dim), False)


def _backward_impl(grad: Tensor, x: Tensor, p: Tensor, zeta: int, tau: float,
                   channel_dim: int) -> tuple[Tensor, Tensor]:
    return _run(_Call(x, p, zeta, tau, channel_dim, grad), True)


def last_backend() -> dict[str, str]:
    """What ran last in this process: ``{"forward": name, "backward": name, "pix": path}`` (those seen so far)."""
    return dict(_LAST)


def _record(key: str, name: str) -> None:
    _LAST[key] = name


