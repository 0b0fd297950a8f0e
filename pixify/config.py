"""pixify's switches, in one place: read once from the environment when pixify is imported, and changed in
code with :func:`override` (or the operator's own :func:`pixify.ops.reference_mode` and
:func:`pixify.ops.eager_kernels`).

========================  ==============================  ===========  =========================================
setting                   environment variable            default      what it does
========================  ==============================  ===========  =========================================
``compiled_kernels``      ``PIXIFY_COMPILED_KERNELS``     ``True``     PiX may use its generated CPU kernels
``compiled_pix``          ``PIXIFY_COMPILED_PIX``         decompose    under ``torch.compile`` inference, trace
                                                                       PiX as its reference formulation
                                                                       (``decompose``) or keep the op (``op``)
``triton_channels_inner`` ``PIXIFY_TRITON_CHANNELS_INNER``  loop       CUDA, channels-last: the Triton kernel
                                                                       that loops over a subset's channels
                                                                       (``loop``) or loads runs of them
                                                                       (``tile``)
``debug``                 ``PIXIFY_DEBUG``                ``False``    the CLI shows tracebacks
``fast_cpu``              (none)                          ``True``     the CPU fast kernels (off: the generic
                                                                       code, which the tests compare them with)
========================  ==============================  ===========  =========================================

The settings are process-wide, like ``torch.backends`` flags, because ``torch.compile`` guards on plain
attributes of a global object (it would bake in a context variable's value without a guard). Changes are
serialised by a lock; :func:`override` blocks nest, each restoring on exit what it found on entry.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

__all__ = ["Settings", "SETTINGS", "settings", "override", "TESTED_TORCH", "PRIVATE_TORCH_OK"]

#: torch releases (major, minor) that pixify's fast paths were tested with.  Those paths use private torch
#: internals (inductor's ahead-of-time compile and C++ code cache, the dispatch-stack probe, a sparse
#: reduction, Triton's compiled-kernel runners); on any other release they stay off and PiX runs on its
#: public-API kernels, which are slower but the same function.
TESTED_TORCH = ((2, 14),)


def _torch_release() -> tuple[int, int]:
    import torch

    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - a version string torch never had
        return (0, 0)


PRIVATE_TORCH_OK = _torch_release() in TESTED_TORCH

_CHOICES = {"compiled_pix": ("decompose", "op"), "triton_channels_inner": ("loop", "tile")}


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    text = (value or "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return default  # unset, empty or a word that is neither: the default, not whatever it resembles


def _env_choice(name: str, key: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    if key == "compiled_pix" and value != "decompose":
        return "op"  # any other value keeps the op, as it always has
    return value if value in _CHOICES[key] else default


class Settings:
    """The current values (read them as attributes; change them with :func:`override`)."""

    __slots__ = ("compiled_kernels", "compiled_pix", "triton_channels_inner", "debug", "fast_cpu",
                 "reference_depth", "eager_depth", "export_depth")

    def __init__(self) -> None:
        self.compiled_kernels = _env_bool("PIXIFY_COMPILED_KERNELS", True)
        self.compiled_pix = _env_choice("PIXIFY_COMPILED_PIX", "compiled_pix", "decompose")
        self.triton_channels_inner = _env_choice("PIXIFY_TRITON_CHANNELS_INNER", "triton_channels_inner", "loop")
        self.debug = _env_bool("PIXIFY_DEBUG", False)
        self.fast_cpu = True
        self.reference_depth = 0  # open reference_mode() blocks
        self.eager_depth = 0  # open eager_kernels() blocks
        self.export_depth = 0  # open export_mode() blocks

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


SETTINGS = Settings()
_LOCK = threading.RLock()
_PUBLIC = ("compiled_kernels", "compiled_pix", "triton_channels_inner", "debug", "fast_cpu")


def settings() -> Settings:
    """The settings object itself (its attributes are the current values)."""
    return SETTINGS


def _check(name: str, value: Any) -> None:
    if name not in _PUBLIC:
        raise TypeError(f"unknown pixify setting {name!r}; known: {', '.join(_PUBLIC)}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"setting {name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if name not in _CHOICES and not isinstance(value, bool):
        raise TypeError(f"setting {name} is a bool, got {value!r}")


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change settings inside a ``with`` block: ``with pixify.config.override(compiled_kernels=False): ...``."""
    for name, value in changes.items():
        _check(name, value)
    with _LOCK:
        before = {name: getattr(SETTINGS, name) for name in changes}
        for name, value in changes.items():
            setattr(SETTINGS, name, value)
    try:
        yield SETTINGS
    finally:
        with _LOCK:
            for name, value in before.items():
                setattr(SETTINGS, name, value)


@contextlib.contextmanager
def _entered(counter: str) -> Iterator[None]:
    """A switch that is on while at least one ``with`` block of it is open (in any thread)."""
    with _LOCK:
        setattr(SETTINGS, counter, getattr(SETTINGS, counter) + 1)
    try:
        yield
    finally:
        with _LOCK:
            setattr(SETTINGS, counter, getattr(SETTINGS, counter) - 1)
