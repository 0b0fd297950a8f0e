"""The whole operator: :func:`pix` (pooling, φ, sigmoid, pick-or-mix) and the :class:`PiX` module."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import _record
from .args import PixArgumentError, _check_channel_dim, _check_channels, _check_tau, _check_zeta, _norm_dim
from . import triton_kernels
from .inductor import _compiled_pix, _compiled_view
from .layout import _PLANAR, _canon, _dense_canon, _empty_canon, _kernel_output, _own, _spatial_numel, _uncanon
from .op import _direct_ok, pick_or_mix
from .reference import _reference_active


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
        _record("pix", "triton")
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
                _record("pix", "whole-kernel")
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
