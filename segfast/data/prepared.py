"""``segfast prepare``: raw source -> on-disk prepared dataset (docs/internals.md section 2), and its loader.

Choices fixed here (docs/internals.md style):

- Sources and their rules: ``segmm`` and ``segmm-sample`` drop users with < 100 interactions and use the
  first 80 of each user as profile; ``kuairand`` drops users with < 20 and has no profile. Both are
  overridable (``min_interactions``, ``profile_len``) and recorded in ``manifest.options``.
- Exact duplicate interactions (same user, video and time_ms) are dropped before the user filter, the
  first in source order kept, and counted under ``rows_dropped["duplicate_interaction"]`` (a row's twin
  would otherwise sit in its own history and leak its label through the visual history).
- Dropped users are counted in rows under ``rows_dropped["user_too_few_interactions"]``; the reader's
  own drop reasons are copied as they are, so ``rows_read == rows_kept + sum(rows_dropped)``.
- ``videos.n_segments`` is the largest N over the video's rows (a video's duration can differ between
  rows); the features hold that many segments per video. Per-row N is ``interactions.n_segments``.
- Features: the kept videos' segments are copied in video_idx order, in chunks, cast to
  ``feature_dtype`` (float16 by default). A value that is non-finite in the source, or overflows the
  target dtype, is an error naming the video id and segment.
- Visual histories (see ``segfast.data.splits``) are written only when features are written; otherwise
  ``vhist_offset`` is -1 and ``vhist_len`` 0 for every row.
- Space: before anything is written the free space of ``out``'s file system is checked against the size
  of the output (``segfast._errors.check_free_space``; a clear error when short), and the memmapped files
  get their blocks allocated when created, so a disk that fills anyway is an ``OSError`` naming the file
  (exit 3 from the CLI), never a SIGBUS in a memmap write.
- Atomicity: everything is written into a hidden temp directory beside ``out`` which is renamed onto
  ``out`` at the end; any exception removes it. With ``overwrite=True`` an existing ``out`` is renamed
  away, the new one renamed in, then the old one deleted (``segfast._io``; the directory and its files get
  the modes the umask implies). A temp directory left by a killed prepare (SIGKILL, power loss) is removed
  by the next prepare of the same ``out`` (``segfast._io.remove_stale_temps``).
- Safety (``segfast._guard``): ``out`` may not be, contain or lie inside ``input`` / ``features_dir``, and
  ``overwrite`` replaces only a prepared dataset (its ``manifest.json`` has ``"kind": "segfast-prepared"``)
  that holds nothing but prepare's own files; anything else is refused, checked again just before the swap.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from segfast import MAX_SLOTS, _fingerprint as _fp, _io
from segfast.data import splits as _sp
from segfast.data.labels import n_segments as _n_segments, view_length as _view_length
from segfast.data.sources import RawInteractions

__all__ = ["SCHEMA_VERSION", "SOURCES", "PreparedFormatError", "Prepared", "prepare", "prepare_raw",
           "load_prepared"]

SCHEMA_VERSION = 1
SOURCES = {
    "segmm": {"min_interactions": 100, "profile_len": 80},
    "segmm-sample": {"min_interactions": 100, "profile_len": 80},
    "kuairand": {"min_interactions": 20, "profile_len": 0},
}
HIST_CAP = 50
VHIST_CAP = 100
_FEATURE_CHUNK = 16384  # segments per copy chunk

INTERACTION_COLUMNS = {
    "user_idx": np.int32, "video_idx": np.int32, "time_ms": np.int64, "duration_ms": np.int64,
    "play_time_ms": np.int64, "n_segments": np.int8, "view_length": np.int8, "target": np.int8,
    "split": np.int8, "is_cold": np.bool_, "hist_len": np.int8, "vhist_offset": np.int64,
    "vhist_len": np.int16, "source_row": np.int64,
}
USER_COLUMNS = {"user_idx": np.int32, "user_id": np.int64, "n_interactions": np.int32}
VIDEO_COLUMNS = {"video_idx": np.int32, "video_id": np.int64, "n_segments": np.int8,
                 "feat_offset": np.int64, "n_train": np.int32}


class PreparedFormatError(ValueError):
    """A prepared directory that does not follow schema version 1; the message names the file."""


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------

def _raw_from(obj: Any) -> RawInteractions:
    if isinstance(obj, RawInteractions):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            if isinstance(o, RawInteractions):
                return o
    for name in ("raw", "interactions"):
        o = getattr(obj, name, None)
        if isinstance(o, RawInteractions):
            return o
    raise TypeError(f"reader returned {type(obj).__name__}, which holds no RawInteractions")


def _read_source(source: str, input, features_dir, log, feature_dim, progress=True):
    if source == "segmm-sample":
        from segfast.data.sources.segmm_sample import read_segmm_sample
        return _raw_from(read_segmm_sample(input)), None
    if source == "segmm":
        from segfast.data.sources.segmm import read_segmm
        raw, feats = read_segmm(input, features_dir=features_dir, feature_dim=feature_dim)
        return raw, feats
    if source == "kuairand":
        from segfast.data.sources.kuairand import read_kuairand
        return _raw_from(read_kuairand(input, log=log, progress=progress)), None
    raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")


def prepare(
    source: str,
    input: str | Path,
    out: str | Path,
    seed: int = 0,
    features_dir: str | Path | None = None,
    log: str | None = None,
    feature_dim: int = 1024,
    feature_dtype: str = "float16",
    progress: bool = True,
    *,
    overwrite: bool = False,
    min_interactions: int | None = None,
    profile_len: int | None = None,
) -> dict:
    """Read ``input`` of ``source`` and write the prepared dataset to ``out``; returns the manifest."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    out = Path(out)
    from segfast._guard import check_out_vs_inputs

    check_out_vs_inputs(out, {"--input": input, "--features": features_dir}, "prepare")
    _check_out(out, overwrite)
    raw, feats = _read_source(source, input, features_dir, log, feature_dim, progress)
    options = {"features_dir": None if features_dir is None else str(features_dir), "log": log,
               "feature_dim": feature_dim}
    return prepare_raw(raw, out, source=source, seed=seed, feature_source=feats, input=str(input),
                       feature_dtype=feature_dtype, progress=progress, overwrite=overwrite,
                       min_interactions=min_interactions, profile_len=profile_len, extra_options=options)


