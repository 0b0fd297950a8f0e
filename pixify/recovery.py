"""Staying close to the original: a fast initialisation fitted to the teacher, per-site costs measured on
real data, and sites chosen within a budget.

Every fit here needs only the *teacher's* activations, so one teacher pass over the calibration images
(forward hooks, statistics accumulated on the fly) fits every site at once:

- a hybrid site or prune point (``PiXBlock(pix, layer)``): the folded layer is refitted by ridge least
  squares so that ``layer(PiX(x))`` reproduces the original layer's output on the original's input ``x``;
  an offset goes into the layer's bias, or into the running mean of the batch norm that follows it;
- a pure site whose norm was kept (``keep_norm``): ``norm(PiX(x))`` becomes a per-channel affine map
  fitted to the original's normalised output, and each group picks or mixes, whichever fits better;
- a pure site whose norm was removed: the single layer that reads PiX's output is refitted instead.

Sites are fitted independently, each on the original's own input, so the fit of one never waits for
another's. The result is kept only if it agrees better with the original on held-out images than the
model as converted (:func:`initialise`); the report says which was kept and why.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PixifyError
from .metrics import _logits, output_agreement
from .ops import PiX, eager_kernels
from .rewrite import PiXBlock, SiteRecord, apply_sites

__all__ = ["calibration_batches", "keep_norm", "fit_sites", "initialise", "site_costs", "choose_sites",
           "parse_budget", "SiteCost", "Budget"]

RIDGE = 1e-2  # relative to the mean diagonal of AᵀA; the fit is pulled towards the folded weights
_PICK_PHI = -1e-3  # φ on a group's own channels that makes p = sigmoid(-1e-3·Σz) < 0.5 for a non-negative z


# ---------------------------------------------------------------------------------------------- data

def calibration_batches(model: nn.Module, data: str | Path, images: int = 512, data_config: dict | None = None,
                        batch_size: int = 32, seed: int = 0, check_images: bool = True) -> list[torch.Tensor]:
    """``images`` images of the folder ``data`` (a seeded random choice), with the model's evaluation
    preprocessing, as a list of input batches."""
    import timm.data

    from .data import create_dataset, prepare_data, resolve_data_config

    if images < 2:
        raise PixifyError(f"--calib-images must be at least 2, got {images}")
    source = prepare_data(data, split="train", labelled=False, check_images=check_images, what="--data")
    cfg = data_config or resolve_data_config(model)
    ds = create_dataset(source, cfg["input_size"][0], training=False)
    if len(ds) < 2:
        raise PixifyError(f"--data {data} holds {len(ds)} image(s); calibration needs at least 2")
    ds.transform = timm.data.create_transform(
        input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"], mean=cfg["mean"],
        std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[:images].tolist()
    xs = [ds[i][0] for i in order]
    return [torch.stack(xs[i:i + batch_size]) for i in range(0, len(xs), batch_size)]


def split_batches(batches: Sequence[torch.Tensor], held_out: float = 0.25) -> tuple[list, list]:
    """(fit, held-out): the last ``held_out`` fraction of the images (at least one) is kept for measuring."""
    x = torch.cat(list(batches))
    n_held = max(1, int(round(len(x) * held_out)))
    if n_held >= len(x):
        raise PixifyError(f"{len(x)} calibration image(s) cannot be split into fitting and held-out sets")
    bs = max(len(b) for b in batches)
    fit, held = x[:-n_held], x[-n_held:]
    return list(fit.split(bs)), list(held.split(bs))


# -------------------------------------------------------------------------------------------- fitting

def keep_norm(records: Sequence[SiteRecord]) -> list[SiteRecord]:
    """Pure sites that keep their norm and activation, so that the norm can hold a fitted affine map."""
    out = []
    for r in records:
        r = copy.deepcopy(r)
        if r.action == "pure" and r.removed and r.pattern.startswith(("conv2d→norm", "linear→norm")):
            r.kept = [n for n in r.removed] + [k for k in r.kept if k not in r.removed]
            r.removed = []
            r.reason = (r.reason + "; " if r.reason else "") + "norm kept as a fitted affine map"
        out.append(r)
    return out


def _rows(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim]).double()


def _sample(n: int, max_rows: int, gen: torch.Generator) -> torch.Tensor | None:
    return torch.randperm(n, generator=gen)[:max_rows] if n > max_rows else None


class _Acc(dict):
    def add(self, key: str, value: Any) -> None:
        self[key] = self[key] + value if key in self else value


def module_io(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, nn.Module, int]]:
    """One forward pass with hooks on every submodule: ``(event, name, module, tensor id)`` in execution
    order, ``event`` being ``"read"`` (the module's first input) or ``"wrote"`` (its output). The outputs stay
    alive during the pass, so that an id names one tensor throughout."""
    events: list[tuple[str, str, nn.Module, int]] = []
    keep: list[torch.Tensor] = []

    def read(name, mod, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            events.append(("read", name, mod, id(inputs[0])))

    def wrote(name, mod, out):  # returns None: the output is left as it is
        if isinstance(out, torch.Tensor):
            events.append(("wrote", name, mod, id(out)))
            keep.append(out)

    hooks = []
    for name, mod in model.named_modules():
        if mod is not model:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, name=name: read(name, m, i)))
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: wrote(name, m, o)))
    try:
        with torch.no_grad(), eager_kernels():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return events


class _Readers:
    """Which modules read which module's output tensor, from one forward pass (:func:`module_io`)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        produced: dict[int, nn.Module] = {}
        self.readers: dict[int, list[tuple[str, nn.Module]]] = {}
        for event, name, mod, tid in module_io(model, example):
            if event == "wrote":
                produced.setdefault(tid, mod)  # the first producer: a module passing it on does not take over
            elif tid in produced:
                self.readers.setdefault(id(produced[tid]), []).append((name, mod))

    def of(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules whose first input is exactly ``module``'s output (an ``nn.Identity`` passes the very
        tensor on, so the layer behind one is found too)."""
        return list(self.readers.get(id(module), []))


@dataclass
class _Plan:
    rec: SiteRecord
    kind: str  # layer | affine | consumer | none
    pix: PiX
    layer: nn.Module | None = None  # the student layer refitted (layer, consumer)
    teacher_in: str = ""  # teacher module whose input is the site input
    teacher_out: str = ""  # teacher module whose output is the target
    norm: nn.Module | None = None  # student norm holding the affine map / absorbing an offset
    norm_name: str = ""  # the batch norm right after a refitted layer, whose input statistics changed
    teacher_norm: nn.Module | None = None  # affine: the original's norm, applied to its layer's output
    allow_pick: bool = True
    stats: _Acc = field(default_factory=_Acc)
    reason: str = ""


def _bn(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None


def _plans(student: nn.Module, teacher: nn.Module, records: Sequence[SiteRecord], example: torch.Tensor) -> list[_Plan]:
    plans = []
    graph = _Readers(student, example)
    for rec in records:
        if rec.action == "skip":
            continue
        mod = student.get_submodule(rec.name)
        if isinstance(mod, PiXBlock):
            after = graph.of(mod.layer)
            norm = after[0][1] if len(after) == 1 and _bn(after[0][1]) else None
            plans.append(_Plan(rec, "layer", mod.pix, mod.layer, rec.name, rec.name, norm,
                               norm_name=after[0][0] if norm is not None else ""))
            continue
        if not isinstance(mod, PiX):
            plans.append(_Plan(rec, "none", None, reason=f"{type(mod).__name__} at the site"))  # type: ignore[arg-type]
            continue
        kept_norm = next((n for n in rec.kept if _bn(_get(student, n))), None)
        if kept_norm and rec.channel_dim == 1:
            plans.append(_Plan(rec, "affine", mod, teacher_in=rec.name, teacher_out=rec.name,
                               norm=student.get_submodule(kept_norm), teacher_norm=teacher.get_submodule(kept_norm)))
            continue
        # nn.Identity returns its input itself, so the layer behind removed followers sees PiX's very output
        readers = [(n, m) for n, m in graph.of(mod) if isinstance(m, (nn.Conv2d, nn.Linear))]
        if len(readers) == 1 and not (isinstance(readers[0][1], nn.Conv2d) and readers[0][1].groups != 1):
            name, layer = readers[0]
            after = graph.of(layer)
            norm = after[0][1] if len(after) == 1 and _bn(after[0][1]) else None
            plans.append(_Plan(rec, "consumer", mod, layer, rec.name, name, norm,
                               norm_name=after[0][0] if norm is not None else ""))
        else:
            plans.append(_Plan(rec, "none", mod, reason="its output is not read by a single dense layer and its "
                                                          "norm was removed"))
    return plans


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _pick_phi(pix: PiX, pick: torch.Tensor) -> None:
    w = torch.zeros_like(pix.weight)
    for g in torch.nonzero(pick).flatten().tolist():
        w[g, g * pix.zeta:min(pix.channels, (g + 1) * pix.zeta)] = _PICK_PHI
    pix.weight.data.copy_(w)


def _layer_rows(layer: nn.Module, f: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), 0):
            return _rows(f, 1)
        a = F.unfold(f.float(), layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return a.transpose(1, 2).reshape(-1, a.shape[1]).double()
    return f.reshape(-1, f.shape[-1]).double()


@torch.no_grad()
def fit_sites(student: nn.Module, teacher: nn.Module, records: Sequence[SiteRecord], batches: Sequence[torch.Tensor],
              ridge: float = RIDGE, max_rows: int = 4096, progress: Callable[[int, int], None] | None = None
              ) -> list[dict[str, Any]]:
    """Fit every site of ``student`` to ``teacher`` from one teacher pass over ``batches`` (see the module
    docstring). Returns one record per site: what was fitted and its relative error on these batches."""
    return fit_many(teacher, [(student, records)], batches, ridge, max_rows, progress)[0]


@torch.no_grad()
def fit_many(teacher: nn.Module, students: Sequence[tuple[nn.Module, Sequence[SiteRecord]]],
             batches: Sequence[torch.Tensor], ridge: float = RIDGE, max_rows: int = 4096,
             progress: Callable[[int, int], None] | None = None) -> list[list[dict[str, Any]]]:
    """:func:`fit_sites` for several converted copies of ``teacher`` at once, from one teacher pass."""
    if not batches:
        return [[] for _ in students]
    teacher.eval()
    groups = []
    for student, records in students:
        student.eval()
        groups.append(_plans(student, teacher, records, batches[0][:1]))
    plans = [p for g in groups for p in g]
    gen = torch.Generator().manual_seed(0)
    got: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []
    for p in plans:
        if p.kind == "none":
            continue
        t_in, t_out = teacher.get_submodule(p.teacher_in), teacher.get_submodule(p.teacher_out)
        hooks.append(t_in.register_forward_pre_hook(lambda m, i, k=p.teacher_in: got.__setitem__(("in", k), i[0])))
        hooks.append(t_out.register_forward_hook(lambda m, i, o, k=p.teacher_out: got.__setitem__(("out", k), o)))
    try:
        for bi, b in enumerate(batches):
            with eager_kernels():
                teacher(b)
            for p in plans:
                if p.kind == "none":
                    continue
                x, y = got[("in", p.teacher_in)], got[("out", p.teacher_out)]
                if p.kind == "affine":
                    _accumulate_affine(p, x, y)
                else:
                    _accumulate_layer(p, x, y, max_rows, gen)
            got.clear()
            if progress:
                progress(bi + 1, len(batches))
    finally:
        for h in hooks:
            h.remove()
    return [[_solve(p, ridge) for p in g] for g in groups]


def _accumulate_affine(p: _Plan, x: torch.Tensor, y: torch.Tensor) -> None:
    pix, s = p.pix, p.stats
    bn = p.teacher_norm  # the target is the original's normalised output before any activation
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if x.min() < 0:
        p.allow_pick = False  # the pick trick needs a non-negative input (its φ·z must be positive)
    z = _rows(y, 1)
    s.add("n", z.shape[0])
    s.add("z", z.sum(0))
    s.add("zz", (z * z).sum(0))
    w0 = pix.weight.data.clone()
    for mode in ("mix", "pick"):
        _pick_phi(pix, torch.full((pix.out_channels,), mode == "pick"))
        with eager_kernels():
            f = _rows(pix(x), 1)
        s.add(mode + "f", f.sum(0))
        s.add(mode + "ff", (f * f).sum(0))
        s.add(mode + "fz", (f * z).sum(0))
    pix.weight.data.copy_(w0)


def _accumulate_layer(p: _Plan, x: torch.Tensor, y: torch.Tensor, max_rows: int, gen: torch.Generator) -> None:
    with eager_kernels():
        f = p.pix(x)
    a = _layer_rows(p.layer, f)
    t = _rows(y, 1) if isinstance(p.layer, nn.Conv2d) else y.reshape(-1, y.shape[-1]).double()
    keep = _sample(a.shape[0], max_rows, gen)
    if keep is not None:
        a, t = a[keep], t[keep]
    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    s = p.stats
    a32 = a.float()  # the products in float32 (4x faster here), their sums over batches in float64
    s.add("ata", (a32.T @ a32).double())
    s.add("atb", (a32.T @ t.float()).double())
    s.add("n", t.shape[0])
    s.add("z", t.sum(0))
    s.add("zz", (t * t).sum(0))
    s.add("err0", float((a[:, :-1] @ p.layer.weight.detach().double().reshape(p.layer.weight.shape[0], -1).T
                         + (p.layer.bias.double() if p.layer.bias is not None else 0) - t).pow(2).sum()))


def _solve(p: _Plan, ridge: float) -> dict[str, Any]:
    rec = {"site": p.rec.name, "fit": p.kind}
    if p.kind == "none":
        rec["reason"] = p.reason
        return rec
    s = p.stats
    n = s["n"]
    var_t = float((s["zz"] - s["z"] ** 2 / n).sum()) or 1.0
    if p.kind == "affine":
        res, coef = {}, {}
        for mode in ("mix", "pick"):
            sf, sff, sfz = s[mode + "f"], s[mode + "ff"], s[mode + "fz"]
            cov = sfz - sf * s["z"] / n
            vf = sff - sf ** 2 / n
            a = torch.where(vf > 1e-12, cov / vf.clamp_min(1e-12), torch.zeros_like(vf))
            res[mode] = (s["zz"] - s["z"] ** 2 / n) - a * cov
            coef[mode] = (a, (s["z"] - a * sf) / n)
        pick = (res["pick"] < res["mix"]) & torch.tensor(p.allow_pick)
        _pick_phi(p.pix, pick)
        a = torch.where(pick, coef["pick"][0], coef["mix"][0])
        b = torch.where(pick, coef["pick"][1], coef["mix"][1])
        r = torch.where(pick, res["pick"], res["mix"])
        # the norm computes a·f + b with f's own statistics as its running ones, so that a training step (which
        # normalises with the batch's statistics) starts from the same function the fit gave
        mean_f = torch.where(pick, s["pickf"], s["mixf"]) / n
        var_f = (torch.where(pick, s["pickff"], s["mixff"]) / n - mean_f ** 2).clamp_min(0.0)
        bn = p.norm
        scale = (var_f + bn.eps).sqrt()
        bn.running_mean.copy_(mean_f.to(bn.running_mean.dtype))
        bn.running_var.copy_(var_f.to(bn.running_var.dtype))
        if bn.weight is not None:
            bn.weight.data.copy_((a * scale).to(bn.weight.dtype))
            bn.bias.data.copy_((b + a * mean_f).to(bn.bias.dtype))
        rec.update(rel_error=math.sqrt(max(float(r.sum()), 0.0) / var_t), picked=float(pick.float().mean()))
        return rec
    ata, atb = s["ata"], s["atb"]
    layer, norm = p.layer, p.norm
    with_offset = layer.bias is not None or norm is not None
    if not with_offset:
        ata, atb = ata[:-1, :-1], atb[:-1]
    k = ata.shape[0] - (1 if with_offset else 0)
    lam = ridge * float(ata.diagonal()[:k].mean()) + 1e-12
    d = torch.ones(ata.shape[0], dtype=ata.dtype)  # the ridge's diagonal: every weight, not the offset
    if with_offset:
        d[-1] = 0
    # ridge towards the folded weights (what the layer computes as converted), not towards zero: with few
    # images and many inputs the fit stays near a sensible layer instead of overfitting the calibration set
    prior = layer.weight.detach().double().reshape(layer.weight.shape[0], -1).T
    if with_offset:
        bias0 = layer.bias.detach().double() if layer.bias is not None else torch.zeros(prior.shape[1], dtype=prior.dtype)
        prior = torch.cat([prior, bias0[None]], 0)
    rhs = atb + lam * d[:, None] * prior
    lhs = ata + torch.diag(lam * d)
    chol, info = torch.linalg.cholesky_ex(lhs)  # symmetric positive definite: half the work of an LU solve
    wt = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(lhs, rhs)
    w = wt.T
    # ‖A wᵀ − b‖² = zz − 2 tr(w atb) + tr(w ata wᵀ), and ata wᵀ = rhs − λ D wᵀ: no product with ata needed
    quad = float((wt * (rhs - lam * d[:, None] * wt)).sum())
    resid = float(s["zz"].sum()) - 2 * float((wt * atb).sum()) + quad
    weight = w[:, :k] if with_offset else w
    layer.weight.data.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
    if with_offset:
        offset = w[:, -1]
        if layer.bias is not None:
            layer.bias.data.copy_(offset.to(layer.bias.dtype))
        else:  # norm(y + b) = norm with running mean μ - b
            norm.running_mean.sub_(offset.to(norm.running_mean.dtype))
    rec.update(rel_error=math.sqrt(max(resid, 0.0) / var_t),
               rel_error_before=math.sqrt(max(s["err0"], 0.0) / var_t), layer=p.teacher_out)
    if p.norm_name:
        rec["norm"] = p.norm_name
    return rec


# ----------------------------------------------------------------------------------- the safe initialisation

@torch.no_grad()
def agreement(model: nn.Module, reference: Sequence[torch.Tensor], batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement (%) and relative logit error of ``model`` against reference logits."""
    model.eval()
    with eager_kernels():
        return output_agreement(reference, (_logits(model(b)) for b in batches))


def _better(a: dict[str, float], b: dict[str, float]) -> bool:
    """Is ``a`` better than ``b``: higher agreement, the logit error breaking ties."""
    return (a["top1_agreement"], -a["rel_logit_error"]) > (b["top1_agreement"], -b["rel_logit_error"])


@torch.no_grad()
def reestimate_norms(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]) -> int:
    """Re-estimate the running statistics of the named batch norms only (a cumulative average over
    ``batches``); every other module stays in eval mode and keeps its statistics."""
    norms = [model.get_submodule(n) for n in names]
    norms = [m for m in norms if _bn(m)]
    if not norms:
        return 0
    model.eval()
    saved = {}
    for m in norms:
        saved[m] = m.momentum
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with eager_kernels():
            for b in batches:
                model(b)
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.eval()
    return len(norms)


