"""The ``pixify::pick_or_mix`` custom ops (forward and backward, fake kernels for compile/export, autograd)
and the functional :func:`pick_or_mix`, with the FLOP formulas and the decomposition for exporters."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..config import PRIVATE_TORCH_OK, SETTINGS
from .args import _check_channel_dim, _check_p, _check_tau, _check_zeta, _norm_dim
from .dispatch import _backward_impl, _forward_impl
from .layout import _empty_canon, _layout_of, _own, _spatial_numel, _uncanon
from .reference import _export_active, _reference_active, pick_or_mix_export, pick_or_mix_reference


_FLEXIBLE = tuple(t for t in [getattr(torch._C.Tag, "flexible_layout", None)] if t is not None)  # torch >= 2.5


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


def pick_or_mix(x: Tensor, p: Tensor, zeta: int, tau: float = 0.5, channel_dim: int = 1) -> Tensor:
    """The fused pick-or-mix step given the probabilities ``p`` (N×G).

    Runs the ``pixify::pick_or_mix`` custom op (fastest exact kernel for the device/layout), or the
    reference path inside :func:`reference_mode`.
    """
    zeta = _check_zeta(zeta)
    tau = _check_tau(tau)
    channel_dim = _check_channel_dim(channel_dim)
    _check_p(x, p, zeta, _norm_dim(channel_dim, x.dim()))
    if _export_active():
        return pick_or_mix_export(x, p, zeta, tau, channel_dim)
    if _reference_active() or _decomposed_under_compile(x, p):
        return pick_or_mix_reference(x, p, zeta, tau, channel_dim)
    if _direct_ok(x, p):
        return _forward_impl(x, p, zeta, tau, channel_dim)
    return torch.ops.pixify.pick_or_mix(x, p, zeta, tau, channel_dim)


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
