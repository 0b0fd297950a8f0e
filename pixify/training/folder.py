"""The output folder of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import Interrupted, PixifyError
from ..outputs import RunLock

__all__: list[str] = []


class _RunFolder:
    """The output folder of one run: created and locked on entry (by the process that owns it), and on an
    error or Ctrl-C before this run wrote its first checkpoint, left exactly as it was found (the files this
    run created removed, the folder too if it made it). Ctrl-C ends as :class:`Interrupted`, saying what
    was kept."""

    def __init__(self, out: Path, files: Sequence[Path], owner: bool = True):
        self.out, self.files, self.owner = out, list(files), owner
        self.lock: RunLock | None = None

    def __enter__(self) -> "_RunFolder":
        if not self.owner:
            return self
        self.made_folder = not self.out.exists()
        try:
            self.out.mkdir(parents=False, exist_ok=True)
        except OSError as exc:
            raise PixifyError(f"cannot create --out {self.out}: {exc.strerror or exc}") from None
        self.before = {f: (f.stat().st_mtime_ns if f.exists() else None) for f in self.files}
        try:
            self.lock = RunLock(self.out).acquire()
        except BaseException:
            if self.made_folder:
                self.out.rmdir()
            raise
        return self

    def _checkpointed(self) -> bool:
        ckpt = self.files[0]
        return ckpt.exists() and ckpt.stat().st_mtime_ns != self.before.get(ckpt)

    def __exit__(self, kind, exc, tb) -> None:
        if not self.owner:
            return None
        lock, self.lock = self.lock, None
        if kind is None:
            lock.release()
            return None
        resumable = self._checkpointed() or self.before.get(self.files[0]) is not None
        if not resumable:
            for f in self.files:
                if self.before.get(f) is None and f.exists():
                    f.unlink()
            for stray in self.out.glob(".*.pixify-*.tmp"):
                stray.unlink()
        lock.release()
        if self.made_folder and not resumable:
            try:
                self.out.rmdir()
            except OSError:
                pass
        if issubclass(kind, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            if resumable:
                raise Interrupted(f"kept {self.files[0]} and its training state; continue with --resume") from None
            raise Interrupted("before the first checkpoint; nothing was kept") from None
        return None
