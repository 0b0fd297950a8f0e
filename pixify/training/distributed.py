"""Processes and devices: ranks under torchrun, seeding, the default device, unwrapping DDP/compile."""

from __future__ import annotations

import os
import random

import torch
from torch import nn

__all__ = ["destroy_distributed"]


def _rank() -> int:
    """This process's global rank; before the process group exists, the one torchrun gave it (else 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 63)


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _setup_distributed(device: str | None) -> tuple[bool, str]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, device or _default_device()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return True, device


def _destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


destroy_distributed = _destroy_distributed
