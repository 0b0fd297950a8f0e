"""The fine-tuning run: plan (validate everything, write nothing), set up, start or resume, train epoch by
epoch, and save after every epoch."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PixifyError, short_reason
from ..metrics import _logits
from ..outputs import check_output_dir, check_output_file
from .config import FinetuneConfig, FinetuneResult, resolve_config
from .distributed import _epoch_seed, _rank, _seed_all, _setup_distributed, _world, destroy_distributed
from .evaluation import evaluate
from .folder import _RunFolder
from .init import _initialise
from .logs import _append_log, _Progress, _truncate_log, plot_log
from .models import _batch_input, _check_classes, _load_student, _near, check_teacher, load_teacher
from .schedule import make_scheduler
from .state import CHECKPOINT_NAME, LOG_NAME, PLOT_NAME, STATE_NAME, _optimizer_from_files, _read_state, _write_state
from . import loss as _loss

__all__ = ["finetune"]


def _say(text: str) -> None:
    if _rank() == 0:
        print(f"pixify: {text}", file=sys.stderr, flush=True)


@dataclass
class _Run:
    """Everything one run holds, filled in phase by phase."""

    cfg: FinetuneConfig
    student: nn.Module
    recipe: dict[str, Any]
    model_name: str
    out: Path
    resume: bool
    fresh_log: bool
    source: Any
    val_source: Any
    teacher: nn.Module
    teacher_arg: Any
    dcfg: dict[str, Any]
    progress: bool
    state_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state_meta: dict[str, Any] = field(default_factory=dict)
    # set up
    distributed: bool = False
    device: str = "cpu"
    dev: torch.device = torch.device("cpu")
    rank: int = 0
    world: int = 1
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    channels_last: bool = False
    loader: Any = None
    val_loader: Any = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    n_epochs: int = 0
    # training
    opt: Any = None
    scaler: Any = None
    scheduler: Any = None
    train_model: nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    init_info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said once the run has checked what it resumes
    start_epoch: int = 0
    step: int = 0
    last_good: Path | None = None

    def path(self, name: str) -> Path:
        return self.out / name


def _plan(model, data, teacher, out, val_data, resume, cfg: FinetuneConfig, explicit: dict[str, Any], device,
          labelled, data_config, progress) -> _Run:
    """Validate everything and load what the run needs; nothing is written."""
    from ..data import DataSource, prepare_data, resolve_data_config, user_data_config

    student, recipe, model_name = _load_student(model)
    if out is None:
        out = (Path(model).with_suffix("").name + "-finetune") if isinstance(model, (str, Path)) else "pixify-finetune"
    out = Path(out)
    check_output_dir(out, "--out")
    if device is not None:
        from ..validate import check_device

        check_device(device)
    state_tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, Any] = {}
    fresh_log = False
    notes: list[str] = []  # said once everything is checked, so that an error stays the only line
    if resume and not (out / STATE_NAME).is_file():
        if (out / CHECKPOINT_NAME).exists():
            raise PixifyError(f"{out} holds a checkpoint but no training state ({STATE_NAME}), so the run "
                              "cannot continue where it stopped", "fine-tune its checkpoint into a new --out")
        if not (out / LOG_NAME).is_file():
            raise PixifyError(f"nothing to resume in {out} (no {STATE_NAME})",
                              "start without --resume, or point --out at the interrupted run")
        resume, fresh_log = False, True  # interrupted before its first checkpoint: start it again
        notes.append(f"{out} has no checkpoint yet; starting the run from the beginning")
    if resume:
        for name in (CHECKPOINT_NAME, STATE_NAME, LOG_NAME, PLOT_NAME):  # the run replaces them as it goes:
            if (out / name).exists() or (out / name).is_symlink():  # refused now, not after an epoch
                check_output_file(out / name, "--out", "move it away, or fine-tune into a new --out")
        state_tensors, state_meta = _read_state(out / STATE_NAME)
        try:
            saved = FinetuneConfig.from_json(state_meta["config"]).validate()
        except (PixifyError, TypeError, ValueError) as exc:
            raise PixifyError(f"the training state in {out} holds settings pixify cannot use ({exc})",
                              "the run cannot be resumed; fine-tune its checkpoint into a new --out") from None
        differ = [k for k, v in explicit.items() if getattr(saved, k) != v and k not in ("workers", "check_images",
                                                                                          "log_every")]
        if differ:
            notes.append(f"resuming with the interrupted run's settings; ignoring {', '.join(sorted(differ))}")
        cfg = FinetuneConfig.from_json({**saved.to_json(), **{k: explicit[k] for k in ("workers", "check_images")
                                                               if k in explicit}}).validate()
    elif (out / STATE_NAME).exists() or (out / CHECKPOINT_NAME).exists():
        raise PixifyError(f"{out} already holds a fine-tuning run",
                          "pass --resume to continue it, or choose another --out")
    else:
        fresh_log = True  # a log without any checkpoint belongs to a run that never finished an epoch
        _check_fresh_folder(out)
    # under torchrun only global rank 0 decodes every image; a bad one stops it, and torchrun stops the others
    check = cfg.check_images and _rank() == 0
    source = data if isinstance(data, DataSource) else prepare_data(
        data, split="train", labelled=labelled, check_images=check, workers=max(2, cfg.workers), what="--data")
    val_source = None
    if val_data is not None:
        val_source = val_data if isinstance(val_data, DataSource) else prepare_data(
            val_data, split="val", check_images=check, workers=max(2, cfg.workers), what="--val-data")
    _check_classes(source, student)
    tmodel = load_teacher(recipe, teacher, _near(model))
    check_teacher(tmodel, student)
    run = _Run(cfg, student, recipe, model_name, out, resume, fresh_log, source, val_source, tmodel, teacher,
                user_data_config(student, data_config) if data_config is not None else resolve_data_config(student),
                progress, state_tensors, state_meta)
    run.notes = notes
    return run


def _setup(run: _Run, device: str | None) -> None:
    """Processes, device, precision, seeds and data loaders."""
    from ..data import create_loader

    cfg = run.cfg
    run.distributed, run.device = _setup_distributed(device)
    run.rank, run.world = _rank(), _world()
    run.dev = torch.device(run.device)
    use_cuda = run.dev.type == "cuda"
    run.amp = cfg.amp if cfg.amp is not None else use_cuda
    run.channels_last = cfg.channels_last if cfg.channels_last is not None else use_cuda
    run.amp_dtype = (torch.bfloat16 if (use_cuda and torch.cuda.is_bf16_supported()) or not use_cuda
                     else torch.float16)
    _seed_all(cfg.seed + run.rank)
    run.loader = create_loader(run.source, run.dcfg, cfg.batch_size, training=True, augment=cfg.augment,
                               workers=cfg.workers, distributed=run.distributed, device=run.device, seed=cfg.seed)
    run.steps_per_epoch = len(run.loader)
    run.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * run.steps_per_epoch
    run.n_epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    if run.val_source is not None and run.rank == 0:
        run.val_loader = create_loader(run.val_source, run.dcfg, max(cfg.batch_size, 64), training=False,
                                       workers=cfg.workers, device=run.device)


def _place(run: _Run) -> None:
    """Models on the device (the teacher frozen), the optimizer and the grad scaler."""
    cfg = run.cfg
    run.student.to(run.dev)
    run.teacher.to(run.dev)
    for p in run.teacher.parameters():
        p.requires_grad_(False)
    if run.channels_last:
        run.student.to(memory_format=torch.channels_last)
        run.teacher.to(memory_format=torch.channels_last)
    params = [p for p in run.student.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        run.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                  weight_decay=cfg.weight_decay)
    else:
        run.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.amp and run.amp_dtype == torch.float16)


def _restore(run: _Run) -> None:
    """Continue where the interrupted run's last checkpoint left it."""
    meta = run.state_meta
    model_sd = {k[len("model/"):]: v for k, v in run.state_tensors.items() if k.startswith("model/")}
    try:
        run.student.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise PixifyError(f"the training state in {run.out} does not fit this model "
                          f"({str(exc).splitlines()[0]})", "resume with the same checkpoint") from None
    try:
        _optimizer_from_files(run.opt, run.state_tensors, meta["optimizer"], run.dev)
        if meta.get("scaler"):
            run.scaler.load_state_dict(meta["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise PixifyError(f"the optimizer state in {run.out} does not fit this run ({short_reason(exc, 200)})",
                          "the run cannot be resumed; fine-tune its checkpoint into a new --out") from None
    run.start_epoch, run.step = int(meta["epoch"]), int(meta["step"])
    run.history = list(meta.get("history", []))
    run.init_info = dict(meta.get("init", {}))
    if meta.get("world_size", 1) != run.world:
        _say(f"the interrupted run used {meta.get('world_size')} processes, this one {run.world}: the data order "
             "differs from an uninterrupted run")
    if run.rank == 0:
        _truncate_log(run.path(LOG_NAME), run.step)


def _start(run: _Run) -> None:
    """A fresh run: log its start, initialise the converted sites, and measure the starting point."""
    if run.rank != 0:
        return
    cfg, teacher = run.cfg, run.teacher_arg
    _append_log(run.path(LOG_NAME), {
        "event": "start", "model": run.model_name, "data": run.source.describe(), "labelled": run.source.labelled,
        "val_data": run.val_source.describe() if run.val_source else None,
        "teacher": Path(teacher).name if isinstance(teacher, (str, Path)) else
        ("module" if isinstance(teacher, nn.Module) else run.recipe["source"].get("weights")),
        "world_size": run.world, "device": str(run.dev), "steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch, "config": cfg.to_json(),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in run.dcfg.items()}})
    if cfg.calib_images > 0:
        run.init_info = _initialise(run.student, run.teacher, run.loader, cfg, run.dev, run.channels_last,
                                    run.recipe, run.progress)
    if run.val_loader is not None:  # the starting point, epoch 0 of the curves
        ev = evaluate(run.student, run.val_loader, teacher=run.teacher, device=str(run.dev))
        run.init_info.update({f"val_{k}": v for k, v in ev.items() if k in ("top1", "top5", "agreement")})
    if run.init_info:
        _append_log(run.path(LOG_NAME), {"event": "init", **run.init_info})


def _wrap(run: _Run) -> None:
    """The model that trains: DDP across processes, torch.compile when asked."""
    run.train_model = run.student
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.train_model = DDP(run.student, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)
    if run.cfg.compile:
        run.train_model = torch.compile(run.train_model)


def _train_step(run: _Run, batch: Any, epoch: int) -> tuple[float, float, float, int, bool]:
    """One optimizer step; returns (loss, kd, ce, images over all processes, whether the data had labels)."""
    cfg = run.cfg
    x = _batch_input(batch).to(run.dev, non_blocking=True)
    y = batch[1].to(run.dev, non_blocking=True) if run.source.labelled and isinstance(batch, (tuple, list)) else None
    if run.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.dev.type, dtype=run.amp_dtype, enabled=run.amp):
        with torch.no_grad():
            t_logits = _logits(run.teacher(x))
        s_logits = _logits(run.train_model(x))
    kd = _loss.distillation_loss(s_logits, t_logits, cfg.temperature)
    ce = F.cross_entropy(s_logits.float(), y) if y is not None and cfg.kd_weight < 1 else None
    loss = cfg.kd_weight * kd + (1 - cfg.kd_weight) * ce if ce is not None else kd
    vals = torch.stack([loss.detach(), kd.detach(), ce.detach() if ce is not None else kd.new_zeros(())])
    if run.distributed:
        import torch.distributed as dist

        dist.all_reduce(vals)
        vals /= run.world
    lv, kv, cv = (float(v) for v in vals)
    if not math.isfinite(lv):
        kept = f"the last good checkpoint is {run.last_good}" if run.last_good else "no checkpoint was written"
        raise PixifyError(f"the loss became non-finite ({lv}) at epoch {epoch + 1}, step {run.step + 1}; stopped, "
                          f"{kept}", "lower --lr, or check the model and data for inf/nan values")
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return lv, kv, cv, x.shape[0] * run.world, y is not None


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass (or the part of it the step budget leaves); returns the epoch's log record."""
    from ..data import read_batches

    cfg = run.cfg
    _seed_all(_epoch_seed(cfg.seed, epoch, run.rank))
    sampler = getattr(run.loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    run.train_model.train()
    run.teacher.eval()
    epoch_steps = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
    bar = _Progress(run.progress, f"epoch {epoch + 1}/{run.n_epochs}", epoch_steps)
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    seen = 0
    window: dict[str, float] = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "n": 0, "images": 0}
    t_win = t_epoch = time.perf_counter()
    for i, batch in enumerate(read_batches(run.loader)):
        if i >= epoch_steps:
            break
        lr = run.opt.param_groups[0]["lr"]
        lv, kv, cv, bs, has_labels = _train_step(run, batch, epoch)
        seen += bs
        for k, v in (("loss", lv), ("kd", kv), ("ce", cv)):
            sums[k] += v * bs
            window[k] += v
        window["n"] += 1
        window["images"] += bs
        bar.update(1, images=bs, loss=lv)
        if run.rank == 0 and (run.step % cfg.log_every == 0 or i == epoch_steps - 1):
            dt = max(1e-9, time.perf_counter() - t_win)
            n = window["n"]
            _append_log(run.path(LOG_NAME), {
                "event": "train", "epoch": epoch + 1, "step": run.step, "lr": lr, "loss": window["loss"] / n,
                "kd": window["kd"] / n, "ce": window["ce"] / n if has_labels else None,
                "images_per_s": window["images"] / dt})
            window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "n": 0, "images": 0}
            t_win = time.perf_counter()
    bar.close()
    return {"event": "epoch", "epoch": epoch + 1, "step": run.step, "loss": sums["loss"] / max(1, seen),
            "kd": sums["kd"] / max(1, seen), "ce": (sums["ce"] / max(1, seen)) if run.source.labelled else None,
            "images": seen, "seconds": round(time.perf_counter() - t_epoch, 2)}


def _save_epoch(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """Rank 0, after every epoch: evaluate, then write the checkpoint, the training state, the log and the plot."""
    from ..checkpoint import save
    from ..data import remembered_preprocessing

    if run.val_loader is not None:
        ev = evaluate(run.student, run.val_loader, teacher=run.teacher, device=str(run.dev))
        record.update({f"val_{k}": v for k, v in ev.items() if k in ("top1", "top5", "agreement")})
    run.history.append({k: v for k, v in record.items() if k != "event"})
    recipe = dict(run.recipe, finetune={"epoch": epoch + 1, "step": run.step, "metrics": run.history[-1]},
                  data_config=remembered_preprocessing(run.dcfg))  # eval/bench read the preprocessing back
    save(run.student, run.path(CHECKPOINT_NAME), recipe=recipe, warn_unverified=False)
    run.last_good = run.path(CHECKPOINT_NAME)
    cfg = run.cfg
    _write_state(run.path(STATE_NAME), run.student, run.opt, {
        "epoch": epoch + 1, "step": run.step, "total_steps": run.total_steps, "config": cfg.to_json(),
        "world_size": run.world, "history": run.history, "init": run.init_info,
        "scheduler": {"kind": "cosine-warmup", "step": run.step, "total_steps": run.total_steps,
                      "warmup_steps": int(round(cfg.warmup * run.total_steps)), "lr": cfg.lr, "min_lr": cfg.min_lr},
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "data": run.source.describe(), "model": run.model_name,
    })
    _append_log(run.path(LOG_NAME), record)
    try:
        plot_log(run.path(LOG_NAME), run.path(PLOT_NAME))
    except Exception as exc:  # a plot must never lose a run
        print(f"pixify: could not draw {run.path(PLOT_NAME)}: {exc}", file=sys.stderr, flush=True)
    if run.progress:
        msg = f"epoch {epoch + 1}/{run.n_epochs}: loss {record['loss']:.4f}"
        if "val_top1" in record:
            msg += f", val top-1 {record['val_top1']:.2f}%"
        if "val_agreement" in record:
            msg += f", agreement {record['val_agreement']:.2f}%"
        print(msg, file=sys.stderr, flush=True)


def _check_fresh_folder(out: Path) -> None:
    """A new run writes into a new or empty folder, or one that only holds what a run of pixify leaves
    (so that ``-o .`` or ``-o ''`` cannot scatter run files among the user's own)."""
    from ..outputs import _TMP_RE

    if not out.is_dir():
        return
    ours = {CHECKPOINT_NAME, STATE_NAME, LOG_NAME, PLOT_NAME}
    others = sorted(e.name for e in out.iterdir() if e.name not in ours and not _TMP_RE.match(e.name))
    if others:
        raise PixifyError(f"--out {out} already holds other files ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''})", "choose a new or empty folder")


def finetune(model: nn.Module | str | Path, data: Any, *, teacher: nn.Module | str | Path | None = None,
             out: str | Path | None = None, val_data: Any = None, resume: bool = False,
             config: FinetuneConfig | None = None, device: str | None = None, labelled: bool | None = None,
             data_config: dict[str, Any] | None = None, progress: bool = True, **overrides: Any) -> FinetuneResult:
    """Recover a converted model's accuracy by distilling from the original.

    Args:
        model: a pixify checkpoint path, or a converted model (as returned by :func:`pixify.convert`;
            it is trained in place).
        data: the training images: an ImageFolder tree (labelled: distillation + cross-entropy) or a flat
            folder of images (unlabelled: distillation alone), see :func:`pixify.data.prepare_data`.
        teacher: the original model (an ``nn.Module``), a weights file for the recipe's architecture
            (``.safetensors`` / ``.pth`` state dict), or ``None`` to rebuild it from the recipe.
        out: output folder (default: ``<checkpoint stem>-finetune`` or ``pixify-finetune``).
        val_data: optional held-out images, evaluated (top-1/top-5, agreement) after every epoch.
        resume: continue the interrupted run in ``out`` exactly where its last checkpoint left it (the
            run's saved configuration is used).
        config: a :class:`FinetuneConfig`; keyword ``overrides`` (``epochs=2, lr=0.01``) update it.
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: the local GPU when there is one).
        labelled: force the data to be treated as labelled / unlabelled.
        data_config: timm data config (input_size, mean, std, crop_pct, interpolation); default
            :func:`pixify.data.resolve_data_config` on the model.
        progress: show rich progress bars.
    """
    from ..data import remembered_preprocessing

    t_start = time.perf_counter()
    cfg, explicit = resolve_config(config, overrides)
    run = _plan(model, data, teacher, out, val_data, resume, cfg, explicit, device, labelled, data_config, progress)
    _setup(run, device)
    files = [run.path(n) for n in (CHECKPOINT_NAME, STATE_NAME, LOG_NAME, PLOT_NAME)]
    with _RunFolder(run.out, files, owner=run.rank == 0):
        if run.rank == 0 and run.fresh_log and run.path(LOG_NAME).exists():
            run.path(LOG_NAME).unlink()
        _place(run)
        if run.resume:
            _restore(run)
        for note in run.notes:
            _say(note)
        if not run.resume:
            _start(run)
        run.scheduler = make_scheduler(run.opt, run.cfg, run.total_steps, start=run.step)
        if run.start_epoch >= run.n_epochs:
            _say(f"the run in {run.out} is already complete ({run.step} steps)")
        _wrap(run)
        run.last_good = run.path(CHECKPOINT_NAME) if run.path(CHECKPOINT_NAME).exists() else None
        try:
            for epoch in range(run.start_epoch, run.n_epochs):
                record = _train_epoch(run, epoch)
                if run.rank == 0:
                    _save_epoch(run, epoch, record)
                if run.distributed:
                    import torch.distributed as dist

                    dist.barrier()
        finally:
            if run.distributed:
                destroy_distributed()
    run.student.eval()
    run.student.pixify_recipe = dict(run.recipe, finetune={"epoch": run.n_epochs, "step": run.step,
                                                           "metrics": run.history[-1] if run.history else {}},
                                     data_config=remembered_preprocessing(run.dcfg))
    return FinetuneResult(model=run.student, out=run.out, checkpoint=run.path(CHECKPOINT_NAME), epochs=run.n_epochs,
                          steps=run.step, seconds=time.perf_counter() - t_start, history=run.history,
                          init=run.init_info)
