"""Cost and agreement measurements: MACs via ``torch.utils.flop_counter``, parameters, output agreement."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .ops import eager_kernels, pix_flop_formulas

__all__ = ["count_macs", "count_params", "output_agreement"]


def count_macs(model: nn.Module, example_input: Any, return_output: bool = False) -> int | tuple[int, Any]:
    """Multiply-accumulates of one forward pass on ``example_input`` (FLOPs / 2), in eval mode.

    Convolutions and matmuls are counted by torch's own formulas; PiX by its registered formula (one
    compare-or-add per input element). Elementwise ops and norms count zero, as usual for MACs tables.
    With ``return_output`` also returns the model's output of that same pass, which runs PiX's eager
    kernels: compiling its CPU kernels would cost seconds for this one pass.
    """
    was_training = model.training
    model.eval()
    # FlopCounterMode's module tracker hooks every input that requires grad; under no_grad a view of a
    # parameter (e.g. CaiT's expanded class token) requires grad without a grad_fn and makes it fail.
    # Nothing needs gradients here, so the parameters stop requiring them for this one pass.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.no_grad(), eager_kernels(), \
                FlopCounterMode(display=False, custom_mapping=pix_flop_formulas()) as counter:
            out = _call(model, example_input)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    macs = int(counter.get_total_flops()) // 2
    return (macs, out) if return_output else macs


def count_params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__})")


@torch.no_grad()
def output_agreement(reference: Iterable[torch.Tensor], converted: Iterable[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement (in %, like every accuracy pixify reports) and relative logit error (‖a−b‖/‖a‖)
    between paired output batches."""
    agree = total = 0
    num = den = 0.0
    for a, b in zip(reference, converted):
        a, b = _logits(a).float(), _logits(b).float()
        if a.ndim >= 2:
            agree += int((a.flatten(1).argmax(1) == b.flatten(1).argmax(1)).sum())
            total += a.shape[0]
        num += float((a - b).pow(2).sum())
        den += float(a.pow(2).sum())
    return {
        "top1_agreement": 100.0 * agree / total if total else float("nan"),
        "rel_logit_error": (num ** 0.5) / (den ** 0.5) if den > 0 else float("nan"),
        "samples": float(total),
    }
