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

from .config import FinetuneConfig, FinetuneResult
from .evaluation import evaluate
from .init import refit_from_teacher
from .logs import plot_log
from .loss import distillation_loss
from .models import load_teacher
from .run import finetune
from .state import CHECKPOINT_NAME, LOG_NAME, PLOT_NAME, STATE_NAME

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "evaluate", "load_teacher", "distillation_loss",
           "refit_from_teacher", "plot_log", "CHECKPOINT_NAME", "STATE_NAME", "LOG_NAME", "PLOT_NAME"]
