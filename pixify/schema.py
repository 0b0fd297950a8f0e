"""The recipe of a checkpoint is untrusted input: it is checked against this schema before pixify acts on any
of it. Every field that loading, fine-tuning, evaluation or benchmarking reads has its type and range
checked here, and anything wrong is a :class:`CheckpointError` that names the field's path
(``sites[3].zeta``). Constructor arguments are data: the ones through which a model library would read a
file, fetch weights or pick a cache folder are refused."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import CheckpointError

__all__ = ["validate_recipe", "FORBIDDEN_KWARGS"]

#: constructor arguments a recipe may not pass: each makes timm or torchvision read a file, fetch weights
#: or write a cache (the user can still pass them on their own command line or in Python)
FORBIDDEN_KWARGS = frozenset({
    "checkpoint_path", "pretrained", "pretrained_strict", "cache_dir", "weights", "weights_backbone", "progress",
    "file", "url", "hf_hub_id", "hf_hub_filename", "model_args", "pretrained_model_args",
})
#: timm's pretrained-config arguments are allowed with descriptive entries only (never a file, URL or state dict)
_CFG_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay")
_LIBRARIES = ("timm", "torchvision", "custom")
_MODES = ("squeeze", "prune")
_ACTIONS = ("pure", "hybrid", "prune")
_KINDS = ("conv2d", "linear")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")  # a module's qualified name
_MODEL = re.compile(r"^[A-Za-z0-9_.\-/:<>]{1,300}$")  # a model name (timm, torchvision, hf-hub id, class path)
_WEIGHTS = re.compile(r"^(random|module|user|pretrained(:[A-Za-z0-9_.\-]{1,100})?|file:[^/\\\x00]{1,255})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHANNELS = 1 << 20  # channels of one layer, and so the largest ζ
# Preprocessing a recipe may remember, and that convert/finetune/eval accept (closed ranges): a std below
# 1e-6 vanishes or overflows in float32 pixels, a crop fraction below 0.05 asks for images 20x the input.
MEAN_RANGE = (-1e6, 1e6)
STD_RANGE = (1e-6, 1e6)
CROP_PCT_RANGE = (0.05, 1.0)


def _fail(path: str, what: str, value: Any) -> None:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise CheckpointError(f"recipe field {path}: expected {what}, got {shown}")


def _int(path: str, v: Any, lo: int = 0, hi: int = 1 << 62, optional: bool = False) -> None:
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        _fail(path, f"an integer in [{lo}, {hi}]", v)


def _num(path: str, v: Any, lo: float, hi: float, optional: bool = False, open_ends: bool = False) -> None:
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (lo < v < hi) if open_ends else (lo <= v <= hi)
    if not ok:
        _fail(path, f"a number in {'(' if open_ends else '['}{lo}, {hi}{')' if open_ends else ']'}", v)


def _str(path: str, v: Any, pattern: re.Pattern | None = None, choices: tuple | None = None,
         optional: bool = False, max_len: int = 10_000) -> None:
    if v is None and optional:
        return
    if not isinstance(v, str) or len(v) > max_len:
        _fail(path, "a string", v)
    if choices is not None and v not in choices:
        _fail(path, "one of " + ", ".join(choices), v)
    if pattern is not None and not pattern.match(v):
        _fail(path, "a valid name", v)


def _names(path: str, v: Any, pattern: re.Pattern | None = _NAME) -> None:
    if not isinstance(v, list) or len(v) > 64:
        _fail(path, "a list of module names", v)
    for i, n in enumerate(v):
        _str(f"{path}[{i}]", n, pattern, max_len=300)


def _json_data(path: str, v: Any, depth: int = 0) -> None:
    """Plain JSON data a constructor may take: numbers, strings, booleans, null, and lists/dicts of them."""
    if depth > 4:
        _fail(path, "data nested at most 4 deep", v)
    if v is None or isinstance(v, (bool, str)):
        if isinstance(v, str) and len(v) > 1000:
            _fail(path, "a string of at most 1000 characters", v)
        return
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            _fail(path, "a finite number", v)
        return
    if isinstance(v, list):
        if len(v) > 1000:
            _fail(path, "a list of at most 1000 items", v)
        for i, x in enumerate(v):
            _json_data(f"{path}[{i}]", x, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            _json_data(f"{path}.{k}", x, depth + 1)
        return
    _fail(path, "JSON data", v)


def _refuse(path: str) -> None:
    raise CheckpointError(f"recipe field {path}: refused, it would make the model library read or fetch files; "
                          "a checkpoint is loaded from its own tensors only")


def _input_size(path: str, size: Any) -> None:
    """A pretrained config's input size, which sizes the example inputs: positive, and no more values per
    image than pixify allocates."""
    if size is None:
        return
    if not isinstance(size, (list, tuple)) or not 1 <= len(size) <= 4:
        _fail(path, "a list of sizes", size)
    for j, v in enumerate(size):
        _int(f"{path}[{j}]", v, 1, 1 << 16)
    from .validate import MAX_INPUT_VALUES

    if math.prod(size) > MAX_INPUT_VALUES:
        _fail(path, f"at most {MAX_INPUT_VALUES:,} values per image", size)


def _source(src: Any) -> None:
    if not isinstance(src, dict):
        _fail("source", "an object", src)
    _str("source.library", src.get("library"), choices=_LIBRARIES)
    _str("source.name", src.get("name"), _MODEL)
    kwargs = src.get("kwargs", {})
    if not isinstance(kwargs, dict) or len(kwargs) > 100:
        _fail("source.kwargs", "an object of constructor arguments", kwargs)
    for k, v in kwargs.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,100}$", k):
            _fail("source.kwargs", "argument names", k)
        if k in FORBIDDEN_KWARGS:
            _refuse(f"source.kwargs.{k}")
        if k in _CFG_KWARGS and not (k == "pretrained_cfg" and isinstance(v, str) and _NAME.match(v)):
            from .sources import _SAFE_CFG_KEYS

            if not isinstance(v, dict):
                _fail(f"source.kwargs.{k}", "an object of pretrained-config entries", v)
            for entry in v:
                if entry not in _SAFE_CFG_KEYS:
                    _refuse(f"source.kwargs.{k}.{entry}")
        _json_data(f"source.kwargs.{k}", v)
        if k in _CFG_KWARGS and isinstance(v, dict):
            _input_size(f"source.kwargs.{k}.input_size", v.get("input_size"))
    _str("source.weights", src.get("weights", "random"), _WEIGHTS)
    _str("source.sha256", src.get("sha256"), _HEX64, optional=True)
    if str(src.get("weights", "")).startswith("file:") and src.get("sha256") is None:
        _fail("source.sha256", "the digest of the weights file the recipe names", None)
    _int("source.seed", src.get("seed"), 0, (1 << 63) - 1, optional=True)
    cfg = src.get("pretrained_cfg")
    if cfg is not None:
        if not isinstance(cfg, dict):
            _fail("source.pretrained_cfg", "an object", cfg)
        _json_data("source.pretrained_cfg", cfg)
        _input_size("source.pretrained_cfg.input_size", cfg.get("input_size"))
    _str("source.hub", src.get("hub"), _MODEL, optional=True)
    _str("source.key_map", src.get("key_map"), choices=("positional",), optional=True)
    _str("source.note", src.get("note"), optional=True, max_len=2000)


def _site(i: int, s: Any) -> None:
    p = f"sites[{i}]"
    if not isinstance(s, dict):
        _fail(p, "an object", s)
    _str(f"{p}.name", s.get("name"), _NAME)
    _str(f"{p}.mode", s.get("mode"), choices=_MODES)
    _str(f"{p}.kind", s.get("kind"), choices=_KINDS)
    _str(f"{p}.action", s.get("action"), choices=_ACTIONS)
    _str(f"{p}.rule", s.get("rule", ""), max_len=200)
    _str(f"{p}.pattern", s.get("pattern", ""), max_len=200)
    _int(f"{p}.c_in", s.get("c_in"), 1, MAX_CHANNELS)
    _int(f"{p}.c_out", s.get("c_out"), 1, MAX_CHANNELS)
    _int(f"{p}.spatial", s.get("spatial", 1), 0, 1 << 40)
    _int(f"{p}.channel_dim", s.get("channel_dim"), -1, 3)
    _int(f"{p}.zeta", s.get("zeta"), 1, MAX_CHANNELS)
    _num(f"{p}.tau", s.get("tau", 0.5), 0.0, 1.0, open_ends=True)
    _names(f"{p}.removed", s.get("removed", []))
    _names(f"{p}.kept", s.get("kept", []), None)  # names with a note: "layer1.1.relu (shared module, kept)"
    _int(f"{p}.macs_before", s.get("macs_before", 0), 0)
    _int(f"{p}.macs_after", s.get("macs_after", 0), 0)
    _int(f"{p}.kernel_area", s.get("kernel_area", 1), 1, 1 << 20)
    _int(f"{p}.out_spatial", s.get("out_spatial"), 0, 1 << 40, optional=True)
    _str(f"{p}.reason", s.get("reason", ""), max_len=2000)


def _data_config(cfg: Any) -> None:
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        _fail("data_config", "an object", cfg)
    size = cfg.get("input_size")
    if size is not None:
        if not isinstance(size, list) or len(size) != 3:
            _fail("data_config.input_size", "[C, H, W]", size)
        for j, v in enumerate(size):
            _int(f"data_config.input_size[{j}]", v, 1, 8192)
    for key in ("mean", "std"):
        v = cfg.get(key)
        if v is not None:
            if not isinstance(v, list) or not 1 <= len(v) <= 16:
                _fail(f"data_config.{key}", "a list of numbers", v)
            for j, x in enumerate(v):
                _num(f"data_config.{key}[{j}]", x, *(STD_RANGE if key == "std" else MEAN_RANGE))
    _num("data_config.crop_pct", cfg.get("crop_pct"), *CROP_PCT_RANGE, optional=True)
    _str("data_config.interpolation", cfg.get("interpolation"), optional=True, max_len=20)
    _str("data_config.crop_mode", cfg.get("crop_mode"), optional=True, max_len=20)


def validate_recipe(recipe: Any) -> None:
    """Raise :class:`CheckpointError` naming the first field of ``recipe`` that is not as pixify writes it."""
    if not isinstance(recipe, dict):
        _fail("(recipe)", "an object", recipe)
    _int("format_version", recipe.get("format_version"), 1)
    _source(recipe.get("source"))
    sites = recipe.get("sites")
    if not isinstance(sites, list) or len(sites) > 100_000:
        _fail("sites", "a list", sites)
    seen = set()
    for i, s in enumerate(sites):
        _site(i, s)
        if s["name"] in seen:
            _fail(f"sites[{i}].name", "a site named once", s["name"])
        seen.add(s["name"])
    _str("mode", recipe.get("mode"), choices=_MODES, optional=True)
    zeta = recipe.get("zeta")
    if zeta is not None and zeta != "auto":
        _int("zeta", zeta, 1, MAX_CHANNELS)
    _num("tau", recipe.get("tau"), 0.0, 1.0, optional=True, open_ends=True)
    _str("preset", recipe.get("preset"), choices=("paper",), optional=True)
    shape = recipe.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 5:
            _fail("input_shape", "a list of sizes", shape)
        for j, v in enumerate(shape):
            _int(f"input_shape[{j}]", v, 1, 1 << 16)
    _data_config(recipe.get("data_config"))
    for key in ("macs_before", "macs_after"):
        _int(key, recipe.get(key, 0), 0, optional=True)
    for key in ("rules", "selection", "init", "finetune"):
        v = recipe.get(key)
        if v is not None:
            if not isinstance(v, (list, dict)):
                _fail(key, "a list or object", v)
            _json_data(key, v, -4)
