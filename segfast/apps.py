"""Applications of segment interest (SPEC section 9): personalised thumbnails and personalised editing.

Both use the calibrated interest of the N real segments of a (user, video) pair: keep_i = P(a user who
reached segment i keeps watching past it), the run's calibrator (``segfast.calibration``, RUN/calibration.json,
fitted on dev after training or by ``segfast calibrate``) applied to the Task-1 logits. The raw logits have no
probability scale (the ranking loss fixes only their order within a video), so sigmoid(logit) is not used.

- Thumbnail: the segment with the highest keep probability (ties: the earliest), time range
  [5000 i, min(5000 (i + 1), duration)) ms. With a position-dependent calibrator this can differ from the
  segment with the highest logit.
- Edit: the segments whose keep probability is strictly below ``threshold`` are skipped (0.3: fewer than 30%
  of the viewers who reach the segment keep watching past it); consecutive skipped segments are merged into
  one range [5000 a, min(5000 (b + 1), duration)).

Durations: a video's duration is the largest ``duration_ms`` over its rows in the prepared dataset (the same
row that gives ``videos.n_segments``, the largest N). The file-level functions first load the run's calibrator
for the checkpoint ``which`` (a run without one is an error naming ``segfast calibrate``), then score the pairs
(Parquet: int64 user_id, video_id[, time_ms]) with ``segfast.scoring.score(..., probabilities=True)`` and the
same scoring options (backend, batch size, the unknown-id policy ``on_unknown`` "error" / "skip", ...) into a
temporary directory next to ``out_path``, and read back its ``keep_probability`` column (the calibrator applied
to the full logits of each pair, the completed pseudo-slot included, which the ``scores`` column lacks). They
write one Parquet file atomically (``segfast._io``), one row per scored pair in input order, that records the
calibrator used (Parquet schema metadata key ``segfast.calibration``, also the summary's ``"calibration"``:
file, checkpoint, weights digest, form, feature, what it was fitted on). They stream: the scorer's parts are
read back ``_CHUNK_ROWS`` pairs at a time, turned into output rows with array operations, and written as one
row group each to the temporary file, so memory does not grow with the number of pairs (scoring itself is flat
too; see docs/scoring.md). ``out_path`` may not be (or lie inside) the pairs, the prepared dataset or the run
directory; an existing output is refused unless ``overwrite``, and even then unless segfast wrote it for the
same command: the file's Parquet schema metadata key ``segfast.output`` holds ``{"kind": "thumbnails"}`` /
``{"kind": "edit"}`` (segfast._guard).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from segfast import MAX_SLOTS, SEGMENT_MS, _io

_CHUNK_ROWS = 65_536  # pairs per output row group: thumbnails / edit hold about this many at a time

__all__ = ["segment_range", "thumbnail_segment", "skip_ranges", "calibration_info", "thumbnails", "edit"]

CALIBRATION_META_KEY = b"segfast.calibration"  # Parquet schema metadata: the calibrator an output used


def _check_scores(scores, duration_ms: int, probabilities: bool = False) -> tuple[np.ndarray, int]:
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
    if probabilities and ((s < 0.0) | (s > 1.0)).any():
        k = int(np.flatnonzero((s < 0.0) | (s > 1.0))[0])
        raise ValueError(f"keep probability {s[k]:.6g} at segment {k}: expected probabilities in [0, 1] (the "
                         "calibrated keep probabilities, Calibrator.keep_probability, not logits)")
    return s, duration_ms


def segment_range(i: int, duration_ms: int) -> tuple[int, int]:
    """[start, end) in ms of segment i of a video of ``duration_ms``."""
    return SEGMENT_MS * int(i), min(SEGMENT_MS * (int(i) + 1), int(duration_ms))


def thumbnail_segment(keep: Sequence[float], duration_ms: int) -> tuple[int, int, int]:
    """(slot, start_ms, end_ms) of the highest-interest segment among the first N = ceil(duration / 5000)
    values of ``keep`` (the calibrated keep probabilities of the pair; the earliest on ties)."""
    s, d = _check_scores(keep, duration_ms)
    i = int(np.argmax(s))
    return (i,) + segment_range(i, d)


def skip_ranges(keep: Sequence[float], duration_ms: int, threshold: float) -> list[tuple[int, int]]:
    """Merged [start_ms, end_ms) ranges of the segments whose calibrated keep probability (``keep``, values in
    [0, 1]; the first N = ceil(duration / 5000) are used) is < threshold."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a probability in [0, 1]")
    s, d = _check_scores(keep, duration_ms, probabilities=True)
    low = s < float(threshold)
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

