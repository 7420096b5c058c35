"""The one place where segfast writes files: atomically, and with the permissions the umask implies.

Every output file is written under a hidden temporary name in its final directory, flushed to disk, given the
mode an ordinary ``open(path, "w")`` would have given it (``0o666 & ~umask``: 0644 under umask 022, 0600 under
077), then renamed over ``NAME`` and the directory flushed; a failure removes the temporary file and leaves any
previous ``NAME`` untouched. ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries whatever the umask,
which is why a plain "mkstemp, then rename" left files the rest of a team could not read.

Temporary names (files and directories): ``.NAME.TAG-HOST-PID-TOKEN``, where TAG says what it is (``tmp``, ``old``,
``scores``), HOST is 8 hex digits of a hash of the host name, PID the writing process and TOKEN 16 hex digits
from :mod:`secrets` (so nobody can plant a file or symlink under the name in advance). A temporary file is
created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing entry, symlinks included, is never opened; a new name
is drawn), a temporary directory with ``mkdir`` (which never follows a symlink either); before the rename the
file is reopened with ``O_NOFOLLOW`` and must still be a regular file. :func:`remove_stale_temps` deletes the
temporaries of this naming left by a killed process (same host, PID no longer alive) at the start of the next
run; entries of other hosts or of live processes are left alone.

    atomic_path(path)            context manager yielding the temporary path to write; renamed on success
    create_temp(path) / commit_temp(tmp, path)   the two halves of atomic_path, for streaming writers
    write_bytes / write_text / write_json / write_parquet(path, ...)
    temp_dir(parent, prefix)     a hidden directory with the umask-implied mode
    install_dir(tmp, out, overwrite)   rename a finished directory onto ``out`` (swapping an old one out)
    remove_stale_temps(directory, name=None)   leftovers of killed segfast writers
    file_mode() / dir_mode() / current_umask()
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["current_umask", "file_mode", "dir_mode", "atomic_path", "write_with", "write_bytes", "write_text",
           "write_json", "write_parquet", "temp_dir", "install_dir", "fsync_dir", "temp_name", "create_temp",
           "commit_temp", "remove_stale_temps", "pid_alive"]

HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[a-z]+)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{16}$")
_LEGACY_RE = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")  # tempfile.mkdtemp names of segfast <= 0.x
LEGACY_AGE_S = 3600.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temp_name(name: str, tag: str = "tmp") -> str:
    """A fresh, unpredictable hidden name for a temporary of ``name``: ``.NAME.TAG-HOST-PID-TOKEN``."""
    return f".{name}.{tag}-{HOST}-{os.getpid()}-{secrets.token_hex(8)}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc/self/status on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # fallback: set and restore (not thread-safe, but only where /proc is missing)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a new regular file gets from ``open()`` under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a new directory gets from ``mkdir()`` under the current umask."""
    return 0o777 & ~current_umask()


def fsync_dir(path) -> None:
    """Flush a directory entry (after a rename); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp(path) -> Path:
    """Create an empty temporary file beside ``path`` (its directory made if needed) with ``O_EXCL |
    O_NOFOLLOW`` under an unpredictable name, with the umask-implied mode; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        tmp = path.parent / temp_name(path.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, file_mode())
        except FileExistsError:  # taken (or planted): draw another name
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name} (16 names taken)")


