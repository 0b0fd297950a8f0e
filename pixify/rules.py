"""Rules as data: loading, validating and registering the TOML pattern rules.

A rule names an anchor layer kind and optional followers (``pattern``), and the conditions under which
the anchor is a site. The rules shipped with pixify live in the top-level ``rules/`` folder (installed as
the ``pixify.rulefiles`` package data); users add files with ``--rules FILE`` or :func:`register_rule`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RuleError

__all__ = ["Rule", "load_rules_file", "builtin_rules", "register_rule", "registered_rules", "active_rules"]

MODES = ("squeeze", "prune")
ANCHORS = ("conv2d", "linear")
FOLLOWERS = ("norm?", "act?")


@dataclass(frozen=True)
class Rule:
    """One pattern-matching rule. See ``rules/squeeze.toml`` for the annotated built-ins."""

    name: str
    description: str
    mode: str = "squeeze"
    pattern: tuple[str, ...] = ("conv2d", "norm?", "act?")
    priority: int = 0
    preset: str | None = None  # only active under this preset (and then exclusively with its peers)
    enabled: bool = True
    kernel_size: int | None = None  # square kernel size required of a conv anchor
    stride: int | None = None
    groups: int | None = None
    min_ratio: float | None = None  # C_in / C_out must exceed this (squeeze)
    min_spatial: int | None = None  # H*W (or token count) of the anchor's input must reach this
    include: tuple[str, ...] = ()  # fnmatch patterns on qualified module names; empty = all
    exclude: tuple[str, ...] = ()
    allow_stem: bool = False  # the stem and the classifier are never touched unless a rule says so
    allow_head: bool = False
    input_from_act: bool = False  # the anchor's input must come from an activation (prune points)
    min_channels: int | None = None  # C_in of the anchor must reach this
    auto_zeta: int | None = None  # the ζ that `--zeta auto` uses at this rule's sites (prune; default 2)
    source: str = "<api>"  # file the rule came from
    digest: str = ""  # content hash of the rule's definition

    @property
    def anchor(self) -> str:
        return self.pattern[0]

    def names_match(self, qualname: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(qualname, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(qualname, p) for p in self.exclude)

    def summary(self) -> dict[str, Any]:
        """What a checkpoint records of the rule: the file's name (never a folder of this machine) and hash."""
        src = self.source if self.source.startswith(("rules/", "<")) else Path(self.source).name
        return {"name": self.name, "source": src, "sha256": self.digest}


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "description": (str,),
    "mode": (str,),
    "pattern": (list,),
    "priority": (int,),
    "preset": (str,),
    "enabled": (bool,),
    "kernel_size": (int,),
    "stride": (int,),
    "groups": (int,),
    "min_ratio": (int, float),
    "min_spatial": (int,),
    "include": (list,),
    "exclude": (list,),
    "allow_stem": (bool,),
    "allow_head": (bool,),
    "input_from_act": (bool,),
    "min_channels": (int,),
    "auto_zeta": (int,),
}
_REQUIRED = ("name", "description", "mode", "pattern")


