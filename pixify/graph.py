"""Graph capture and rule matching (SPEC §3.1, §3.3).

The model is traced with torch.fx (timm's no-trace registries and torchvision's leaf defaults), shapes
are propagated on an example input, and the rules are matched against the graph. The graph is only for
analysis: rewriting (``rewrite.py``) swaps modules by qualified name in the original module tree.

Where the whole model does not trace, its children are traced separately (recursively), each with an
example input of the shape it saw in one forward pass of the whole model; every part that could not be
analysed is reported with the tracer's reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .rules import Rule

__all__ = ["Candidate", "NearMiss", "Untraced", "Analysis", "analyse", "example_input_for"]

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
ACT_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
ACT_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh, F.softplus,
}
ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


def _timm_act_types() -> tuple[type, ...]:
    try:
        from timm.layers import activations as ta

        names = ("Swish", "Mish", "HardSwish", "HardSigmoid", "GELU", "GELUTanh", "QuickGELU", "Sigmoid", "Tanh",
                 "PReLU", "HardMish")
        return tuple(getattr(ta, n) for n in names if isinstance(getattr(ta, n, None), type))
    except Exception:  # pragma: no cover - timm is a dependency, but the engine does not need it
        return ()


ACT_TYPES = ACT_TYPES + _timm_act_types()


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

    @property
    def ratio(self) -> float:
        return self.c_in / self.c_out

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
    types: list[type] = [nn.Conv2d, nn.Linear, *NORM_TYPES, *ACT_TYPES]
    try:
        from timm.layers import get_notrace_modules

        types.extend(t for t in get_notrace_modules() if isinstance(t, type))
    except Exception:  # pragma: no cover
        pass
    try:
        from torchvision.models.feature_extraction import _get_leaf_modules_for_ops

        types.extend(_get_leaf_modules_for_ops())
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


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        modules, functions = _autowrap()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self._leaves = _leaf_types()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``module`` with pixify's leaf and autowrap settings (raises on failure)."""
    graph = _Tracer().trace(module)
    return fx.GraphModule(module, graph, module.__class__.__name__)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ example input

