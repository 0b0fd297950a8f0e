"""What a resumed run needs, in one safetensors file: model and optimizer tensors, everything else as JSON
metadata (nothing is pickled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..errors import PixifyError

__all__ = ["CHECKPOINT_NAME", "STATE_NAME", "LOG_NAME", "PLOT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "state.safetensors"
LOG_NAME = "log.jsonl"
PLOT_NAME = "curves.png"
STATE_VERSION = 1
_STATE_KEY = "pixify_train_state"


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        meta: dict[str, Any] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous().clone()
                meta[k] = "tensor"
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          device: torch.device) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        entry = {}
        for k, v in st.items():
            if v == "tensor":
                t = tensors[f"optim/{pid}/{k}"]
                entry[k] = t if k == "step" else t.to(device)
            else:
                entry[k] = v
        state[int(pid)] = entry
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, entry in state.items():  # a moment tensor of another shape would fail only inside a step
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() and (pid >= len(params) or v.shape != params[pid].shape):
                raise ValueError(f"optim/{pid}/{k} has shape {tuple(v.shape)}, its parameter "
                                 f"{tuple(params[pid].shape) if pid < len(params) else 'does not exist'}")


def _write_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_files(opt)
    tensors.update(opt_tensors)
    payload = dict(meta, optimizer=opt_meta, version=STATE_VERSION)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_STATE_KEY: json.dumps(payload)}))


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PixifyError(f"cannot read the training state {path} ({str(exc).splitlines()[0] if str(exc) else ''})",
                          "the run cannot be resumed; start a new one with another --out") from None
    if _STATE_KEY not in meta:
        raise PixifyError(f"{path} is not a pixify training state")
    try:
        payload = json.loads(meta[_STATE_KEY])
    except (ValueError, RecursionError):
        _damaged(path, "its metadata is not valid JSON")
    if not isinstance(payload, dict):
        _damaged(path, "its metadata is not an object")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _damaged(path, f"version {str(version)[:40]}")
    if version > STATE_VERSION:
        raise PixifyError(f"{path} was written by a newer pixify (state version {version})")
    _check_payload(path, payload, tensors)
    return tensors, payload


def _damaged(path: Path, what: str) -> None:
    raise PixifyError(f"the training state {path} is damaged ({what})",
                      "the run cannot be resumed; fine-tune its checkpoint into a new --out")


def _is_int(v: Any, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_payload(path: Path, p: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every field a resume acts on, checked before it does: a state file is read back, so it is input."""
    if not isinstance(p.get("config"), dict):
        _damaged(path, "config")
    for key in ("epoch", "step"):
        if not _is_int(p.get(key)):
            _damaged(path, key)
    if not _is_int(p.get("world_size", 1), 1, 1 << 20):
        _damaged(path, "world_size")
    history, init = p.get("history", []), p.get("init", {})
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        _damaged(path, "history")
    if not isinstance(init, dict):
        _damaged(path, "init")
    if p.get("scaler") is not None and not isinstance(p.get("scaler"), dict):
        _damaged(path, "scaler")
    opt = p.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
            opt.get("param_groups"), list):
        _damaged(path, "optimizer")
    for g in opt["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or not all(
                _is_int(i) for i in g["params"]):
            _damaged(path, "optimizer.param_groups")
        for k, v in g.items():
            if k in ("lr", "initial_lr", "weight_decay", "momentum", "eps") and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool)):
                _damaged(path, f"optimizer.param_groups.{k}")
    for pid, st in opt["state"].items():
        if not str(pid).isdigit() or not isinstance(st, dict):
            _damaged(path, "optimizer.state")
        for k, v in st.items():
            if v == "tensor" and f"optim/{pid}/{k}" not in tensors:
                _damaged(path, f"the tensor optim/{pid}/{k} is missing")