@contextlib.contextmanager
def _scored(run_dir, data_dir, pairs_path, out_path, scoring: dict):
    """Score the pairs with segfast.scoring.score into a temporary directory beside ``out_path`` (removed
    afterwards) with ``probabilities=True`` and yield (manifest, chunks): ``chunks`` yields, part by part in
    input order and at most ``_CHUNK_ROWS`` rows at a time, (row, user_id, video_id, offsets, values): the
    calibrated keep probabilities of pair k (the scorer's ``keep_probability`` column) are
    ``values[offsets[k]:offsets[k + 1]]``. Memory stays flat in the number of pairs. ``scoring``: score()'s
    options (device, backend, batch_size, on_unknown, which, progress, ...); with on_unknown="skip" the unknown
    pairs are left out (counted in the manifest's "rejected")."""
    import pyarrow.parquet as pq

    from segfast.scoring import score

    out_path = Path(out_path)
    tmp = _io.temp_dir(out_path.parent, prefix=f".{out_path.name}.scores-")

    def chunks():
        last = -1
        for part in sorted((tmp / "scores").glob("part-*.parquet")):
            for b in pq.ParquetFile(part).iter_batches(batch_size=_CHUNK_ROWS,
                                                       columns=["row", "user_id", "video_id",
                                                                "keep_probability"]):
                row = b.column(0).to_numpy()
                if row.size and (row[0] <= last or (row.size > 1 and (np.diff(row) <= 0).any())):
                    raise AssertionError(f"{part}: rows out of input order")  # the scorer's invariant
                last = int(row[-1]) if row.size else last
                sc = b.column(3)
                yield (row, b.column(1).to_numpy(), b.column(2).to_numpy(),
                       np.asarray(sc.offsets, dtype=np.int64), np.asarray(sc.values, dtype=np.float64))

    try:
        man = score(run_dir, data_dir, pairs_path, tmp / "scores", probabilities=True, **scoring)
        yield man, chunks()
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


def calibration_info(cal, run_dir=None, which: str | None = None) -> dict:
    """Which calibrator an output used (JSON-able): {"file", "which", "checkpoint_digest", "weights", "form",
    "feature", "fitted_on"}; ``cal``: a segfast.calibration.Calibrator."""
    from segfast.calibration import CALIBRATION_FILE

    ck = cal.checkpoint or {}
    return {"file": None if run_dir is None else str(Path(run_dir) / CALIBRATION_FILE),
            "which": which if which is not None else ck.get("which"), "checkpoint_digest": ck.get("digest"),
            "weights": ck.get("weights"), "form": cal.form, "feature": cal.feature,
            "fitted_on": dict(cal.fitted_on or {})}


def _calibration(run_dir, scoring: dict) -> dict:
    """The run's calibrator for the scored checkpoint, loaded before any scoring: a run without one is an
    error naming ``segfast calibrate`` (segfast.calibration.load_calibrator). Returns calibration_info."""
    from segfast.calibration import load_calibrator

    which = scoring.get("which") or "best"
    return calibration_info(load_calibrator(run_dir, which), run_dir, which)


def _inputs(run_dir, data_dir, pairs_path) -> dict:
    return {"--run-dir": run_dir, "--data": data_dir, "--pairs": pairs_path}


def _scoring(device, progress, options: dict) -> dict:
    allowed = {"backend", "batch_size", "on_unknown", "which", "part_rows", "prefetch", "max_batch_bytes",
               "precision", "feature_memory_bytes"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise TypeError(f"unexpected scoring option(s) {bad}; expected some of {sorted(allowed)}")
    return dict(options, device=device, progress=progress)


def _summary(n_pairs: int, man, out_path, calibration: dict) -> dict:
    rej = man.get("rejected") or {}
    return {"pairs": int(n_pairs), "rejected": int(man.get("rows_rejected") or 0),
            "rejected_summary": rej.get("summary"), "out": str(out_path),
            "backend": man.get("backend"), "device": man.get("device"), "precision": man.get("precision"),
            "batch_size": man.get("effective_batch_size"), "calibration": calibration}


class _Durations:
    """Video id -> duration_ms (the largest over the video's rows), looked up for whole arrays."""

    def __init__(self, data_dir):
        from segfast.data.prepared import load_prepared

        p = load_prepared(data_dir)
        it = p.interactions
        dmax = np.zeros(p.n_videos, dtype=np.int64)
        np.maximum.at(dmax, np.asarray(it["video_idx"], dtype=np.int64), np.asarray(it["duration_ms"], np.int64))
        vid = np.asarray(p.videos["video_id"], dtype=np.int64)
        o = np.argsort(vid)
        self.vid, self.dur, self.data_dir = vid[o], dmax[o], data_dir

    def __call__(self, row, uid, vid) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.vid, vid), max(self.vid.size - 1, 0))
        ok = self.vid[pos] == vid if self.vid.size else np.zeros(vid.shape, bool)
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"pair at input row {row[k]} (user {uid[k]}, video {vid[k]}): video not in the "
                             f"prepared dataset {self.data_dir}")
        return self.dur[pos]


