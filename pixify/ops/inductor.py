"""The generated CPU kernels: inductor compiles the fused formulations (:mod:`.fused`) ahead of time with
symbolic sizes (``torch._inductor.standalone_compile``, a private API: used only on the torch releases in
:data:`pixify.config.TESTED_TORCH`), once per kind, tau and dtypes, and they are called without dynamo's
per-call guards. A kernel that fails to build is given up alone, with its reason."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PRIVATE_TORCH_OK, SETTINGS, _entered
from . import cpu_kernels
from .fused import (_UNROLL_MAX_ZETA, _fused_even, _fused_even_backward, _fused_interleaved,
                    _fused_interleaved_backward, _pix_even, _pix_interleaved)
from .layout import _PLANAR
from .planar import _use_fast


# Planar forward, C divisible by zeta: from this many input elements on, the compiled kernel is used
# (see _compiled_even); below, its call overhead is not worth it.
_COMPILED_MIN_NUMEL = 1 << 16


# the generated kernels built so far, by (kind, tau, dtypes); "failed": the ones that could not be built
# here, with the reason (only that kernel is given up: the others are still tried)
_COMPILED: dict[str, Any] = {"kernels": {}, "failed": {}}


def eager_kernels() -> contextlib.AbstractContextManager[None]:
    """Inside, PiX never uses (or compiles) the generated CPU kernel: e.g. for one-off forward passes,
    where its one-time compilation would cost more than it saves.  Nesting is allowed."""
    return _entered("eager_depth")


def compiled_kernels_enabled() -> bool:
    """Whether the generated CPU kernels may be used: not disabled (``PIXIFY_COMPILED_KERNELS=0``,
    :func:`pixify.config.override`), not inside :func:`eager_kernels`.  A kernel that failed to build here
    is skipped on its own (:func:`compiled_kernel_failures`)."""
    return SETTINGS.fast_cpu and SETTINGS.eager_depth == 0 and SETTINGS.compiled_kernels and PRIVATE_TORCH_OK


def compiled_kernel_failures() -> dict[str, str]:
    """The generated kernels that could not be built in this process, by kind, with the reason."""
    return {f"{k[0]} (tau {k[1]}, {', '.join(str(d).replace('torch.', '') for d in k[2:])})": why
            for k, why in _COMPILED["failed"].items()}


def _import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (which inductor needs to build a CPU kernel) with its logger
    silenced: on import, a CUDA build of torch on a machine without a GPU warns "No CUDA runtime is
    found, using CUDA_HOME=...", noise for our users."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(old)


def _build_kernel(kind: str, tau: float, dtypes: tuple[torch.dtype, ...]) -> Callable[..., Any]:
    """Inductor's C++/OpenMP kernel at one tau and input dtypes, for any shape, traced with symbolic sizes
    and compiled ahead of time (``torch._inductor.standalone_compile``).  ``kind``:

    * planar memory (channels outside the pixels): "fwd" :func:`_fused_even`; "bwd"
      :func:`_fused_even_backward`; "pix" :func:`_pix_even` ("pix/1" for batch size 1, which the trace
      specialises); each with a zeta after it ("fwd4", "pix4/1") unrolled over the rows of a subset for
      that zeta, without for any zeta;
    * channels innermost (channels-last NCHW, N×L×C tokens), each built for one zeta and with a batch-1
      build apart, as the batch is a dimension of their inputs: "cl-fwd<zeta>" :func:`_fused_interleaved`,
      "cl-bwd<zeta>" :func:`_fused_interleaved_backward`, "cl-pix<zeta>" :func:`_pix_interleaved`
      ("cl-fwd4/1": zeta 4, batch 1).

    Calling the artifact skips dynamo's per-call frame evaluation and guards, about 0.15 ms per call in a
    network, which dominated PiX at batch 1.  Nothing checks the inputs at call time: the callers pass only
    contiguous tensors with every size >= 2 (the trace assumes sizes other than 0 and 1), except the batch
    size of the batch-1 builds."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _import_cpp_extension_quietly()
    # Example sizes: distinct and >= 2, so that none is specialised or tied to another (duck sizing), and
    # of a network's order, as inductor takes them as size hints when it plans the loops.
    # The batch of a planar "pix" build is 17, above any unrolled zeta, which a dimension of its input is.
    nb, z, s, g = 509, 3, 3137, 167
    base, _, batch = kind.partition("/")
    n = 1 if batch == "1" else 17 if base.startswith("pix") else 2
    # "<kind><zeta>": unrolled for zeta; channels innermost, every kind is built for one zeta
    stem = base.rstrip("0123456789")
    unroll = int(base[len(stem):]) if stem != base else None
    base = stem
    zz = unroll or z
    # impl: no annotations, else make_fx copies them into the traced code as string globals, which
    # inductor's cache cannot key (it then warns with a traceback and does not cache the kernel)
    if base == "pix":
        ex = [torch.zeros(n, g, zz, s, dtype=dtypes[0]), torch.zeros(g, g * zz, dtype=dtypes[1])]

        def impl(t5, w):  # type: ignore[no-untyped-def]
            return _pix_even(t5, w, tau, unroll)
    elif base == "fwd":
        ex = [torch.zeros(nb, zz, s, dtype=dtypes[0]), torch.zeros(nb, dtype=dtypes[1])]

        def impl(t4, p):  # type: ignore[no-untyped-def]
            return _fused_even(t4, p, tau, unroll)
    elif base == "bwd":
        ex = [torch.zeros(nb, zz, s, dtype=dtypes[0]), torch.zeros(nb, dtype=dtypes[1]),
              torch.zeros(nb, s, dtype=dtypes[2])]

        def impl(t4, p, g2):  # type: ignore[no-untyped-def]
            return _fused_even_backward(t4, p, g2, tau, unroll)
    elif base.startswith("cl-") and unroll is None:
        raise ValueError(f"kernel kind {kind!r}: channels-innermost kernels are built for one zeta")
    elif base == "cl-pix":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(g, g * zz, dtype=dtypes[1])]

        def impl(t3, w):  # type: ignore[no-untyped-def]
            return _pix_interleaved(t3, w, tau, unroll)
    elif base == "cl-fwd":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(n, g, dtype=dtypes[1])]

        def impl(t3, p):  # type: ignore[no-untyped-def]
            return _fused_interleaved(t3, p, tau, unroll)
    elif base == "cl-bwd":
        ex = [torch.zeros(n, s, g * zz, dtype=dtypes[0]), torch.zeros(n, g, dtype=dtypes[1]),
              torch.zeros(n, s, g, dtype=dtypes[2])]

        def impl(t3, p, g3):  # type: ignore[no-untyped-def]
            return _fused_interleaved_backward(t3, p, g3, tau, unroll)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    # Built outside inference mode even when first needed inside it: the kernel built under
    # inference_mode ran at half the speed (8x256x56x56: 2.1 against 1.0 ms).
    with torch.inference_mode(False), torch.no_grad():
        ex = [e.clone() for e in ex]
        gm = make_fx(impl, tracing_mode="symbolic")(*ex)
        return torch._inductor.standalone_compile(gm, ex)


