"""Rewriting: decide ζ at every matched site, then swap modules by qualified name.

Squeeze mode: a *pure* site replaces the anchor layer by PiX (its norm and activation become
``nn.Identity``). A *hybrid* site puts PiX(ζ) in front of the anchor layer shrunk to ``ceil(C_in/ζ)``
inputs, whose weights are folded from the original (the input-channel slices of each subset summed,
scaled by ``1/sigmoid(0)``).

Prune mode: a *prune* site is built exactly like a hybrid one — PiX(ζ) in front of the consumer layer
(any dense k×k convolution or token-layout linear fed by an activation), the consumer shrunk to
``ceil(C_in/ζ)`` inputs with folded weights — but it is chosen for a different reason (the consumer's
MACs drop by ζ) and ``--zeta auto`` means the rule's ``auto_zeta`` (2 by default). The consumer keeps its
kernel, stride, padding and output channels, so whatever reads its output (residual adds,
concatenations, grouped convolutions) sees the same shapes as before.

Initialisation: φ starts at zero, so every probability is ``sigmoid(0) = 0.5 = τ`` and every
group *mixes* (a mean) on the first forward pass. The folded layer of a hybrid site divides that known
0.5 back out, so it computes ``Σ_c W_c · mean(subset)`` — exactly the original layer whenever the channels
of a subset agree, and its best channel-blind approximation otherwise. A random φ would instead flip
groups between max and mean at random and make the first forward pass noisy.

:func:`apply_sites` is the single place that builds the new modules: conversion and checkpoint loading
both call it, so a recipe re-applied to a fresh model reproduces the same module tree.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .graph import Candidate
from .ops import PiX, pix_groups
from .schema import MAX_CHANNELS

__all__ = ["PiXBlock", "SiteRecord", "plan_sites", "apply_sites", "parse_zeta", "INIT_P"]

INIT_P = 0.5  # sigmoid(0): the probability every group starts with (φ = 0)


class PiXBlock(nn.Module):
    """PiX followed by the layer it feeds (a hybrid squeeze site or a prune point)."""

    def __init__(self, pix: PiX, layer: nn.Module):
        super().__init__()
        self.pix = pix
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.pix(x))


@dataclass
class SiteRecord:
    """What was decided (and, unless skipped, done) at one site. Serialised into checkpoints."""

    name: str
    rule: str
    mode: str
    kind: str  # conv2d | linear
    action: str  # pure | hybrid | prune | skip
    c_in: int
    c_out: int
    spatial: int
    channel_dim: int
    pattern: str
    zeta: int | None = None
    tau: float = 0.5
    removed: list[str] = field(default_factory=list)  # modules replaced by nn.Identity
    kept: list[str] = field(default_factory=list)  # followers that stay in place (and why)
    reason: str = ""
    macs_before: int = 0
    macs_after: int = 0
    kernel_area: int = 1  # kh*kw of a conv consumer (prune sites)
    out_spatial: int | None = None  # output positions of the layer when they differ from ``spatial``

    @property
    def groups(self) -> int | None:
        return pix_groups(self.c_in, self.zeta) if self.zeta else None

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiteRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


MAX_ZETA = MAX_CHANNELS  # no layer has more channels; a checkpoint's recipe holds ζ up to this


def parse_zeta(value: Any) -> int | str:
    """``"auto"`` or an integer from 1 to :data:`MAX_ZETA`; anything else raises ValueError with a one-line
    reason."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"zeta must be 'auto' or an integer >= 1, got '{value}'") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        try:
            number = float(operator.index(value))  # numpy and 0-d torch integers
        except TypeError:
            raise ValueError(f"zeta must be 'auto' or an integer >= 1, got {value!r}") from None
    else:
        number = float(value)
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(f"zeta must be 'auto' or an integer >= 1, got {value}")
    if number > MAX_ZETA:
        raise ValueError(f"zeta {value} is more than any layer's channels (at most {MAX_ZETA})")
    return int(number)


def _exact_zeta(c_in: int, c_out: int) -> int | None:
    """The integer ζ whose ceil(C_in/ζ) groups equal C_out exactly, if any."""
    z = max(1, math.ceil(c_in / c_out))
    for cand in (z - 1, z, z + 1):
        if cand >= 1 and pix_groups(c_in, cand) == c_out:
            return cand
    return None


DEFAULT_PRUNE_ZETA = 2  # what `--zeta auto` means at a prune point whose rule sets no auto_zeta


def plan_sites(candidates: list[Candidate], zeta: int | str, tau: float) -> list[SiteRecord]:
    """Decide pure / hybrid / prune / skip and ζ for every candidate."""
    records = []
    for c in candidates:
        if c.rule.mode == "prune":
            records.append(_plan_prune(c, zeta, tau))
            continue
        removed, kept = [], []
        if c.norm:
            removed.append(c.norm)
        if c.act and c.act_removable:
            removed.append(c.act)
        if c.act_desc:
            kept.append(c.act_desc)
        rec = SiteRecord(name=c.name, rule=c.rule.name, mode=c.rule.mode, kind=c.kind, action="skip",
                         c_in=c.c_in, c_out=c.c_out, spatial=c.spatial, channel_dim=c.channel_dim,
                         pattern=c.pattern, tau=tau, macs_before=c.macs)
        exact = _exact_zeta(c.c_in, c.c_out)
        allow_ratio_one = c.rule.min_ratio is not None and c.rule.min_ratio < 1
        r = c.ratio
        if zeta == "auto":
            if exact is not None and (exact >= 2 or allow_ratio_one):
                rec.action, rec.zeta = "pure", exact
            elif math.floor(r) >= 2:
                rec.action, rec.zeta = "hybrid", math.floor(r)
                rec.reason = f"no integer ζ gives exactly {c.c_out} groups from {c.c_in}; hybrid at ζ={rec.zeta}"
            else:
                rec.reason = f"ratio {r:.3g} < 2: no integer ζ ≥ 2 squeezes {c.c_in}→{c.c_out}"
        else:
            g = pix_groups(c.c_in, zeta)
            if g == c.c_out:
                rec.action, rec.zeta = "pure", zeta
            elif g > c.c_out:
                rec.action, rec.zeta = "hybrid", zeta
            else:
                rec.reason = f"ζ={zeta} > ratio {r:.3g}: PiX would give {g} < {c.c_out} channels"
        if rec.action == "pure":
            rec.removed, rec.kept = removed, kept
        rec.macs_after = _site_macs(rec)
        records.append(rec)
    return records


