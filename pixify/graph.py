"""Graph capture and rule matching.

The model is traced with torch.fx (timm's no-trace registries and torchvision's leaf defaults), shapes
are propagated on an example input, and the rules are matched against the graph. The graph is only for
analysis: rewriting (``rewrite.py``) swaps modules by qualified name in the original module tree.

Two kinds of parts are analysed on their own graphs:

- *leaf modules that hold layers* (timm's no-trace modules such as ``ConvMlp`` or ``MobileVitBlock``) are
  traced separately with an example input of the shape their node had, so the layers inside them are
  matched too;
- where a module does not trace at all (data-dependent control flow, unsupported Python), its children
  are traced separately (recursively), each with the input it received in one forward pass of the whole
  model. Every part that could not be analysed is reported with the tracer's reason.

Prune points need to know where a layer's input comes from: :func:`_from_act` walks back
from the layer through ops that keep the channels (dropout, identity, pooling, padding, channel gates,
concatenations) and answers whether an activation produced it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import short_reason
from .metrics import _call
from .rules import Rule

__all__ = ["Candidate", "NearMiss", "Untraced", "Analysis", "analyse", "example_input_for", "trace"]

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_ACT_TYPES: tuple[type, ...] = (  # and timm's: see _act_types()
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh,
)
ACT_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh, F.softplus, F.hardtanh, F.prelu,
}
ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_"}

# Modules and functions that keep the channels of their input in place: a layer fed through them is fed
# by whatever fed them (used to decide whether a layer's input comes from an activation).
_PASS_TYPES: tuple[type, ...] = (  # and timm's and torchvision's: see _pass_types()
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d,
)
PASS_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.pad, torch.clone,
}
PASS_METHODS = {"contiguous", "clone"}


def _timm_types(names: Iterable[str], module: str) -> tuple[type, ...]:
    try:
        import importlib

        mod = importlib.import_module(module)
    except Exception:  # pragma: no cover - timm is a dependency, but the engine does not need it
        return ()
    return tuple(getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type))


# timm's and torchvision's types are looked up on first use, not on import: importing timm imports
# torchvision, which imports torch._dynamo (about half of `import pixify`, and of `pixify --help`, here).
@functools.cache
def _act_types() -> tuple[type, ...]:
    return _ACT_TYPES + _timm_types(
        ("Swish", "Mish", "HardSwish", "HardSigmoid", "GELU", "GELUTanh", "QuickGELU", "Sigmoid", "Tanh", "PReLU",
         "HardMish"), "timm.layers.activations") + _timm_types(
        ("SwishMe", "MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe"), "timm.layers.activations_me")


@functools.cache
def _pass_types() -> tuple[type, ...]:
    return _PASS_TYPES + _timm_types(("DropPath",), "timm.layers.drop") + _timm_types(
        ("MaxPool2dSame", "AvgPool2dSame"), "timm.layers.pool2d_same") + _timm_types(
        ("BlurPool2d",), "timm.layers.blur_pool") + _timm_types(("StochasticDepth",), "torchvision.ops")

# torchvision.ops lists these as leaves for feature extraction, but they are plain containers that trace
# fine; treating them as leaves would hide the layers inside them (e.g. every EfficientNet convolution).
_TRACEABLE_TORCHVISION = ("Conv2dNormActivation", "Conv3dNormActivation", "MLP", "SqueezeExcitation")


@dataclass
class Candidate:
    """An anchor layer matched by a rule: the place where PiX may go."""

    name: str  # qualified name of the anchor module in the original model
    rule: Rule
    kind: str  # "conv2d" | "linear"
    c_in: int
    c_out: int
    spatial: int  # H*W of the input (conv) or number of tokens (linear)
    input_shape: tuple[int, ...]
    channel_dim: int  # 1 for NCHW, -1 for token / channels-last layouts
    norm: str | None = None  # qualified name of the absorbed norm module
    act: str | None = None  # qualified name of the absorbed activation module
    act_desc: str | None = None  # description when the activation is a function (cannot be removed)
    act_removable: bool = False
    kernel_area: int = 1  # kh*kw of a conv anchor (1 for linear)
    out_spatial: int | None = None  # H*W of the output (conv) or number of tokens; None = same as spatial
    groups: int = 1

    @property
    def ratio(self) -> float:
        return self.c_in / self.c_out

    @property
    def macs(self) -> int:
        """MACs of the anchor layer on the example input (batch 1)."""
        out_spatial = self.spatial if self.out_spatial is None else self.out_spatial
        return (self.c_in // max(1, self.groups)) * self.c_out * self.kernel_area * out_spatial

    @property
    def pattern(self) -> str:
        parts = [self.kind]
        if self.norm:
            parts.append("norm")
        if self.act or self.act_desc:
            parts.append("act")
        return "→".join(parts)


@dataclass
class NearMiss:
    name: str
    rule: str
    reason: str
    c_in: int | None = None
    c_out: int | None = None


@dataclass
class Untraced:
    name: str  # qualified name of the module that could not be analysed ("" = the whole model)
    reason: str


@dataclass
class Analysis:
    candidates: list[Candidate] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)  # roots of the graphs that traced


# --------------------------------------------------------------------------------------------- tracing

def _leaf_types() -> tuple[type, ...]:
    types: list[type] = [nn.Conv2d, nn.Linear, *NORM_TYPES, *_act_types()]
    try:
        from timm.layers import get_notrace_modules

        types.extend(t for t in get_notrace_modules() if isinstance(t, type))
    except Exception:  # pragma: no cover
        pass
    try:
        from torchvision.models.feature_extraction import _get_leaf_modules_for_ops

        types.extend(t for t in _get_leaf_modules_for_ops() if t.__name__ not in _TRACEABLE_TORCHVISION)
    except Exception:  # pragma: no cover
        pass
    from .ops import PiX

    types.append(PiX)
    return tuple(dict.fromkeys(types))


def _autowrap() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    modules: list[Any] = [math]
    functions: list[Any] = []
    try:
        import torchvision.ops

        modules.append(torchvision.ops)
    except Exception:  # pragma: no cover
        pass
    try:
        from timm.layers import get_notrace_functions

        functions.extend(f for f in get_notrace_functions() if callable(f))
    except Exception:  # pragma: no cover
        pass
    return tuple(modules), tuple(functions)


_LEAVES: tuple[type, ...] | None = None


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        global _LEAVES
        modules, functions = _autowrap()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        if _LEAVES is None:
            _LEAVES = _leaf_types()
        self._leaves = _LEAVES

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        if _is_act_module(m) or (type(m).__name__ in _PASS_NAMES and _scalar_only(m)):
            return True  # elementwise modules stay one node, so that followers and prune inputs see them
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Symbolically trace ``module`` with pixify's leaf and autowrap settings (raises on failure).

    ``concrete_args`` fixes non-tensor arguments of ``forward`` (e.g. ``mask=None``) for the trace.
    """
    graph = _Tracer().trace(module, concrete_args=concrete_args or None)
    return fx.GraphModule(module, graph, module.__class__.__name__)


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def _concrete_args(module: nn.Module, n_positional: int, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments of ``module.forward`` after the first ``n_positional``, fixed to their given (non-tensor)
    value or their default, so that ``if mask is not None:`` traces the branch the model really takes.

    Raises TypeError when a keyword argument is a tensor (it cannot be fixed for the trace).
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    out: dict[str, Any] = {}
    kwargs = dict(kwargs or {})
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i < n_positional and p.kind != p.KEYWORD_ONLY:
            continue
        if p.name in kwargs:
            value = kwargs.pop(p.name)
            if not isinstance(value, _CONSTANT_TYPES):
                raise TypeError(f"forward is called with '{p.name}' = a {type(value).__name__} (keyword tensors are "
                                "not traced)")
            out[p.name] = value
        elif p.default is not p.empty and isinstance(p.default, _CONSTANT_TYPES):
            out[p.name] = p.default
    if kwargs:
        raise TypeError(f"forward takes no argument named {', '.join(kwargs)}")
    return out


class _Holder(nn.Module):
    """Wraps a lone layer so that it appears as a ``call_module`` node (named ``m``) in a graph."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: Any) -> Any:
        return self.m(x)


# ------------------------------------------------------------------------------------------ example input

def example_input_for(model: nn.Module, batch_size: int = 1, input_size: tuple[int, ...] | None = None,
                      seed: int = 0) -> torch.Tensor:
    """A random example input sized from the model's ``pretrained_cfg`` (timm) or 3×224×224, with as many
    channels as the first convolution takes (timm keeps ``input_size`` at 3 channels for ``in_chans=1``)."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
        first = cfg.get("first_conv")
        conv = None
        if isinstance(first, str):
            try:
                conv = model.get_submodule(first)
            except AttributeError:
                conv = None
        else:
            conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if isinstance(conv, nn.Conv2d) and len(input_size) == 3 and conv.in_channels != input_size[0]:
            input_size = (conv.in_channels, *input_size[1:])
        from .validate import check_input_size

        # a pretrained_cfg comes from the user's --model-arg or a checkpoint: an input size of 0 or of more
        # values than pixify allocates is refused here, before any model sees it
        input_size = check_input_size(input_size, "the model's pretrained_cfg input_size")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_size), generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ matching

