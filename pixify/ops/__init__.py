"""The Pick-or-Mix (PiX) operator.

Input ``x`` has a batch dimension 0 and a channel dimension ``channel_dim`` of size ``C``; every other
dimension is "spatial" (``H×W`` for NCHW, ``L`` for ``N×L×C`` tokens).  With a sampling factor ``zeta``
there are ``G = ceil(C / zeta)`` contiguous channel subsets ``[i*zeta, min(i*zeta + zeta, C))``.

``pix``:  ``z = mean of x over the spatial dims`` (N×C), ``p = sigmoid(z @ weight.T)`` (N×G), then the
fused *pick-or-mix* step: per sample ``n`` and subset ``i``

* ``p[n, i] <  tau``: pick -- ``y = p · max over the subset``
* ``p[n, i] >= tau``: mix  -- ``y = p · mean over the subset`` (the true subset size, also for a short
  last subset)

Gradients are exact for the branch taken: pick sends ``p·g`` to the first arg-max channel, mix sends
``p·g/|subset|`` to every member, ``p`` receives ``sum over pixels of g·fused``; nothing flows through the
threshold.

Implementation layout
---------------------
* ``pixify::pick_or_mix`` and ``pixify::pick_or_mix_backward`` are ``torch.library`` custom ops (fake
  kernels for compile/export, autograd registered), so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` see one opaque node; for ``torch.fx.symbolic_trace`` :func:`pix` and
  :func:`pick_or_mix` are leaf functions (one ``call_function`` node).  Exception: ``torch.compile`` of
  inference traces the reference formulation instead, for inductor to generate and fuse (setting ``compiled_pix``).
* Inference without autograd calls the kernels directly (no custom-op dispatch) when nothing watches
  the dispatcher (see ``_direct_ok``).
* Their kernels pick the fastest exact path at run time, from one ordered table of backends
  (:mod:`.dispatch`; :func:`explain` says which one a call takes and why the others were passed over):

  - CPU, contiguous NCHW / N×C×L, C divisible by zeta, at least ``_COMPILED_MIN_NUMEL`` elements: a
    kernel that inductor generates from :func:`_fused_even` / :func:`_fused_even_backward` (a
    vectorised C++/OpenMP loop that reads the input once), compiled ahead of time on first use with
    symbolic sizes (``torch._inductor.standalone_compile``; cached on disk by torch, shared by all
    shapes) and called without dynamo's per-call guards.  For fp32 inference :func:`pix` runs the whole
    operator (pooling, φ, sigmoid, fused step) as one such kernel call (``_compiled_pix``).
    ``PIXIFY_COMPILED_KERNELS=0`` or :func:`eager_kernels` turns them off; if they cannot be built (no
    C++ compiler) the eager kernels below run, after one warning.
  - CPU, channels innermost (channels-last NCHW, N×L×C tokens), C divisible by zeta <= 16: the same
    for :func:`_fused_interleaved` / :func:`_fused_interleaved_backward` / :func:`_pix_interleaved`, one
    build per zeta.  Inductor does not vectorise their stride-zeta loads: the forward takes about 4
    passes (8x256x56x56, zeta 4), the backward about 13 (still faster than the eager kernel below).  So
    in fp32 with zeta 2, 4, 8 or 16 hand-vectorised C++ kernels run instead (:mod:`pixify.ops.cpu_kernels`,
    built with inductor's toolchain: the forward about one pass, the backward about four), and fp32
    inference pools with ATen, applies φ and runs the forward one.
    Under ``torch.compile`` the forward op is ``flexible_layout``, so it takes the channels-last
    activations that inductor's layout optimisation makes without a copy back to NCHW.

  - CPU, "planar" memory (contiguous NCHW / N×C×L) and at least ``_FAST_MIN_NUMEL`` elements, eager:
    with C divisible by zeta, one reduction over ``x.view(N*G, zeta, S)`` for all-mix/all-pick batches
    and a second, partial one for mixed batches (``_planar_forward_even``); otherwise every
    (sample, subset) is a block of contiguous channel rows of the table ``x.view(N*C, H*W)``.  The mix
    blocks are reduced by ``embedding_bag`` (weighted sum, ``p/|subset|`` folded into the weights), the
    pick blocks by a CSR sparse × dense product under the ``amax`` reduction (``p`` folded into the
    sparse values; ``max(p·x) == p·max(x)`` exactly for p >= 0).  Each reads only its own rows, so the
    input is read once in total, nothing input-sized is gathered, and no select is built at all.  The
    backward uses the first arg-max positions that the same sparse kernel records.
  - CPU, "interleaved" memory (channels_last NCHW, N×L×C tokens): channels are innermost; the group max
    comes from ``max_pool1d``, the group sum from a small block-diagonal matmul, then an output-sized
    select (reads the input twice).
  - CUDA (fp32, fp16, bf16; any layout, any C) with Triton installed: one Triton kernel
    (:mod:`pixify.ops.triton_kernels`) for the forward and one for the backward, each reading the input once.
  - anything else (other dtypes, CUDA without Triton, small CPU tensors): the generic formulation -- two
    grouped reductions and an output-sized select (never a select over the full-size input); backward
    with ``torch.max`` indices.
* :func:`pick_or_mix_reference` is plain differentiable PyTorch used for ONNX export and equality tests;
  :func:`reference_mode` makes :func:`pick_or_mix` / :func:`pix` use it.  ``torch.onnx.export``
  (dynamo) needs it (or :func:`pix_decompositions` applied to an ExportedProgram): the exporter has no
  translation for the custom op.
* Double backward (``create_graph=True`` through PiX) is not supported.
"""

from __future__ import annotations

from . import cpu_kernels, triton_kernels  # noqa: F401 - backends with their own switches
from .args import PixArgumentError, pix_groups
from .dispatch import BACKENDS, Backend, last_backend
from .explain import Explanation, explain
from .inductor import compiled_kernel_failures, compiled_kernels_enabled, eager_kernels
from .module import PiX, pix
from .op import pick_or_mix, pix_decompositions, pix_flop_formulas
from .reference import export_mode, pick_or_mix_export, pick_or_mix_reference, reference_mode

__all__ = [
    "BACKENDS",
    "Backend",
    "Explanation",
    "PiX",
    "PixArgumentError",
    "compiled_kernel_failures",
    "compiled_kernels_enabled",
    "eager_kernels",
    "explain",
    "export_mode",
    "last_backend",
    "pick_or_mix",
    "pick_or_mix_export",
    "pick_or_mix_reference",
    "pix",
    "pix_decompositions",
    "pix_flop_formulas",
    "pix_groups",
    "reference_mode",
]
