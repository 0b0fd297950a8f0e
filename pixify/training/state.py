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
    payload = json.loads(meta[_STATE_KEY])
    if payload.get("version", 0) > STATE_VERSION:
        raise PixifyError(f"{path} was written by a newer pixify (state version {payload.get('version')})")
    return tensors, payload
