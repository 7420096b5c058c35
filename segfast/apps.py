"""Applications of segment interest (SPEC section 9): personalised thumbnails and personalised editing.

Both come straight from the Task-1 logits p of the N real segments of a (user, video) pair:

- Thumbnail: the segment with the highest logit (ties: the earliest), time range
  [5000 i, min(5000 (i + 1), duration)) ms.
- Edit: the segments whose interest sigmoid(p_i) is strictly below ``threshold`` are skipped; consecutive
  skipped segments are merged into one range [5000 a, min(5000 (b + 1), duration)).

Durations: a video's duration is the largest ``duration_ms`` over its rows in the prepared dataset (the same
row that gives ``videos.n_segments``, the largest N). The file-level functions score the pairs with
``segfast.scoring.score`` (pairs Parquet: int64 user_id, video_id[, time_ms]; the same scoring options:
backend, batch size, the unknown-id policy ``on_unknown`` "error" / "skip") into a temporary directory next
to ``out_path`` and write one Parquet file atomically (``segfast._io``), one row per scored pair in input
order. ``out_path`` may not be (or lie inside) the pairs, the prepared dataset or the run directory; an existing
output is refused unless ``overwrite``, and even then unless segfast wrote it for the same command: the file's
Parquet schema metadata key ``segfast.output`` holds ``{"kind": "thumbnails"}`` / ``{"kind": "edit"}``
(segfast._guard).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from segfast import MAX_SLOTS, SEGMENT_MS, _io

__all__ = ["segment_range", "thumbnail_segment", "skip_ranges", "thumbnails", "edit"]


def _check_scores(scores, duration_ms: int) -> tuple[np.ndarray, int]:
    duration_ms = int(duration_ms)
    if not 0 < duration_ms < MAX_SLOTS * SEGMENT_MS:
        raise ValueError(f"duration_ms={duration_ms}: expected 0 < duration_ms < {MAX_SLOTS * SEGMENT_MS}")
    n = -(-duration_ms // SEGMENT_MS)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] < n:
        raise ValueError(f"{s.shape[0]} scores for a video of {duration_ms} ms, which has {n} segments")
    s = s[:n]
    if not np.isfinite(s).all():
        raise ValueError(f"non-finite score at segment {int(np.flatnonzero(~np.isfinite(s))[0])}")
    return s, duration_ms


def segment_range(i: int, duration_ms: int) -> tuple[int, int]:
    """[start, end) in ms of segment i of a video of ``duration_ms``."""
    return SEGMENT_MS * int(i), min(SEGMENT_MS * (int(i) + 1), int(duration_ms))


def thumbnail_segment(scores: Sequence[float], duration_ms: int) -> tuple[int, int, int]:
    """(slot, start_ms, end_ms) of the highest-interest segment among the first N = ceil(duration / 5000)
    scores (the earliest on ties)."""
    s, d = _check_scores(scores, duration_ms)
    i = int(np.argmax(s))
    return (i,) + segment_range(i, d)


def skip_ranges(scores: Sequence[float], duration_ms: int, threshold: float) -> list[tuple[int, int]]:
    """Merged [start_ms, end_ms) ranges of the segments whose sigmoid(score) < threshold."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a probability in [0, 1]")
    s, d = _check_scores(scores, duration_ms)
    with np.errstate(over="ignore"):
        interest = 1.0 / (1.0 + np.exp(-s))
    low = interest < float(threshold)
    out = []
    i = 0
    while i < low.shape[0]:
        if low[i]:
            j = i
            while j + 1 < low.shape[0] and low[j + 1]:
                j += 1
            out.append((segment_range(i, d)[0], segment_range(j, d)[1]))
            i = j + 1
        else:
            i += 1
    return out


# ----------------------------------------------------------------------------------------------------
# file level
# ----------------------------------------------------------------------------------------------------

