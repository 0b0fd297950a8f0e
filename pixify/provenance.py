"""Where a model came from, worked out from the model itself and verified.

``pixify.convert(model)`` records in the checkpoint how to rebuild the original architecture, so that
``pixify.load(path)`` needs nothing but the file. For a model built by ``timm.create_model`` the
architecture is in ``model.pretrained_cfg`` and the constructor arguments in ``model._model_args``; for a
torchvision model the class and its builders narrow the candidates. Every guess is verified: the candidate
is built on the meta device (no memory, no random init) and its state dict must have exactly the same
keys, shapes and dtypes as the model's. A model that cannot be verified is recorded as a user module,
with the reason, and :func:`pixify.save` says what to pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import PixifyError
from .sources import _SAFE_CFG_KEYS, Source, parse_spec, state_dict_digest

__all__ = ["identify", "verify", "signature"]

def signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The state dict's keys with the shape and dtype of each tensor."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool, list)) or v is None:
        return v
    raise TypeError(type(v).__name__)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return {k: _json_value(v) for k, v in kwargs.items()}
    except TypeError:
        return None


def pretrained_cfg_subset(cfg: Any) -> dict[str, Any]:
    cfg = cfg if isinstance(cfg, dict) else getattr(cfg, "__dict__", {}) or {}
    out = {}
    for k in _SAFE_CFG_KEYS:  # what describes the model and its preprocessing, never a URL or file
        if cfg.get(k) is not None:
            try:
                out[k] = _json_value(cfg[k])
            except TypeError:
                pass
    return out


def _build_meta(library: str, name: str, kwargs: dict[str, Any], cfg: dict[str, Any] | None) -> nn.Module:
    """The architecture without memory or init (meta device); on CPU where a constructor needs real data."""
    from .sources import build_architecture, meta_architecture

    meta = meta_architecture(library, name, kwargs, cfg)
    return meta if meta is not None else build_architecture(library, name, kwargs, cfg, no_init=True)


def _difference(want: dict, got: dict) -> str:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing in the rebuild (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        return ", ".join(parts)
    for k, v in want.items():
        if got[k] != v:
            return f"{k} is {tuple(got[k][0])} {got[k][1]} in the rebuild, {tuple(v[0])} {v[1]} in the model"
    return ""


def verify(model: nn.Module, library: str, name: str, kwargs: dict[str, Any],
           cfg: dict[str, Any] | None = None) -> str:
    """'' when ``library:name(**kwargs)`` rebuilds ``model``'s exact state-dict layout, else the reason."""
    try:
        rebuilt = _build_meta(library, name, kwargs, cfg)
    except PixifyError as exc:
        return exc.one_line()
    except Exception as exc:  # noqa: BLE001 - the library rejects the arguments
        return f"{library} cannot build {name} with {kwargs}: {type(exc).__name__}: {exc}".splitlines()[0]
    if type(rebuilt) is not type(model):
        return f"{library} builds a {type(rebuilt).__name__} for {name}, the model is a {type(model).__name__}"
    return _difference(signature(model), signature(rebuilt))


def _timm_candidates(model: nn.Module) -> tuple[str | None, list[dict[str, Any]], dict[str, Any] | None, str]:
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    arch = cfg.get("architecture")
    if not arch:
        return None, [], None, "it has no pretrained_cfg['architecture'] (not built by timm.create_model)"
    recorded = getattr(model, "_model_args", None)
    cands: list[dict[str, Any]] = []
    if isinstance(recorded, dict):
        rec = {k: v for k, v in recorded.items() if k not in ("pretrained_model_args", "device", "dtype")}
        cands.append(rec)
    guess: dict[str, Any] = {}
    n_cls = getattr(model, "num_classes", None)
    if isinstance(n_cls, int):
        guess["num_classes"] = n_cls
    first = cfg.get("first_conv")
    try:
        conv = model.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        conv = None
    if isinstance(conv, nn.Conv2d):
        guess["in_chans"] = conv.in_channels
    cands += [{}, guess]
    sub = pretrained_cfg_subset(cfg)
    hub = cfg.get("hf_hub_id") if cfg.get("source") == "hf-hub" else None
    return arch, cands, sub, hub or ""


