"""Initialisation before training: the converted sites fitted to the teacher (see :mod:`pixify.recovery`),
keeping whatever agrees best with it on held-out images; and the older per-consumer refit."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import _logits
from .config import FinetuneConfig
from .logs import _Progress
from .models import _batch_input

__all__ = ["refit_from_teacher"]


def _pix_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..ops import PiX

    return [(n, m) for n, m in model.named_modules() if isinstance(m, PiX)]


@torch.no_grad()
def _consumer_of(model: nn.Module, pix: nn.Module, example: torch.Tensor) -> list[str]:
    """Qualified names of the Conv2d/Linear layers whose input is exactly ``pix``'s output tensor."""
    seen: dict[str, Any] = {}
    found: list[str] = []
    hooks = [pix.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))]
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i, name=name: found.append(name) if "out" in seen and i and i[0] is seen["out"] else None))
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


@torch.no_grad()
def refit_from_teacher(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                       ridge: float = 1e-3, max_rows: int = 16384) -> list[dict[str, Any]]:
    """Least-squares initialisation of the layers that read PiX outputs.

    For every PiX module, in forward order, the Conv2d/Linear that consumes its output — the folded layer
    of a hybrid site, or the next layer after a pure site (found by following the very output tensor
    through identity modules) — gets the weights that best reproduce, over ``batches``, what the
    corresponding layer of the original computes (the original's own layer for a hybrid site, the same
    consumer for a pure site): a ridge regression (λ = ``ridge`` × the mean diagonal of AᵀA) on the
    unfolded inputs of the converted model, site after site, so the error of earlier sites is compensated
    downstream. φ is left at its deliberate zero start (every group
    mixes at p = 0.5), which is the regime the regression sees. Grouped convolutions and consumers that
    cannot be found are left alone. Returns one record per site.
    """
    from ..rewrite import PiXBlock

    if not batches:
        return []
    student.eval()
    teacher.eval()
    records: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for name, pix in _pix_sites(student):
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = student.get_submodule(parent_name) if parent_name else student
        if isinstance(parent, PiXBlock) and parent.pix is pix:
            s_name, t_name = f"{parent_name}.layer", parent_name
        else:
            cons = _consumer_of(student, pix, batches[0][:2])
            if len(cons) != 1:
                records.append({"site": name, "refit": None, "reason": "no single layer reads its output"})
                continue
            s_name = t_name = cons[0]
        try:
            s_layer, t_layer = student.get_submodule(s_name), teacher.get_submodule(t_name)
        except AttributeError:
            records.append({"site": name, "refit": None, "reason": f"the original has no {t_name}"})
            continue
        if type(t_layer) is not type(s_layer) and not (isinstance(s_layer, nn.Conv2d) and isinstance(t_layer, nn.Conv2d)):
            records.append({"site": name, "refit": None, "reason": "layer types differ"})
            continue
        if isinstance(s_layer, nn.Conv2d) and (s_layer.groups != 1 or s_layer.padding_mode != "zeros"):
            records.append({"site": name, "refit": None, "reason": "grouped or padded-mode convolution"})
            continue
        if not isinstance(s_layer, (nn.Conv2d, nn.Linear)):
            records.append({"site": name, "refit": None, "reason": f"{type(s_layer).__name__} is not refitted"})
            continue
        got: dict[str, torch.Tensor] = {}
        h1 = s_layer.register_forward_pre_hook(lambda m, i: got.__setitem__("x", i[0]))
        h2 = t_layer.register_forward_hook(lambda m, i, o: got.__setitem__("y", o))
        ata = atb = None
        err_before = norm = 0.0
        try:
            for b in batches:
                student(b)
                teacher(b)
                x, y = got["x"], got["y"]
                if isinstance(s_layer, nn.Conv2d):
                    if s_layer(x).shape != y.shape:
                        raise ValueError("output shapes differ")
                    a = F.unfold(x.float(), s_layer.kernel_size, s_layer.dilation, s_layer.padding, s_layer.stride)
                    a = a.transpose(1, 2).reshape(-1, a.shape[1])
                    t = y.float().flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
                else:
                    a = x.float().reshape(-1, x.shape[-1])
                    t = y.float().reshape(-1, y.shape[-1])
                if a.shape[0] > max_rows:
                    keep = torch.randperm(a.shape[0], generator=gen)[:max_rows].to(a.device)
                    a, t = a[keep], t[keep]
                pred = a @ s_layer.weight.float().reshape(s_layer.weight.shape[0], -1).T
                if s_layer.bias is not None:
                    pred = pred + s_layer.bias.float()
                err_before += float((pred - t).pow(2).sum())
                norm += float(t.pow(2).sum())
                if s_layer.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                a, t = a.double(), t.double()
                ata = a.T @ a if ata is None else ata + a.T @ a
                atb = a.T @ t if atb is None else atb + a.T @ t
        except ValueError as exc:
            records.append({"site": name, "refit": None, "reason": str(exc)})
            continue
        finally:
            h1.remove()
            h2.remove()
        lam = ridge * float(ata.diagonal().mean()) + 1e-12
        eye = torch.eye(ata.shape[0], dtype=ata.dtype, device=ata.device)
        w = torch.linalg.solve(ata + lam * eye, atb).T
        resid = float(torch.trace(w @ ata @ w.T - 2 * w @ atb)) + norm
        if s_layer.bias is not None:
            s_layer.bias.copy_(w[:, -1].to(s_layer.bias.dtype))
            w = w[:, :-1]
        s_layer.weight.copy_(w.reshape(s_layer.weight.shape).to(s_layer.weight.dtype))
        records.append({"site": name, "refit": s_name, "target": t_name,
                        "rel_error_before": (err_before / norm) ** 0.5 if norm else float("nan"),
                        "rel_error_after": (max(resid, 0.0) / norm) ** 0.5 if norm else float("nan")})
    return records


