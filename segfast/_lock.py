"""An advisory lock on every output a segfast command writes (``prepare``, ``score``, ``train``, ``thumbnails``,
``edit``), so that two writers never mix their files in one ``--out``.

The lock is ``fcntl.flock`` on a lock file beside the output, ``<parent>/.<name>.segfast.lock`` (beside, not
inside: ``prepare`` swaps its whole output directory in, and a score output may hold only the scorer's own
names). The holder writes ``{"pid", "host", "command", "argv", "started", "run_id"}`` into it; a second writer
gets :class:`LockHeldError` (a ``FileExistsError``, so the CLI reports one line and exit code 2) naming the
holder's pid and host. The kernel drops a flock when its holder dies, so a lock file that is not locked is
stale and simply taken; a lock still held although the recorded pid is dead on this host (a child process that
inherited the descriptor) is taken over by replacing the lock file. The file is left in place (emptied) when
the run ends: unlinking a flock file races with a writer that has just opened it.

Within one process the lock is re-entrant (the CLI takes it, the API it calls may take it again). Under
torchrun only rank 0 takes it; the other ranks check that the file names their own job (``run_id``: torchrun's
``TORCHELASTIC_RUN_ID``, else ``MASTER_ADDR:MASTER_PORT``) and refuse a lock held by anyone else.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["LockHeldError", "lock_path", "output_lock", "read_holder"]

_SUFFIX = ".segfast.lock"
_held: dict = {}  # realpath of the lock file -> [fd, depth]


class LockHeldError(FileExistsError):
    """Another segfast process writes the same output; the message names its pid and host."""


def lock_path(out) -> Path:
    """The lock file of output ``out`` (a directory or a file): ``<parent>/.<name>.segfast.lock``."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}{_SUFFIX}"


def _run_id() -> Optional[str]:
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return rid
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return None


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def read_holder(path) -> Optional[dict]:
    """The holder record in a lock file (None when empty or unreadable)."""
    try:
        with open(path) as f:
            js = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return js if isinstance(js, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (someone else's) or unknowable: assume alive
    return True


def _describe(h: Optional[dict]) -> str:
    if not h:
        return "a process that has not written its record yet"
    cmd = h.get("command") or "?"
    return f"pid {h.get('pid')} on host {h.get('host')} (segfast {cmd}, since {h.get('started')})"


def _open_locked(path: Path) -> Optional[int]:
    """Open ``path`` (created if missing, never through a symlink) and flock it; None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_record(fd: int, command: str) -> None:
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "argv": sys.argv[1:],
           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "run_id": _run_id()}
    data = json.dumps(rec).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _acquire(path: Path, command: str, out) -> int:
    for _ in range(20):
        fd = _open_locked(path)
        if fd is not None:
            if _same_file(fd, path):  # not replaced between our open and our flock
                _write_record(fd, command)
                return fd
            os.close(fd)
            continue
        holder = read_holder(path)
        if holder and holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
            # held by an orphan of a dead holder: take it over with a fresh lock file
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}")
            fd = _open_locked(tmp)
            if fd is None:
                continue
            _write_record(fd, command)
            os.replace(tmp, path)
            if _same_file(fd, path):
                return fd
            os.close(fd)
            continue
        raise LockHeldError(f"{out}: another segfast writer holds it: {_describe(holder)}; wait for it to finish "
                            f"or choose another output (lock file {path})")
    raise LockHeldError(f"{out}: could not take the lock {path} (it keeps changing hands)")


def _verify_rank(path: Path, out, timeout: float = 30.0) -> None:
    """(rank > 0) The lock, once rank 0 has it, must name this torchrun job."""
    rid = _run_id()
    deadline = time.monotonic() + timeout
    while True:
        h = read_holder(path)
        if h and h.get("run_id") == rid and rid is not None:
            return
        if h and h.get("run_id") != rid and _held_by_other(path):
            raise LockHeldError(f"{out}: another segfast writer holds it: {_describe(h)}; rank {_rank()} "
                                f"refuses to write there (lock file {path})")
        if time.monotonic() > deadline:
            return  # rank 0 has not taken it (another host's file system, or it failed: it reports why)
        time.sleep(0.05)


def _held_by_other(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out, command: str):
    """Hold the lock of output ``out`` for the body (re-entrant in one process; under torchrun rank 0 holds
    it and the other ranks verify it). Raises :class:`LockHeldError` when another writer holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path)
    if _rank() != 0:
        _verify_rank(path, out)
        yield path
        return
    if key in _held:
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(path, command, out)
    _held[key] = [fd, 1]
    try:
        yield path
    finally:
        del _held[key]
        try:
            os.ftruncate(fd, 0)  # an empty, unlocked file: nobody holds it
        except OSError:
            pass
        os.close(fd)