def _padded(row, offsets, values, dur):
    """(keep probabilities float64 [k, L] of the first N = ceil(duration / 5000) segments of each pair, -inf
    after N; the valid mask; N); errors as thumbnail_segment / skip_ranges give them."""
    if ((dur <= 0) | (dur >= MAX_SLOTS * SEGMENT_MS)).any():
        k = int(np.flatnonzero((dur <= 0) | (dur >= MAX_SLOTS * SEGMENT_MS))[0])
        raise ValueError(f"duration_ms={dur[k]}: expected 0 < duration_ms < {MAX_SLOTS * SEGMENT_MS}")
    n = -(-dur // SEGMENT_MS)
    have = np.diff(offsets)
    if (have < n).any():
        k = int(np.flatnonzero(have < n)[0])
        raise ValueError(f"input row {row[k]}: {have[k]} scores for a video of {dur[k]} ms, which has {n[k]} segments")
    width = int(n.max()) if n.size else 0
    slot = np.arange(width, dtype=np.int64)
    valid = slot[None, :] < n[:, None]
    idx = np.where(valid, offsets[:-1, None] + slot[None, :], 0)
    s = np.where(valid, values[idx] if values.size else 0.0, -np.inf)
    bad = valid & ~np.isfinite(s)
    if bad.any():
        k = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"input row {row[k]}: non-finite score at segment {int(np.flatnonzero(bad[k])[0])}")
    out = valid & ((s < 0.0) | (s > 1.0))
    if out.any():
        k = int(np.flatnonzero(out.any(axis=1))[0])
        raise ValueError(f"input row {row[k]}: keep probability outside [0, 1] at segment "
                         f"{int(np.flatnonzero(out[k])[0])}")
    return s, valid, n


