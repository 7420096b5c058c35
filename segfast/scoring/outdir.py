"""The output directory: identity fingerprints, resume state, the manifest, and the version-1 layout migration.

Layout (format version 2): ``part-NNNNN.parquet`` (the scores; the only names a Parquet dataset reader sees),
``_manifest.json``, ``_rejected/part-00000.parquet`` (with on_unknown="skip"), ``_manifest.rank-NNNNN.json``
while a sharded job runs, and ``.NAME.tmp-*`` temp files of a write in progress. Names starting with ``_`` or
``.`` are ignored by pyarrow's dataset discovery (and so by pandas, and by ``pq.read_table(out)``).

Version 1 wrote ``manifest.json``, ``rejected.parquet`` and ``manifest.rank-NNNNN.json`` beside the parts. A
rerun of the same job over such a directory migrates it in place (rejected rows moved, manifest rewritten,
the old names removed; each step a rename, so a kill in between is picked up by the next run) and resumes.

What ``overwrite`` may replace: only a directory whose ``_manifest.json`` (or version-1 ``manifest.json``) is a
``segfast-scores`` manifest and which holds nothing but the scorer's names. A ``manifest.json`` of another kind
(a prepared dataset's) is a foreign file, and so are Parquet parts without a scores manifest (the scorer writes
its manifest before any part); both are refused with or without ``overwrite``, and the message then does not
suggest it (segfast._guard has the same rule for the other commands).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from segfast.scoring.common import (FORMAT, MANIFEST, REJECTED_DIR, REJECTED_FILE, VERSION, OutDirError,
                                    atomic_json, read_json, sha256_file)

__all__ = ["run_fingerprint", "data_fingerprint", "identity_diff", "setup_out_dir", "rank_file", "MANIFEST"]

_PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
_RANK_RE = re.compile(r"^_manifest\.rank-\d{5}\.json$")
_TMP_RE = re.compile(r"^\.(part-\d{5,}\.parquet|_manifest(\.rank-\d{5})?\.json)\.tmp-.*$")
# format version 1 (read for migration and for overwrite; never written)
_V1_MANIFEST, _V1_REJECTED = "manifest.json", "rejected.parquet"
_V1_RANK_RE = re.compile(r"^manifest\.rank-\d{5}\.json$")
_V1_TMP_RE = re.compile(r"^\.(manifest(\.rank-\d{5})?\.json|rejected\.parquet)\.tmp-.*$")


def rank_file(rank: int) -> str:
    return f"_manifest.rank-{rank:05d}.json"


def run_fingerprint(meta: dict) -> str:
    """sha256 of the model config and the weights' tensor digest (stored in the safetensors metadata)."""
    from safetensors import safe_open

    mc = meta["model_config"]
    cfg = mc.to_dict() if hasattr(mc, "to_dict") else dict(mc)
    cfg.pop("backend", None)  # an execution choice, not part of the weights
    with safe_open(str(meta["weights"]), framework="pt", device="cpu") as f:
        digest = (f.metadata() or {}).get("segfast_sha256")
    if digest is None:
        digest = sha256_file(Path(meta["weights"]))
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(digest.encode())
    return h.hexdigest()