def _cfg_names(model: nn.Module, key: str) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get(key)
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        return set()
    return {n for n in names if isinstance(n, str) and n}


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _tensor_shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _tensor_meta(node: Any) -> Any:
    return getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None


def _anchor_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _in_out(m: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return None, None


def _holds_anchor(m: nn.Module) -> bool:
    return any(_anchor_kind(sub) for sub in m.modules())


def _norm_ends_with_act(m: nn.Module) -> bool:
    """A fused norm + activation module (timm's BatchNormAct2d and friends) whose activation is real."""
    act = getattr(m, "act", None)
    if isinstance(act, nn.Module):
        return not isinstance(act, nn.Identity)
    name = getattr(m, "act_name", None)  # InplaceAbn
    return isinstance(name, str) and name not in ("", "identity")


_ACT_SUFFIXES = ("ReLU", "ReLU6", "GELU", "GELUTanh", "SiLU", "Swish", "Mish", "Hardswish", "HardSwish",
                 "Sigmoid", "HardSigmoid", "Tanh")


def _scalar_only(m: nn.Module) -> bool:
    """No layers inside and no parameter but scalars (an elementwise map)."""
    return all(p.numel() <= 1 for p in m.parameters()) and not any(_anchor_kind(c) for c in m.modules())


def _is_act_module(m: nn.Module | None) -> bool:
    """An activation module: a known type, or an elementwise one defined elsewhere (StarReLU, ...)."""
    if m is None:
        return False
    if isinstance(m, _act_types()):
        return True
    return type(m).__name__.endswith(_ACT_SUFFIXES) and _scalar_only(m)


# elementwise, per-tensor affine maps that keep an activation an activation (HGNetV2's learnable affine)
_PASS_NAMES = ("LearnableAffineBlock",)


def _is_act_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return _is_act_module(modules.get(node.target))
    if node.op == "call_function":
        return node.target in ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACT_METHODS
    return False


def _from_act(node: Any, modules: dict[str, nn.Module], placeholder_act: bool, depth: int = 0) -> bool:
    """Whether ``node``'s value is an activation's output, looking through channel-preserving ops."""
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op == "placeholder":
        return placeholder_act and node is next(iter(n for n in node.graph.nodes if n.op == "placeholder"))
    if _is_act_node(node, modules):
        return True
    nxt = lambda n: _from_act(n, modules, placeholder_act, depth + 1)  # noqa: E731
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, NORM_TYPES) or type(m).__name__.endswith(("NormAct", "NormAct2d", "Abn")):
            return _norm_ends_with_act(m)
        if (isinstance(m, _pass_types()) or (type(m).__name__ in _PASS_NAMES and _scalar_only(m))) and node.args:
            return nxt(node.args[0])
        return False
    if node.op == "call_function":
        if node.target in PASS_FUNCTIONS and node.args:
            return nxt(node.args[0])
        if node.target in (torch.cat, torch.concat) and node.args and isinstance(node.args[0], (list, tuple)):
            parts = [a for a in node.args[0] if isinstance(a, fx.Node)]
            return bool(parts) and all(nxt(a) for a in parts)
        if node.target in (operator.mul, torch.mul) and len(node.args) == 2:
            return _through_gate(node, nxt)
        return False
    if node.op == "call_method":
        if node.target in PASS_METHODS and node.args:
            return nxt(node.args[0])
        if node.target == "mul" and len(node.args) == 2:
            return _through_gate(node, nxt)
    return False


