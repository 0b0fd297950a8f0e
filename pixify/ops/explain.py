"""What a PiX call would run, and why: :func:`explain`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import SETTINGS
from .args import _check_channel_dim, _check_tau, _check_zeta, _norm_dim
from .dispatch import _Call, backend_for
from .layout import _dense_canon
from .module import _triton_inference_ok, _whole_ok
from .inductor import _compiled_view
from .op import _decomposed_under_compile, _direct_ok
from .reference import _export_active, _reference_active

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """The path a call takes: ``entry`` (how PiX is reached), ``forward`` / ``backward`` (the backend of the
    step, see :data:`pixify.ops.BACKENDS`), and for each backend passed over, why."""

    entry: str
    forward: str | None
    backward: str | None
    passed_forward: dict[str, str] = field(default_factory=dict)
    passed_backward: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"entry: {self.entry}"]
        for what, chosen, passed in (("forward", self.forward, self.passed_forward),
                                     ("backward", self.backward, self.passed_backward)):
            if chosen is None:
                continue
            lines.append(f"{what}: {chosen}")
            lines += [f"  passed over {name}: {why}" for name, why in passed.items()]
        return "\n".join(lines)


def explain(x: Tensor, weight: Tensor | None = None, zeta: int = 2, tau: float = 0.5, channel_dim: int = 1,
            p: Tensor | None = None, backward: bool | None = None) -> Explanation:
    """Which path :func:`pixify.ops.pix` (given φ as ``weight``) or :func:`pixify.ops.pick_or_mix` (given
    ``p``) takes for these arguments in the current mode (grad, reference mode, settings), without running
    it.  ``backward``: also explain the backward (default: when a gradient would be wanted)."""
    zeta, tau, channel_dim = _check_zeta(zeta), _check_tau(tau), _check_channel_dim(channel_dim)
    cd = _norm_dim(channel_dim, x.dim())
    c = x.shape[cd]
    g = -(-c // zeta)
    if p is None:
        if weight is None:
            raise TypeError("explain needs weight= (for pix) or p= (for pick_or_mix)")
        if weight.shape != (g, c):
            raise ValueError(f"weight must have shape ({g}, {c})")
        if _triton_inference_ok(x, weight, zeta):
            return Explanation("pix: one Triton kernel for pooling, φ and the step", None, None)
        dense = _dense_canon(x, cd) if _whole_ok(x, weight) else None
        if dense is not None and _compiled_view(x, dense[0], zeta, dense[1]) is not None:
            return Explanation("pix: the whole operator as one generated kernel (falls back to the step if "
                               "it cannot be built)", None, None)
        p = torch.zeros(x.shape[0], g, dtype=weight.dtype, device=x.device)
        grad_wanted = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        prefix = "pix: pooling and φ, then "
    else:
        grad_wanted = torch.is_grad_enabled() and (x.requires_grad or p.requires_grad)
        prefix = ""
    if _export_active():
        return Explanation(prefix + "the export formulation (export_mode)", None, None)
    if _reference_active():
        return Explanation(prefix + "the reference (reference_mode)", None, None)
    if _decomposed_under_compile(x, p):
        return Explanation(prefix + f"the reference, traced for inductor (compiled_pix={SETTINGS.compiled_pix})",
                           None, None)
    entry = prefix + ("a direct kernel call" if _direct_ok(x, p) else "the pixify::pick_or_mix custom op")
    call = _Call(x, p, zeta, tau, channel_dim)
    fwd, passed_f = backend_for(call, False)
    bwd, passed_b = (backend_for(call, True) if (grad_wanted if backward is None else backward) else (None, {}))
    return Explanation(entry, fwd.name, bwd.name if bwd else None, passed_f, passed_b)
