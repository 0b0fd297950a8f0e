"""Recovery fine-tuning: distil the original model into its converted copy.

``finetune(model, data)`` = validate everything → (fresh run) initialise the converted layers from the
teacher (least-squares refit, see :func:`refit_from_teacher`) and re-estimate batch-norm statistics →
train with knowledge distillation (KL at a temperature, plus cross-entropy when the data has labels) on a
cosine schedule with linear warm-up → after every epoch write, atomically and on rank 0 only:

- ``OUT/checkpoint.safetensors``: a pixify checkpoint (weights + recipe), loadable by
  ``pixify.load``; its recipe gains a ``finetune`` entry (epoch, step, metrics);
- ``OUT/state.safetensors``: what ``resume=True`` needs to continue exactly: the model weights, the
  optimizer's tensors, the schedule position, the grad-scaler, the configuration and the history
  (tensors in safetensors, everything else as JSON metadata; nothing is pickled). Random numbers are
  re-seeded from (seed, epoch, rank) at the start of every epoch, so a resumed epoch draws exactly the
  numbers the interrupted one drew;
- ``OUT/log.jsonl`` (one JSON object per line) and ``OUT/curves.png`` (loss and accuracy curves).

Runs under ``torchrun`` with DistributedDataParallel (NCCL on GPUs, gloo on CPU); AMP (bf16, else fp16
with a grad scaler) and channels-last on CUDA; optional ``torch.compile``. A non-finite loss stops the run
with a :class:`~pixify.errors.PixifyError` and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, read_recipe
from .errors import Interrupted, PixifyError
from .outputs import RunLock, check_output_dir
from .metrics import _logits

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "evaluate", "load_teacher", "distillation_loss",
           "refit_from_teacher", "CHECKPOINT_NAME", "STATE_NAME", "LOG_NAME", "PLOT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "state.safetensors"
LOG_NAME = "log.jsonl"
PLOT_NAME = "curves.png"
STATE_VERSION = 1
_STATE_KEY = "pixify_train_state"


# ----------------------------------------------------------------------------------------- configuration

@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters. The defaults were chosen on Fashion-MNIST (README, "Fine-tuning")."""

    epochs: int = 1  #: passes over the data (ignored when ``steps`` is set)
    steps: int | None = None  #: total optimizer steps instead of whole epochs
    batch_size: int = 128  #: per process
    lr: float = 0.05  #: peak learning rate (for batch 128 per process)
    min_lr: float = 0.0  #: learning rate at the end of the cosine
    warmup: float = 0.1  #: fraction of the steps spent in the linear warm-up
    optimizer: str = "sgd"  #: sgd (Nesterov momentum) | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-5
    temperature: float = 4.0  #: distillation temperature T (the KL term is scaled by T²)
    kd_weight: float = 0.5  #: loss = kd_weight·KD + (1 − kd_weight)·CE with labels; KD alone without
    init: str = "lsq"  #: lsq: every site fitted to the teacher by least squares, kept if it helps | none
    calib_images: int = 2048  #: images for the fit (three quarters) and for checking it (0: skip)
    augment: bool = False  #: timm's training augmentation (default: the evaluation transforms)
    workers: int = 2  #: data-loading processes per training process
    seed: int = 0
    amp: bool | None = None  #: mixed precision; default on for CUDA
    channels_last: bool | None = None  #: default on for CUDA
    compile: bool = False  #: torch.compile the student
    log_every: int = 20  #: steps between log lines
    check_images: bool = True  #: decode every image once before training

    def validate(self) -> "FinetuneConfig":
        def bad(msg: str, hint: str | None = None):
            raise PixifyError(msg, hint)

        if self.steps is None:
            if not isinstance(self.epochs, int) or self.epochs < 1:
                bad(f"--epochs must be an integer >= 1, got {self.epochs}", "use --epochs 1 or --steps N")
        elif not isinstance(self.steps, int) or self.steps < 1:
            bad(f"--steps must be an integer >= 1, got {self.steps}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            bad(f"--min-lr must be in [0, lr], got {self.min_lr}")
        if not 0 <= self.warmup < 1:
            bad(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.kd_weight <= 1:
            bad(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("sgd", "adamw"):
            bad(f"unknown optimizer '{self.optimizer}'", "use sgd or adamw")
        if self.init not in ("lsq", "none"):
            bad(f"unknown --init '{self.init}'", "use lsq or none")
        if self.calib_images < 0 or self.workers < 0 or self.log_every < 1:
            bad("--calib-images and --workers must be >= 0 and --log-every >= 1")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FinetuneResult:
    """What a fine-tune produced."""

    model: nn.Module  #: the fine-tuned model (eval mode, CPU unless trained on a GPU)
    out: Path  #: the output folder
    checkpoint: Path  #: OUT/checkpoint.safetensors
    epochs: int
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  #: one entry per epoch
    init: dict[str, Any] = field(default_factory=dict)  #: agreement before/after initialisation


# --------------------------------------------------------------------------------------------- helpers

def _rank() -> int:
    """This process's global rank; before the process group exists, the one torchrun gave it (else 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 63)


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _num_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    return None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, times T² (Hinton et al.)."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=1)
    q = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, q, reduction="batchmean", log_target=True) * (t * t)


def _lr_at(cfg: FinetuneConfig, step: int, total: int) -> float:
    """Linear warm-up from lr/warmup_steps to lr, then a cosine down to min_lr (step is 0-based)."""
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total - warm)
    frac = min(1.0, (step - warm) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _batch_input(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# ----------------------------------------------------------------------------------- models and teacher

def _load_student(model: nn.Module | str | Path) -> tuple[nn.Module, dict[str, Any], str]:
    from .checkpoint import load

    if isinstance(model, nn.Module):
        recipe = getattr(model, "pixify_recipe", None)
        if recipe is None:
            raise PixifyError("this model carries no pixify recipe",
                              "fine-tune the model returned by pixify.convert or a pixify checkpoint")
        return model, recipe, type(model).__name__
    path = Path(model)
    read_recipe(path)  # a one-line CheckpointError for anything that is not a pixify checkpoint
    student = load(path)
    return student, student.pixify_recipe, path.name


def _near(model: nn.Module | str | Path) -> list[Path]:
    """Where the original weights of a checkpoint converted with ``--weights FILE`` are looked for: the
    checkpoint's folder, then the folder above it (a fine-tuning run's folder sits beside the original);
    for a model converted in this process, the folder the weights were read from."""
    if isinstance(model, nn.Module):
        found = getattr(model, "pixify_weights_file", None)  # set by pixify.create_model(weights=...)
        if found is not None:
            return [Path(found).parent]
        model = getattr(model, "pixify_checkpoint", None)  # set by pixify.load
        if model is None:
            return []
    folder = Path(model).resolve().parent
    return [folder, folder.parent]


def load_teacher(recipe: dict[str, Any], teacher: nn.Module | str | Path | None = None,
                 near: Sequence[Path] = ()) -> nn.Module:
    """The original model: ``teacher`` itself, the architecture of the recipe with the weights in the file
    ``teacher``, or (default) the original rebuilt from the recipe with its recorded weights (a weights
    file is looked for by its recorded name in the folders ``near``)."""
    from .sources import Source, load_state_dict_checked, load_weights_file, map_keys, rebuild

    if isinstance(teacher, nn.Module):
        return teacher.eval()
    source = Source.from_json(recipe["source"])
    if source.library == "custom":
        raise PixifyError(f"the teacher ({source.name}) is a user module that cannot be rebuilt from the recipe",
                          "use the Python API: pixify.finetune(model, data, teacher=original_model)")
    if teacher is not None:
        state = load_weights_file(teacher)
        model = rebuild(source, init=False)
        state = map_keys(model, state, source.key_map, f"teacher weights {Path(teacher).name}")
        load_state_dict_checked(model, state, f"teacher weights {teacher}", source.spec)
        return model.eval()
    return rebuild(source, with_weights=True, near=near).eval()


# ------------------------------------------------------------------------------------- initialisation

def _pix_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .ops import PiX

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
    from .rewrite import PiXBlock

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
    from .metrics import output_agreement

    student.eval()
    teacher.eval()
    return output_agreement((teacher(b) for b in batches), (student(b) for b in batches))


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model: nn.Module | str | Path, data: Any, teacher: nn.Module | str | Path | None | bool = None,
             batch_size: int = 256, workers: int = 2, device: str | None = None, data_config: dict | None = None,
             check_images: bool = True, progress: bool = False, max_batches: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 of ``model`` on ``data`` (when it has labels) and top-1 agreement with the teacher.

    ``model``: a pixify checkpoint path or a converted model. ``data``: a folder (see
    :func:`pixify.data.prepare_data`) or an iterable of ``(images, labels)`` batches. ``teacher``: as in
    :func:`finetune`; ``False`` skips the teacher.
    """
    from .data import DataSource, create_loader, prepare_data, resolve_data_config

    from .validate import check_device

    device = str(check_device(device)) if device is not None else _default_device()
    if batch_size < 1 or workers < 0:
        raise PixifyError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    student, recipe, _ = _load_student(model)
    if isinstance(data, (str, Path, DataSource)):
        source = data if isinstance(data, DataSource) else prepare_data(data, split="val", check_images=check_images,
                                                                          workers=max(1, workers), what="--data")
        cfg = data_config or resolve_data_config(student)
        loader = create_loader(source, cfg, batch_size, training=False, workers=workers, device=device)
        labelled = source.labelled
        _check_classes(source, student)
    else:
        loader, labelled = data, True
    tmodel = None if teacher is False else load_teacher(recipe, teacher if teacher is not True else None,
                                                          _near(model))
    student = student.to(device).eval()
    if tmodel is not None:
        tmodel = tmodel.to(device).eval()
    n = c1 = c5 = agree = tc1 = 0
    t0 = time.perf_counter()
    bar = _Progress(progress, "eval", len(loader) if hasattr(loader, "__len__") else None)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = _batch_input(batch).to(device)
        out = _logits(student(x)).float()
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


def _check_classes(source, model: nn.Module) -> None:
    n_out = _num_outputs(_unwrap(model))
    if source.labelled and source.classes and n_out is not None and len(source.classes) > n_out:
        raise PixifyError(f"the data has {len(source.classes)} classes but the model predicts {n_out}",
                          "use data with the model's classes, or --unlabelled for distillation alone")


# -------------------------------------------------------------------------------------------- progress

class _Progress:
    """A rich progress bar (loss, images/s, ETA) on rank 0, or nothing."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.enabled = enabled and _rank() == 0
        self._images = 0
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss="-", ips="-")

    def update(self, n: int = 1, images: int = 0, loss: float | None = None) -> None:
        self._images += images
        if not self.enabled:
            return
        dt = max(1e-9, time.perf_counter() - self._t0)
        fields_: dict[str, Any] = {"ips": f"{self._images / dt:.0f}"}
        if loss is not None:
            fields_["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, advance=n, **fields_)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


# ------------------------------------------------------------------------------------ state and output

def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta: dict[str, Any] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous().clone()
                meta[k] = "tensor"
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          device: torch.device) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        entry = {}
        for k, v in st.items():
            if v == "tensor":
                t = tensors[f"optim/{pid}/{k}"]
                entry[k] = t if k == "step" else t.to(device)
            else:
                entry[k] = v
        state[int(pid)] = entry
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_files(opt)
    tensors.update(opt_tensors)
    payload = dict(meta, optimizer=opt_meta, version=STATE_VERSION)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_STATE_KEY: json.dumps(payload)}))


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PixifyError(f"cannot read the training state {path} ({str(exc).splitlines()[0] if str(exc) else ''})",
                          "the run cannot be resumed; start a new one with another --out") from None
    if _STATE_KEY not in meta:
        raise PixifyError(f"{path} is not a pixify training state")
    payload = json.loads(meta[_STATE_KEY])
    if payload.get("version", 0) > STATE_VERSION:
        raise PixifyError(f"{path} was written by a newer pixify (state version {payload.get('version')})")
    return tensors, payload


def _append_log(path: Path, record: dict[str, Any]) -> None:
    record = {"time": round(time.time(), 3), **record}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they belong to the lost part of the run)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "train" and rec.get("step", 0) > step:
            continue
        if rec.get("event") == "epoch" and rec.get("step", 0) > step:
            continue
        keep.append(line)
    keep.append(json.dumps({"time": round(time.time(), 3), "event": "resume", "step": step}))
    text = "\n".join(keep) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def plot_log(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw the loss curves (per logged step) and the per-epoch accuracy from a JSON-lines log into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in recs if r.get("event") == "train"]
    epochs = [r for r in recs if r.get("event") == "epoch"]
    if not train and not epochs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "loss"), ("kd", "distillation (KL·T²)"), ("ce", "cross-entropy")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    plotted = False
    for key, label in (("val_top1", "top-1 (val)"), ("val_agreement", "agreement with teacher (val)")):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        init = [r for r in recs if r.get("event") == "init" and r.get(key) is not None]
        if init and pts:
            pts = [(0, init[-1][key])] + pts
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
            plotted = True
    if not plotted:
        pts = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
        if pts:
            ax2.plot(*zip(*pts), label="learning rate")
        ax2.set_xlabel("step")
        ax2.set_title("learning rate")
    else:
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("%")
        ax2.set_title("accuracy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return Path(png_path)


# ------------------------------------------------------------------------------------------- the run

def _setup_distributed(device: str | None) -> tuple[bool, str]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, device or _default_device()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return True, device


class _RunFolder:
    """The output folder of one run: created and locked on entry (by the process that owns it), and on an
    error or Ctrl-C before this run wrote its first checkpoint, left exactly as it was found (the files this
    run created removed, the folder too if it made it). Ctrl-C ends as :class:`Interrupted`, saying what
    was kept."""

    def __init__(self, out: Path, files: Sequence[Path], owner: bool = True):
        self.out, self.files, self.owner = out, list(files), owner
        self.lock: RunLock | None = None

    def __enter__(self) -> "_RunFolder":
        if not self.owner:
            return self
        self.made_folder = not self.out.exists()
        try:
            self.out.mkdir(parents=False, exist_ok=True)
        except OSError as exc:
            raise PixifyError(f"cannot create --out {self.out}: {exc.strerror or exc}") from None
        self.before = {f: (f.stat().st_mtime_ns if f.exists() else None) for f in self.files}
        try:
            self.lock = RunLock(self.out).acquire()
        except BaseException:
            if self.made_folder:
                self.out.rmdir()
            raise
        return self

    def _checkpointed(self) -> bool:
        ckpt = self.files[0]
        return ckpt.exists() and ckpt.stat().st_mtime_ns != self.before.get(ckpt)

    def __exit__(self, kind, exc, tb) -> None:
        if not self.owner:
            return None
        lock, self.lock = self.lock, None
        if kind is None:
            lock.release()
            return None
        resumable = self._checkpointed() or self.before.get(self.files[0]) is not None
        if not resumable:
            for f in self.files:
                if self.before.get(f) is None and f.exists():
                    f.unlink()
            for stray in self.out.glob(".*.pixify-*.tmp"):
                stray.unlink()
        lock.release()
        if self.made_folder and not resumable:
            try:
                self.out.rmdir()
            except OSError:
                pass
        if issubclass(kind, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            if resumable:
                raise Interrupted(f"kept {self.files[0]} and its training state; continue with --resume") from None
            raise Interrupted("before the first checkpoint; nothing was kept") from None
        return None


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
    from .data import DataSource, create_loader, prepare_data, remembered_preprocessing, resolve_data_config

    t_start = time.perf_counter()
    cfg = config or FinetuneConfig()
    unknown = set(overrides) - {f.name for f in fields(FinetuneConfig)}
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
    explicit = {k: v for k, v in overrides.items() if v is not None}
    cfg = FinetuneConfig.from_json({**cfg.to_json(), **explicit})
    cfg.validate()

    # ---- everything is validated before anything is written
    student, recipe, model_name = _load_student(model)
    if out is None:
        out = (Path(model).with_suffix("").name + "-finetune") if isinstance(model, (str, Path)) else "pixify-finetune"
    out = Path(out)
    state_path, ckpt_path, log_path, png_path = (out / STATE_NAME, out / CHECKPOINT_NAME, out / LOG_NAME,
                                                 out / PLOT_NAME)
    check_output_dir(out, "--out")
    if device is not None:
        from .validate import check_device

        check_device(device)
    state_tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, Any] = {}
    fresh_log = False
    if resume and not state_path.is_file():
        if not log_path.is_file():
            raise PixifyError(f"nothing to resume in {out} (no {STATE_NAME})",
                              "start without --resume, or point --out at the interrupted run")
        # the run was interrupted before its first checkpoint: start it again from the beginning
        resume, fresh_log = False, True
        if _rank() == 0:
            print(f"pixify: {out} has no checkpoint yet; starting the run from the beginning", file=sys.stderr,
                  flush=True)
    if resume:
        state_tensors, state_meta = _read_state(state_path)
        saved = FinetuneConfig.from_json(state_meta["config"])
        differ = [k for k, v in explicit.items() if getattr(saved, k) != v and k not in ("workers", "check_images",
                                                                                          "log_every")]
        if differ and _rank() == 0:
            print(f"pixify: resuming with the interrupted run's settings; ignoring {', '.join(sorted(differ))}",
                  file=sys.stderr, flush=True)
        cfg = FinetuneConfig.from_json({**saved.to_json(), **{k: explicit[k] for k in ("workers", "check_images")
                                                               if k in explicit}})
    elif state_path.exists() or ckpt_path.exists():
        raise PixifyError(f"{out} already holds a fine-tuning run",
                          "pass --resume to continue it, or choose another --out")
    else:
        fresh_log = True  # a log without any checkpoint belongs to a run that never finished an epoch
    # under torchrun only global rank 0 decodes every image; a bad one stops it, and torchrun stops the others
    check = cfg.check_images and _rank() == 0
    if isinstance(data, DataSource):
        source = data
    else:
        source = prepare_data(data, split="train", labelled=labelled, check_images=check,
                              workers=max(2, cfg.workers), what="--data")
    val_source = None
    if val_data is not None:
        val_source = val_data if isinstance(val_data, DataSource) else prepare_data(
            val_data, split="val", check_images=check, workers=max(2, cfg.workers), what="--val-data")
    _check_classes(source, student)
    tmodel = load_teacher(recipe, teacher, _near(model))
    dcfg = data_config or resolve_data_config(student)

    distributed, device = _setup_distributed(device)
    rank, world = _rank(), _world()
    dev = torch.device(device)
    use_cuda = dev.type == "cuda"
    amp = cfg.amp if cfg.amp is not None else use_cuda
    channels_last = cfg.channels_last if cfg.channels_last is not None else use_cuda
    amp_dtype = (torch.bfloat16 if (use_cuda and torch.cuda.is_bf16_supported()) or not use_cuda else torch.float16)
    _seed_all(cfg.seed + rank)

    loader = create_loader(source, dcfg, cfg.batch_size, training=True, augment=cfg.augment, workers=cfg.workers,
                           distributed=distributed, device=device, seed=cfg.seed)
    steps_per_epoch = len(loader)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    val_loader = (create_loader(val_source, dcfg, max(cfg.batch_size, 64), training=False, workers=cfg.workers,
                                device=device) if val_source is not None and rank == 0 else None)

    with _RunFolder(out, [ckpt_path, state_path, log_path, png_path], owner=rank == 0):
        if rank == 0 and fresh_log and log_path.exists():
            log_path.unlink()
        student.to(dev)
        tmodel.to(dev)
        for p in tmodel.parameters():
            p.requires_grad_(False)
        if channels_last:
            student.to(memory_format=torch.channels_last)
            tmodel.to(memory_format=torch.channels_last)

        params = [p for p in student.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

        history: list[dict[str, Any]] = []
        init_info: dict[str, Any] = {}
        start_epoch = step = 0
        if resume:
            model_sd = {k[len("model/"):]: v for k, v in state_tensors.items() if k.startswith("model/")}
            try:
                student.load_state_dict(model_sd, strict=True)
            except RuntimeError as exc:
                raise PixifyError(f"the training state in {out} does not fit this model "
                                  f"({str(exc).splitlines()[0]})", "resume with the same checkpoint") from None
            _optimizer_from_files(opt, state_tensors, state_meta["optimizer"], dev)
            if state_meta.get("scaler"):
                scaler.load_state_dict(state_meta["scaler"])
            start_epoch, step = int(state_meta["epoch"]), int(state_meta["step"])
            history = list(state_meta.get("history", []))
            init_info = dict(state_meta.get("init", {}))
            if state_meta.get("world_size", 1) != world and rank == 0:
                print(f"pixify: the interrupted run used {state_meta.get('world_size')} processes, this one {world}: "
                      "the data order differs from an uninterrupted run", file=sys.stderr, flush=True)
            if rank == 0:
                _truncate_log(log_path, step)
        else:
            if rank == 0:
                _append_log(log_path, {"event": "start", "model": model_name, "data": source.describe(),
                                       "labelled": source.labelled, "val_data": val_source.describe() if val_source else None,
                                       "teacher": Path(teacher).name if isinstance(teacher, (str, Path)) else
                                       ("module" if isinstance(teacher, nn.Module) else recipe["source"].get("weights")),
                                       "world_size": world, "device": str(dev), "steps": total_steps,
                                       "steps_per_epoch": steps_per_epoch, "config": cfg.to_json(),
                                       "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in dcfg.items()}})
                if cfg.calib_images > 0:
                    init_info = _initialise(student, tmodel, loader, cfg, dev, channels_last, recipe, progress)
                if val_loader is not None:  # the starting point, epoch 0 of the curves
                    ev = evaluate(student, val_loader, teacher=tmodel, device=str(dev))
                    init_info.update({f"val_{k}": v for k, v in ev.items() if k in ("top1", "top5", "agreement")})
                if init_info:
                    _append_log(log_path, {"event": "init", **init_info})

        if start_epoch >= n_epochs:
            if rank == 0:
                print(f"pixify: the run in {out} is already complete ({step} steps)", file=sys.stderr, flush=True)
        train_model: nn.Module = student
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(student, device_ids=[dev.index] if use_cuda else None)
        if cfg.compile:
            train_model = torch.compile(train_model)

        last_good = ckpt_path if ckpt_path.exists() else None
        try:
            for epoch in range(start_epoch, n_epochs):
                _seed_all(_epoch_seed(cfg.seed, epoch, rank))
                sampler = getattr(loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                train_model.train()
                tmodel.eval()
                epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                bar = _Progress(progress, f"epoch {epoch + 1}/{n_epochs}", epoch_steps)
                sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
                seen = 0
                window: dict[str, float] = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "n": 0, "images": 0}
                t_win = t_epoch = time.perf_counter()
                for i, batch in enumerate(loader):
                    if i >= epoch_steps:
                        break
                    x = _batch_input(batch).to(dev, non_blocking=True)
                    y = batch[1].to(dev, non_blocking=True) if source.labelled and isinstance(batch, (tuple, list)) else None
                    if channels_last and x.ndim == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    lr = _lr_at(cfg, step, total_steps)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                        with torch.no_grad():
                            t_logits = _logits(tmodel(x))
                        s_logits = _logits(train_model(x))
                    kd = distillation_loss(s_logits, t_logits, cfg.temperature)
                    if y is not None and cfg.kd_weight < 1:
                        ce = F.cross_entropy(s_logits.float(), y)
                        loss = cfg.kd_weight * kd + (1 - cfg.kd_weight) * ce
                    else:
                        ce = None
                        loss = kd
                    vals = torch.stack([loss.detach(), kd.detach(), ce.detach() if ce is not None else kd.new_zeros(())])
                    if distributed:
                        import torch.distributed as dist

                        dist.all_reduce(vals)
                        vals /= world
                    lv, kv, cv = (float(v) for v in vals)
                    if not math.isfinite(lv):
                        where = f"epoch {epoch + 1}, step {step + 1}"
                        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                        raise PixifyError(f"the loss became non-finite ({lv}) at {where}; stopped, {kept}",
                                          "lower --lr, or check the model and data for inf/nan values")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    step += 1
                    bs = x.shape[0] * world
                    seen += bs
                    sums["loss"] += lv * bs
                    sums["kd"] += kv * bs
                    sums["ce"] += cv * bs
                    for k, v in (("loss", lv), ("kd", kv), ("ce", cv)):
                        window[k] += v
                    window["n"] += 1
                    window["images"] += bs
                    bar.update(1, images=bs, loss=lv)
                    if rank == 0 and (step % cfg.log_every == 0 or i == epoch_steps - 1):
                        dt = max(1e-9, time.perf_counter() - t_win)
                        n = window["n"]
                        _append_log(log_path, {"event": "train", "epoch": epoch + 1, "step": step, "lr": lr,
                                               "loss": window["loss"] / n, "kd": window["kd"] / n,
                                               "ce": window["ce"] / n if y is not None else None,
                                               "images_per_s": window["images"] / dt})
                        window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "n": 0, "images": 0}
                        t_win = time.perf_counter()
                bar.close()
                record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": step,
                                          "loss": sums["loss"] / max(1, seen), "kd": sums["kd"] / max(1, seen),
                                          "ce": (sums["ce"] / max(1, seen)) if source.labelled else None,
                                          "images": seen, "seconds": round(time.perf_counter() - t_epoch, 2)}
                if rank == 0:
                    if val_loader is not None:
                        ev = evaluate(student, val_loader, teacher=tmodel, device=str(dev))
                        record.update({f"val_{k}": v for k, v in ev.items() if k in ("top1", "top5", "agreement")})
                    history.append({k: v for k, v in record.items() if k != "event"})
                    summary = {"epoch": epoch + 1, "step": step, "metrics": history[-1]}
                    student_recipe = dict(recipe)
                    student_recipe["finetune"] = summary
                    student_recipe["data_config"] = remembered_preprocessing(dcfg)  # eval/bench read it back
                    from .checkpoint import save

                    save(student, ckpt_path, recipe=student_recipe, warn_unverified=False)
                    last_good = ckpt_path
                    _write_state(state_path, student, opt, {
                        "epoch": epoch + 1, "step": step, "total_steps": total_steps, "config": cfg.to_json(),
                        "world_size": world, "history": history, "init": init_info,
                        "scheduler": {"kind": "cosine-warmup", "step": step, "total_steps": total_steps,
                                      "warmup_steps": int(round(cfg.warmup * total_steps)), "lr": cfg.lr,
                                      "min_lr": cfg.min_lr},
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "data": source.describe(), "model": model_name,
                    })
                    _append_log(log_path, record)
                    try:
                        plot_log(log_path, png_path)
                    except Exception as exc:  # a plot must never lose a run
                        print(f"pixify: could not draw {png_path}: {exc}", file=sys.stderr, flush=True)
                    if progress:
                        msg = f"epoch {epoch + 1}/{n_epochs}: loss {record['loss']:.4f}"
                        if "val_top1" in record:
                            msg += f", val top-1 {record['val_top1']:.2f}%"
                        if "val_agreement" in record:
                            msg += f", agreement {record['val_agreement']:.2f}%"
                        print(msg, file=sys.stderr, flush=True)
                if distributed:
                    import torch.distributed as dist

                    dist.barrier()
        finally:
            if distributed:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
    student.eval()
    student.pixify_recipe = dict(recipe, finetune={"epoch": n_epochs, "step": step,
                                                   "metrics": history[-1] if history else {}},
                                 data_config=remembered_preprocessing(dcfg))
    return FinetuneResult(model=student, out=out, checkpoint=ckpt_path, epochs=n_epochs, steps=step,
                          seconds=time.perf_counter() - t_start, history=history, init=init_info)


def _initialise(student: nn.Module, teacher: nn.Module, loader: Iterable, cfg: FinetuneConfig, dev: torch.device,
                channels_last: bool, recipe: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Fit the converted sites to the teacher on ~cfg.calib_images training images (cfg.init == 'lsq'; one
    teacher pass, see :func:`pixify.recovery.initialise`), keeping whatever agrees best with the teacher on
    the held-out quarter of those images: the initialisation never makes the agreement worse."""
    from .recovery import agreement, initialise, split_batches
    from .rewrite import SiteRecord

    t0 = time.perf_counter()
    batches: list[torch.Tensor] = []
    n = 0
    for batch in loader:
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
