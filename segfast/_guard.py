"""Never destroy what segfast did not create: the checks every writing command makes on its ``--out``.

1. ``--out`` against the inputs (:func:`check_out_vs_inputs`): after ``os.path.realpath`` (symlinks and
   ``..`` resolved), an output that is one of the inputs, lies inside one, or contains one is refused
   (``prepare --input``/``--features``; ``train --data``; ``score``, ``thumbnails``, ``edit`` ``--data``,
   ``--pairs``, ``--run-dir``).
2. ``--overwrite`` replaces only what segfast itself wrote for the same command kind, recognised by its
   manifest:

   - ``prepare``: a directory whose ``manifest.json`` says ``"kind": "segfast-prepared"`` (or, for datasets
     prepared before the kind was recorded, has ``schema_version`` 1, a known ``source``, ``counts`` and
     ``features``), holding nothing but the prepared files (:data:`PREPARED_FILES`) and segfast's own hidden
     temporaries (:func:`check_replace_prepared`);
   - ``score``: a directory whose ``_manifest.json`` is a ``segfast-scores`` manifest
     (``segfast.scoring.outdir``, which also refuses any file beside it that the scorer did not write);
   - ``train`` never replaces anything: it resumes a run of the same configuration or refuses;
   - ``thumbnails`` / ``edit`` (one Parquet file): a Parquet file whose schema metadata has the key
     ``segfast.output`` (:data:`FILE_META_KEY`) with ``{"kind": "thumbnails"}`` / ``{"kind": "edit"}``
     (:func:`check_replace_file`). Files written before that key existed are not recognised: remove them by
     hand once.

Every refusal is an :class:`OutputGuardError` (a ``ValueError``: one line on stderr and exit code 2 from the
CLI) that says what was refused and why; it suggests ``--overwrite`` only where ``--overwrite`` would help.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["OutputGuardError", "PREPARED_KIND", "PREPARED_FILES", "FILE_META_KEY", "check_out_vs_inputs",
           "check_replace_prepared", "check_replace_file", "file_output_kind", "file_metadata"]

PREPARED_KIND = "segfast-prepared"
PREPARED_FILES = frozenset({"manifest.json", "interactions.parquet", "users.parquet", "videos.parquet",
                            "features.npy", "vhist.npy"})
FILE_META_KEY = b"segfast.output"


class OutputGuardError(ValueError):
    """An ``--out`` that would overwrite an input or something segfast did not write; the message says which."""


def _real(p) -> str:
    return os.path.realpath(os.fspath(p))


def _inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def check_out_vs_inputs(out, inputs: Mapping[str, object], command: str = "", out_flag: str = "--out") -> None:
    """Refuse ``out`` when, resolved with ``os.path.realpath``, it is, contains or lies inside one of
    ``inputs`` ({flag or name: path}; None values are skipped)."""
    o = _real(out)
    for flag, path in inputs.items():
        if path is None or path == "":
            continue
        i = _real(path)
        if o == i:
            how = "is"
        elif _inside(o, i):
            how = "is inside"
        elif _inside(i, o):
            how = "contains"
        else:
            continue
        shown = f" ({o})" if o != os.path.abspath(os.fspath(out)) else ""
        who = f"{command} " if command else ""
        raise OutputGuardError(f"{out_flag} {out}{shown} {how} the input {flag} {path}: segfast {who}never writes "
                               f"over its own input; choose an {out_flag} outside it")


def _prepared_manifest(out: Path) -> Optional[dict]:
    try:
        with open(out / "manifest.json") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    if m.get("kind") == PREPARED_KIND:
        return m
    from segfast.data.prepared import SCHEMA_VERSION, SOURCES

    if "kind" not in m and m.get("schema_version") == SCHEMA_VERSION and m.get("source") in SOURCES \
            and isinstance(m.get("counts"), dict) and "features" in m:
        return m  # prepared before "kind" was recorded
    return None


def _segfast_temp(name: str) -> bool:
    from segfast._io import _TEMP_RE

    return bool(_TEMP_RE.match(name))


def check_replace_prepared(out, overwrite: bool) -> None:
    """May ``prepare`` write its dataset at ``out``? Nothing there: yes. Otherwise only with ``overwrite`` and
    only over a prepared dataset that holds nothing else; every other case is an :class:`OutputGuardError`."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputGuardError(f"--out {out}: exists and is not a directory segfast prepare wrote; segfast "
                               "replaces only its own prepared datasets: choose another --out")
    if _prepared_manifest(out) is None:
        names = sorted(os.listdir(out))
        if not names:  # nothing to lose
            if not overwrite:
                raise FileExistsError(f"{out}: output already exists (an empty directory; pass overwrite=True "
                                      "/ --overwrite to replace it)")
            return
        raise OutputGuardError(f"--out {out}: exists and is not a prepared dataset (no manifest.json of segfast "
                               f"prepare; holds {names[:5]}); --overwrite replaces only a dataset segfast prepare "
                               "wrote: choose another --out")
    foreign = sorted(n for n in os.listdir(out) if n not in PREPARED_FILES and not _segfast_temp(n))
    if foreign:
        raise OutputGuardError(f"--out {out}: a prepared dataset that also holds files prepare did not write "
                               f"({foreign[:5]}); they would be deleted with it: move them out or choose "
                               "another --out")
    if not overwrite:
        raise FileExistsError(f"{out}: a prepared dataset already exists there (pass overwrite=True / "
                              "--overwrite to replace it)")


def file_metadata(kind: str) -> dict:
    """Parquet schema metadata that marks a single-file output of segfast ``kind`` (thumbnails, edit)."""
    from segfast import __version__

    return {FILE_META_KEY: json.dumps({"kind": kind, "segfast": __version__}).encode()}


def file_output_kind(path) -> Optional[str]:
    """The ``kind`` a segfast single-file output records in its Parquet metadata; None for anything else."""
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(str(path)).metadata or {}
        return json.loads(meta[FILE_META_KEY].decode()).get("kind")
    except Exception:  # noqa: BLE001 - not Parquet, no key, bad JSON: not ours
        return None


def check_replace_file(path, kind: str, overwrite: bool) -> None:
    """May segfast ``kind`` write its Parquet file at ``path``? Nothing there: yes. A directory: never. A file:
    only with ``overwrite`` and only when segfast ``kind`` wrote it (:func:`file_output_kind`)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise IsADirectoryError(f"--out {path}: is a directory; expected the path of a Parquet file to write")
    found = None if path.is_symlink() else file_output_kind(path)
    if found != kind:
        what = f"an output of segfast {found}" if found else f"not a file segfast {kind} wrote"
        raise OutputGuardError(f"--out {path}: exists and is {what}; --overwrite replaces only a file segfast "
                               f"{kind} wrote: choose another --out")
    if not overwrite:
        raise FileExistsError(f"{path}: output already exists (pass overwrite=True / --overwrite to replace it)")
