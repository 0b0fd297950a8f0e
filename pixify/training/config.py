"""Fine-tuning settings and results."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import PixifyError
from ..validate import check_batch_size, check_workers

__all__ = ["FinetuneConfig", "FinetuneResult", "resolve_config", "DEFAULT_LR"]

#: the peak learning rate of each optimizer when ``lr`` is not given (batch 64 per process)
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}


_NUMBER = (int, float)
_KINDS: dict[str, tuple[type, ...]] = {
    "epochs": (int,), "steps": (int,), "batch_size": (int,), "lr": _NUMBER, "min_lr": _NUMBER, "warmup": _NUMBER,
    "optimizer": (str,), "momentum": _NUMBER, "weight_decay": _NUMBER, "temperature": _NUMBER,
    "kd_weight": _NUMBER, "init": (str,), "calib_images": (int,), "augment": (bool,), "workers": (int,),
    "seed": (int,), "amp": (bool,), "channels_last": (bool,), "compile": (bool,), "log_every": (int,),
    "check_images": (bool,),
}
_OPTIONAL = ("steps", "lr", "amp", "channels_last")


def _plain_number(v: Any, kinds: tuple[type, ...]) -> int | float | None:
    """``v`` (a numpy or other registered number) as the Python int or float the option takes, or None."""
    if int in kinds and isinstance(v, numbers.Integral):
        return int(v)
    if float in kinds and isinstance(v, numbers.Real):
        return float(v)
    return None


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters. The defaults were chosen on two models: a small ResNet trained from
    scratch on Fashion-MNIST and an ImageNet-pretrained EfficientNet-Lite0 transferred to it
    (docs/finetune-evidence.md)."""

    epochs: int = 1  #: passes over the data (ignored when ``steps`` is set)
    steps: int | None = None  #: total optimizer steps instead of whole epochs
    batch_size: int = 64  #: per process
    lr: float | None = None  #: peak learning rate (batch 64 per process); None: ``DEFAULT_LR[optimizer]``
    min_lr: float = 0.0  #: learning rate at the end of the cosine
    warmup: float = 0.1  #: fraction of the steps spent in the linear warm-up
    optimizer: str = "adamw"  #: adamw | sgd (Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    temperature: float = 4.0  #: distillation temperature T (the KL term is scaled by T²)
    kd_weight: float = 0.25  #: loss = kd_weight·KD + (1 − kd_weight)·CE with labels; KD alone without
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

    def validate(self) -> "FinetuneConfig":  # noqa: C901 - one check per option
        def bad(msg: str, hint: str | None = None):
            raise PixifyError(msg, hint)

        for f in fields(self):  # the types first, so that the range checks below compare numbers
            v, kinds = getattr(self, f.name), _KINDS.get(f.name)
            if kinds is None or (v is None and f.name in _OPTIONAL):
                continue
            if not isinstance(v, bool) and not isinstance(v, kinds) and isinstance(v, numbers.Number):
                v = _plain_number(v, kinds)  # numpy and 0-d torch numbers become Python ones
                if v is not None:
                    setattr(self, f.name, v)
            if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
                bad(f"fine-tuning option {f.name} must be {' or '.join(k.__name__ for k in kinds)}, got {v!r}")
        if not 0 <= self.seed < 2 ** 63:
            bad(f"--seed must be in [0, 2^63), got {self.seed}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            bad(f"momentum must be in [0, 1), got {self.momentum}")

        if self.steps is None:
            if not isinstance(self.epochs, int) or self.epochs < 1:
                bad(f"--epochs must be an integer >= 1, got {self.epochs}", "use --epochs 1 or --steps N")
        elif not isinstance(self.steps, int) or self.steps < 1:
            bad(f"--steps must be an integer >= 1, got {self.steps}")
        check_batch_size(self.batch_size)
        if not isinstance(self.optimizer, str) or self.optimizer not in DEFAULT_LR:
            bad(f"unknown optimizer '{self.optimizer}'", "use adamw or sgd")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
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
        if self.init not in ("lsq", "none"):
            bad(f"unknown --init '{self.init}'", "use lsq or none")
        if self.calib_images < 0 or self.log_every < 1:
            bad("--calib-images must be >= 0 and --log-every >= 1")
        check_workers(self.workers)
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


def resolve_config(config: FinetuneConfig | None, overrides: dict[str, Any]) -> tuple[FinetuneConfig, dict[str, Any]]:
    """``config`` (default: the defaults) updated with the keyword ``overrides`` that are not None, validated;
    also returns those explicit overrides (a resumed run reports the ones it ignores)."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise PixifyError(f"config must be a pixify.FinetuneConfig, got {type(config).__name__}")
    cfg = config or FinetuneConfig()
    unknown = set(overrides) - {f.name for f in fields(FinetuneConfig)}
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
    explicit = {k: v for k, v in overrides.items() if v is not None}
    cfg = FinetuneConfig.from_json({**cfg.to_json(), **explicit})
    cfg.validate()
    return cfg, explicit