def _check_out(out: Path, overwrite: bool) -> None:
    """Nothing at ``out``, or (with ``overwrite``) a prepared dataset and nothing else (segfast._guard); and
    the temporaries a killed prepare left beside ``out`` removed (segfast._io.remove_stale_temps)."""
    from segfast._guard import check_replace_prepared

    check_replace_prepared(out, overwrite)
    _io.remove_stale_temps(out.parent, out.name)


def _feature_rows(fs, video_ids: np.ndarray, nseg: np.ndarray) -> np.ndarray:
    """Flat feature-source rows of all segments of the given videos, in order."""
    res = fs.rows_for(video_ids, nseg)
    if isinstance(res, tuple) and len(res) == 2:
        offsets, rows = (np.asarray(a, dtype=np.int64) for a in res)
        expect = np.concatenate(([0], np.cumsum(nseg.astype(np.int64))))
        if offsets.shape != expect.shape or not np.array_equal(offsets, expect):
            raise ValueError("feature source rows_for returned offsets that disagree with n_segments")
    else:  # per-video API: rows_for(video_id, n) -> int64[n]
        rows = np.concatenate([np.asarray(fs.rows_for(int(v), int(n)), dtype=np.int64)
                               for v, n in zip(video_ids, nseg)] or [np.zeros(0, np.int64)])
    if rows.shape[0] != int(nseg.astype(np.int64).sum()):
        raise ValueError("feature source returned a wrong number of segment rows")
    return rows


