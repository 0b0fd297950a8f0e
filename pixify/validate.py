"""Checks of what a user passes before it reaches torch or a model library: devices, input sizes and
data-loading processes."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .errors import PixifyError

__all__ = ["check_device", "check_input_size", "check_workers", "check_threads", "check_batch_size", "max_workers",
           "MAX_INPUT_VALUES", "MAX_BATCH"]

MAX_INPUT_VALUES = 1 << 27  # values in one example input (C·H·W): 128 Mi, 512 MiB in float32
MAX_BATCH = 1 << 16  # images in one batch


def check_device(device: Any, what: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine; else a one-line PixifyError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PixifyError(f"{what} {device!r} is not a device", "use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PixifyError(f"{what} {device!r}: no CUDA device is available here", "use 'cpu'")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise PixifyError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise PixifyError(f"{what} {device!r}: pixify runs on cpu or cuda", "use 'cpu' or 'cuda'")
    elif dev.index not in (None, 0):
        raise PixifyError(f"{what} {device!r}: there is one CPU device", "use 'cpu'")
    return dev


def check_input_size(dims: Sequence[int] | None, what: str = "--input-size") -> tuple[int, ...] | None:
    """An example input size (C, H, W) that can be allocated: positive, and at most ``MAX_INPUT_VALUES``."""
    if dims is None:
        return None
    dims = tuple(dims)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise PixifyError(f"{what} must be positive integers, got {dims}")
    total = 1
    for d in dims:
        total *= d
    if total > MAX_INPUT_VALUES:
        raise PixifyError(f"{what} {','.join(map(str, dims))} is {total:,} values per image, more than pixify "
                          f"allocates ({MAX_INPUT_VALUES:,})", "use the model's input size, e.g. 3,224,224")
    return dims


def run_on_example(fn: Callable[[Any], Any], example: Any, hint: str = "pass --input-size C,H,W") -> Any:
    """``fn(example)`` (the model's forward, or a measurement that runs it); whatever the model raises on an
    input it cannot take is one line naming the input's shape."""
    try:
        return fn(example)
    except Exception as exc:  # noqa: BLE001 - the model's own error, whatever its type
        raise PixifyError(f"the model does not run on the example input {tuple(getattr(example, 'shape', ()))}: "
                          f"{type(exc).__name__}: {exc}", hint) from None


def max_workers() -> int:
    """The most data-loading processes pixify starts: four per CPU this process may use (each is a copy of
    the process; far more than the CPUs only adds memory, and thousands exhaust it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 4 * max(1, cpus)


def check_workers(n: Any, what: str = "--workers") -> int:
    """A number of data-loading processes: an integer from 0 to :func:`max_workers`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PixifyError(f"{what} must be an integer >= 0, got {n!r}")
    limit = max_workers()
    if n > limit:
        raise PixifyError(f"{what} {n} is more data-loading processes than this machine can use "
                          f"({limit // 4} CPUs)", f"use at most {limit}")
    return n


def check_threads(n: Any, what: str = "--threads") -> int:
    """A number of CPU threads: an integer from 1 to :func:`max_workers`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PixifyError(f"{what} must be an integer >= 1, got {n!r}")
    limit = max_workers()
    if n > limit:
        raise PixifyError(f"{what} {n} is more threads than this machine can use ({limit // 4} CPUs)",
                          f"use at most {limit}")
    return n


def check_batch_size(n: Any, what: str = "--batch-size") -> int:
    """Images per batch: an integer from 1 to :data:`MAX_BATCH`."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_BATCH:
        raise PixifyError(f"{what} must be an integer from 1 to {MAX_BATCH:,}, got {n!r}")
    return n
