"""The one place where segfast writes files: atomically, and with the permissions the umask implies.

Every output file is written under a hidden temporary name in its final directory (``.NAME.tmp-XXXX``),
flushed to disk, given the mode an ordinary ``open(path, "w")`` would have given it (``0o666 & ~umask``:
0644 under umask 022, 0600 under 077), then renamed over ``NAME``; a failure removes the temporary file and
leaves any previous ``NAME`` untouched. ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries
whatever the umask, which is why a plain "mkstemp, then rename" left files the rest of a team could not read.
Directories written whole (a prepared dataset, a checkpoint) are built in a temporary directory made by
:func:`temp_dir`, which gets ``0o777 & ~umask``, and then renamed into place with :func:`install_dir`.

    atomic_path(path)            context manager yielding the temporary path to write; renamed on success
    write_bytes / write_text / write_json / write_parquet(path, ...)
    temp_dir(parent, prefix)     a hidden directory with the umask-implied mode
    install_dir(tmp, out, overwrite)   rename a finished directory onto ``out`` (swapping an old one out)
    file_mode() / dir_mode() / current_umask()
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["current_umask", "file_mode", "dir_mode", "atomic_path", "write_with", "write_bytes", "write_text",
           "write_json", "write_parquet", "temp_dir", "install_dir", "fsync_dir"]


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


@contextlib.contextmanager
def atomic_path(path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception the temporary file
    gets the umask-implied mode, is flushed and renamed onto ``path``. On an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: the writer for {path} removed or never produced its temporary file")
        os.chmod(tmp, file_mode())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
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
    """A new hidden directory in ``parent`` (created if needed) with the umask-implied directory mode."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, dir_mode())
    return d


def install_dir(tmp, out, overwrite: bool, what: str = "output") -> Path:
    """Rename the finished directory ``tmp`` onto ``out``. An existing ``out`` is an error unless
    ``overwrite``; then it is renamed away, ``tmp`` renamed in, and the old one deleted (restored if the
    second rename fails)."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return out
    if not overwrite:
        raise FileExistsError(f"{out}: {what} already exists (pass overwrite=True / --overwrite to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
    return out
