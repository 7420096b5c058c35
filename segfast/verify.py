"""``segfast verify DIR``: check an output against its own record (issue 15 item 7).

What DIR is, is read from its manifest:

- a prepared dataset (``manifest.json`` with ``schema_version``): it loads (schema, columns, sizes), and every
  data file has the size and sha256 that ``prepare`` recorded in ``manifest["fingerprint"]`` (a dataset prepared
  before the fingerprint existed: the load check only, and a note saying so);
- a run directory (``config.json`` of format ``segfast-run``): the config parses, every ``*.safetensors`` file
  (``model``, ``last/``, ``best/``) is readable and matches the tensor digest in its metadata, and the weights
  match the model config they were saved with; ``state.json`` files parse; ``calibration.json`` (when present)
  parses and each of its calibrators belongs to weights one of the run's checkpoints holds;
- a score output (``_manifest.json`` of format ``segfast-scores``): every listed part exists with its row count
  and sha256, no ``part-*.parquet`` is unlisted, ``complete`` agrees with the parts, and the rejected rows file
  has the rows the manifest states.

Returns ``{"path", "kind", "ok", "checked": [...], "problems": [...], "notes": [...]}``; the CLI exits 0 when
ok, 1 when not (2 when DIR is none of the three).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

__all__ = ["verify", "VerifyError"]


class VerifyError(ValueError):
    """DIR is not something segfast verify knows (no prepared, run or score manifest)."""


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _prepared(d: Path, res: dict) -> None:
    from segfast import _fingerprint as fp
    from segfast.data.prepared import load_prepared

    try:
        load_prepared(d)
        res["checked"].append("manifest, schema, columns and row counts")
    except Exception as e:  # noqa: BLE001 - every load failure is a finding
        res["problems"].append(str(e))
    m = _read_json(d / "manifest.json") or {}
    rec = (m.get("fingerprint") or {}).get("files")
    if not rec:
        res["notes"].append("no content fingerprint in manifest.json (prepared before segfast recorded one): "
                            "file contents not verified; re-run prepare to record it")
        return
    for name, r in sorted(rec.items()):
        f = d / name
        if not f.is_file():
            res["problems"].append(f"{f}: missing")
            continue
        size = f.stat().st_size
        if size != r.get("size"):
            res["problems"].append(f"{f}: {size} bytes, the manifest records {r.get('size')}")
            continue
        if fp.sha256_file(f) != r.get("sha256"):
            res["problems"].append(f"{f}: sha256 differs from the manifest's (the content changed)")
            continue
        res["checked"].append(f"{name} ({size} bytes, sha256)")
    extra = [n for n in fp.DATA_FILES if (d / n).is_file() and n not in rec]
    for n in extra:
        res["problems"].append(f"{d / n}: a data file the manifest's fingerprint does not list")
    if fp.combine(rec) != (m.get("fingerprint") or {}).get("sha256"):
        res["problems"].append(f"{d / 'manifest.json'}: fingerprint.sha256 does not match its file digests")


def _run(d: Path, res: dict) -> None:
    from segfast.checkpoint import CheckpointError, load_model_weights, read_run_config
    from segfast.model.model import SegInterestModel

    try:
        cfg = read_run_config(d)
        res["checked"].append("config.json")
    except CheckpointError as e:
        res["problems"].append(str(e))
        return
    files = sorted(p for p in d.rglob("*.safetensors") if not any(x.startswith(".") for x in p.relative_to(d).parts))
    if not files:
        res["problems"].append(f"{d}: no weights (*.safetensors)")
    for f in files:
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                if f.name == "model.safetensors":
                    load_model_weights(f, SegInterestModel(cfg["model"]))
                else:
                    from segfast.checkpoint import load_tensors

                    load_tensors(f)
            for x in w:
                res["notes"].append(str(x.message))
            res["checked"].append(f"{f.relative_to(d)} (tensor digest" + (", model config)" if f.name == "model.safetensors" else ")"))
        except Exception as e:  # noqa: BLE001
            res["problems"].append(str(e))
    for f in sorted(p for p in d.rglob("*.json") if not any(x.startswith(".") for x in p.relative_to(d).parts)):
        if _read_json(f) is None:
            res["problems"].append(f"{f}: unreadable JSON")
    _calibration(d, res)


def _calibration(d: Path, res: dict) -> None:
    """RUN/calibration.json (segfast.calibration), when present: every entry parses and was fitted for weights
    that one of the run's checkpoints (best, last, the exported model) holds."""
    from segfast import calibration as cal

    f = d / cal.CALIBRATION_FILE
    if not f.is_file():
        return
    try:
        entries = cal._read_file(f)
    except cal.CalibrationError as e:
        res["problems"].append(str(e))
        return
    have = {}
    for which in ("best", "last", "final"):
        try:
            have.setdefault(cal.checkpoint_digest(d, which)["digest"], which)
        except Exception:  # noqa: BLE001 - a missing or unreadable checkpoint is reported above
            pass
    for k, c in enumerate(entries):
        dg = (c.checkpoint or {}).get("digest")
        if dg in have:
            res["checked"].append(f"{cal.CALIBRATION_FILE} entry {k} ({c.form}, for the {have[dg]} weights)")
        else:
            res["problems"].append(f"{f}: entry {k} was fitted for weights (digest {str(dg)[:12]}) that no checkpoint "
                                   f"of this run holds; refit with segfast calibrate --run-dir {d} --data D")


