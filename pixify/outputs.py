"""Where pixify writes, and how: output paths are checked before any work, files appear whole or not at all,
and one run owns an output folder at a time.

Rules for an output *file* (``-o``):

- it is created or replaced only if it is a regular file or does not exist yet; a directory, device node,
  FIFO or socket is refused, and so is anything under ``/proc``, ``/sys`` or ``/dev``;
- a symbolic link is refused (pixify would replace the link itself, not write through it): give the path it
  points to;
- its folder must exist and be a folder;
- it is written to a temporary file beside it (``.NAME.pixify-PID-*.tmp``) and renamed into place, so that a
  reader never sees half a file; any error (disk full, read-only, permission) removes the temporary file and
  is reported as one line; temporary files left by a killed run (their process gone) are removed by the next
  write to the same folder;
- a new file gets the mode the user's umask gives; a replaced file keeps its mode.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

from .errors import PixifyError

__all__ = ["check_output_file", "check_output_dir", "atomic_write", "RunLock"]

_SYSTEM_DIRS = ("/proc", "/sys", "/dev")
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.pixify-(?P<pid>\d+)-[^.]+\.tmp$")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _under_system_dir(p: Path) -> str | None:
    try:
        real = os.path.realpath(p)
    except (OSError, ValueError):
        return None
    for d in _SYSTEM_DIRS:
        if real == d or real.startswith(d + "/"):
            return d
    return None


def _one_line_oserror(exc: OSError) -> str:
    return exc.strerror or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def check_output_file(path: str | Path, what: str = "output path", hint: str = "choose another -o") -> Path:
    """``path`` as a :class:`Path` if pixify may create or replace it (module docstring); else PixifyError."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise PixifyError(f"{what} {str(path)!r} is not a file name", hint)
    system = _under_system_dir(p)
    if system:
        raise PixifyError(f"{what} {path} is under {system}, where pixify never writes", hint)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise PixifyError(f"{what} {path}: a part of its folder path is a file, not a folder", hint) from None
    except OSError as exc:
        raise PixifyError(f"{what} {path}: {_one_line_oserror(exc)}", hint) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISLNK(st.st_mode):
            raise PixifyError(f"{what} {path} is a symbolic link; pixify does not write through links",
                              "give the path it points to")
        raise PixifyError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file", hint)
    parent = p.parent
    if not parent.exists():
        raise PixifyError(f"the folder of {what} {path} does not exist", "create it first or " + hint)
    if not parent.is_dir():
        raise PixifyError(f"the folder of {what} {path} is not a folder", hint)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PixifyError(f"cannot write {what} {path}: {_why_not_writable(parent)}", hint)
    return p


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except OSError:
        pass
    return f"permission denied in {folder}"


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a :class:`Path` if pixify may create it as a folder or write into it; else PixifyError."""
    p = Path(path)
    hint = f"choose another {what}"
    system = _under_system_dir(p)
    if system:
        raise PixifyError(f"{what} {path} is under {system}, where pixify never writes", hint)
    if p.exists() and not p.is_dir():
        raise PixifyError(f"{what} {path} is a file", "give a folder")
    if not p.exists():
        if not p.parent.exists():
            raise PixifyError(f"the parent folder of {what} {path} does not exist", "create it first or " + hint)
        if not p.parent.is_dir():
            raise PixifyError(f"the parent of {what} {path} is not a folder", hint)
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise PixifyError(f"cannot create {what} {path}: {_why_not_writable(p.parent)}", hint)
    elif not os.access(p, os.W_OK | os.X_OK):
        raise PixifyError(f"cannot write into {what} {path}: {_why_not_writable(p)}", hint)
    return p


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(folder: Path, name: str) -> None:
    """Remove temporary files of ``name`` left by pixify processes that no longer exist."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TMP_RE.match(e.name)
        if m and m.group("name") == name and not _pid_alive(int(m.group("pid"))):
            try:
                if e.is_file(follow_symlinks=False):
                    os.unlink(e.path)
            except OSError:
                pass


def _new_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None], what: str = "output path",
                 hint: str = "choose another -o") -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (rules in the module docstring)."""
    p = check_output_file(path, what, hint)
    folder = p.parent
    _clean_stale(folder, p.name)
    try:
        old_mode = stat.S_IMODE(os.stat(p).st_mode) if p.exists() else None
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.pixify-{os.getpid()}-", suffix=".tmp", dir=str(folder))
        os.close(fd)
    except OSError as exc:
        raise PixifyError(f"cannot write {p}: {_one_line_oserror(exc)}", hint) from None
    try:
        write(tmp)
        os.chmod(tmp, old_mode if old_mode is not None else _new_file_mode())
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) or _is_io_error(exc):
            reason = _one_line_oserror(exc) if isinstance(exc, OSError) else str(exc).splitlines()[0]
            raise PixifyError(f"cannot write {p}: {reason}", hint) from None
        raise
    return p


def _is_io_error(exc: BaseException) -> bool:
    """safetensors reports write failures (disk full) as its own error type, naming the OS error in text."""
    name = type(exc).__name__
    text = str(exc)
    return name == "SafetensorError" and ("Io" in text or "No space" in text or "os error" in text)


class RunLock:
    """An exclusive lock on an output folder for the life of a run (``flock`` on the folder itself, so that
    nothing is added to it): a second run on the same folder fails at once, and the lock of a killed run is
    released by the operating system with its process."""

    def __init__(self, folder: Path, what: str = "--out"):
        self.folder, self.what = Path(folder), what
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise PixifyError(f"cannot lock {self.what} {self.folder}: {_one_line_oserror(exc)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise PixifyError(f"another pixify run is writing to {self.what} {self.folder}",
                                  f"wait for it to finish, or choose another {self.what}") from None
            raise PixifyError(f"cannot lock {self.what} {self.folder}: {_one_line_oserror(exc)}") from None
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
