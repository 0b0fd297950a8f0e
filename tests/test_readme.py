"""Every example in README.md runs, so that none can rot.

The README is cut into its fenced blocks:

- ``python`` blocks run in order, in one namespace, in a sandbox folder;
- ``console`` blocks: each ``$ pixify ...`` line runs through the CLI's entry point; it must exit 0, a
  ``--json`` command must print exactly one JSON document, and every table row and summary line the README
  shows after it must be in the real output (timings excepted);
- ``bash`` blocks: every ``pixify ...`` and ``torchrun ...`` line runs and must exit 0 (the install and test
  commands are this test suite itself and are not re-run);
- ``toml`` blocks are rules files and must load.

The sandbox holds what the examples name: ``train/`` and ``val/`` (ImageFolder trees of two classes) and
``photos/`` (a flat folder), all tiny. Substitutions, each for a reason, are listed in ``SUBSTITUTE``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README text -> what the test runs instead, and why.
SUBSTITUTE = {
    # no network here: the hub weights cannot be fetched (the README says so right above the example)
    'pretrained=True': 'pretrained=False',
    'pixify convert resnet50 --data': 'pixify convert resnet50 --no-pretrained --data',
    # 8 processes do not fit a 2-core machine; 2 exercise the same DDP path (gloo on CPU)
    "torchrun --nproc-per-node 8": "torchrun --nproc-per-node 2",
}
# Examples that take minutes on this machine (fine-tuning ResNet-50, DDP, timing) run in the slow suite
# (`pytest -m slow`, which CI runs too).
SLOW = ("torchrun", "pixify bench", "pixify finetune", "pixify eval", "pixify export")
SLOW_PYTHON = ("pixify.finetune(",)


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, first line number) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        out.append((m.group(1), m.group(2), text[:m.start()].count("\n") + 2))
    return out


def _substitute(line: str) -> str:
    for a, b in SUBSTITUTE.items():
        line = line.replace(a, b)
    return line


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:].strip(), []))
        elif out:
            out[-1][1].append(line)
    return out


def bash_commands(body: str) -> list[str]:
    cmds = []
    for line in body.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith(("pixify ", "torchrun ")):
            cmds.append(line)
    return cmds


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from test_finetune import _write_images

    root = tmp_path_factory.mktemp("readme")
    _write_images(root / "train", 4, 2, 0)
    _write_images(root / "val", 2, 2, 1)
    _write_images(root / "photos", 4, None, 2)
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Fine-tuning on the sandbox's few images: a batch of 4 (two DDP processes share 8 images) and no worker
# processes keep each run to seconds.
# They are options the README documents; the run is otherwise the README's.
FAST_FT = ["--batch-size", "4", "--workers", "0", "--calib-images", "8"]


def run_cli(command: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(_substitute(command))
    if args[0] == "pixify":
        args = [sys.executable, "-m", "pixify.cli", *args[1:]]
    else:  # torchrun
        args = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    if "finetune" in args:
        args += FAST_FT
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)


def _shown_lines(expected: list[str]) -> list[str]:
    """The lines of shown output that must appear: table rows and the summary lines (no timings)."""
    keep = []
    for line in expected:
        s = line.strip()
        if s.startswith("│") or s.startswith(("sites:", "MACs:", "params:", "output agreement")):
            keep.append(" ".join(s.split()))
    return keep


def _slow(cmd: str) -> bool:
    return cmd.startswith(SLOW) or "--data" in cmd  # fitting ResNet-50 to data takes minutes here


def _examples() -> list:
    params = []
    for lang, body, line in blocks(README.read_text()):
        if lang == "console":
            for cmd, expected in console_commands(body):
                marks = [pytest.mark.slow] if _slow(cmd) else []
                params.append(pytest.param("console", cmd, expected, id=f"L{line}:{cmd[:40]}", marks=marks))
        elif lang == "bash":
            for i, cmd in enumerate(bash_commands(body)):
                marks = [pytest.mark.slow] if _slow(cmd) else []
                params.append(pytest.param("bash", cmd, None, id=f"L{line + 1 + i}:{cmd[:40]}", marks=marks))
        elif lang == "python":
            marks = [pytest.mark.slow] if any(s in body for s in SLOW_PYTHON) else []
            params.append(pytest.param("python", body, None, id=f"L{line}:python", marks=marks))
        elif lang == "toml":
            params.append(pytest.param("toml", body, None, id=f"L{line}:toml"))
    return params


def test_readme_has_examples():
    kinds = {p.values[0] for p in _examples()}
    assert kinds == {"console", "bash", "python", "toml"}
    assert len(_examples()) >= 10


_NAMESPACE: dict = {}


def _ensure_checkpoint(code: str, sandbox: Path) -> None:
    """Examples that read the checkpoint the README's first ``convert`` writes get it even when that example
    did not run first (``-m slow`` deselects it)."""
    if "r50_pix.safetensors" in code and not (sandbox / "r50_pix.safetensors").exists():
        first = next(c for lang, body, _ in blocks(README.read_text()) if lang == "console"
                     for c, _ in console_commands(body) if "-o r50_pix.safetensors" in c)
        assert run_cli(first, sandbox).returncode == 0


@pytest.mark.parametrize("kind,code,expected", _examples())
def test_readme_example(kind, code, expected, sandbox, monkeypatch, tmp_path):
    monkeypatch.chdir(sandbox)
    _ensure_checkpoint(code, sandbox)
    if kind == "python":
        import torch

        torch.manual_seed(0)
        exec(compile(_substitute(code), "README.md", "exec"), _NAMESPACE)
        return
    if kind == "toml":
        from pixify.rules import load_rules_file

        path = tmp_path / "readme_rules.toml"
        path.write_text(code)
        assert load_rules_file(path)
        return
    proc = run_cli(code, sandbox)
    assert proc.returncode == 0, f"{code}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    if "--json" in code:
        json.loads(proc.stdout)  # exactly one JSON document on stdout
    if expected:
        got = {" ".join(line.split()) for line in proc.stdout.splitlines()}
        missing = [line for line in _shown_lines(expected) if line not in got]
        assert not missing, f"{code}: the README shows lines the command no longer prints: {missing[:3]}"
