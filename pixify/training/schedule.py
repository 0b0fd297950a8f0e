"""The learning-rate schedule: linear warm-up, then a cosine down to ``min_lr``, stepped once per optimizer
step by ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math

import torch

from .config import FinetuneConfig

__all__ = ["lr_at", "make_scheduler"]


def _lr_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Linear warm-up from lr/warmup_steps to lr, then a cosine down to min_lr (step is 0-based)."""
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total - warm)
    frac = min(1.0, (step - warm) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


lr_at = _lr_at


def make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig, total: int, start: int = 0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule for ``total`` steps, positioned at step ``start`` (a resumed run): the optimizer's
    learning rate is set to the one of that step now, and every ``scheduler.step()`` moves one step on."""
    for g in opt.param_groups:
        g["initial_lr"] = cfg.lr  # the base of the factors below, whatever a loaded optimizer state says
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_at(cfg, start + k, total) / cfg.lr)
