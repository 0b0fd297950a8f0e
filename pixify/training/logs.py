"""What a run shows and leaves behind: progress bars, the JSON-lines log and the PNG of its curves."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write
from ..errors import PixifyError
from .distributed import _rank

__all__ = ["plot_log"]


class _Progress:
    """A rich progress bar (loss, images/s, ETA) on rank 0, or nothing."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.enabled = enabled and _rank() == 0
        self._images = 0
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss="-", ips="-")

    def update(self, n: int = 1, images: int = 0, loss: float | None = None) -> None:
        self._images += images
        if not self.enabled:
            return
        dt = max(1e-9, time.perf_counter() - self._t0)
        fields_: dict[str, Any] = {"ips": f"{self._images / dt:.0f}"}
        if loss is not None:
            fields_["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, advance=n, **fields_)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def _append_log(path: Path, record: dict[str, Any]) -> None:
    record = {"time": round(time.time(), 3), **record}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they belong to the lost part of the run)."""
    if not path.exists():
        return
    if not path.is_file():
        raise PixifyError(f"{path} is not a file", "move it away to resume the run")
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict):
            continue  # not a line pixify wrote
        at = rec.get("step", 0)
        if rec.get("event") in ("train", "epoch") and (not isinstance(at, (int, float)) or at > step):
            continue
        keep.append(line)
    keep.append(json.dumps({"time": round(time.time(), 3), "event": "resume", "step": step}))
    text = "\n".join(keep) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def plot_log(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw the loss curves (per logged step) and the per-epoch accuracy from a JSON-lines log into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in recs if r.get("event") == "train"]
    epochs = [r for r in recs if r.get("event") == "epoch"]
    if not train and not epochs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "loss"), ("kd", "distillation (KL·T²)"), ("ce", "cross-entropy")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    plotted = False
    for key, label in (("val_top1", "top-1 (val)"), ("val_agreement", "agreement with teacher (val)")):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        init = [r for r in recs if r.get("event") == "init" and r.get(key) is not None]
        if init and pts:
            pts = [(0, init[-1][key])] + pts
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
            plotted = True
    if not plotted:
        pts = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
        if pts:
            ax2.plot(*zip(*pts), label="learning rate")
        ax2.set_xlabel("step")
        ax2.set_title("learning rate")
    else:
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("%")
        ax2.set_title("accuracy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return Path(png_path)