def prepare_raw(
    raw: RawInteractions,
    out: str | Path,
    source: str,
    seed: int = 0,
    feature_source=None,
    input: str = "",
    feature_dtype: str = "float16",
    progress: bool = True,
    overwrite: bool = False,
    min_interactions: int | None = None,
    profile_len: int | None = None,
    extra_options: dict | None = None,
) -> dict:
    """Prepare from already-read RawInteractions (and an optional feature source with ``dim``,
    ``rows_for``, ``read``). This is what :func:`prepare` calls after reading."""
    from tqdm.auto import tqdm

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    rules = SOURCES[source]
    min_inter = rules["min_interactions"] if min_interactions is None else int(min_interactions)
    prof = rules["profile_len"] if profile_len is None else int(profile_len)
    if prof < 0 or min_inter < 0:
        raise ValueError("min_interactions and profile_len must be >= 0")
    fdtype = np.dtype(feature_dtype)
    if fdtype.kind != "f":
        raise ValueError(f"feature_dtype must be a float dtype, got {feature_dtype!r}")
    out = Path(out)
    _check_out(out, overwrite)

    # ---- columns, labels
    n_read = len(raw)
    cols = {k: np.asarray(getattr(raw, k), dtype=np.int64) for k in
            ("user_id", "video_id", "time_ms", "duration_ms", "play_time_ms", "source_row")}
    for k, v in cols.items():
        if v.shape != (n_read,):
            raise ValueError(f"RawInteractions.{k} has shape {v.shape}, expected ({n_read},)")
    bad = np.flatnonzero((cols["duration_ms"] <= 0) | (cols["duration_ms"] >= MAX_SLOTS * 5000)
                         | (cols["play_time_ms"] <= 0))
    if bad.size:
        i = bad[0]
        raise ValueError(f"source row {cols['source_row'][i]}: duration_ms={cols['duration_ms'][i]}, "
                         f"play_time_ms={cols['play_time_ms'][i]}; expected 0 < duration_ms < 200000 and "
                         "play_time_ms > 0 (the reader should have filtered it)")
    dropped = {str(k): int(v) for k, v in (raw.dropped or {}).items()}
    if raw.rows_read != n_read + sum(dropped.values()):
        raise ValueError(f"reader counts disagree: rows_read={raw.rows_read}, kept {n_read}, "
                         f"dropped {sum(dropped.values())}")

    # ---- sort, exact duplicates, user filter
    order = _sp.sort_order(cols["user_id"], cols["time_ms"], cols["source_row"])
    cols = {k: v[order] for k, v in cols.items()}
    first = _sp.first_occurrences(cols["user_id"], cols["video_id"], cols["time_ms"])
    n_dup = int((~first).sum())
    dropped["duplicate_interaction"] = dropped.get("duplicate_interaction", 0) + n_dup
    if n_dup:
        cols = {k: v[first] for k, v in cols.items()}
    del first
    keep = _sp.filter_users(cols["user_id"], min_inter)
    n_drop_users = int((~keep).sum())
    dropped["user_too_few_interactions"] = dropped.get("user_too_few_interactions", 0) + n_drop_users
    if n_drop_users:
        cols = {k: v[keep] for k, v in cols.items()}
    del order, keep
    n = cols["user_id"].shape[0]

    nseg = _n_segments(cols["duration_ms"]).astype(np.int64)
    vlen = _view_length(cols["play_time_ms"], cols["duration_ms"]).astype(np.int64)

    user_ids, user_idx = np.unique(cols["user_id"], return_inverse=True)
    video_ids, video_idx = np.unique(cols["video_id"], return_inverse=True)
    user_idx = user_idx.astype(np.int64).reshape(-1)
    video_idx = video_idx.astype(np.int64).reshape(-1)
    n_users, n_videos = user_ids.shape[0], video_ids.shape[0]
    vid_nseg = np.zeros(n_videos, dtype=np.int64)
    np.maximum.at(vid_nseg, video_idx, nseg) if n else None

    # ---- splits, histories, cold flags
    split = _sp.assign_splits(cols["user_id"], cols["video_id"], cols["time_ms"], cols["duration_ms"],
                              cols["play_time_ms"], seed=seed, profile_len=prof)
    hist_len = _sp.history_lengths(cols["user_id"], HIST_CAP)
    n_train, is_cold = _sp.cold_flags(video_idx, split, n_videos)
    vid_off = np.zeros(n_videos, dtype=np.int64)
    if n_videos:
        np.cumsum(vid_nseg[:-1], out=vid_off[1:])
    n_segments_total = int(vid_nseg.sum())

    with_features = feature_source is not None
    _check_space(out, n, n_users, n_videos, n_segments_total, fdtype,
                 int(feature_source.dim) if with_features else None,
                 int(_sp.vhist_lengths(cols["user_id"], vlen, hist_len, prof, VHIST_CAP).sum()) if with_features else 0)
    tmp = _io.temp_dir(out.parent, prefix=f".{out.name}.tmp-")  # the mode the umask implies (not mkdtemp's 0700)
    try:
        features_meta = None
        vh_off = np.full(n, -1, dtype=np.int64)
        vh_len = np.zeros(n, dtype=np.int64)
        if with_features:
            dim = int(feature_source.dim)
            features_meta = {"dim": dim, "dtype": fdtype.name, "rows": n_segments_total,
                             "file": "features.npy"}
            _write_features(tmp / "features.npy", feature_source, video_ids, vid_nseg, vid_off, dim,
                            fdtype, progress, tqdm)
            vh_len = _sp.vhist_lengths(cols["user_id"], vlen, hist_len, prof, VHIST_CAP)
            vh_off = np.zeros(n, dtype=np.int64)
            if n:
                np.cumsum(vh_len[:-1], out=vh_off[1:])
            total = int(vh_len.sum())
            vh = np.lib.format.open_memmap(tmp / "vhist.npy", mode="w+", dtype=np.int64, shape=(total,))
            _reserve(tmp / "vhist.npy")
            pos = 0
            with tqdm(total=n, desc="visual histories", unit="rows", disable=not progress) as bar:
                for r0, r1, chunk in _sp.vhist_chunks(cols["user_id"], vid_off[video_idx], vlen, hist_len,
                                                      prof, VHIST_CAP, seed):
                    if pos != vh_off[r0] or chunk.shape[0] != int(vh_len[r0:r1].sum()):
                        raise AssertionError("visual history chunk misaligned")  # internal invariant
                    vh[pos:pos + chunk.shape[0]] = chunk
                    pos += chunk.shape[0]
                    bar.update(r1 - r0)
            vh.flush()
            del vh

        import pyarrow as pa
        import pyarrow.parquet as pq

        inter = {
            "user_idx": user_idx, "video_idx": video_idx, "time_ms": cols["time_ms"],
            "duration_ms": cols["duration_ms"], "play_time_ms": cols["play_time_ms"], "n_segments": nseg,
            "view_length": vlen, "target": vlen, "split": split, "is_cold": is_cold, "hist_len": hist_len,
            "vhist_offset": vh_off, "vhist_len": vh_len, "source_row": cols["source_row"],
        }
        _write_parquet(tmp / "interactions.parquet", inter, INTERACTION_COLUMNS, pa, pq)
        n_inter_user = np.bincount(user_idx, minlength=n_users)
        _write_parquet(tmp / "users.parquet", {"user_idx": np.arange(n_users), "user_id": user_ids,
                                               "n_interactions": n_inter_user}, USER_COLUMNS, pa, pq)
        _write_parquet(tmp / "videos.parquet", {
            "video_idx": np.arange(n_videos), "video_id": video_ids, "n_segments": vid_nseg,
            "feat_offset": vid_off if with_features else np.full(n_videos, -1, np.int64),
            "n_train": n_train}, VIDEO_COLUMNS, pa, pq)

        counts_split = np.bincount(split, minlength=4)
        opts = dict(extra_options or {})
        opts.update({"min_interactions": min_inter, "profile_len": prof, "hist_len": HIST_CAP,
                     "vhist_cap": VHIST_CAP, "feature_dtype": fdtype.name})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "segfast-prepared",  # what segfast._guard recognises before --overwrite replaces it
            "source": source,
            "seed": int(seed),
            "input": str(input),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "options": opts,
            "counts": {
                "rows_read": int(raw.rows_read),
                "rows_kept": int(n),
                "rows_dropped": dropped,
                "users": int(n_users),
                "videos": int(n_videos),
                "segments": n_segments_total,
                "splits": {name: int(counts_split[code]) for name, code in _sp.SPLIT_CODES.items()},
                "cold_test": int((is_cold & (split == _sp.SPLIT_CODES["test"])).sum()),
            },
            "features": features_meta,
            "fingerprint": _fp.compute(tmp),  # sha256 of every data file (segfast._fingerprint)
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_space(out: Path, n: int, n_users: int, n_videos: int, segments: int, fdtype, dim, vhist_total: int):
    """Refuse to start when the file system of ``out`` lacks the space of the output (features and visual
    histories exactly, the Parquet tables at their uncompressed size, an upper bound)."""
    from segfast._errors import check_free_space

    row = sum(np.dtype(t).itemsize for t in INTERACTION_COLUMNS.values())
    need = n * row + n_users * sum(np.dtype(t).itemsize for t in USER_COLUMNS.values()) \
        + n_videos * sum(np.dtype(t).itemsize for t in VIDEO_COLUMNS.values()) + 65536
    if dim is not None:
        need += segments * dim * fdtype.itemsize + vhist_total * 8 + 256
    check_free_space(out.parent, need, f"the prepared dataset ({n} rows"
                     + (f", {segments} segments x {dim} {fdtype.name} features)" if dim is not None else ")"))


