"""Model sources: timm names, ``torchvision:NAME``, ``hf-hub:...``, weight files, and the user's own modules.

A :class:`Source` records how to rebuild the original architecture and where its weights came from, so
that a checkpoint can rebuild the model and fine-tuning can rebuild the teacher.
"""

from __future__ import annotations

import difflib
import hashlib
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import PixifyError

__all__ = ["Source", "create_model", "rebuild", "load_weights_file", "state_dict_digest"]

_OFFLINE_HINT = ("pass --weights FILE, use --no-pretrained for random weights, or put the weights in the local "
                 "cache (HF_HOME / TORCH_HOME) on a machine with network access")


@dataclass
class Source:
    library: str  # timm | torchvision | custom
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "random"  # pretrained[:tag] | file:NAME | module | random
    sha256: str | None = None  # of the weights file, or of the state dict (hub weights, a Python module's)
    seed: int | None = None  # torch seed used for random initialisation
    pretrained_cfg: dict[str, Any] | None = None  # timm: what describes the model and its preprocessing
    hub: str | None = None  # timm: the Hugging Face Hub id the model came from (hf-hub:ORG/NAME)
    key_map: str | None = None  # how the weights file's keys were mapped onto the model's ("positional")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("pretrained_cfg", "hub", "key_map"):  # optional: left out when unset
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Source":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def spec(self) -> str:
        if self.hub:
            return f"hf-hub:{self.hub}"
        return self.name if self.library == "timm" else f"{self.library}:{self.name}"