def _plan_prune(c: Candidate, zeta: int | str, tau: float) -> SiteRecord:
    rec = SiteRecord(name=c.name, rule=c.rule.name, mode="prune", kind=c.kind, action="skip", c_in=c.c_in,
                     c_out=c.c_out, spatial=c.spatial, channel_dim=c.channel_dim, pattern=c.pattern, tau=tau,
                     macs_before=c.macs, kernel_area=c.kernel_area,
                     out_spatial=c.out_spatial if c.out_spatial != c.spatial else None)
    z = (c.rule.auto_zeta or DEFAULT_PRUNE_ZETA) if zeta == "auto" else int(zeta)
    if z >= c.c_in:
        rec.reason = f"ζ={z} ≥ {c.c_in} input channels: nothing left to prune to"
    else:
        rec.action, rec.zeta = "prune", z
    rec.macs_after = _site_macs(rec)
    return rec


def _site_macs(rec: SiteRecord) -> int:
    if rec.action == "skip":
        return rec.macs_before
    g = pix_groups(rec.c_in, rec.zeta)
    pix = rec.c_in * g + rec.c_in * rec.spatial  # φ, plus one compare/add per input element
    if rec.action == "pure":
        return pix
    out_spatial = rec.spatial if rec.out_spatial is None else rec.out_spatial
    return pix + g * rec.c_out * rec.kernel_area * out_spatial


def fold_layer(layer: nn.Module, zeta: int, scale: float = 1.0 / INIT_P) -> nn.Module:
    """``layer`` (Conv2d or Linear, any subclass) with its inputs folded to ceil(C_in/ζ) subset means.

    The input-channel slices of each contiguous subset are summed and multiplied by ``scale``; a short
    last subset sums only its real channels.
    """
    w = layer.weight.detach()
    c_in = w.shape[1]
    g = pix_groups(c_in, zeta)
    pad = g * zeta - c_in
    if pad:
        w = torch.cat([w, w.new_zeros((w.shape[0], pad, *w.shape[2:]))], dim=1)
    folded = w.reshape(w.shape[0], g, zeta, *w.shape[2:]).sum(2) * scale
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(folded.contiguous(), requires_grad=layer.weight.requires_grad)
    if isinstance(new, nn.Conv2d):
        if new.groups != 1:
            raise ValueError("cannot fold a grouped convolution")
        new.in_channels = g
    elif isinstance(new, nn.Linear):
        new.in_features = g
    else:  # pragma: no cover - rules only anchor conv2d and linear
        raise TypeError(f"cannot fold {type(layer).__name__}")
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_sites(model: nn.Module, records: list[SiteRecord]) -> nn.Module:
    """Swap the modules of every non-skipped site in ``model`` (in place) and shape-check each swap."""
    for rec in records:
        if rec.action == "skip":
            continue
        try:
            layer = model.get_submodule(rec.name)
        except AttributeError:
            raise ValueError(f"site {rec.name}: no such module in this model") from None
        w = getattr(layer, "weight", None)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or w is None:
            raise ValueError(f"site {rec.name}: expected a Conv2d or Linear, found {type(layer).__name__}")
        if w.shape[0] != rec.c_out or w.shape[1] != rec.c_in:
            raise ValueError(f"site {rec.name}: layer is {w.shape[1]}→{w.shape[0]}, the recipe says "
                             f"{rec.c_in}→{rec.c_out}")
        pix = PiX(rec.c_in, rec.zeta, rec.tau, channel_dim=rec.channel_dim).to(device=w.device, dtype=w.dtype)
        if rec.action == "pure":
            if pix.out_channels != rec.c_out:
                raise ValueError(f"site {rec.name}: PiX(ζ={rec.zeta}) gives {pix.out_channels} channels, "
                                 f"the layer gave {rec.c_out}")
            _set(model, rec.name, pix)
            for other in rec.removed:
                try:
                    model.get_submodule(other)  # a module, not a parameter, buffer or other attribute
                except AttributeError:
                    raise ValueError(f"site {rec.name}: '{other}' (to be removed) is not a module of this "
                                     "model") from None
                _set(model, other, nn.Identity())
        elif rec.action in ("hybrid", "prune"):
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                raise ValueError(f"site {rec.name}: a grouped convolution (groups={layer.groups}) cannot be "
                                 "shrunk")
            shrunk = fold_layer(layer, rec.zeta)
            _set(model, rec.name, PiXBlock(pix, shrunk))
        else:
            raise ValueError(f"site {rec.name}: unknown action '{rec.action}'")
    return model