def _through_gate(node: fx.Node, nxt: Callable[[Any], bool]) -> bool:
    """``x * gate`` with a gate broadcast over x's spatial positions (squeeze-excitation): look at x."""
    out = _tensor_shape(node)
    a, b = node.args
    sa, sb = _tensor_shape(a), _tensor_shape(b)
    if out is None or sa is None or sb is None:
        return False
    for x, gate, sx, sg in ((a, b, sa, sb), (b, a, sb, sa)):
        if sx == out and len(sg) == len(sx) and math.prod(sg) < math.prod(sx) and sg[:2] == sx[:2]:
            return nxt(x)
    return False


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _check(rule: Rule, kind: str, m: nn.Module, shape: tuple[int, ...] | None,
           out_shape: tuple[int, ...] | None) -> tuple[bool, str | None, dict]:
    """(matches, near-miss reason or None when not even a candidate, facts)."""
    if kind != rule.anchor:
        return False, None, {}
    if shape is None:
        return False, "input shape unknown (no shape propagation here)", {}
    if kind == "conv2d":
        k = tuple(m.kernel_size)
        if rule.kernel_size is not None and k != (rule.kernel_size, rule.kernel_size):
            return False, None, {}  # a different kind of layer: not worth a near-miss line
        c_in, c_out = m.in_channels, m.out_channels
        spatial = shape[2] * shape[3] if len(shape) == 4 else 0
        out_spatial = out_shape[2] * out_shape[3] if out_shape is not None and len(out_shape) == 4 else None
        facts = {"c_in": c_in, "c_out": c_out, "spatial": spatial, "channel_dim": 1,
                 "kernel_area": k[0] * k[1], "out_spatial": out_spatial, "groups": m.groups}
        if len(shape) != 4:
            return False, f"input is not N×C×H×W ({len(shape)} dims)", facts
        if rule.groups is not None and m.groups != rule.groups:
            return False, f"grouped/depthwise conv (groups={m.groups})", facts
        if rule.stride is not None and tuple(m.stride) != (rule.stride, rule.stride):
            return False, f"stride {tuple(m.stride)} (PiX does not subsample)", facts
        if rule.mode == "squeeze":  # a pure replacement must keep the spatial size
            if any(int(p) != 0 for p in (m.padding if not isinstance(m.padding, str) else ())) or (
                    isinstance(m.padding, str) and m.padding != "valid" and k != (1, 1)):
                return False, f"padding {m.padding}", facts
            if tuple(m.dilation) != (1, 1) and k != (1, 1):
                return False, f"dilation {m.dilation}", facts
            if out_spatial is not None and out_spatial != spatial:
                return False, f"changes the spatial size ({spatial} → {out_spatial} positions)", facts
    else:
        if len(shape) < 3:
            return False, "input is not token layout (N×C): a classifier-style linear", {
                "c_in": m.in_features, "c_out": m.out_features}
        c_in, c_out = m.in_features, m.out_features
        spatial = math.prod(shape[1:-1])
        facts = {"c_in": c_in, "c_out": c_out, "spatial": spatial, "channel_dim": -1}
    if rule.min_ratio is not None and not c_in / c_out > rule.min_ratio:
        what = "not a squeeze" if c_in <= c_out else "ratio too small"
        return False, f"{what}: {c_in}→{c_out} (rule needs C_in/C_out > {rule.min_ratio:g})", facts
    if rule.min_channels is not None and c_in < rule.min_channels:
        return False, f"only {c_in} input channels (rule needs at least {rule.min_channels})", facts
    if rule.min_spatial is not None and spatial < rule.min_spatial:
        return False, f"input spatial size {spatial} < {rule.min_spatial} (e.g. squeeze-excitation on a pooled map)", facts
    return True, None, facts


