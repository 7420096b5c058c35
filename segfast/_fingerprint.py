"""The content fingerprint of a prepared dataset (issue 15 item 3): sha256 of each data file (the id maps
``users.parquet`` / ``videos.parquet``, ``interactions.parquet``, ``features.npy``, ``vhist.npy``), hashed once
by ``prepare`` and stored in ``manifest.json`` as::

    "fingerprint": {"algorithm": "sha256", "sha256": <digest of the per-file digests>,
                    "files": {NAME: {"size": bytes, "mtime_ns": ..., "sha256": ...}}}

At load the check is cheap: a file whose size and mtime match the record is taken to hold the recorded
content; a file whose size or mtime changed is hashed again (once per process), and its actual digest enters
the dataset's fingerprint, so a run or a score output made on the old content no longer matches. ``segfast
verify`` hashes every file. A dataset prepared before the fingerprint existed has its files hashed when a run,
an evaluation or a score first needs the fingerprint (nothing is written into the dataset; re-run ``prepare``
to store it). No torch here: ``segfast.data.prepared`` imports it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["DATA_FILES", "sha256_file", "compute", "current", "combine"]

DATA_FILES = ("users.parquet", "videos.parquet", "interactions.parquet", "features.npy", "vhist.npy")


def sha256_file(path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def combine(files: dict) -> str:
    """One digest over the per-file digests (names included; the order is the names' order)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}:{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def _record(path: Path, digest=None) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest or sha256_file(path)}


def compute(directory) -> dict:
    """Hash every data file present in ``directory`` (what ``prepare`` stores in the manifest)."""
    d = Path(directory)
    files = {n: _record(d / n) for n in DATA_FILES if (d / n).is_file()}
    return {"algorithm": "sha256", "sha256": combine(files), "files": files}


def current(directory, stored) -> tuple:
    """(fingerprint of the files as they are now, names of the files whose content differs from ``stored``).

    Files whose size and mtime match ``stored`` keep the stored digest (the cheap check); the others, and
    every file when nothing is stored, are hashed."""
    d = Path(directory)
    rec = (stored or {}).get("files") or {}
    files, changed = {}, []
    for n in DATA_FILES:
        p = d / n
        if not p.is_file():
            if n in rec:
                changed.append(n)
            continue
        st = os.stat(p)
        r = rec.get(n)
        if r and r.get("size") == st.st_size and r.get("mtime_ns") == st.st_mtime_ns:
            files[n] = dict(r)
            continue
        files[n] = _record(p)
        if r and r.get("sha256") != files[n]["sha256"]:
            changed.append(n)
    return {"algorithm": "sha256", "sha256": combine(files), "files": files}, changed