def _write_stream(out_path, schema, tables, kind: str, overwrite: bool, calibration: dict) -> int:
    """Write the Parquet output from an iterable of tables (``schema``), one row group at a time, to a temporary
    file beside ``out_path`` renamed onto it at the end (segfast._io), marked as segfast ``kind``'s and with the
    calibrator used (``CALIBRATION_META_KEY``); what is at ``out_path`` is checked again just before the
    rename. Returns the rows written."""
    import json

    import pyarrow.parquet as pq

    from segfast._guard import check_replace_file, file_metadata

    meta = dict(schema.metadata or {})
    meta.update(file_metadata(kind))
    meta[CALIBRATION_META_KEY] = json.dumps(calibration, sort_keys=True).encode()
    schema = schema.with_metadata(meta)
    rows = 0
    with _io.atomic_path(out_path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for t in tables:
                w.write_table(t.replace_schema_metadata(meta))
                rows += t.num_rows
        check_replace_file(out_path, kind, overwrite)
    return rows


def thumbnails(run_dir, data_dir, pairs_path, out_path, device="cpu", progress: bool = False,
               overwrite: bool = False, **scoring) -> dict:
    """Write ``out_path`` (Parquet): user_id, video_id, n_segments, duration_ms, thumbnail_slot, start_ms,
    end_ms, keep_probability (the chosen segment's calibrated keep probability, the highest of the pair), one
    row per scored pair in input order.

    ``scoring``: segfast.scoring.score's options (backend, batch_size, on_unknown="error"/"skip", which, ...);
    an existing ``out_path`` is an error unless ``overwrite``; a run without a calibrator for checkpoint
    ``which`` is an error naming ``segfast calibrate``. Returns {"pairs", "rejected", "rejected_summary",
    "out", "backend", "device", "precision", "batch_size", "calibration"}."""
    import pyarrow as pa

    out_path = _check_output(out_path, overwrite, "thumbnails", _inputs(run_dir, data_dir, pairs_path))
    calibration = _calibration(run_dir, scoring)
    durations = _Durations(data_dir)
    types = {"user_id": pa.int64(), "video_id": pa.int64(), "n_segments": pa.int8(), "duration_ms": pa.int64(),
             "thumbnail_slot": pa.int8(), "start_ms": pa.int64(), "end_ms": pa.int64(),
             "keep_probability": pa.float32()}
    schema = pa.schema(list(types.items()))

    def tables(chunks):
        for row, uid, vid, offsets, values in chunks:
            d = durations(row, uid, vid)
            s, _, n = _padded(row, offsets, values, d)
            i = np.argmax(s, axis=1) if row.size else np.zeros(0, np.int64)  # the earliest on ties
            best = s[np.arange(row.size), i] if row.size else np.zeros(0)
            cols = (uid, vid, n, d, i, SEGMENT_MS * i, np.minimum(SEGMENT_MS * (i + 1), d), best)
            yield pa.table({k: pa.array(np.asarray(x).astype(types[k].to_pandas_dtype()), type=types[k])
                            for k, x in zip(types, cols)}, schema=schema)

    with _scored(run_dir, data_dir, pairs_path, out_path, _scoring(device, progress, scoring)) as (man, chunks):
        n_pairs = _write_stream(out_path, schema, tables(chunks), "thumbnails", overwrite, calibration)
    return _summary(n_pairs, man, out_path, calibration)


def edit(run_dir, data_dir, pairs_path, out_path, threshold: float = 0.5, device="cpu",
         progress: bool = False, overwrite: bool = False, **scoring) -> dict:
    """Write ``out_path`` (Parquet): user_id, video_id, n_segments, duration_ms, skip_start_ms list<int64>,
    skip_end_ms list<int64>, skipped_ms (total), kept_ms, one row per scored pair in input order. Skipped: the
    segments whose calibrated keep probability is < ``threshold`` (0.3: fewer than 30% of the viewers who reach
    the segment keep watching past it).

    ``scoring``, ``overwrite`` and the calibrator as in :func:`thumbnails`. Returns thumbnails' summary plus
    "threshold", "skipped_fraction" (skipped time over total time of the scored pairs) and
    "skipped_segment_fraction" (skipped segments over all segments of the scored pairs)."""
    import pyarrow as pa

    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a probability in [0, 1]")
    out_path = _check_output(out_path, overwrite, "edit", _inputs(run_dir, data_dir, pairs_path))
    calibration = _calibration(run_dir, scoring)
    durations = _Durations(data_dir)
    types = {"user_id": pa.int64(), "video_id": pa.int64(), "n_segments": pa.int8(), "duration_ms": pa.int64(),
             "skip_start_ms": pa.list_(pa.int64()), "skip_end_ms": pa.list_(pa.int64()),
             "skipped_ms": pa.int64(), "kept_ms": pa.int64()}
    schema = pa.schema(list(types.items()))
    totals = {"skipped": 0, "duration": 0, "skipped_segments": 0, "segments": 0}

    def tables(chunks):
        for row, uid, vid, offsets, values in chunks:
            d = durations(row, uid, vid)
            s, valid, n = _padded(row, offsets, values, d)
            low = valid & (s < float(threshold))
            totals["skipped_segments"] += int(low.sum())
            totals["segments"] += int(n.sum())
            prev = np.zeros_like(low)
            prev[:, 1:] = low[:, :-1]
            nxt = np.zeros_like(low)
            nxt[:, :-1] = low[:, 1:]
            r0, i0 = np.nonzero(low & ~prev)  # run starts, row-major: in row order, then slot order
            r1, i1 = np.nonzero(low & ~nxt)   # run ends, paired with the starts
            start = SEGMENT_MS * i0.astype(np.int64)
            end = np.minimum(SEGMENT_MS * (i1.astype(np.int64) + 1), d[r1])
            off = np.zeros(row.size + 1, dtype=np.int32)
            np.cumsum(np.bincount(r0, minlength=row.size), out=off[1:])
            skipped = np.bincount(r0, weights=end - start, minlength=row.size).astype(np.int64)
            totals["skipped"] += int(skipped.sum())
            totals["duration"] += int(d.sum())
            yield pa.table({"user_id": pa.array(uid, pa.int64()), "video_id": pa.array(vid, pa.int64()),
                            "n_segments": pa.array(n.astype(np.int8), pa.int8()),
                            "duration_ms": pa.array(d, pa.int64()),
                            "skip_start_ms": pa.ListArray.from_arrays(pa.array(off), pa.array(start, pa.int64())),
                            "skip_end_ms": pa.ListArray.from_arrays(pa.array(off), pa.array(end, pa.int64())),
                            "skipped_ms": pa.array(skipped, pa.int64()),
                            "kept_ms": pa.array(d - skipped, pa.int64())}, schema=schema)

    with _scored(run_dir, data_dir, pairs_path, out_path, _scoring(device, progress, scoring)) as (man, chunks):
        n_pairs = _write_stream(out_path, schema, tables(chunks), "edit", overwrite, calibration)
    return dict(_summary(n_pairs, man, out_path, calibration), threshold=float(threshold),
                skipped_fraction=(totals["skipped"] / totals["duration"]) if totals["duration"] else 0.0,
                skipped_segment_fraction=(totals["skipped_segments"] / totals["segments"]) if totals["segments"]
                else 0.0)