class _Record:
    """One forward pass of the whole model with hooks: call order, call counts and first inputs.

    Inputs are kept (by reference) only for modules that hold a layer, and only when a module is called
    with positional tensors (plus, possibly, keyword arguments that are not tensors).
    """

    def __init__(self, model: nn.Module, example: Any):
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, tuple[tuple[torch.Tensor, ...], dict[str, Any]]] = {}
        self.error: str | None = None
        holds = {name for name, m in model.named_modules() if _holds_anchor(m)}
        handles = []
        for name, m in model.named_modules():
            def hook(mod, args, kwargs, name=name):
                n = self.calls.get(name, 0)
                self.calls[name] = n + 1
                if n == 0:
                    self.order.append(name)
                    if (name in holds and args and all(isinstance(a, torch.Tensor) for a in args)
                            and all(isinstance(v, _CONSTANT_TYPES) for v in kwargs.values())):
                        self.inputs[name] = (tuple(a.detach() for a in args), dict(kwargs))
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                _call(model, example)
        except Exception as exc:  # pragma: no cover - the caller ran the model successfully before
            self.error = short_reason(exc)
        finally:
            for h in handles:
                h.remove()


@dataclass
class _Ctx:
    root: nn.Module
    example: Any
    rules: list[Rule]
    out: Analysis
    stem: set[str] = field(default_factory=set)
    head: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    _record: _Record | None = None

    def record(self) -> _Record:
        if self._record is None:
            self._record = _Record(self.root, self.example)
        return self._record