@torch.no_grad()
def _agreement(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, float]:
    from ..metrics import output_agreement

    student.eval()
    teacher.eval()
    return output_agreement((teacher(b) for b in batches), (student(b) for b in batches))


def _initialise(student: nn.Module, teacher: nn.Module, loader: Iterable, cfg: FinetuneConfig, dev: torch.device,
                channels_last: bool, recipe: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Fit the converted sites to the teacher on ~cfg.calib_images training images (cfg.init == 'lsq'; one
    teacher pass, see :func:`pixify.recovery.initialise`), keeping whatever agrees best with the teacher on
    the held-out quarter of those images: the initialisation never makes the agreement worse."""
    from ..data import read_batches
    from ..recovery import agreement, initialise, split_batches
    from ..rewrite import SiteRecord

    t0 = time.perf_counter()
    batches: list[torch.Tensor] = []
    n = 0
    for batch in read_batches(loader):
        x = _batch_input(batch).to(dev)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append(x)
        n += x.shape[0]
        if n >= cfg.calib_images:
            break
    info: dict[str, Any] = {"calib_images": n}
    records = [SiteRecord.from_json(r) for r in (recipe or getattr(student, "pixify_recipe", {}) or {}).get("sites", [])]
    if cfg.init == "lsq" and n >= 2 and records:
        fit, held = split_batches(batches)
        bar = _Progress(progress, "initialising", len(fit))
        res = initialise(student, teacher, records, fit, held,
                         progress=lambda done, total: bar.update(1) if done <= total else None)
        bar.close()
        info.update(calib_agreement_converted=res["agreement_before"], calib_agreement=res["agreement_after"],
                    calib_rel_logit_error=res["rel_logit_error_after"], kept=res["kept"], candidates=res["candidates"],
                    norms_reestimated=len(res["norms_reestimated"]), held_out_images=res["held_out_images"],
                    sites=res["sites"])
    else:
        with torch.no_grad():
            ref = [_logits(teacher(b)) for b in batches]
        m = agreement(student, ref, batches)
        info.update(calib_agreement_converted=m["top1_agreement"], calib_agreement=m["top1_agreement"],
                    calib_rel_logit_error=m["rel_logit_error"], kept="as converted")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info