def example_input_for(model: nn.Module, batch_size: int = 1, input_size: tuple[int, ...] | None = None,
                      seed: int = 0) -> torch.Tensor:
    """A random example input sized from the model's ``pretrained_cfg`` (timm) or 3×224×224."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_size), generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ matching

def _classifier_names(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        names = [names]
    return set(names or [])


def _stem_names(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("first_conv")
    if isinstance(names, str):
        names = [names]
    return set(names or [])


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _tensor_shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _anchor_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _is_act_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ACT_TYPES)
    if node.op == "call_function":
        return node.target in ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACT_METHODS
    return False


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _check(rule: Rule, kind: str, m: nn.Module, shape: tuple[int, ...] | None) -> tuple[bool, str | None, dict]:
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
        facts = {"c_in": c_in, "c_out": c_out, "spatial": spatial, "channel_dim": 1}
        if rule.groups is not None and m.groups != rule.groups:
            return False, f"grouped/depthwise conv (groups={m.groups})", facts
        if rule.stride is not None and tuple(m.stride) != (rule.stride, rule.stride):
            return False, f"stride {tuple(m.stride)} (PiX does not subsample)", facts
        if any(int(p) != 0 for p in (m.padding if not isinstance(m.padding, str) else ())) or (
                isinstance(m.padding, str) and m.padding != "valid" and k != (1, 1)):
            return False, f"padding {m.padding}", facts
        if tuple(m.dilation) != (1, 1) and k != (1, 1):
            return False, f"dilation {m.dilation}", facts
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
    if rule.min_spatial is not None and spatial < rule.min_spatial:
        return False, f"input spatial size {spatial} < {rule.min_spatial} (e.g. squeeze-excitation on a pooled map)", facts
    return True, None, facts


def _match_graph(gm: fx.GraphModule, prefix: str, rules: list[Rule], stem: set[str], head: set[str],
                 out: Analysis, seen: set[str]) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    anchors = [n for n in gm.graph.nodes if n.op == "call_module" and _anchor_kind(modules[n.target])]
    if not prefix and anchors:
        # Without a timm config, the first and last anchor layers are the stem and the classifier.
        stem = stem or {anchors[0].target}
        head = head or {anchors[-1].target}
    for node in anchors:
        local = node.target
        name = f"{prefix}.{local}" if prefix else local
        if name in seen:
            continue
        seen.add(name)
        m = modules[local]
        kind = _anchor_kind(m)
        shape = _tensor_shape(node.args[0]) if node.args else None
        for rule in rules:
            if rule.anchor != kind or not rule.names_match(name):
                continue
            ok, reason, facts = _check(rule, kind, m, shape)
            if not ok and reason is None:
                continue
            if ok and _under(name, stem) and not rule.allow_stem:
                ok, reason = False, "stem (never touched unless a rule allows it)"
            if ok and _under(name, head) and not rule.allow_head:
                ok, reason = False, "classifier head (never touched unless a rule allows it)"
            if ok and calls.get(local, 0) != 1:
                ok, reason = False, f"module is called {calls.get(local, 0)} times in forward"
            if not ok:
                out.near_misses.append(NearMiss(name, rule.name, reason, facts.get("c_in"), facts.get("c_out")))
                continue
            cand = Candidate(name=name, rule=rule, kind=kind, input_shape=shape, **facts)
            _absorb_followers(cand, node, rule, modules, calls, prefix)
            out.candidates.append(cand)
            break


def _absorb_followers(cand: Candidate, node: fx.Node, rule: Rule, modules: dict[str, nn.Module],
                      calls: dict[str, int], prefix: str) -> None:
    q = (lambda t: f"{prefix}.{t}" if prefix else t)
    cur = node
    if "norm?" in rule.pattern:
        nxt = _single_user(cur)
        if (nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), NORM_TYPES)
                and calls.get(nxt.target) == 1 and nxt.args and nxt.args[0] is cur):
            cand.norm = q(nxt.target)
            cur = nxt
    if "act?" in rule.pattern:
        nxt = _single_user(cur)
        if nxt is not None and nxt.args and nxt.args[0] is cur and _is_act_node(nxt, modules):
            if nxt.op == "call_module":
                cand.act = q(nxt.target)
                cand.act_removable = calls.get(nxt.target) == 1
                if not cand.act_removable:
                    cand.act_desc = f"{cand.act} (shared module, kept)"
            else:
                name = getattr(nxt.target, "__name__", str(nxt.target))
                cand.act_desc = f"{name} (function, kept)"


def _record_input_shapes(model: nn.Module, example: Any) -> dict[str, tuple[int, ...]]:
    """One forward pass with hooks: the first positional input's shape of every module."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        def hook(mod, args, name=name):
            if name not in shapes and args and isinstance(args[0], torch.Tensor) and len(args) == 1:
                shapes[name] = tuple(args[0].shape)
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call(model, example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _analyse_module(module: nn.Module, prefix: str, example: torch.Tensor | None, rules: list[Rule],
                    stem: set[str], head: set[str], out: Analysis, seen: set[str],
                    shapes: dict[str, tuple[int, ...]] | None, root: nn.Module, depth: int = 0) -> None:
    try:
        gm = trace(module)
        if example is not None:
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # the tracer's reason goes into the report
        reason = _short_reason(exc)
        children = list(module.named_children())
        if not children or depth > 12:
            out.untraced.append(Untraced(prefix, reason))
            return
        out.untraced.append(Untraced(prefix, f"{reason} — its children are analysed separately"))
        if shapes is None:
            return
        for cname, child in children:
            full = f"{prefix}.{cname}" if prefix else cname
            if full not in shapes:
                if any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in child.modules()):
                    out.untraced.append(Untraced(full, "not called with a single tensor input in forward"))
                continue
            g = torch.Generator().manual_seed(0)
            p = next(iter(child.parameters()), None)
            ex = torch.randn(shapes[full], generator=g)
            if p is not None:
                ex = ex.to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
            _analyse_module(child, full, ex, rules, stem, head, out, seen, shapes, root, depth + 1)
        return
    out.traced.append(prefix)
    _match_graph(gm, prefix, rules, stem, head, out, seen)


def analyse(model: nn.Module, rules: list[Rule], example_input: Any) -> Analysis:
    """Trace ``model``, propagate shapes on ``example_input`` and match ``rules``.

    The model is put in eval mode for the analysis and restored afterwards.
    """
    out = Analysis()
    was_training = model.training
    model.eval()
    try:
        stem, head = _stem_names(model), _classifier_names(model)
        seen: set[str] = set()
        try:
            gm = trace(model)
            if isinstance(example_input, torch.Tensor):
                ShapeProp(gm).propagate(example_input)
            else:
                raise TypeError("example input is not a single tensor")
        except Exception:
            shapes = _record_input_shapes(model, example_input)
            # stem/head from the hook order when no timm config names them
            anchors = [n for n, m in model.named_modules() if _anchor_kind(m) and n in shapes]
            if anchors:
                stem = stem or {anchors[0]}
                head = head or {anchors[-1]}
            _analyse_module(model, "", None, rules, stem, head, out, seen, shapes, model)
            return out
        out.traced.append("")
        _match_graph(gm, "", rules, stem, head, out, seen)
        return out
    finally:
        model.train(was_training)
