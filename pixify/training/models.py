"""The student (a converted model or checkpoint), the teacher (the original), and checks between them and the
data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import read_recipe
from ..errors import PixifyError
from .distributed import _unwrap

__all__ = ["load_student", "load_teacher"]


def _num_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    return None


def _batch_input(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _load_student(model: nn.Module | str | Path) -> tuple[nn.Module, dict[str, Any], str]:
    from ..checkpoint import load

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
    from ..sources import Source, load_state_dict_checked, load_weights_file, map_keys, rebuild

    if isinstance(teacher, nn.Module):
        from ..conversion import check_eager_model

        check_eager_model(teacher)
        return teacher.eval()
    if teacher is not None and not isinstance(teacher, (str, Path)):
        raise PixifyError(f"teacher must be a model or the path of its weights file, got {type(teacher).__name__}")
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


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher predicts as many classes as the student (distillation compares their outputs)."""
    n_teacher, n_student = _num_outputs(_unwrap(teacher)), _num_outputs(_unwrap(student))
    if n_teacher is not None and n_student is not None and n_teacher != n_student:
        raise PixifyError(f"the teacher predicts {n_teacher} classes, the converted model {n_student}",
                          "pass the original model the checkpoint was converted from")


def _check_classes(source, model: nn.Module) -> None:
    n_out = _num_outputs(_unwrap(model))
    if source.labelled and source.classes and n_out is not None and len(source.classes) > n_out:
        raise PixifyError(f"the data has {len(source.classes)} classes but the model predicts {n_out}",
                          "use data with the model's classes, or --unlabelled for distillation alone")


load_student = _load_student  # the CLI loads a checkpoint's student before it fine-tunes or evaluates it