def _torchvision_candidates(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    import torchvision

    module = type(model).__module__
    names = []
    for n in torchvision.models.list_models(module=torchvision.models):
        try:
            if torchvision.models.get_model_builder(n).__module__ == module:
                names.append(n)
        except Exception:  # noqa: BLE001
            continue
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    n_cls = heads[-1].out_features if heads else None
    out = []
    for n in names:
        out.append((n, {}))
        if n_cls is not None and n_cls != 1000:
            out.append((n, {"num_classes": n_cls}))
    return out


def _with_weights(model: nn.Module, src: Source) -> Source:
    src.weights = "module"
    src.sha256 = state_dict_digest(model)
    return src


def identify(model: nn.Module) -> tuple[Source, str]:
    """The verified source of ``model``, or a user-module source and the reason it could not be verified."""
    from .sources import custom_source

    mod = type(model).__module__
    if mod.startswith("timm."):
        arch, cands, cfg, hub = _timm_candidates(model)
        reasons = []
        for kw in cands:
            kw = _jsonable(kw)
            if kw is None:
                reasons.append("its constructor arguments are not JSON data")
                continue
            why = verify(model, "timm", arch, kw, cfg)
            if not why:
                src = Source("timm", arch, kw, pretrained_cfg=cfg)
                if hub:
                    src.hub = hub
                return _with_weights(model, src), ""
            reasons.append(why)
        reason = (f"timm's {arch} does not rebuild it ({reasons[0]})" if arch else (reasons or [""])[0]) if reasons \
            else "it has no pretrained_cfg['architecture'] (not built by timm.create_model)"
        return custom_source(model), reason
    if mod.startswith("torchvision.models"):
        cands = _torchvision_candidates(model)
        matches = [(n, kw) for n, kw in cands if not verify(model, "torchvision", n, kw)]
        if len(matches) == 1:
            n, kw = matches[0]
            return _with_weights(model, Source("torchvision", n, kw)), ""
        if matches:
            return custom_source(model), (f"several torchvision builders fit it ({', '.join(n for n, _ in matches)})")
        return custom_source(model), f"no torchvision builder of {type(model).__name__} rebuilds it"
    return custom_source(model), f"{type(model).__qualname__} is not a timm or torchvision model"


def source_for(model: nn.Module, source: Source | str | None) -> tuple[Source, str]:
    """What ``pixify.convert`` records: ``source`` checked against ``model``, or the identified source."""
    if source is None:
        return identify(model)
    if isinstance(source, str):
        library, name = parse_spec(source)
        if name.startswith(("hf-hub:", "hf_hub:")):
            raise PixifyError(f"source='{source}' names hub weights",
                              "build the model with pixify.create_model(...) or timm.create_model(...) and convert it")
        found, _ = identify(model)
        if found.library == library and found.name == name:
            return found, ""
        kw = {}
        if library == "torchvision":
            heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if heads and heads[-1].out_features != 1000:
                kw["num_classes"] = heads[-1].out_features
        elif isinstance(getattr(model, "_model_args", None), dict):
            kw = _jsonable(model._model_args) or {}
        why = verify(model, library, name, kw)
        if why:
            raise PixifyError(f"source='{source}' does not rebuild this model: {why}",
                              "pass a pixify.Source with the constructor arguments, e.g. "
                              f"pixify.Source('{library}', '{name}', {{'num_classes': 10}})")
        return _with_weights(model, Source(library, name, kw)), ""
    if not isinstance(source, Source):
        raise PixifyError(f"source must be a pixify.Source or a string like 'torchvision:resnet50', "
                          f"got {type(source).__name__}")
    return source, ""
