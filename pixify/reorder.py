"""Channel reordering before conversion: PiX pools *contiguous* channel subsets, so which channels share a
subset decides how much a site loses. The order of channels between a dense layer and the layer that reads
them is free: permuting the producer's output channels, every per-channel module in between (norms,
activations, depthwise convolutions) and the reader's input channels leaves the function unchanged. This
module chooses, from calibration statistics, an order in which each subset holds channels that pool with
little loss, and applies it to the original model before it is converted.

The loss of pooling a subset ``g`` is measured where it matters, at the output of the layer that reads it:
with ``W`` that layer's weights, ``S`` the covariance of its input, the part of ``Σ_{c∈g} W_c x_c`` that a
refitted layer cannot recover from ``Σ_{c∈g} x_c`` is ``1ᵀ(G∘S)1 − ‖Σ_i W_i t_i‖² / 1ᵀS1`` over ``g``, with
``G = WᵀW`` and ``t_i = Σ_{j∈g} S_ij`` (the least-squares residual of a multi-output regression on the
subset's sum; cross terms between subsets are ignored). Pairs are chosen greedily by ascending loss (ζ = 2,
the gentle cut that budgets choose; other sites keep their order). A reordering is applied only where the
model's output is unchanged by it on the example input, which also catches readers that hooks cannot see.

Measured on EfficientNet-Lite0's real weights (docs/recovery.md): the fit's relative error at the prune
points 0.41 → 0.34, and the budgeted conversions agree better with the original on unseen photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .ops import eager_kernels
from .recovery import _Acc, _rows, _sample, module_io

__all__ = ["choose_order", "reorder_sites"]

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.PReLU)


@dataclass
class Chain:
    head: str  # the dense layer whose output channels are reordered
    between: list[str]  # per-channel modules from the head to the reader (in forward order)
    reader: str  # the layer whose input channels are reordered (the site)
    channels: int


def _per_channel(m: nn.Module, c: int) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features == c
    if isinstance(m, nn.Conv2d):
        return m.groups == c and m.in_channels == c and m.out_channels == c
    if isinstance(m, nn.PReLU):
        return m.num_parameters in (1, c)
    if isinstance(m, _ELEMENTWISE):
        return True
    # timm's norm-act modules hold a per-channel norm followed by an activation and a dropout
    return type(m).__name__ in ("BatchNormAct2d",) and getattr(m, "num_features", None) == c


def _dense(m: nn.Module, c: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels == c) or \
           (isinstance(m, nn.Linear) and m.out_features == c)


class _Producers:
    """For each module, the module whose output is its first input, and how many modules read each output,
    from one forward pass (:func:`pixify.recovery.module_io`)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        made: dict[int, str] = {}
        self.producer: dict[str, str] = {}
        self.readers: dict[str, int] = {}
        for event, name, _, tid in module_io(model, example):
            if event == "wrote":
                made[tid] = name  # a module that passes its input through (Identity) takes it over
            elif tid in made:
                self.producer.setdefault(name, made[tid])
                self.readers[made[tid]] = self.readers.get(made[tid], 0) + 1


def channel_chain(model: nn.Module, reader: str, graph: _Producers) -> Chain | None:
    """The dense layer and per-channel modules that produce ``reader``'s input, when every one of them is
    read by the next one only; None when there is no such chain."""
    mod = model.get_submodule(reader)
    c = mod.in_channels if isinstance(mod, nn.Conv2d) else getattr(mod, "in_features", None)
    if c is None or (isinstance(mod, nn.Conv2d) and mod.groups != 1):
        return None
    between: list[str] = []
    cur = reader
    while True:
        src = graph.producer.get(cur)
        if src is None or graph.readers.get(src, 0) != 1 or "." + src + "." in "." + reader + ".":
            return None
        m = model.get_submodule(src)
        if _dense(m, c):
            return Chain(src, list(reversed(between)), reader, c)
        if not _per_channel(m, c) or len(between) > 8:
            return None
        between.append(src)
        cur = src