def _compiled_even(t4: Tensor, p: Tensor, tau: float, grad: Tensor | None = None) -> Any:
    """:func:`_fused_even` as a generated kernel (inductor writes a vectorised C++/OpenMP loop that reads
    the input once: about one pass, where the eager kernels need 1.5-2.5), built on first use per tau and
    dtype (a few seconds; torch caches the code on disk, so later processes load it in about two) and shared
    by every shape.  None when it does not apply (a size below 2) or is unavailable: the eager kernels run
    instead, and a build failure (no C++ compiler, say) is reported once and not retried.

    With ``grad`` (NB, S): the backward kernel (:func:`_fused_even_backward`), returning (grad_t4, grad_p).
    """
    if not compiled_kernels_enabled() or min(t4.shape) < 2:
        return None
    args = [t4.contiguous(), p.contiguous()] + ([] if grad is None else [grad.contiguous()])
    return _run_kernel(_even_kind(t4.shape[1], grad is not None), tau, args)


def _compiled_cl(t3: Tensor, p: Tensor, zeta: int, tau: float, grad: Tensor | None = None) -> Any:
    """:func:`_compiled_even` for channels-innermost memory: t3 (N, S, C), p (N, G) -> (N, S, G)
    (:func:`_fused_interleaved`), or with ``grad`` (N, S, G) the gradients (N, S, G, zeta) and (N, G).
    Built per zeta (up to ``_UNROLL_MAX_ZETA``) and for batch 1 apart.  In fp32 the hand-vectorised
    kernels run instead where they apply (:mod:`pixify.ops.cpu_kernels`; the input gradient then comes as
    (N, S, C), the same memory)."""
    if not compiled_kernels_enabled() or min(t3.shape[1:]) < 2 or zeta > _UNROLL_MAX_ZETA:
        return None
    if cpu_kernels.available(t3, p.dtype, zeta):
        if grad is None:
            out = cpu_kernels.fused_interleaved(t3, p, zeta, tau)
        else:
            out = cpu_kernels.fused_interleaved_backward(t3, p, grad, zeta, tau)
        if out is not None:
            return out
    return _compiled_generated_cl(t3, p, zeta, tau, grad)