def _qualifier(prefix: str, holder: bool) -> Callable[[str], str]:
    if holder:  # the lone layer is ``m`` inside the holder
        return lambda t: prefix + t[1:] if t == "m" or t.startswith("m.") else f"{prefix}.{t}"
    return lambda t: f"{prefix}.{t}" if prefix else t


def _match_graph(ctx: _Ctx, gm: fx.GraphModule, q: Callable[[str], str], placeholder_act: bool) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    read_directly = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    anchors = [n for n in gm.graph.nodes if n.op == "call_module" and _anchor_kind(modules[n.target])]
    for node in anchors:
        local = node.target
        name = q(local)
        if name in ctx.seen:
            continue
        ctx.seen.add(name)
        m = modules[local]
        kind = _anchor_kind(m)
        shape = _tensor_shape(node.args[0]) if node.args else None
        out_shape = _tensor_shape(node)
        from_act: bool | None = None
        for rule in ctx.rules:
            if rule.anchor != kind or not rule.names_match(name):
                continue
            ok, reason, facts = _check(rule, kind, m, shape, out_shape)
            if not ok and reason is None:
                continue
            # the stem and the head are named as such, whatever else would keep them out
            if _under(name, ctx.stem) and not rule.allow_stem:
                ok, reason = False, "stem (never touched unless a rule allows it)"
            elif _under(name, ctx.head) and not rule.allow_head:
                ok, reason = False, "classifier head (never touched unless a rule allows it)"
            if ok and rule.input_from_act:
                if from_act is None:
                    from_act = bool(node.args) and _from_act(node.args[0], modules, placeholder_act)
                if not from_act:
                    ok, reason = False, "input does not come from an activation"
            if ok and calls.get(local, 0) != 1:
                ok, reason = False, f"module is called {calls.get(local, 0)} times in forward"
            if ok and any(t == local or t.startswith(local + ".") for t in read_directly):
                ok, reason = False, "its parameters are also read directly in forward"
            if not ok:
                ctx.out.near_misses.append(NearMiss(name, rule.name, reason, facts.get("c_in"), facts.get("c_out")))
                continue
            cand = Candidate(name=name, rule=rule, kind=kind, input_shape=shape, **facts)
            if rule.mode == "squeeze":
                _absorb_followers(cand, node, rule, modules, calls, q, read_directly)
            ctx.out.candidates.append(cand)
            break


def _absorb_followers(cand: Candidate, node: fx.Node, rule: Rule, modules: dict[str, nn.Module],
                      calls: dict[str, int], q: Callable[[str], str], read_directly: set[str]) -> None:
    cur = node
    free = (lambda t: not any(r == t or r.startswith(t + ".") for r in read_directly))
    if "norm?" in rule.pattern:
        nxt = _single_user(cur)
        if (nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), NORM_TYPES)
                and calls.get(nxt.target) == 1 and nxt.args and nxt.args[0] is cur and free(nxt.target)):
            cand.norm = q(nxt.target)
            cur = nxt
    if "act?" in rule.pattern:
        nxt = _single_user(cur)
        if nxt is not None and nxt.args and nxt.args[0] is cur and _is_act_node(nxt, modules):
            if nxt.op == "call_module":
                cand.act = q(nxt.target)
                cand.act_removable = calls.get(nxt.target) == 1 and free(nxt.target)
                if not cand.act_removable:
                    cand.act_desc = f"{cand.act} (shared module, kept)"
            else:
                name = getattr(nxt.target, "__name__", str(nxt.target))
                cand.act_desc = f"{name} (function, kept)"