def _line_of(text: str, rule_index: int, key: str | None) -> int | None:
    """Best-effort line number of ``key`` inside the ``rule_index``-th ``[[rule]]`` table."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)]
    if rule_index >= len(headers):
        return None
    start = headers[rule_index]
    end = headers[rule_index + 1] if rule_index + 1 < len(headers) else len(lines)
    if key is None:
        return start + 1
    for i in range(start, end):
        if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def _digest(data: dict[str, Any]) -> str:
    canon = repr(sorted((k, data[k]) for k in data))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _validate(data: dict[str, Any], path: str, line_of) -> Rule:
    for key in data:
        if key not in _TYPES:
            known = ", ".join(sorted(_TYPES))
            raise RuleError(path, line_of(key), f"unknown key '{key}' (known keys: {known})")
    for key in _REQUIRED:
        if key not in data:
            raise RuleError(path, line_of(None), f"missing required key '{key}'")
    for key, value in data.items():
        types = _TYPES[key]
        if isinstance(value, bool) and bool not in types:
            raise RuleError(path, line_of(key), f"'{key}' must be {types[0].__name__}, got a boolean")
        if not isinstance(value, types):
            raise RuleError(path, line_of(key), f"'{key}' must be {types[0].__name__}, got {type(value).__name__}")
    if data["mode"] not in MODES:
        raise RuleError(path, line_of("mode"), f"mode must be one of {', '.join(MODES)}, got '{data['mode']}'")
    pattern = data["pattern"]
    if not pattern or not all(isinstance(p, str) for p in pattern):
        raise RuleError(path, line_of("pattern"), "pattern must be a non-empty list of strings")
    if pattern[0] not in ANCHORS:
        raise RuleError(path, line_of("pattern"), f"pattern must start with one of {', '.join(ANCHORS)}, got '{pattern[0]}'")
    rest = list(pattern[1:])
    if any(p not in FOLLOWERS for p in rest) or rest != [f for f in FOLLOWERS if f in rest]:
        raise RuleError(path, line_of("pattern"), f"after the anchor a pattern may hold {', '.join(FOLLOWERS)} in that order")
    if data["mode"] == "prune" and rest:
        raise RuleError(path, line_of("pattern"), "a prune rule matches the consumer layer alone: pattern must be "
                        "[\"conv2d\"] or [\"linear\"] (no followers)")
    for key in ("kernel_size", "stride", "groups", "min_spatial", "min_channels", "auto_zeta"):
        if key in data and data[key] < 1:
            raise RuleError(path, line_of(key), f"'{key}' must be >= 1")
    if "min_ratio" in data and data["min_ratio"] <= 0:
        raise RuleError(path, line_of("min_ratio"), "'min_ratio' must be > 0")
    for key in ("include", "exclude"):
        if key in data and not all(isinstance(p, str) for p in data[key]):
            raise RuleError(path, line_of(key), f"'{key}' must be a list of strings")
    kwargs = dict(data)
    kwargs["pattern"] = tuple(pattern)
    for key in ("include", "exclude"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return Rule(**kwargs, source=path, digest=_digest(data))


def parse_rules(text: str, path: str = "<string>") -> list[Rule]:
    """Parse and validate a rules document; raises :class:`RuleError` naming file, line and reason."""
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise RuleError(path, None, "nested deeper than any rules file") from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"line (\d+)", msg)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        raise RuleError(path, int(m.group(1)) if m else None, f"TOML syntax error: {reason}") from None
    extra = [k for k in doc if k != "rule"]
    if extra:
        line = next((i + 1 for i, ln in enumerate(text.splitlines()) if re.match(rf"\s*\[?\s*{re.escape(extra[0])}\b", ln)), None)
        raise RuleError(path, line, f"unknown top-level key '{extra[0]}' (a rules file holds [[rule]] tables only)")
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not tables:
        raise RuleError(path, None, "no [[rule]] tables found")
    rules = []
    names = set()
    for i, table in enumerate(tables):
        if not isinstance(table, dict):
            raise RuleError(path, _line_of(text, i, None), "'rule' must be [[rule]] tables, got "
                            f"{type(table).__name__} values")
        rule = _validate(table, path, lambda key, i=i: _line_of(text, i, key))
        if rule.name in names:
            raise RuleError(path, _line_of(text, i, "name"), f"duplicate rule name '{rule.name}'")
        names.add(rule.name)
        rules.append(rule)
    return rules


def load_rules_file(path: str | Path) -> list[Rule]:
    p = Path(path)
    if not p.is_file():
        raise RuleError(str(path), None, "file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(str(path), None, f"cannot read it ({exc.__class__.__name__})") from None
    return parse_rules(text, str(path))


def _builtin_dir():
    return resources.files("pixify.rulefiles")


def builtin_rules() -> list[Rule]:
    """The rules shipped in the wheel, in file-name order."""
    out: list[Rule] = []
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out.extend(parse_rules(entry.read_text(encoding="utf-8"), f"rules/{entry.name}"))
    return out


_REGISTERED: list[Rule] = []


def check_rule(rule: Rule) -> Rule:
    """``rule`` if its fields are what a rules file may hold (a :class:`Rule` built in Python skips the file's
    checks); else :class:`RuleError`."""
    if not isinstance(rule, Rule):
        raise RuleError("<api>", None, f"expected a pixify.Rule, got {type(rule).__name__}")
    data = {}
    for key in _TYPES:
        value = getattr(rule, key)
        if value is None:
            continue
        data[key] = list(value) if isinstance(value, tuple) else value
    if not isinstance(rule.source, str) or len(rule.source) > 4096:
        raise RuleError("<api>", None, f"source must be a string (where the rule comes from), got {rule.source!r:.60}")
    if rule.digest and not (isinstance(rule.digest, str) and re.fullmatch(r"[0-9a-f]{1,64}", rule.digest)):
        raise RuleError("<api>", None, f"digest must be a hex string or empty, got {rule.digest!r:.60}")
    checked = _validate(data, rule.source, lambda key: None)
    return rule if rule.digest else checked


def register_rule(rule: Rule | dict[str, Any]) -> Rule:
    """Add a rule for this process (a :class:`Rule` or a dict with the TOML keys)."""
    if isinstance(rule, dict):
        rule = _validate(dict(rule), "<register_rule>", lambda key: None)
    elif not isinstance(rule, Rule):
        raise RuleError("<register_rule>", None, f"takes a Rule or a dict of rule keys, got {type(rule).__name__}")
    else:
        rule = check_rule(rule)
    if any(r.name == rule.name for r in _REGISTERED):
        raise RuleError("<register_rule>", None, f"a rule named '{rule.name}' is already registered",)
    _REGISTERED.append(rule)
    return rule


def registered_rules() -> list[Rule]:
    return list(_REGISTERED)


def unregister_rule(name: str) -> None:
    _REGISTERED[:] = [r for r in _REGISTERED if r.name != name]


def active_rules(mode: str, preset: str | None = None, extra: list[Rule] | None = None,
                 files: list[str | Path] | None = None) -> list[Rule]:
    """The rules that apply to a conversion, highest priority first.

    Without a preset: every enabled rule of ``mode`` that names no preset. With a preset: only the rules
    that name it (a preset is an exact configuration, not an addition).
    """
    pool = builtin_rules() + registered_rules() + list(extra or [])
    for f in files or []:
        pool.extend(load_rules_file(f))
    chosen = [r for r in pool if r.enabled and r.mode == mode and r.preset == preset]
    if preset is not None and not chosen:
        presets = sorted({r.preset for r in pool if r.preset})
        from .errors import PixifyError

        raise PixifyError(f"unknown preset '{preset}'", f"known presets: {', '.join(presets) or 'none'}")
    return sorted(chosen, key=lambda r: -r.priority)


def with_changes(rule: Rule, **changes: Any) -> Rule:
    return dataclasses.replace(rule, **changes)


def all_rules() -> list[Rule]:
    return builtin_rules() + registered_rules()