def _permute_(t: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    t.data.copy_(t.data.index_select(dim, perm))


@torch.no_grad()
def apply_order(model: nn.Module, chain: Chain, perm: torch.Tensor) -> None:
    """Reorder the channels of ``chain`` in ``model`` (in place); the function is unchanged."""
    head = model.get_submodule(chain.head)
    _permute_(head.weight, perm, 0)
    if head.bias is not None:
        _permute_(head.bias, perm, 0)
    for name in chain.between:
        m = model.get_submodule(name)
        for t in list(m.parameters(recurse=True)) + [b for b in m.buffers(recurse=True)]:
            if t.dim() >= 1 and t.shape[0] == chain.channels:
                _permute_(t, perm, 0)
    _permute_(model.get_submodule(chain.reader).weight, perm, 1)


def choose_order(G: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """A channel order whose consecutive pairs pool with little loss (module docstring): the pair with the
    least loss first, then the least among the channels left, and so on."""
    c = S.shape[0]
    G, S = G.double(), S.double()
    if c < 4:
        return torch.arange(c)
    d_g, d_s = G.diag(), S.diag()
    a = d_g[:, None] * d_s[:, None] + d_g[None] * d_s[None] + 2 * G * S  # energy of W_a x_a + W_b x_b
    u, v = d_s[:, None] + S, S + d_s[None]
    den = (d_s[:, None] + d_s[None] + 2 * S).clamp_min(1e-30)
    loss = a - (d_g[:, None] * u ** 2 + d_g[None] * v ** 2 + 2 * G * u * v) / den
    loss.fill_diagonal_(float("inf"))
    order: list[int] = []
    for _ in range(c // 2):
        k = int(loss.argmin())
        i, j = divmod(k, c)
        order += [i, j]
        loss[[i, j], :] = float("inf")
        loss[:, [i, j]] = float("inf")
    used = torch.zeros(c, dtype=torch.bool)
    used[order] = True
    return torch.tensor(order + torch.nonzero(~used).flatten().tolist())


def _weight_gram(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().double()
    w = w.reshape(w.shape[0], w.shape[1], -1)  # out × C × taps
    return torch.einsum("oak,obk->ab", w, w)


@torch.no_grad()
def reorder_sites(model: nn.Module, sites: Sequence[Any], batches: Sequence[torch.Tensor],
                  max_rows: int = 2048) -> dict[str, Any]:
    """Reorder, in place, the channels that each site's PiX will pool in pairs (``sites``: records with
    ``name``, ``zeta`` and ``channel_dim``; sites whose smallest planned ζ is 2, as budgets choose them), from
    the covariance of each site's input on ``batches``. Returns ``{"reordered": [...], "skipped": {...}}``."""
    model.eval()
    example = batches[0][:2]
    graph = _Producers(model, example)
    zetas: dict[str, int] = {}
    for s in sites:
        if getattr(s, "action", "") != "skip" and s.zeta and s.zeta >= 2 and s.channel_dim == 1:
            zetas[s.name] = min(zetas.get(s.name, s.zeta), s.zeta)
    zetas = {name: z for name, z in zetas.items() if z == 2}  # pairs: the cut budgets choose
    chains, skipped = {}, {}
    for name in zetas:
        ch = channel_chain(model, name, graph)
        if ch is None:
            skipped[name] = "no dense layer and per-channel chain produces its input"
        else:
            chains[name] = ch
    if not chains:
        return {"reordered": [], "skipped": skipped}
    stats = {n: _Acc() for n in chains}
    gen = torch.Generator().manual_seed(0)

    def grab(name):
        def hook(m, inputs):
            rows = _rows(inputs[0], 1)
            keep = _sample(rows.shape[0], max_rows, gen)
            if keep is not None:
                rows = rows[keep]
            r32 = rows.float()  # the products in float32, their sums over batches in float64
            stats[name].add("n", rows.shape[0])
            stats[name].add("sum", rows.sum(0))
            stats[name].add("xx", (r32.T @ r32).double())
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in chains]
    try:
        with eager_kernels():
            for b in batches:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    with eager_kernels():
        before = model(example)
    done = []
    for name, ch in chains.items():
        st = stats[name]
        mean = st["sum"] / st["n"]
        S = st["xx"] / st["n"] - torch.outer(mean, mean)
        perm = choose_order(_weight_gram(model.get_submodule(name)), S)
        if torch.equal(perm, torch.arange(len(perm))):
            continue
        apply_order(model, ch, perm)
        with eager_kernels():
            after = model(example)
        if not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * float(before.abs().max())):
            apply_order(model, ch, torch.argsort(perm))
            skipped[name] = "reordering its channels changed the model's output"
            continue
        done.append(name)
    return {"reordered": done, "skipped": skipped}
