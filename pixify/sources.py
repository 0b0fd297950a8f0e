"""Model sources: timm names, ``torchvision:NAME``, ``hf-hub:...``, weight files, and the user's own modules.

A :class:`Source` records how to rebuild the original architecture and where its weights came from, so
that a checkpoint can rebuild the model (SPEC §4) and fine-tuning can rebuild the teacher (SPEC §5).
"""

from __future__ import annotations

import difflib
import hashlib
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    weights: str = "random"  # pretrained[:tag] | file:PATH | random
    sha256: str | None = None  # of the weights file, or of the state dict for hub weights
    seed: int | None = None  # torch seed used for random initialisation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Source":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def spec(self) -> str:
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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build(library: str, name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
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
            finally:
                hc.HF_HUB_OFFLINE = offline_before
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise PixifyError(f"cannot build '{name}' with {kwargs}: {exc}") from None
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
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise PixifyError(f"unknown model library '{library}'", "use a timm name or torchvision:NAME")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file read with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
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


def _build_for_loading(library: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """:func:`_build` without pretrained weights or random init (:class:`_NoRandomInit`): the caller
    loads every parameter and buffer strictly next. Non-persistent buffers are built as usual (they are
    computed, not drawn); a constructor that fails without its random draws is built again normally."""
    try:
        with _NoRandomInit():
            return _build(library, name, False, kwargs)
    except PixifyError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a constructor that checks its drawn weights: build as usual
        return _build(library, name, False, kwargs)


def create_model(spec: str, pretrained: bool = True, weights: str | Path | None = None,
                 kwargs: dict[str, Any] | None = None, seed: int = 0) -> tuple[nn.Module, Source]:
    """Build the original model named by ``spec`` and describe where it came from.

    With ``weights`` the architecture is built without hub weights and the file is loaded strictly.
    Random initialisation is seeded (``seed``) so that the same model can be rebuilt as a teacher.
    """
    kwargs = dict(kwargs or {})
    library, name = parse_spec(spec)
    if weights is not None:
        state = load_weights_file(weights)
        torch.manual_seed(seed)  # a known RNG state for what follows (the example input), as before
        model = _build_for_loading(library, name, kwargs)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise PixifyError(f"weights {weights} do not fit {spec}: {first}") from None
        src = Source(library, name, kwargs, f"file:{Path(weights).resolve()}", file_digest(weights))
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


def rebuild(source: Source, with_weights: bool = False, init: bool = True) -> nn.Module:
    """A fresh instance of the source architecture; with ``with_weights`` also its original weights.

    ``init=False`` (without ``with_weights``): zeros where the init would draw at random, for a caller that
    loads every weight strictly next (see :class:`_NoRandomInit`)."""
    if source.library == "custom":
        raise PixifyError(f"this checkpoint was made from a user module ({source.name})",
                          "pass the freshly built module: pixify.load(path, model=MyModel())")
    if not with_weights:
        if not init:
            return _build_for_loading(source.library, source.name, source.kwargs)
        return _build(source.library, source.name, False, source.kwargs)
    if source.weights.startswith("file:"):
        path = source.weights[5:]
        model, _ = create_model(source.spec, weights=path, kwargs=source.kwargs)
        if source.sha256 and file_digest(path) != source.sha256:
            raise PixifyError(f"the original weights {path} changed since conversion (sha256 differs)")
        return model
    if source.weights.startswith("pretrained"):
        model, _ = create_model(source.spec, pretrained=True, kwargs=source.kwargs)
        return model
    model, _ = create_model(source.spec, pretrained=False, kwargs=source.kwargs, seed=source.seed or 0)
    return model