def _example_from_meta(nodes: Iterable[Any], like: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Random tensors shaped like the (tensor) values of ``nodes``; None if one is not a plain tensor."""
    out = []
    g = torch.Generator().manual_seed(0)
    p = next(iter(like.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    for n in nodes:
        meta = _tensor_meta(n)
        if meta is None or not hasattr(meta, "shape"):
            return None
        dtype = meta.dtype
        if dtype.is_floating_point:
            t = torch.randn(tuple(meta.shape), generator=g).to(dtype)
        else:
            t = torch.zeros(tuple(meta.shape), dtype=dtype)
        out.append(t.to(device))
    return tuple(out)


Example = tuple[tuple[torch.Tensor, ...], dict[str, Any]]


def _analyse_children(ctx: _Ctx, module: nn.Module, prefix: str, depth: int) -> None:
    rec = ctx.record()
    for cname, child in module.named_children():
        if not _holds_anchor(child):
            continue
        full = f"{prefix}.{cname}" if prefix else cname
        if full in rec.calls:
            _analyse_module(ctx, child, full, rec.inputs.get(full), False, depth + 1)
        elif any(n == full or n.startswith(full + ".") for n in rec.calls) and depth < 12:
            # a container the forward iterates over instead of calling (``for blk in self.blocks``)
            _analyse_children(ctx, child, full, depth + 1)
        else:
            ctx.out.untraced.append(Untraced(full, "not called in forward on the example input"))


def _analyse_module(ctx: _Ctx, module: nn.Module, prefix: str, example: Example | None,
                    placeholder_act: bool = False, depth: int = 0) -> None:
    """Trace ``module`` (qualified name ``prefix``) on ``example`` and match it; fall back to its children."""
    holder = _anchor_kind(module) is not None
    try:
        if example is None:
            raise TypeError("no example input for this part (it is not called with tensor arguments alone)")
        args, kwargs = example
        if holder:
            if kwargs or len(args) != 1:
                raise TypeError("a lone layer called with more than one input")
            gm = trace(_Holder(module))
        else:
            gm = trace(module, _concrete_args(module, len(args), kwargs))
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before raising
            ShapeProp(gm).propagate(*args)
    except Exception as exc:  # the tracer's reason goes into the report
        reason = short_reason(exc)
        if holder or not any(_holds_anchor(c) for c in module.children()) or depth > 12:
            ctx.out.untraced.append(Untraced(prefix, reason))
            return
        ctx.out.untraced.append(Untraced(prefix, f"{reason} — its children are analysed separately"))
        _analyse_children(ctx, module, prefix, depth)
        return
    ctx.out.traced.append(prefix)
    q = _qualifier(prefix, holder)
    _match_graph(ctx, gm, q, placeholder_act)
    if holder:
        return
    # Leaf modules that hold layers (timm's no-trace modules): analyse them on their own graphs.
    modules = dict(gm.named_modules())
    done: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        m = modules.get(node.target)
        if m is None or _anchor_kind(m) or not _holds_anchor(m):
            continue
        done.add(node.target)
        full = q(node.target)
        if type(m).__module__.startswith("torch.nn."):
            # torch's own composite layers (MultiheadAttention, TransformerEncoderLayer) read their layers'
            # weights directly (fused kernels): their layers cannot be swapped.
            for sub, layer in m.named_modules():
                if sub and _anchor_kind(layer) and f"{full}.{sub}" not in ctx.seen:
                    ctx.seen.add(f"{full}.{sub}")
                    ctx.out.near_misses.append(NearMiss(
                        f"{full}.{sub}", "-", f"inside torch.nn.{type(m).__name__}, which uses its layers' "
                        "weights directly", *_in_out(layer)))
            continue
        ex: Example | None = None
        if node.args and all(isinstance(v, _CONSTANT_TYPES) for v in node.kwargs.values()):
            tensors = _example_from_meta(node.args, m)
            ex = (tensors, dict(node.kwargs)) if tensors is not None else None
        if ex is None:
            ex = ctx.record().inputs.get(full)
        from_act = bool(node.args) and _from_act(node.args[0], modules, placeholder_act)
        _analyse_module(ctx, m, full, ex, from_act, depth + 1)


def analyse(model: nn.Module, rules: list[Rule], example_input: Any) -> Analysis:
    """Trace ``model``, propagate shapes on ``example_input`` and match ``rules``.

    The model is put in eval mode for the analysis and restored afterwards.
    """
    out = Analysis()
    was_training = model.training
    model.eval()
    try:
        ctx = _Ctx(model, example_input, list(rules), out, _cfg_names(model, "first_conv"),
                   _cfg_names(model, "classifier"))
        if not ctx.stem or not ctx.head:
            # Without a timm config, the first and last layers the forward pass runs are the stem and the
            # classifier.
            rec = ctx.record()
            anchors = [n for n in rec.order if n and _anchor_kind(model.get_submodule(n))]
            if anchors:
                ctx.stem = ctx.stem or {anchors[0]}
                ctx.head = ctx.head or {anchors[-1]}
        if isinstance(example_input, torch.Tensor):
            example: Example | None = ((example_input,), {})
        elif isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
            example = (tuple(example_input), {})
        else:
            example = None
        _analyse_module(ctx, model, "", example)
        return out
    finally:
        model.train(was_training)