def _write_parquet(path: Path, columns: dict, schema: dict, pa, pq) -> None:
    arrays, names = [], []
    for name, dt in schema.items():
        arrays.append(pa.array(np.ascontiguousarray(columns[name], dtype=dt)))
        names.append(name)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path, compression="zstd")


def _write_features(path, fs, video_ids, vid_nseg, vid_off, dim, fdtype, progress, tqdm):
    total = int(vid_nseg.sum())
    src_rows = _feature_rows(fs, video_ids, vid_nseg)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=fdtype, shape=(total, dim))
    _reserve(path)
    with tqdm(total=total, desc="features", unit="seg", disable=not progress) as bar:
        for s0 in range(0, total, _FEATURE_CHUNK):
            s1 = min(s0 + _FEATURE_CHUNK, total)
            x = np.asarray(fs.read(src_rows[s0:s1]))
            if x.shape != (s1 - s0, dim):
                raise ValueError(f"feature source returned shape {x.shape}, expected ({s1 - s0}, {dim})")
            y = x.astype(fdtype)
            ok = np.isfinite(y).all(axis=1)
            if not ok.all():
                i = s0 + int(np.flatnonzero(~ok)[0])
                v = int(np.searchsorted(vid_off, i, side="right") - 1)
                j = int(np.flatnonzero(~np.isfinite(y[i - s0]))[0])
                what = "non-finite" if not np.isfinite(x[i - s0, j]) else f"out of {fdtype.name} range"
                raise ValueError(f"features of video {int(video_ids[v])} segment {i - int(vid_off[v])} "
                                 f"(feature row {int(src_rows[i])}, dim {j}): {what} value {x[i - s0, j]!r}")
            mm[s0:s1] = y
            bar.update(s1 - s0)
    mm.flush()
    del mm


