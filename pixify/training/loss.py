"""The distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, times T² (Hinton et al.)."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, q, reduction="batchmean", log_target=True) * (t * t)