def data_fingerprint(prepared) -> dict:
    from segfast.checkpoint import data_fingerprint as _base

    fp = dict(_base(prepared))
    h = hashlib.sha256()
    for name in ("users.parquet", "videos.parquet", "interactions.parquet", "vhist.npy"):
        f = Path(prepared.path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(sha256_file(f).encode())
    fp["files_sha256"] = h.hexdigest()
    feats = (prepared.manifest.get("features") or {})
    fp["features"] = None if not feats else {k: feats.get(k) for k in ("dim", "dtype", "rows")}
    return fp


def identity_diff(a: dict, b: dict) -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out += [f"{k}.{x}" for x in identity_diff(a[k], b[k])]
            else:
                out.append(k)
    return out




def _is_ours(name: str) -> bool:
    return bool(name in (MANIFEST, REJECTED_DIR, _V1_MANIFEST, _V1_REJECTED) or _PART_RE.match(name)
                or _RANK_RE.match(name) or _TMP_RE.match(name) or _V1_RANK_RE.match(name) or _V1_TMP_RE.match(name))


def _rejected_ours(path: Path) -> bool:
    """``_rejected/`` holds only the scorer's own files (so overwrite may delete it)."""
    return all(n == REJECTED_FILE or n.startswith(f".{REJECTED_FILE}.tmp-") for n in os.listdir(path))


def _remove_ours(out: Path, names) -> None:
    for n in names:
        p = out / n
        if n == REJECTED_DIR and p.is_dir():
            for x in os.listdir(p):
                (p / x).unlink(missing_ok=True)
            p.rmdir()
        else:
            p.unlink(missing_ok=True)


def _check_part(out: Path, rec: dict) -> bool:
    """A finished part is present with the right row count and checksum."""
    import pyarrow.parquet as pq

    f = out / rec.get("file", "")
    if not f.is_file():
        return False
    try:
        if pq.ParquetFile(f).metadata.num_rows != rec.get("rows"):
            return False
    except Exception:  # noqa: BLE001 - unreadable: redo it
        return False
    return rec.get("sha256") is None or sha256_file(f) == rec["sha256"]


def _migrate_v1(out: Path, prev: dict, names: list) -> dict:
    """Rewrite a version-1 output of the same job into the version-2 layout; return the new manifest."""
    rej = out / _V1_REJECTED
    if rej.is_file():
        (out / REJECTED_DIR).mkdir(exist_ok=True)
        os.replace(rej, out / REJECTED_DIR / REJECTED_FILE)
    new = dict(prev, version=VERSION, migrated_from_version=prev.get("version", 1))
    if isinstance(new.get("rejected"), dict) and new["rejected"].get("file"):
        new["rejected"] = dict(new["rejected"], file=f"{REJECTED_DIR}/{REJECTED_FILE}")
    atomic_json(out / MANIFEST, new)
    for n in names:
        if _V1_RANK_RE.match(n):
            os.replace(out / n, out / ("_" + n))
        elif _V1_TMP_RE.match(n):
            (out / n).unlink(missing_ok=True)
    (out / _V1_MANIFEST).unlink(missing_ok=True)
    return new


def _scores_manifest(path: Path) -> bool:
    """A manifest file that is really the scorer's (format segfast-scores): only then are the names around it
    the scorer's (a prepared dataset's manifest.json shares the version-1 manifest's name)."""
    m = read_json(path)
    return isinstance(m, dict) and m.get("format") == FORMAT


def _same_job(man, identity: dict) -> bool:
    return isinstance(man, dict) and man.get("format") == FORMAT and man.get("identity") == identity


def setup_out_dir(out: Path, identity: dict, overwrite: bool) -> tuple:
    """(rank 0) Validate, migrate or clear ``out``; return (the parts already finished there by part number,
    the format version the output was migrated from or None)."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not _is_ours(n)]
    foreign += [n for n in (MANIFEST, _V1_MANIFEST) if n in names and not _scores_manifest(out / n)]
    if REJECTED_DIR in names and not ((out / REJECTED_DIR).is_dir() and _rejected_ours(out / REJECTED_DIR)):
        foreign.append(f"{REJECTED_DIR}/ (with other files)")
    prev = read_json(out / MANIFEST) if MANIFEST not in foreign and (out / MANIFEST).is_file() else None
    if prev is None and _V1_MANIFEST not in foreign and (out / _V1_MANIFEST).is_file():
        old = read_json(out / _V1_MANIFEST)
        if _same_job(old, identity) and old.get("version", 1) == 1 and not foreign:
            prev = _migrate_v1(out, old, names)  # same job, old layout: migrate, then resume below
            names = sorted(p.name for p in out.iterdir())
        else:
            prev = old
    elif prev is not None and _V1_MANIFEST not in foreign and (out / _V1_MANIFEST).is_file():
        (out / _V1_MANIFEST).unlink()  # a migration killed after its manifest was written
        names.remove(_V1_MANIFEST)
    if not _same_job(prev, identity):
        ours = [n for n in names if _is_ours(n)]
        if prev is None and not names:
            return {}, None
        if foreign and prev is None:
            raise OutDirError(f"{out}: not empty and not a segfast score output (holds {foreign[:5]}); --overwrite "
                              "replaces only a directory segfast score wrote: choose an empty or new directory")
        if foreign:
            raise OutDirError(f"{out}: holds files the scorer did not write ({foreign[:5]}) beside its output; "
                              "remove them or choose another directory")
        if prev is None and any(_PART_RE.match(n) for n in ours):  # parts are written after the manifest
            raise OutDirError(f"{out}: holds Parquet parts but no segfast score manifest ({ours[:5]}); "
                              "--overwrite replaces only an output segfast score wrote: remove them or choose "
                              "another directory")
        if not overwrite:
            if isinstance(prev, dict) and prev.get("format") == FORMAT:
                diff = identity_diff(prev.get("identity") or {}, identity)
                raise OutDirError(f"{out}: holds scores of a different run or input (differs in {diff}); pass "
                                  "overwrite=True (--overwrite) to replace them, or choose another directory")
            raise OutDirError(f"{out}: holds files of an unidentified scoring job ({ours[:5]}); pass "
                              "overwrite=True (--overwrite) to replace them")
        _remove_ours(out, ours)
        return {}, None
    if foreign:
        raise OutDirError(f"{out}: holds files the scorer did not write ({foreign[:5]}) beside its output; a "
                          "Parquet reader of the directory would see them: remove them or choose another directory")
    for n in names:  # temp files of a killed run
        if _TMP_RE.match(n) or _V1_TMP_RE.match(n):
            (out / n).unlink(missing_ok=True)
    if (out / REJECTED_DIR).is_dir():
        for x in os.listdir(out / REJECTED_DIR):
            if x != REJECTED_FILE:
                (out / REJECTED_DIR / x).unlink(missing_ok=True)
    recs = {}
    sources = [prev] + [read_json(out / n) for n in names if _RANK_RE.match(n)]
    for src in sources:
        if not isinstance(src, dict) or src.get("identity") != identity:
            continue
        for rec in src.get("parts", []):
            p = rec.get("part")
            if isinstance(p, int) and p not in recs and _check_part(out, rec):
                recs[p] = rec
    for n in names:
        if _RANK_RE.match(n):
            (out / n).unlink(missing_ok=True)
    return recs, prev.get("migrated_from_version")