def _video_durations(prepared) -> dict:
    it = prepared.interactions
    vid = np.asarray(it["video_idx"], dtype=np.int64)
    dmax = np.zeros(prepared.n_videos, dtype=np.int64)
    np.maximum.at(dmax, vid, np.asarray(it["duration_ms"], dtype=np.int64))
    return dict(zip(np.asarray(prepared.videos["video_id"]).tolist(), dmax.tolist()))


def _scored(run_dir, data_dir, pairs_path, out_path, scoring: dict):
    """(pairs, manifest): (user_id, video_id, scores) per scored pair in input order, via segfast.scoring.score
    into a temporary directory beside ``out_path`` (removed afterwards). ``scoring``: score()'s options
    (device, backend, batch_size, on_unknown, which, progress, ...); with on_unknown="skip" the unknown pairs
    are left out (counted in the manifest's "rejected")."""
    import pyarrow.parquet as pq

    from segfast.scoring import score

    out_path = Path(out_path)
    tmp = _io.temp_dir(out_path.parent, prefix=f".{out_path.name}.scores-")
    try:
        man = score(run_dir, data_dir, pairs_path, tmp / "scores", **scoring)
        parts = sorted((tmp / "scores").glob("part-*.parquet"))
        tables = [pq.read_table(p, columns=["row", "user_id", "video_id", "scores"]) for p in parts]
        rows, uids, vids, sc = [], [], [], []
        for t in tables:
            rows.append(t.column("row").to_numpy())
            uids.append(t.column("user_id").to_numpy())
            vids.append(t.column("video_id").to_numpy())
            sc.extend(t.column("scores").to_pylist())
        if not rows:
            return [], man
        rows = np.concatenate(rows)
        order = np.argsort(rows, kind="stable")
        uids, vids = np.concatenate(uids), np.concatenate(vids)
        return [(int(uids[i]), int(vids[i]), sc[i]) for i in order], man
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_output(out_path, overwrite: bool, kind: str = "", inputs: dict | None = None) -> Path:
    """``out_path`` may be written: not one of the inputs (nor inside / around one), and nothing there or (with
    ``overwrite``) a file segfast ``kind`` wrote (segfast._guard); stale temporaries of a killed run removed."""
    from segfast._guard import check_out_vs_inputs, check_replace_file

    out_path = Path(out_path)
    check_out_vs_inputs(out_path, inputs or {}, kind)
    check_replace_file(out_path, kind, overwrite)
    _io.remove_stale_temps(out_path.parent, out_path.name)
    return out_path


def _inputs(run_dir, data_dir, pairs_path) -> dict:
    return {"--run-dir": run_dir, "--data": data_dir, "--pairs": pairs_path}


def _write(out_path, table, kind: str, overwrite: bool) -> None:
    """Write the output atomically, marked as segfast ``kind``'s (its Parquet schema metadata, which is how
    --overwrite recognises it); what is at ``out_path`` now is checked again first."""
    from segfast._guard import check_replace_file, file_metadata

    check_replace_file(out_path, kind, overwrite)
    meta = dict(table.schema.metadata or {})
    meta.update(file_metadata(kind))
    _io.write_parquet(out_path, table.replace_schema_metadata(meta))