_PART = re.compile(r"^part-\d{5,}\.parquet$")


def _scores(d: Path, m: dict, res: dict) -> None:
    import pyarrow.parquet as pq

    from segfast import _fingerprint as fp

    parts = m.get("parts") or []
    listed = set()
    for rec in parts:
        name = rec.get("file", "")
        listed.add(name)
        f = d / name
        if not f.is_file():
            res["problems"].append(f"{f}: missing (listed in _manifest.json)")
            continue
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            res["problems"].append(f"{f}: not a readable Parquet file ({e})")
            continue
        if rows != rec.get("rows"):
            res["problems"].append(f"{f}: {rows} rows, the manifest records {rec.get('rows')}")
        elif rec.get("sha256") and fp.sha256_file(f) != rec["sha256"]:
            res["problems"].append(f"{f}: sha256 differs from the manifest's")
        else:
            res["checked"].append(f"{name} ({rows} rows, sha256)")
    for n in sorted(os.listdir(d)):
        if _PART.match(n) and n not in listed:
            res["problems"].append(f"{d / n}: a part the manifest does not list")
    n_parts = m.get("n_parts")
    complete = isinstance(n_parts, int) and len(parts) == n_parts
    if bool(m.get("complete")) != complete:
        res["problems"].append(f"{d / '_manifest.json'}: complete={m.get('complete')} but {len(parts)} of "
                               f"{n_parts} parts are listed")
    elif not complete:
        res["problems"].append(f"{d}: incomplete ({len(parts)} of {n_parts} parts); rerun the same score to finish")
    rej = m.get("rejected") or {}
    if rej.get("file"):
        f = d / rej["file"]
        try:
            rows = pq.ParquetFile(f).metadata.num_rows
            if rows != rej.get("rows"):
                res["problems"].append(f"{f}: {rows} rows, the manifest records {rej.get('rows')}")
            else:
                res["checked"].append(f"{rej['file']} ({rows} rows)")
        except Exception as e:  # noqa: BLE001
            res["problems"].append(f"{f}: missing or unreadable ({e})")


def verify(path) -> dict:
    """Check DIR (a prepared dataset, a run directory or a score output) against its manifest."""
    d = Path(path)
    if not d.is_dir():
        raise VerifyError(f"{d}: not a directory (expected a prepared dataset, a run directory or a score output)")
    res = {"path": str(d), "kind": None, "ok": False, "checked": [], "problems": [], "notes": []}
    sm = _read_json(d / "_manifest.json")
    rc = _read_json(d / "config.json")
    pm = _read_json(d / "manifest.json")
    if isinstance(sm, dict) and sm.get("format") == "segfast-scores":
        res["kind"] = "scores"
        _scores(d, sm, res)
    elif isinstance(rc, dict) and rc.get("format") == "segfast-run":
        res["kind"] = "run"
        _run(d, res)
    elif isinstance(pm, dict) and "schema_version" in pm:
        res["kind"] = "prepared"
        _prepared(d, res)
    elif isinstance(pm, dict) and pm.get("format") == "segfast-scores":
        raise VerifyError(f"{d}: a version-1 score output (manifest.json); rerun the same score to migrate it")
    else:
        raise VerifyError(f"{d}: no segfast manifest (manifest.json of a prepared dataset, config.json of a run, "
                          "_manifest.json of a score output)")
    res["ok"] = not res["problems"]
    return res