def commit_temp(tmp, path, fsync: bool = True) -> Path:
    """Finish a temporary made by :func:`create_temp`: check it is still a regular file (never following a
    symlink), give it the umask-implied mode, flush it, rename it onto ``path`` and flush the directory."""
    tmp, path = Path(tmp), Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"{tmp}: the writer for {path} removed or never produced its temporary "
                                "file") from None
    except OSError as e:  # ELOOP: replaced by a symlink
        raise OSError(e.errno, f"{tmp}: temporary file of {path} is no longer a regular file ({e.strerror})") \
            from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{tmp}: temporary file of {path} is no longer a regular file")
        os.fchmod(fd, file_mode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (:func:`create_temp`); when the block ends without an exception
    the temporary file gets the umask-implied mode, is flushed and renamed onto ``path``. On an exception it is
    removed."""
    path = Path(path)
    tmp = create_temp(path)
    try:
        yield tmp
        commit_temp(tmp, path, fsync=fsync)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_with(path, writer: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Atomically create ``path`` with ``writer(tmp_path)`` (any library call that writes a file by name)."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path, data: bytes, fsync: bool = True) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync)


def write_text(path, text: str, fsync: bool = True, encoding: str = "utf-8") -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding), fsync=fsync)


def write_json(path, obj: Any, indent: Optional[int] = 2, sort_keys: bool = False, default=None,
               fsync: bool = True) -> Path:
    """Atomically write ``obj`` as JSON (with a final newline)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    return write_text(path, text, fsync=fsync)


def write_parquet(path, table, compression: str = "zstd", fsync: bool = True) -> Path:
    """Atomically write a pyarrow Table as Parquet."""
    import pyarrow.parquet as pq

    return write_with(path, lambda tmp: pq.write_table(table, tmp, compression=compression), fsync=fsync)


def temp_dir(parent, prefix: str) -> Path:
    """A new hidden directory ``PREFIX + HOST-PID-TOKEN`` in ``parent`` (created if needed) with the
    umask-implied directory mode. ``prefix`` is ``.NAME.TAG-`` (e.g. ``.out.tmp-``), so that
    :func:`remove_stale_temps` recognises it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        d = parent / f"{prefix}{HOST}-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.mkdir(d, dir_mode())
        except FileExistsError:
            continue
        os.chmod(d, dir_mode())
        return d
    raise FileExistsError(f"{parent}: could not create a temporary directory {prefix}* (16 names taken)")


def _remove_entry(p: Path) -> None:
    """Delete a file, a symlink (never its target) or a directory tree."""
    st = os.lstat(p)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        os.unlink(p)


def remove_stale_temps(directory, name=None) -> list:
    """Remove the temporaries of segfast's naming (``.NAME.TAG-HOST-PID-TOKEN``, of ``name`` only when given)
    in ``directory`` that a process on this host left when it died (PID not alive). A stale ``.NAME.old-*``
    directory (a kill between the two renames of :func:`install_dir`) is renamed back to ``NAME`` when
    ``NAME`` is missing, else deleted. The temporary directories of earlier segfast versions (``.NAME.tmp-`` and
    8 characters of ``tempfile.mkdtemp``, which name no PID) are removed when ``name`` is given and they were
    last modified over :data:`LEGACY_AGE_S` ago. Returns the paths removed or restored."""
    import time

    directory = Path(directory)
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    done = []
    for n in sorted(entries):
        m = _TEMP_RE.match(n)
        old = _LEGACY_RE.match(n) if m is None and name is not None else None
        if old is not None and old["name"] == str(name):
            p = directory / n
            try:
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode) and time.time() - st.st_mtime > LEGACY_AGE_S:
                    _remove_entry(p)
                    done.append(p)
            except FileNotFoundError:
                pass
            continue
        if m is None or (name is not None and m["name"] != str(name)) or m["host"] != HOST:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        p = directory / n
        try:
            final = directory / m["name"]
            if m["tag"] == "old" and not os.path.lexists(final) and p.is_dir() and not p.is_symlink():
                os.replace(p, final)
            else:
                _remove_entry(p)
        except FileNotFoundError:
            continue
        done.append(p)
    if done:
        fsync_dir(directory)
    return done


def install_dir(tmp, out, overwrite: bool, what: str = "output") -> Path:
    """Rename the finished directory ``tmp`` onto ``out``. An existing ``out`` is an error unless
    ``overwrite``; then it is renamed away, ``tmp`` renamed in, and the old one deleted (restored if the
    second rename fails). Whether ``out`` may be replaced at all is the caller's check (segfast._guard)."""
    tmp, out = Path(tmp), Path(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return out
    if not overwrite:
        raise FileExistsError(f"{out}: {what} already exists (pass overwrite=True / --overwrite to replace it)")
    old = out.parent / temp_name(out.name, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove_entry(old)
    fsync_dir(out.parent)
    return out