def _scoring(device, progress, options: dict) -> dict:
    allowed = {"backend", "batch_size", "on_unknown", "which", "part_rows", "prefetch", "max_batch_bytes",
               "precision", "feature_memory_bytes"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise TypeError(f"unexpected scoring option(s) {bad}; expected some of {sorted(allowed)}")
    return dict(options, device=device, progress=progress)


def _summary(pairs, man, out_path) -> dict:
    rej = man.get("rejected") or {}
    return {"pairs": len(pairs), "rejected": int(man.get("rows_rejected") or 0),
            "rejected_summary": rej.get("summary"), "out": str(out_path),
            "backend": man.get("backend"), "device": man.get("device"), "precision": man.get("precision"),
            "batch_size": man.get("effective_batch_size")}


def _durations_for(data_dir, pairs) -> list:
    from segfast.data.prepared import load_prepared

    dur = _video_durations(load_prepared(data_dir))
    out = []
    for k, (u, v, _) in enumerate(pairs):
        if v not in dur:
            raise ValueError(f"pair {k} (user {u}, video {v}): video not in the prepared dataset {data_dir}")
        out.append(dur[v])
    return out


def thumbnails(run_dir, data_dir, pairs_path, out_path, device="cpu", progress: bool = False,
               overwrite: bool = False, **scoring) -> dict:
    """Write ``out_path`` (Parquet): user_id, video_id, n_segments, duration_ms, thumbnail_slot, start_ms,
    end_ms, interest (sigmoid of the chosen segment's logit), one row per scored pair in input order.

    ``scoring``: segfast.scoring.score's options (backend, batch_size, on_unknown="error"/"skip", which, ...);
    an existing ``out_path`` is an error unless ``overwrite``. Returns {"pairs", "rejected",
    "rejected_summary", "out", "backend", "device", "batch_size"}."""
    import pyarrow as pa

    out_path = _check_output(out_path, overwrite, "thumbnails", _inputs(run_dir, data_dir, pairs_path))
    pairs, man = _scored(run_dir, data_dir, pairs_path, out_path, _scoring(device, progress, scoring))
    durs = _durations_for(data_dir, pairs)
    cols = {k: [] for k in ("user_id", "video_id", "n_segments", "duration_ms", "thumbnail_slot", "start_ms",
                            "end_ms", "interest")}
    for (u, v, s), d in zip(pairs, durs):
        i, a, b = thumbnail_segment(s, d)
        for k, x in zip(cols, (u, v, len(s), d, i, a, b, 1.0 / (1.0 + math.exp(-float(s[i]))))):
            cols[k].append(x)
    types = {"user_id": pa.int64(), "video_id": pa.int64(), "n_segments": pa.int8(), "duration_ms": pa.int64(),
             "thumbnail_slot": pa.int8(), "start_ms": pa.int64(), "end_ms": pa.int64(), "interest": pa.float32()}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
    _write(out_path, table, "thumbnails", overwrite)
    return _summary(pairs, man, out_path)


def edit(run_dir, data_dir, pairs_path, out_path, threshold: float = 0.5, device="cpu",
         progress: bool = False, overwrite: bool = False, **scoring) -> dict:
    """Write ``out_path`` (Parquet): user_id, video_id, n_segments, duration_ms, skip_start_ms list<int64>,
    skip_end_ms list<int64>, skipped_ms (total), kept_ms, one row per scored pair in input order.

    ``scoring`` and ``overwrite`` as in :func:`thumbnails`. Returns thumbnails' summary plus
    "skipped_fraction" (skipped time over total time of the scored pairs)."""
    import pyarrow as pa

    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a probability in [0, 1]")
    out_path = _check_output(out_path, overwrite, "edit", _inputs(run_dir, data_dir, pairs_path))
    pairs, man = _scored(run_dir, data_dir, pairs_path, out_path, _scoring(device, progress, scoring))
    durs = _durations_for(data_dir, pairs)
    cols = {k: [] for k in ("user_id", "video_id", "n_segments", "duration_ms", "skip_start_ms", "skip_end_ms",
                            "skipped_ms", "kept_ms")}
    for (u, v, s), d in zip(pairs, durs):
        r = skip_ranges(s, d, threshold)
        skipped = sum(b - a for a, b in r)
        for k, x in zip(cols, (u, v, len(s), d, [a for a, _ in r], [b for _, b in r], skipped, d - skipped)):
            cols[k].append(x)
    types = {"user_id": pa.int64(), "video_id": pa.int64(), "n_segments": pa.int8(), "duration_ms": pa.int64(),
             "skip_start_ms": pa.list_(pa.int64()), "skip_end_ms": pa.list_(pa.int64()),
             "skipped_ms": pa.int64(), "kept_ms": pa.int64()}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
    _write(out_path, table, "edit", overwrite)
    total = sum(durs)
    return dict(_summary(pairs, man, out_path),
                skipped_fraction=(sum(cols["skipped_ms"]) / total) if total else 0.0)