@torch.no_grad()
def initialise(student: nn.Module, teacher: nn.Module, records: Sequence[SiteRecord], fit: Sequence[torch.Tensor],
               held: Sequence[torch.Tensor], progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fit ``student``'s sites to ``teacher`` on ``fit``, then try re-estimating the batch norms right after
    the refitted layers (the only ones whose input statistics the fit changed). Of the model as converted,
    fitted, and fitted with those norms re-estimated, keep the one that agrees best with the teacher on
    ``held``: the initialisation never makes the agreement worse. Returns what was done and measured."""
    t0 = time.perf_counter()
    with eager_kernels():
        ref = [_logits(teacher.eval()(b)) for b in held]
    before = agreement(student, ref, held)
    states = {"as converted": copy.deepcopy(student.state_dict())}
    fits = fit_sites(student, teacher, records, fit, progress=progress)
    fitted = agreement(student, ref, held)
    states["fit"] = copy.deepcopy(student.state_dict())
    measured = {"as converted": before, "fit": fitted}
    norms = sorted({f["norm"] for f in fits if f.get("norm")})
    if norms:
        reestimate_norms(student, norms, fit)
        measured["fit + norms re-estimated"] = agreement(student, ref, held)
        states["fit + norms re-estimated"] = student.state_dict()
    kept = "as converted"
    for name, m in measured.items():
        if _better(m, measured[kept]):
            kept = name
    student.load_state_dict(states[kept])
    return {"kept": kept, "agreement_before": before["top1_agreement"], "agreement_after": measured[kept]["top1_agreement"],
            "rel_logit_error_before": before["rel_logit_error"],
            "rel_logit_error_after": measured[kept]["rel_logit_error"],
            "candidates": {k: {"agreement": v["top1_agreement"], "rel_logit_error": v["rel_logit_error"]}
                           for k, v in measured.items()},
            "norms_reestimated": norms if kept.endswith("re-estimated") else [],
            "fit_images": sum(len(b) for b in fit), "held_out_images": sum(len(b) for b in held),
            "sites": fits, "seconds": round(time.perf_counter() - t0, 2), "final": measured[kept]}


# ------------------------------------------------------------------------------------ per-site costs, budget

@dataclass
class SiteCost:
    """One way of converting one site, measured alone on held-out calibration images."""

    name: str
    action: str
    zeta: int
    macs_saved: int
    agreement: float  # top-1 agreement (%) with the original, this site alone converted and fitted
    rel_logit_error: float
    fit_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def site_options(records: Sequence[SiteRecord]) -> list[SiteRecord]:
    """Every candidate way to convert each site: the planned action, and for a squeeze site also the hybrid
    at ζ = 2 (a gentler cut) when that differs from the plan."""
    from .ops import pix_groups
    from .rewrite import _site_macs

    out = []
    for r in records:
        if r.action == "skip":
            continue
        out.append(r)
        if r.mode == "squeeze" and r.action == "pure" and r.zeta and r.zeta > 2 and r.c_in >= 4:
            h = copy.deepcopy(r)
            h.action, h.zeta, h.removed, h.kept = "hybrid", 2, [], []
            h.reason = "hybrid at ζ=2: a gentler cut than the pure site"
            if pix_groups(h.c_in, 2) > h.c_out:
                h.macs_after = _site_macs(h)
                if h.macs_after < h.macs_before:
                    out.append(h)
    return out


@torch.no_grad()
def site_costs(model: nn.Module, options: Sequence[SiteRecord], fit: Sequence[torch.Tensor],
               held: Sequence[torch.Tensor], progress: Callable[[int, int], None] | None = None,
               max_images: int = 128) -> list[SiteCost]:
    """Convert each option alone on a copy of ``model``, fit it, and measure it on (at most ``max_images`` of)
    ``held``: one forward pass per option, the time that dominates on a CPU."""
    held = list(torch.cat(list(held))[:max_images].split(max(len(b) for b in held)))
    with eager_kernels():
        ref = [_logits(model.eval()(b)) for b in held]
    students = []
    for rec in options:
        student = copy.deepcopy(model)
        recs = keep_norm([rec])
        apply_sites(student, recs)
        students.append((student, recs))
    fits = fit_many(model, students, fit)  # one pass of the original fits every option
    costs = []
    for i, (rec, (student, _), f) in enumerate(zip(options, students, fits)):
        m = agreement(student, ref, held)
        costs.append(SiteCost(rec.name, rec.action, rec.zeta or 0, rec.macs_saved, m["top1_agreement"],
                              m["rel_logit_error"], f[0].get("rel_error") if f else None))
        if progress:
            progress(i + 1, len(options))
    return costs


@dataclass
class Budget:
    """``agreement``: the least top-1 agreement (%) with the original; ``macs``: the largest MACs ratio."""

    agreement: float | None = None
    macs: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_budget(text: str | dict | Budget | None) -> Budget | None:
    """``"agreement=99"`` (percent; 0.99 reads as 99 %) or ``"macs=0.8"``, or both separated by a comma."""
    if text is None or isinstance(text, Budget):
        return text
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in str(text).split(",") if part.strip())
    b = Budget()
    for key, value in items:
        key = str(key).strip().lower()
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise PixifyError(f"budget '{text}': '{key}' needs a number", "e.g. --budget agreement=99 or "
                              "--budget macs=0.8") from None
        if key == "agreement":
            v = v * 100 if 0 < v <= 1 else v
            if not 0 < v <= 100:
                raise PixifyError(f"budget agreement must be in (0, 100] %, got {value}")
            b.agreement = v
        elif key == "macs":
            if not 0 < v <= 1:
                raise PixifyError(f"budget macs must be a ratio in (0, 1], got {value}")
            b.macs = v
        else:
            raise PixifyError(f"unknown budget '{key}'", "use agreement=PERCENT or macs=RATIO")
    if b.agreement is None and b.macs is None:
        raise PixifyError(f"empty budget '{text}'", "use agreement=PERCENT or macs=RATIO")
    return b


def choose_sites(costs: Sequence[SiteCost], budget: Budget, macs_total: int) -> list[SiteCost]:
    """The options to apply, one per site at most, in the order they were chosen.

    Each option's loss is what it costs alone (agreement points lost, the logit error as a tie-break);
    options are taken in order of MACs saved per unit of loss. Under an agreement budget the summed losses
    stay within it; under a MAC budget options are added until the MACs ratio reaches it. The combined
    model is checked afterwards (:func:`convert_within_budget`), since losses do not add exactly."""
    def loss(c: SiteCost) -> float:
        return max(0.0, 100.0 - c.agreement) + 10.0 * c.rel_logit_error

    ranked = sorted((c for c in costs if c.macs_saved > 0), key=lambda c: -c.macs_saved / (loss(c) + 1e-3))
    chosen: dict[str, SiteCost] = {}
    lost = 0.0
    saved = 0
    for c in ranked:
        if c.name in chosen:
            continue
        if budget.macs is not None and 1 - saved / macs_total <= budget.macs and budget.agreement is None:
            break
        if budget.agreement is not None and lost + max(0.0, 100.0 - c.agreement) > 100.0 - budget.agreement:
            continue
        chosen[c.name] = c
        lost += max(0.0, 100.0 - c.agreement)
        saved += c.macs_saved
    return list(chosen.values())