def _compiled_generated_cl(t3: Tensor, p: Tensor, zeta: int, tau: float, grad: Tensor | None = None) -> Any:
    """:func:`_compiled_cl` with the generated kernel only (the dispatch table lists the hand one apart)."""
    if not compiled_kernels_enabled() or min(t3.shape[1:]) < 2 or zeta > _UNROLL_MAX_ZETA:
        return None
    args = [t3.contiguous(), p.contiguous()] + ([] if grad is None else [grad.contiguous()])
    return _run_kernel(_cl_kind(zeta, t3.shape[0], grad is not None), tau, args)


def _cl_kind(zeta: int, n: int, backward: bool) -> str:
    return ("cl-bwd" if backward else "cl-fwd") + str(zeta) + ("/1" if n == 1 else "")


def _even_kind(zeta: int, backward: bool) -> str:
    return ("bwd" if backward else "fwd") + (str(zeta) if zeta <= _UNROLL_MAX_ZETA else "")


def failure_for(t: Tensor, p: Tensor, zeta: int, tau: float, layout: int, backward: bool) -> str | None:
    """Why the generated kernel for this call could not be built here, if it could not."""
    kind = _even_kind(zeta, backward) if layout == _PLANAR else _cl_kind(zeta, t.shape[0], backward)
    dtypes = (t.dtype, p.dtype) + ((t.dtype,) if backward else ())
    return _COMPILED["failed"].get((kind, float(tau), *dtypes))


def _compiled_pix(t: Tensor, w: Tensor, tau: float, zeta: int | None = None) -> Tensor | None:
    """The whole operator as one generated kernel call (inference): pooling, φ, sigmoid and the fused step
    without a Python round trip between them.  w (G, C) of t's dtype; t contiguous, planar
    (N, G, zeta, S) (:func:`_pix_even`, returns (N*G, S)) or, given ``zeta``, channels innermost (N, S, C)
    (:func:`_pix_interleaved`, returns (N, S, G)).  Channels innermost, where the hand-vectorised step
    applies, it is three calls instead: ATen's pooling, φ with its sigmoid, and that step."""
    if not compiled_kernels_enabled() or min(t.shape[1:]) < 2:
        return None
    if zeta is None:
        kind = "pix" + (str(t.shape[2]) if t.shape[2] <= _UNROLL_MAX_ZETA else "")
    elif cpu_kernels.available(t, w.dtype, zeta):  # the pooling (ATen), φ with its sigmoid, the hand step
        with torch.no_grad():
            p = torch.sigmoid(F.linear(t.mean(1), w))
        return _compiled_cl(t, p, zeta, tau)  # which uses the generated step if the hand one fails to build
    elif zeta <= _UNROLL_MAX_ZETA:
        kind = f"cl-pix{zeta}"
    else:
        return None
    return _run_kernel(kind + ("/1" if t.shape[0] == 1 else ""), tau, [t, w.contiguous()])


def _run_kernel(kind: str, tau: float, args: list[Tensor]) -> Any:
    """Run the generated kernel ``kind``, building it on first use.  A build that fails (no C++ compiler,
    say) gives up that kernel alone, says so once, and the eager kernels run instead; an error while a
    built kernel runs is raised as it is."""
    key = (kind, float(tau), *(a.dtype for a in args))
    kernels = _COMPILED["kernels"]
    fn = kernels.get(key)
    if fn is None:
        if key in _COMPILED["failed"]:
            return None
        try:
            fn = kernels[key] = _build_kernel(key[0], key[1], key[2:])
        except Exception as e:  # noqa: BLE001 - any compiler/toolchain failure means "use the eager kernels"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _COMPILED["failed"][key] = reason
            warnings.warn(f"pixify: the compiled PiX CPU kernel {kind} is unavailable here ({reason}); using the "
                          "eager kernels", RuntimeWarning, stacklevel=2)
            return None
    with torch.no_grad():
        return fn(*args)


def _compiled_view(x: Tensor, t: Tensor, zeta: int, layout: int) -> Tensor | None:
    """The view of t (N, C, S) that the compiled kernels take -- planar (N*G, zeta, S), channels innermost
    (N, S, C) -- or None where they do not apply (zeta 1, C not divisible by zeta, not a CPU fast-path
    tensor, too small)."""
    n, c, s = t.shape
    if zeta > 1 and c % zeta == 0 and _use_fast(x, _COMPILED_MIN_NUMEL):
        return t.view(n * (c // zeta), zeta, s) if layout == _PLANAR else t.transpose(1, 2)
    return None
