"""Clean failures of the CLI: every expected failure ends with one line on stderr and a documented exit code.

    EXIT_USAGE = 2        bad input or usage (a malformed file, a wrong flag, an output that exists or is locked)
    EXIT_IO = 3           the disk is full (ENOSPC / EDQUOT), permission denied or a read-only file system,
                          or another operating-system I/O error; the message names the file
    EXIT_NONFINITE = 4    training (or SegRec) met a non-finite loss (FloatingPointError, names the step)
    EXIT_CUDA = 5         a CUDA error (out of memory, illegal address, a failed launch)
    EXIT_INTERRUPTED = 130   Ctrl-C (SIGINT); SIGTERM exits 143 (128 + 15)

Whatever fails, nothing half-written is left under the final name: outputs are written under temporary names
and renamed (``segfast._io``), and the temporaries are removed on the way out. SIGTERM is turned into
:class:`Terminated` (a ``KeyboardInterrupt``) by :func:`handle_sigterm`, so it takes the same clean path as
Ctrl-C. ``segfast prepare`` checks the free space against the size it is about to write before it starts
(:func:`check_free_space`) and reserves the space of its memory-mapped outputs (:func:`reserve`), so a full disk
is an ``OSError`` naming the file rather than a SIGBUS in the middle of a memmap write.

Unexpected exceptions (bugs) still end in a traceback; ``SEGFAST_DEBUG=1`` shows the traceback of the expected
ones too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

__all__ = ["EXIT_USAGE", "EXIT_IO", "EXIT_NONFINITE", "EXIT_CUDA", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "Terminated", "DiskSpaceError", "classify", "handle_sigterm", "check_free_space", "reserve",
           "human_bytes"]

EXIT_USAGE = 2
EXIT_IO = 3
EXIT_NONFINITE = 4
EXIT_CUDA = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (temporaries removed)."""


class DiskSpaceError(OSError):
    """Not enough free space for an output (raised before anything is written)."""

    def __init__(self, message: str, filename: Optional[str] = None):
        super().__init__(errno.ENOSPC, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def _os_message(e: OSError, where=None) -> str:
    what = e.strerror or str(e)
    names = [n for n in (e.filename, getattr(e, "filename2", None)) if n]
    if names:
        return f"{' -> '.join(map(str, names))}: {what}"
    return f"{what} (writing {where})" if where is not None else what


def _is_cuda_error(e: BaseException) -> bool:
    name = type(e).__name__
    if name in ("OutOfMemoryError", "AcceleratorError", "CudaError"):
        return True
    if isinstance(e, RuntimeError):
        head = str(e).lstrip()
        return head.startswith(("CUDA error", "CUDA out of memory", "CUDA driver error", "cuDNN error",
                                "CUBLAS_STATUS", "NCCL error", "Triton Error [CUDA]"))
    return False


def classify(e: BaseException, where=None) -> Optional[tuple[int, str]]:
    """(exit code, one-line message) of an expected failure, or None for an unexpected one (a bug).
    ``where``: the output being written, named when the error's own text names no file."""
    if isinstance(e, Terminated):
        return EXIT_TERMINATED, "terminated (SIGTERM); temporary files removed, nothing half-written kept"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted; temporary files removed, nothing half-written kept"
    if isinstance(e, FloatingPointError):
        return EXIT_NONFINITE, str(e)
    if isinstance(e, NotADirectoryError):  # a file where a directory is expected (--out file/sub)
        return EXIT_USAGE, f"not a directory: {_os_message(e, where)}"
    if isinstance(e, DiskSpaceError):
        return EXIT_IO, str(e)
    if not isinstance(e, OSError) or e.errno is None:
        # pyarrow's OSError, safetensors' SafetensorError: the reason only in the text, often without the file
        text = (str(e).strip().splitlines() or [""])[0]
        tail = "" if where is None or str(where) in text else f" (writing {where})"
        if any(m in text for m in ("No space left on device", "Disk quota exceeded", "os error 28")):
            return EXIT_IO, f"no space left on device: {text}{tail}; free some space and rerun (nothing " \
                            "half-written is kept)"
        if any(m in text for m in ("Permission denied", "Read-only file system", "os error 13", "os error 30")):
            return EXIT_IO, f"cannot write: {text}{tail}"
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return EXIT_IO, f"no space left on device: {_os_message(e, where)}; free some space and rerun (nothing " \
                        "half-written is kept)"
    if isinstance(e, OSError) and e.errno in _DENIED:
        return EXIT_IO, f"cannot write: {_os_message(e, where)}"
    if _is_cuda_error(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return EXIT_CUDA, first if first.startswith("CUDA") else f"CUDA error: {first}"
    if isinstance(e, OSError) and e.errno is not None and not isinstance(
            e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return EXIT_IO, f"I/O error: {_os_message(e, where)}"
    return None


@contextlib.contextmanager
def handle_sigterm():
    """While the block runs (main thread only), SIGTERM raises :class:`Terminated` like Ctrl-C raises
    KeyboardInterrupt; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # not settable here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_free_space(directory, need_bytes: int, what: str, margin: float = 1.05) -> None:
    """Raise :class:`DiskSpaceError` when the file system of ``directory`` (its nearest existing ancestor) has
    less than ``need_bytes * margin`` bytes free. Called before anything is written."""
    d = Path(os.path.abspath(directory))
    while not d.exists() and d != d.parent:
        d = d.parent
    free = shutil.disk_usage(d).free
    need = int(need_bytes * margin)
    if free < need:
        raise DiskSpaceError(f"{directory}: {what} needs about {human_bytes(need)} but only {human_bytes(free)} "
                             f"is free on that file system (free some space or choose another --out)",
                             str(directory))


def reserve(path, nbytes: int) -> None:
    """Allocate ``nbytes`` of the file ``path`` now (posix_fallocate), so that a full disk is an OSError naming
    the file here rather than a SIGBUS when a memory map of it is written later. No-op where unsupported."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, int(nbytes))
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)