def parse_spec(spec: str) -> tuple[str, str]:
    """``"resnet50"`` → (timm, resnet50); ``"torchvision:resnet50"`` → (torchvision, resnet50)."""
    if spec.startswith("torchvision:"):
        return "torchvision", spec.split(":", 1)[1]
    if spec.startswith("timm:"):
        return "timm", spec.split(":", 1)[1]
    if spec.startswith("hf-hub:") or spec.startswith("hf_hub:"):
        return "timm", spec
    return "timm", spec


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` or torchvision's list_models()"


def _hub_reachable() -> bool:
    try:
        import huggingface_hub.constants as hc

        host = urllib.parse.urlparse(hc.ENDPOINT).hostname
        socket.getaddrinfo(host, 443)
        return True
    except Exception:
        return False


def state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SAFE_CFG_KEYS = ("architecture", "tag", "hf_hub_id", "input_size", "test_input_size", "min_input_size",
                  "fixed_input_size", "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std",
                  "num_classes", "pool_size", "first_conv", "classifier")


def _safe_cfg(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of a recorded pretrained_cfg that describe the model, never a URL or file to read."""
    return {k: v for k, v in (cfg or {}).items() if k in _SAFE_CFG_KEYS}


# what a model constructor raises for arguments it rejects (timm and torchvision check them in many ways)
_BUILD_ERRORS = (TypeError, ValueError, AssertionError, KeyError, IndexError, AttributeError, NotImplementedError,
                 ZeroDivisionError, OverflowError, RuntimeError, MemoryError)


def _one(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class _ConstructorError(PixifyError):
    """The model library's constructor rejected the arguments (or the device it builds on)."""


def _cannot_build(label: str, kwargs: dict[str, Any], exc: BaseException) -> _ConstructorError:
    return _ConstructorError(f"cannot build '{label}' with {kwargs}: {_one(exc)}")


def _build(library: str, name: str, pretrained: bool, kwargs: dict[str, Any],
           cfg: dict[str, Any] | None = None) -> nn.Module:
    if library == "timm":
        import timm

        if not name.startswith("hf-hub:") and not timm.is_model(name):
            raise PixifyError(f"unknown model '{name}'", _suggest(name, timm.list_models()))
        if name.startswith("hf-hub:") and not pretrained:
            raise PixifyError(f"'{name}' names hub weights", "hf-hub models need --pretrained")
        if pretrained:
            import huggingface_hub.constants as hc

            offline_before = hc.HF_HUB_OFFLINE
            if not _hub_reachable():
                hc.HF_HUB_OFFLINE = True  # fail fast and use the local cache instead of retrying for a minute
            try:
                return timm.create_model(name, pretrained=True, **kwargs)
            except (OSError, RuntimeError, ValueError) as exc:
                raise PixifyError(f"could not fetch pretrained weights for '{name}' "
                                  f"({type(exc).__name__})", _OFFLINE_HINT) from None
            except _BUILD_ERRORS as exc:
                raise _cannot_build(name, kwargs, exc) from None
            finally:
                hc.HF_HUB_OFFLINE = offline_before
        extra = {"pretrained_cfg_overlay": _safe_cfg(cfg)} if cfg else {}
        try:
            return timm.create_model(name, pretrained=False, **extra, **kwargs)
        except _BUILD_ERRORS as exc:
            raise _cannot_build(name, kwargs, exc) from None
    if library == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise PixifyError(f"unknown torchvision model '{name}'", _suggest(name, names))
        if pretrained:
            try:
                return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
            except (OSError, RuntimeError, ValueError) as exc:
                raise PixifyError(f"could not fetch pretrained weights for 'torchvision:{name}' "
                                  f"({type(exc).__name__})", _OFFLINE_HINT) from None
            except _BUILD_ERRORS as exc:
                raise _cannot_build(f"torchvision:{name}", kwargs, exc) from None
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except _BUILD_ERRORS as exc:
            raise _cannot_build(f"torchvision:{name}", kwargs, exc) from None
    raise PixifyError(f"unknown model library '{library}'", "use a timm name or torchvision:NAME")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file read with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise PixifyError(f"{path} is a folder, not a weights file", "name a .safetensors or .pth file")
        raise PixifyError(f"weights file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PixifyError(f"cannot read weights {path}: {exc}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PixifyError(f"cannot read weights {path} as a state dict ({type(exc).__name__})",
                          "only plain state dicts are accepted (no pickled objects)") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixifyError(f"{path} does not hold a state dict of tensors")
    return obj


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return f"{shown}, …" if len(names) > n else shown


def mismatch_summary(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How ``state`` differs from ``model``'s state dict, in one short line: counts and a few names."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape ({k}: {tuple(state[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the model)")
    return "; ".join(parts) or "the tensors do not load"


KEY_MAPS = ("positional",)


def map_keys(model: nn.Module, state: dict[str, torch.Tensor], key_map: str | None, what: str = "the weights"
             ) -> dict[str, torch.Tensor]:
    """``state`` with its keys renamed to ``model``'s. ``positional``: the i-th tensor of the file is the
    i-th of the model (``num_batches_tracked`` counters left out on both sides, the model keeps its own),
    accepted only when every pair has the same shape; for files from another code base of the same
    architecture, whose names differ but whose order agrees."""
    if key_map is None:
        return state
    if key_map not in KEY_MAPS:
        raise PixifyError(f"unknown key map '{key_map}'", f"use one of: {', '.join(KEY_MAPS)}")
    own = model.state_dict()
    mine = [k for k in own if not k.endswith("num_batches_tracked")]
    theirs = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(mine) != len(theirs):
        raise PixifyError(f"--key-map positional: {what} hold {len(theirs)} tensors, the model {len(mine)}",
                          "positional mapping needs the same tensors in the same order")
    out = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if tuple(own[a].shape) != tuple(state[b].shape):
            raise PixifyError(f"--key-map positional: tensor {i} of {what}, {b} {tuple(state[b].shape)}, does not "
                              f"fit the model's {a} {tuple(own[a].shape)}",
                              "positional mapping needs the same tensors in the same order")
        out[a] = state[b].contiguous()
    return out


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str, spec: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error that summarises the mismatch.

    Floating-point tensors of another precision are cast, as PyTorch does; integer or boolean tensors where the
    model holds floating-point ones (or the other way round) are refused: PyTorch would cast them silently."""
    own = model.state_dict()
    for k, v in state.items():
        mine = own.get(k)
        if (isinstance(mine, torch.Tensor) and isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")
                and mine.is_floating_point() != v.is_floating_point()):
            raise PixifyError(f"{what} do not fit {spec}: {k} is {str(v.dtype).replace('torch.', '')} in the "
                              f"file, {str(mine.dtype).replace('torch.', '')} in the model",
                              "save the weights in their own precision")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise PixifyError(f"{what} do not fit {spec}: {mismatch_summary(model, state)}",
                          "check the architecture and --model-arg; --key-map positional maps keys by order "
                          "when only the names differ") from None


# What parameter initialisation is made of: the in-place random fills, trunc_normal_'s transform of its uniform
# draw, and the torch.nn.init functions that hand themselves to __torch_function__ whole (the others reach the
# Tensor methods). Inside a mode's handler the mode is off, so a function passed on is not looked into again.
_RANDOM_FILLS = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
    torch.Tensor.erfinv_, nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_,
})


class _NoRandomInit(TorchFunctionMode):
    """Inside, building a model fills with zeros what its init would draw at random: for a model whose every
    weight is loaded strictly right after (a checkpoint, a weights file). Random init was most of what
    loading took (``pixify.load`` here: VGG-16 2.5 -> 0.5 s, ViT-B/16 1.8 -> 0.4 s, ResNet-50 0.50 ->
    0.11 s), and the global RNG is left as it was."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS:
            t = args[0] if args else kwargs["tensor"]
            with torch.no_grad():  # zeros, not the allocation's leftovers: trunc_normal_'s scaling of
                return t.zero_()  # those (denormal values among them) took 1.2 s for ViT-B/16 here
        return func(*args, **kwargs)


def build_architecture(library: str, name: str, kwargs: dict[str, Any], cfg: dict[str, Any] | None = None,
                       no_init: bool = False) -> nn.Module:
    """The architecture without pretrained weights. ``no_init``: zeros where its init would draw at random
    (:class:`_NoRandomInit`), for a caller that loads every parameter and buffer strictly next;
    non-persistent buffers are built as usual (they are computed, not drawn), and a constructor that fails
    without its random draws is built again normally."""
    if no_init:
        try:
            with _NoRandomInit():
                return _build(library, name, False, kwargs, cfg)
        except _ConstructorError:  # e.g. a constructor that checks its drawn weights: build as usual (a real
            pass                   # rejection of the arguments is raised again by that build)
        except PixifyError:
            raise
        except Exception:  # noqa: BLE001 - an error the constructor raises that is not wrapped: the same
            pass
    return _build(library, name, False, kwargs, cfg)


def meta_architecture(library: str, name: str, kwargs: dict[str, Any],
                      cfg: dict[str, Any] | None = None) -> nn.Module | None:
    """The architecture on the meta device (no memory), or None when its constructor cannot run there (it
    computes something from real data); an unknown model and the like raise as :func:`build_architecture`."""
    try:
        with torch.device("meta"):
            return build_architecture(library, name, kwargs, cfg)
    except _ConstructorError:
        return None
    except PixifyError:
        raise
    except Exception:  # noqa: BLE001 - an error a constructor raises that is not wrapped
        return None


def _build_for_loading(library: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    return build_architecture(library, name, kwargs, no_init=True)


def _hub_source(model: nn.Module, hub_spec: str, kwargs: dict[str, Any]) -> "Source":
    """What rebuilds a model made from ``hf-hub:ORG/NAME`` without the hub: its timm architecture, the
    arguments of the hub's config.json together with the user's, and its pretrained_cfg."""
    from .provenance import _jsonable, pretrained_cfg_subset

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    recorded = getattr(model, "_model_args", None)
    args = dict(recorded) if isinstance(recorded, dict) else dict(kwargs)
    args.pop("pretrained_model_args", None)
    return Source("timm", cfg.get("architecture") or hub_spec, _jsonable(args) or dict(kwargs), "pretrained",
                  state_dict_digest(model), pretrained_cfg=pretrained_cfg_subset(cfg),
                  hub=hub_spec.split(":", 1)[1])


def create_model(spec: str, pretrained: bool = True, weights: str | Path | None = None,
                 kwargs: dict[str, Any] | None = None, seed: int = 0,
                 key_map: str | None = None) -> tuple[nn.Module, Source]:
    """Build the original model named by ``spec`` and describe where it came from.

    With ``weights`` the architecture is built without hub weights and the file is loaded strictly
    (``key_map="positional"`` renames the file's keys to the model's by order, see :func:`map_keys`).
    Random initialisation is seeded (``seed``) so that the same model can be rebuilt as a teacher.
    """
    if not isinstance(spec, str):
        raise PixifyError(f"the model must be named by a string such as 'resnet50', got {type(spec).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise PixifyError(f"kwargs must be a dict of constructor arguments, got {type(kwargs).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise PixifyError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise PixifyError(f"weights must be the path of a file, got {type(weights).__name__}")
    kwargs = dict(kwargs or {})
    library, name = parse_spec(spec)
    if key_map is not None:
        if key_map not in KEY_MAPS:
            raise PixifyError(f"unknown key map '{key_map}'", f"use one of: {', '.join(KEY_MAPS)}")
        if weights is None:
            raise PixifyError("a key map applies to a weights file", "pass --weights FILE, or drop --key-map")
    if weights is not None:
        state = load_weights_file(weights)
        torch.manual_seed(seed)  # a known RNG state for what follows (the example input), as before
        model = _build_for_loading(library, name, kwargs)
        state = map_keys(model, state, key_map, f"weights {Path(weights).name}")
        load_state_dict_checked(model, state, f"weights {weights}", spec)
        # the file's name and digest, never the path: a checkpoint must not carry this machine's folders
        src = Source(library, name, kwargs, f"file:{Path(weights).name}", file_digest(weights), key_map=key_map)
        model.pixify_weights_file = Path(weights).resolve()  # in memory only: where a teacher is found again
    elif pretrained and name.startswith("hf-hub:"):
        model = _build(library, name, True, kwargs)
        src = _hub_source(model, name, kwargs)
    elif pretrained:
        model = _build(library, name, True, kwargs)
        tag = getattr(model, "pretrained_cfg", {}).get("tag") if library == "timm" else "DEFAULT"
        src = Source(library, name, kwargs, f"pretrained:{tag}" if tag else "pretrained",
                     state_dict_digest(model))
    else:
        torch.manual_seed(seed)
        model = _build(library, name, False, kwargs)
        src = Source(library, name, kwargs, "random", None, seed)
    model.eval()
    return model, src


def custom_source(model: nn.Module) -> Source:
    cls = type(model)
    return Source("custom", f"{cls.__module__}.{cls.__qualname__}", {}, "user", None)


def find_weights_file(source: Source, near: Sequence[Path] = ()) -> Path:
    """The original weights file a ``file:NAME`` source names: ``NAME`` in one of the folders ``near``
    (the checkpoint's own folder, then the one above it), checked against the recorded sha256."""
    name = source.weights[len("file:"):]
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(d) / name for d in near]
    for path in candidates:
        if path.is_file():
            if source.sha256 and file_digest(path) != source.sha256:
                raise PixifyError(f"the original weights {path} are not the ones the model was converted from "
                                  "(sha256 differs)", "pass the original with --teacher FILE")
            return path
    where = ", ".join(str(d) for d in near) or "the checkpoint's folder"
    raise PixifyError(f"the original weights '{Path(name).name}' (sha256 {str(source.sha256)[:12]}…) are not in "
                      f"{where}", "pass them with --teacher FILE (Python: teacher=...), or put the file next to "
                      "the checkpoint")


def rebuild(source: Source, with_weights: bool = False, init: bool = True, near: Sequence[Path] = ()) -> nn.Module:
    """A fresh instance of the source architecture; with ``with_weights`` also its original weights.

    ``init=False`` (without ``with_weights``): zeros where the init would draw at random, for a caller that
    loads every weight strictly next (see :class:`_NoRandomInit`). ``near``: the folders in which a
    ``file:NAME`` source's weights are looked for."""
    if source.library == "custom":
        raise PixifyError(f"this checkpoint was made from a user module ({source.name})",
                          "pass the freshly built module: pixify.load(path, model=MyModel())")
    if not with_weights:
        return build_architecture(source.library, source.name, source.kwargs, source.pretrained_cfg,
                                  no_init=not init)
    if source.weights.startswith("file:"):
        path = find_weights_file(source, near)
        model = build_architecture(source.library, source.name, source.kwargs, source.pretrained_cfg, no_init=True)
        state = map_keys(model, load_weights_file(path), source.key_map, f"weights {path.name}")
        load_state_dict_checked(model, state, f"weights {path}", source.spec)
        return model.eval()
    if source.weights == "module":
        # the weights came with a Python model: when they are the library's published ones (the usual
        # timm.create_model(name, pretrained=True)), fetching those again and matching the digest finds them
        tag = (source.pretrained_cfg or {}).get("tag")
        spec = source.spec if source.hub or not tag or "." in source.name else f"{source.spec}.{tag}"
        try:
            model, again = create_model(spec, pretrained=True, kwargs=source.kwargs)
        except PixifyError:
            model, again = None, None
        if model is not None and source.sha256 and again.sha256 == source.sha256:
            return model
        raise PixifyError("the original's weights came with a Python model and are not the published ones "
                          "(or those cannot be fetched here)",
                          "pass the original with --teacher FILE (a state dict) or, in Python, teacher=model")
    if source.weights.startswith("pretrained"):
        spec = source.spec
        model, _ = create_model(spec, pretrained=True, kwargs=source.kwargs)
        return model
    model, _ = create_model(source.spec, pretrained=False, kwargs=source.kwargs, seed=source.seed or 0)
    return model