def _reserve(path: Path) -> None:
    """Allocate a new memmap file's blocks now: a full disk is then an OSError naming it, not a SIGBUS later."""
    from segfast._errors import reserve

    reserve(path, path.stat().st_size)


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    from segfast._guard import check_replace_prepared

    check_replace_prepared(out, overwrite)  # again: what is there now, not what was there at the start
    _io.install_dir(tmp, out, overwrite)


# ----------------------------------------------------------------------------------------------------
# load_prepared
# ----------------------------------------------------------------------------------------------------

class Prepared:
    """A loaded prepared dataset. Memmaps are reopened (not copied) when pickled into a worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._load()

    def _load(self) -> None:
        p = self.path
        if not p.is_dir():
            raise PreparedFormatError(f"{p}: not a directory")
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise PreparedFormatError(f"{mpath}: missing (not a prepared dataset)")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except json.JSONDecodeError as e:
            raise PreparedFormatError(f"{mpath}: invalid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
            got = m.get("schema_version") if isinstance(m, dict) else None
            raise PreparedFormatError(f"{mpath}: schema_version {got!r}, expected {SCHEMA_VERSION}")
        for key in ("source", "counts", "features"):
            if key not in m:
                raise PreparedFormatError(f"{mpath}: missing field {key!r}")
        self.manifest = m
        counts = m["counts"]
        self.interactions = _read_parquet(p / "interactions.parquet", INTERACTION_COLUMNS,
                                          counts.get("rows_kept"))
        self.users = _read_parquet(p / "users.parquet", USER_COLUMNS, counts.get("users"))
        self.videos = _read_parquet(p / "videos.parquet", VIDEO_COLUMNS, counts.get("videos"))
        fm = m["features"]
        self.features = None
        self.vhist = None
        if fm is not None:
            fpath = p / fm.get("file", "features.npy")
            self.features = _open_npy(fpath)
            if self.features.ndim != 2 or self.features.shape != (fm["rows"], fm["dim"]) \
                    or self.features.dtype != np.dtype(fm["dtype"]):
                raise PreparedFormatError(
                    f"{fpath}: shape {self.features.shape} dtype {self.features.dtype}, expected "
                    f"({fm['rows']}, {fm['dim']}) {fm['dtype']}")
            vpath = p / "vhist.npy"
            self.vhist = _open_npy(vpath)
            if self.vhist.ndim != 1 or self.vhist.dtype != np.int64:
                raise PreparedFormatError(f"{vpath}: expected a 1-d int64 array, got {self.vhist.shape} "
                                          f"{self.vhist.dtype}")
            off, ln = self.interactions["vhist_offset"], self.interactions["vhist_len"]
            if off.size and (off.min() < 0 or int((off + ln).max()) > self.vhist.shape[0]):
                raise PreparedFormatError(f"{p / 'interactions.parquet'}: vhist_offset/vhist_len point "
                                          f"outside vhist.npy ({self.vhist.shape[0]} entries)")
        self._split_rows: dict[int, np.ndarray] = {}

    # pickling (DataLoader workers under spawn/forkserver): reload from disk, never copy arrays
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.path = Path(state["path"])
        self._load()

    def content_fingerprint(self) -> str:
        """sha256 of the dataset's data files as they are now (the id maps, interactions, features, visual
        histories): the digests stored by ``prepare`` for files whose size and mtime are unchanged, the others
        (or all, for a dataset prepared without a fingerprint) hashed once (segfast._fingerprint). The names
        of files whose content differs from the manifest's record are in ``content_changed`` afterwards."""
        if getattr(self, "_content_fp", None) is None:
            fp, self.content_changed = _fp.current(self.path, self.manifest.get("fingerprint"))
            self._content_fp = fp["sha256"]
        return self._content_fp

    @property
    def n_users(self) -> int:
        return int(self.users["user_idx"].shape[0])

    @property
    def n_videos(self) -> int:
        return int(self.videos["video_idx"].shape[0])

    @property
    def feature_dim(self) -> int | None:
        return None if self.features is None else int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.interactions["user_idx"].shape[0])

    def rows(self, split: str | int) -> np.ndarray:
        """int64 row numbers of a split ('train', 'dev', 'test', 'profile' or its code 0..3)."""
        if isinstance(split, str):
            if split not in _sp.SPLIT_CODES:
                raise ValueError(f"unknown split {split!r}; expected one of {list(_sp.SPLIT_CODES)}")
            code = _sp.SPLIT_CODES[split]
        else:
            code = int(split)
            if code not in _sp.SPLIT_NAMES:
                raise ValueError(f"unknown split code {split!r}; expected 0..3")
        if code not in self._split_rows:
            self._split_rows[code] = np.flatnonzero(self.interactions["split"] == code).astype(np.int64)
        return self._split_rows[code]

    def __repr__(self) -> str:
        return (f"Prepared({str(self.path)!r}, source={self.manifest['source']!r}, rows={len(self)}, "
                f"users={self.n_users}, videos={self.n_videos}, features={self.feature_dim})")


def _open_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PreparedFormatError(f"{path}: missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PreparedFormatError(f"{path}: not a readable .npy file ({e})") from None


def _read_parquet(path: Path, schema: dict, expect_rows) -> dict:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise PreparedFormatError(f"{path}: missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise PreparedFormatError(f"{path}: not a readable Parquet file ({e})") from None
    out = {}
    for name, dt in schema.items():
        if name not in table.column_names:
            raise PreparedFormatError(f"{path}: missing column {name!r}")
        arr = table.column(name).to_numpy()
        if arr.dtype != np.dtype(dt):
            raise PreparedFormatError(f"{path}: column {name!r} has dtype {arr.dtype}, expected "
                                      f"{np.dtype(dt).name}")
        out[name] = arr
    if expect_rows is not None and table.num_rows != expect_rows:
        raise PreparedFormatError(f"{path}: {table.num_rows} rows, manifest says {expect_rows}")
    return out


def load_prepared(path: str | Path) -> Prepared:
    """Open a prepared directory (validates the schema version, files, columns and sizes)."""
    return Prepared(path)
