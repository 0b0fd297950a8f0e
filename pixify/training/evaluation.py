"""Evaluation: top-1/top-5 and agreement with the teacher."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PixifyError, short_reason
from ..metrics import _logits
from .distributed import _default_device
from .logs import _Progress
from .models import _batch_input, _check_classes, _load_student, _near, load_teacher

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module | str | Path, data: Any, teacher: nn.Module | str | Path | None | bool = None,
             batch_size: int = 256, workers: int = 2, device: str | None = None, data_config: dict | None = None,
             check_images: bool = True, progress: bool = False, max_batches: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 of ``model`` on ``data`` (when it has labels) and top-1 agreement with the teacher.

    ``model``: a pixify checkpoint path or a converted model. ``data``: a folder (see
    :func:`pixify.data.prepare_data`) or an iterable of ``(images, labels)`` batches. ``teacher``: as in
    :func:`finetune`; ``False`` skips the teacher.
    """
    from ..data import (DataSource, create_loader, prepare_data, read_batches, resolve_data_config,
                        user_data_config)

    from ..validate import check_batch_size, check_device, check_workers

    device = str(check_device(device)) if device is not None else _default_device()
    check_workers(workers)
    check_batch_size(batch_size)
    student, recipe, _ = _load_student(model)
    if isinstance(data, (str, Path, DataSource)):
        source = data if isinstance(data, DataSource) else prepare_data(data, split="val", check_images=check_images,
                                                                          workers=max(1, workers), what="--data")
        cfg = user_data_config(student, data_config) if data_config is not None else resolve_data_config(student)
        loader = create_loader(source, cfg, batch_size, training=False, workers=workers, device=device)
        labelled = source.labelled
        _check_classes(source, student)
    else:
        if not hasattr(data, "__iter__") or isinstance(data, (bytes, dict)):
            raise PixifyError(f"data must be a folder, a pixify DataSource or an iterable of (images, labels) "
                              f"batches, got {type(data).__name__}")
        loader, labelled = data, True
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise PixifyError(f"max_batches must be a positive integer, got {max_batches!r}")
    tmodel = None if teacher is False else load_teacher(recipe, teacher if teacher is not True else None,
                                                          _near(model))
    student = student.to(device).eval()
    if tmodel is not None:
        tmodel = tmodel.to(device).eval()
    n = c1 = c5 = agree = tc1 = 0
    t0 = time.perf_counter()
    bar = _Progress(progress, "eval", len(loader) if hasattr(loader, "__len__") else None)
    for i, batch in enumerate(read_batches(loader)):
        if max_batches is not None and i >= max_batches:
            break
        x = _batch_input(batch)
        if not isinstance(x, torch.Tensor):
            raise PixifyError(f"batch {i} holds {type(x).__name__}, not a tensor of images")
        x = x.to(device)
        try:
            out = _logits(student(x)).float()
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise PixifyError(f"batch {i} of shape {tuple(x.shape)} does not run through the model: "
                              f"{short_reason(exc, 200)}",
                              "give images of the model's input size and channels") from None
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        if labelled and isinstance(batch, (tuple, list)) and len(batch) > 1:
            y = batch[1].to(device)
            c1 += int((top[:, 0] == y).sum())
            c5 += int((top == y[:, None]).any(1).sum())
        if tmodel is not None:
            t = _logits(tmodel(x)).float().argmax(1)
            agree += int((t == top[:, 0]).sum())
            if labelled and isinstance(batch, (tuple, list)) and len(batch) > 1:
                tc1 += int((t == batch[1].to(device)).sum())
        n += x.shape[0]
        bar.update(1, images=x.shape[0])
    bar.close()
    res: dict[str, Any] = {"images": n, "seconds": round(time.perf_counter() - t0, 3)}
    if n and labelled:
        res.update(top1=100.0 * c1 / n, top5=100.0 * c5 / n)
        if tmodel is not None:
            res["teacher_top1"] = 100.0 * tc1 / n
    if n and tmodel is not None:
        res["agreement"] = 100.0 * agree / n
    return res
