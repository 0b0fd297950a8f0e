"""Checkpoints: one ``.safetensors`` file, weights plus the conversion recipe as JSON metadata.

Loading rebuilds the source architecture, re-applies the recipe's sites and loads the weights with
``strict=True``. Nothing is ever unpickled. Writes go to a temporary file in the same folder and are
renamed into place, so a checkpoint is never half-written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, PixifyError, PixifyWarning, short_reason
from .outputs import atomic_write, check_output_file

__all__ = ["FORMAT", "FORMAT_VERSION", "save", "load", "read_recipe", "atomic_write", "check_output_file"]

FORMAT = "pixify"
FORMAT_VERSION = 1
_META_KEY = "pixify"


def save(model: nn.Module, path: str | Path, recipe: dict[str, Any] | None = None, *,
         warn_unverified: bool = True) -> Path:
    """Write ``model``'s weights and ``recipe`` (default: ``model.pixify_recipe``) to ``path`` atomically.

    A recipe whose source is a user module (one that pixify could not verify) warns, in one line, that
    ``pixify.load`` will need ``model=`` (``warn_unverified=False`` keeps quiet)."""
    from safetensors.torch import save_model

    recipe = recipe if recipe is not None else getattr(model, "pixify_recipe", None)
    if recipe is None:
        raise PixifyError("this model carries no pixify recipe", "save the model returned by pixify.convert")
    if not isinstance(recipe, dict):
        raise PixifyError(f"the recipe must be the dict pixify.convert made, got {type(recipe).__name__}")
    if not isinstance(path, (str, Path)):
        raise PixifyError(f"expected a file name to save to, got {type(path).__name__}")
    if not isinstance(model, nn.Module) or any(t.is_meta for t in model.state_dict().values()):
        raise PixifyError("the model has no weights to save (it is on the meta device)" if isinstance(model, nn.Module)
                          else f"expected a torch.nn.Module, got {type(model).__name__}")
    from . import __version__

    src = recipe.get("source") or {}
    if src.get("library") == "custom" and warn_unverified:
        warnings.warn(PixifyWarning(
            f"{Path(path).name} records a user module ({src.get('name')}): pixify.load will need "
            f"model={src.get('name', 'MyModel').rsplit('.', 1)[-1]}(...)"
            + (f" because {src['note']}" if src.get("note") else "")
            + "; to make it self-contained pass source='timm:NAME' or 'torchvision:NAME' (or a pixify.Source) "
            "to pixify.convert"), stacklevel=2)
    meta = dict(recipe)
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, pixify_version=__version__)
    try:
        meta = json.loads(json.dumps(meta))  # as a reader will see it (tuples become lists)
    except (TypeError, ValueError) as exc:
        raise PixifyError(f"the recipe is not JSON data ({exc})", "save the recipe pixify.convert made") from None
    from .schema import validate_recipe

    try:  # never write a checkpoint that pixify.load would refuse
        validate_recipe(meta)
    except CheckpointError as exc:
        raise PixifyError(f"cannot save {Path(path).name}: {exc.message}", exc.hint) from None
    atomic_write(path, lambda tmp: save_model(model, tmp, metadata={"format": "pt", _META_KEY: json.dumps(meta)}))
    return Path(path)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe stored in a pixify checkpoint, validated; raises :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not str(path).strip():
        raise CheckpointError("no checkpoint named (an empty path)", "name a .safetensors file pixify wrote")
    if not p.is_file():
        if p.exists():
            kind = "a folder" if p.is_dir() else "not a regular file"
            raise CheckpointError(f"{path} is {kind}, not a checkpoint", "name a .safetensors file pixify wrote")
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason})",
                              "the file may be truncated or of another type") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is not a pixify checkpoint (no recipe in its metadata)",
                              "plain weights go in with --weights FILE")
    try:
        recipe = json.loads(meta[_META_KEY])
    except ValueError as exc:  # JSONDecodeError, or an integer longer than Python converts
        raise CheckpointError(f"{path}: the pixify recipe is not valid JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the pixify recipe is nested deeper than any recipe pixify writes") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pixify checkpoint (unknown recipe format)")
    version = recipe.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: recipe field format_version: expected an integer >= 1, got "
                              f"{str(version)[:40]}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this pixify reads up to "
                              f"{FORMAT_VERSION}", "upgrade pixify")
    for key in ("source", "sites"):
        if key not in recipe:
            raise CheckpointError(f"{path}: the recipe lacks '{key}'")
    from .schema import validate_recipe

    try:
        validate_recipe(recipe)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc.message}", exc.hint) from None
    recipe["_tensor_names"] = keys
    return recipe


def _load_weights(model: nn.Module, path: str | Path, device: str) -> None:
    """``safetensors.torch.load_model(strict=True)``, plus the modules' state-dict versions.

    A safetensors file keeps no ``_metadata`` (the per-module versions ``torch.save`` keeps), and some
    modules refuse a state dict without theirs (torchvision's MNASNet raises "version should be set to 1
    or 2"). The model was just built from the same architecture, so its own versions are the right ones.
    Tied tensors, stored once by ``save_model``, are filled in under every name they go by.
    """
    from collections import OrderedDict

    from safetensors.torch import load_file

    stored = load_file(str(path), device=device)
    own = model.state_dict()
    for k, t in stored.items():
        if k in own and t.dtype != own[k].dtype:
            raise CheckpointError(f"{Path(path).name}: tensor {k} is stored as {t.dtype}, the model holds "
                                  f"{own[k].dtype}", "the file was altered or belongs to another model")
    state = OrderedDict(stored)
    tied: dict[tuple, list[str]] = {}
    for name, t in own.items():
        if t.numel():
            tied.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    for names in tied.values():
        present = [n for n in names if n in stored]
        if present and len(present) < len(names):
            for n in names:
                state.setdefault(n, stored[present[0]])
    metadata = getattr(own, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def _mismatch(model: nn.Module, path: str | Path) -> str:
    """How the file's tensors differ from the model's state dict: counts and a few names (shapes read from the
    header only)."""
    from safetensors import safe_open

    from .sources import mismatch_summary

    with safe_open(str(path), framework="pt") as f:
        stored = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    return mismatch_summary(model, stored)


def _stored_numel(path: str | Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


def _check_size(source, path: str | Path) -> None:
    """Build the architecture on the meta device (no memory) and refuse one far larger than the checkpoint's
    own tensors: a recipe's constructor arguments must not make pixify allocate what the file does not hold."""
    from .sources import meta_architecture

    try:
        meta = meta_architecture(source.library, source.name, source.kwargs, source.pretrained_cfg)
    except PixifyError as exc:  # an unknown model: say so now
        raise CheckpointError(f"{Path(path).name}: {exc.message}", exc.hint) from None
    if meta is None:
        return  # a constructor that needs real data: the real build below judges it
    held = _stored_numel(path)
    need = sum(t.numel() for t in meta.parameters()) + sum(t.numel() for t in meta.buffers())
    if need > 2 * held + (1 << 24):
        raise CheckpointError(f"{Path(path).name}: its recipe builds a model of {need:,} values but the file holds "
                              f"{held:,}", "the recipe does not belong to these weights")


def load(path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the converted model stored in ``path``.

    ``model``: a freshly built instance of the original architecture, needed only for checkpoints made
    from a user's own module (``source.library == "custom"``).
    """
    from .rewrite import SiteRecord, apply_sites
    from .sources import Source, rebuild

    from .validate import check_device

    dev = check_device(map_location, "map_location")
    if not isinstance(path, (str, Path)):
        raise CheckpointError(f"expected the path of a checkpoint, got {type(path).__name__}")
    if model is not None:
        from .conversion import check_eager_model

        check_eager_model(model)
    recipe = read_recipe(path)
    source = Source.from_json(recipe["source"])
    if model is None:
        if source.library == "custom":
            note = recipe["source"].get("note")
            raise CheckpointError(f"{Path(path).name} was made from a user module ({source.name})"
                                  + (f" that pixify could not identify: {note}" if note else ""),
                                  f"pass a freshly built one: pixify.load(path, model={source.name.rsplit('.', 1)[-1]}(...))")
        _check_size(source, path)
        model = rebuild(source, init=False)  # every weight is loaded strictly below
    sites = [SiteRecord.from_json(s) for s in recipe["sites"]]
    try:
        apply_sites(model, sites)
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the recipe does not apply to {source.spec}: {exc}") from None
    try:
        _load_weights(model, path, str(dev))
    except (OSError, ValueError) as exc:  # the file changed or vanished since its recipe was read
        raise CheckpointError(f"{path}: cannot read its weights ({short_reason(exc, 200)})",
                              "the file changed while it was read; try again") from None
    except RuntimeError:
        raise CheckpointError(f"{path}: the weights do not fit the rebuilt model ({_mismatch(model, path)})",
                              "the file was altered, or its recipe and tensors come from different models") from None
    recipe.pop("_tensor_names", None)
    model.pixify_recipe = recipe
    model.pixify_checkpoint = Path(path).resolve()  # where the original's weights file is looked for
    model.eval()
    return model
