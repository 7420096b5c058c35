"""Reader of the SegMM release (SPEC section 3).

- ``SegMM_inter.csv``: user_id, time_ms, photo_id, duration_ms, playing_time, wtd_effective_view
  (photo_id is the video id), read with pyarrow.csv.
- ``SegMM_photoidframeid2lineid.json``: "<photo_id>-<segment_index>" -> row of the feature matrix
  (segment_index 0-based; a map whose smallest index is 1 is taken as 1-based).
- ``SegMM_feat_memmap.dat`` (or its parts ``SegMM_feat_memmap.dat.*``, concatenated in sorted order):
  raw float64 [rows, dim], opened read-only with np.memmap and never loaded whole. Its size must be exactly
  (largest line id + 1) x dim x 8 bytes: a longer file is an error too (a file of dimension 2d read with
  ``feature_dim=d`` would otherwise pass as twice the rows).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from segfast.data.sources import (
    DataFormatError, RawInteractions, apply_filters, check_header, locate_bad_int, read_csv_header,
)

INTER_FILE = "SegMM_inter.csv"
MAP_FILE = "SegMM_photoidframeid2lineid.json"
FEAT_FILE = "SegMM_feat_memmap.dat"
INTER_COLUMNS = ("user_id", "time_ms", "photo_id", "duration_ms", "playing_time", "wtd_effective_view")
_USED = ("user_id", "time_ms", "photo_id", "duration_ms", "playing_time")
_SEG_SHIFT = 20  # composite key = photo_id << 20 | segment_index
_READ_CHUNK_ROWS = 4096


# --------------------------------------------------------------------------- feature matrix
class FeatureMatrix:
    """Read-only float64 [rows, dim] matrix over one raw file or several concatenated parts.

    Parts may be cut at any byte (``split -b``): each part is memory-mapped over the rows it holds
    whole, and the (at most one per boundary) rows straddling two parts are assembled from both.
    """

    def __init__(self, paths, dim: int, dtype=np.float64):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataFormatError("no feature file given")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.dim * self.dtype.itemsize
        sizes = [p.stat().st_size for p in self.paths]
        total = sum(sizes)
        names = ", ".join(p.name for p in self.paths)
        if total == 0:
            raise DataFormatError(f"{names}: feature file is empty")
        if total % self.row_bytes:
            raise DataFormatError(
                f"{names}: size {total} bytes is not rows x {self.dim} x {self.dtype.itemsize} bytes "
                f"({total / self.row_bytes:.3f} rows); wrong feature_dim, or a truncated/missing part?")
        self.rows = total // self.row_bytes
        self._starts = np.zeros(len(sizes) + 1, dtype=np.int64)  # global byte offset of each part
        np.cumsum(sizes, out=self._starts[1:])
        self._maps = []  # (first whole row, memmap [k, dim] or None)
        for p, size, g0 in zip(self.paths, sizes, self._starts[:-1]):
            g0 = int(g0)
            r0 = -(-g0 // self.row_bytes)
            r1 = (g0 + size) // self.row_bytes
            if r1 > r0:
                mm = np.memmap(p, dtype=self.dtype, mode="r", offset=r0 * self.row_bytes - g0, shape=(r1 - r0, self.dim))
            else:
                mm = None
            self._maps.append((r0, r1, mm))

    @property
    def shape(self):
        return (self.rows, self.dim)

    def _straddler(self, r: int) -> np.ndarray:
        b0, b1 = r * self.row_bytes, (r + 1) * self.row_bytes
        buf = bytearray()
        for i, p in enumerate(self.paths):
            s, e = int(self._starts[i]), int(self._starts[i + 1])
            lo, hi = max(s, b0), min(e, b1)
            if lo < hi:
                with open(p, "rb") as f:
                    f.seek(lo - s)
                    buf += f.read(hi - lo)
        return np.frombuffer(bytes(buf), dtype=self.dtype)

    def read(self, rows) -> np.ndarray:
        """Rows (any order, repeats allowed) -> float64 [len(rows), dim], read in sorted chunks."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.shape[0], self.dim), dtype=np.float64)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            bad = rows[(rows < 0) | (rows >= self.rows)][0]
            raise IndexError(f"feature row {bad} outside [0, {self.rows})")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        for r0, r1, mm in self._maps:
            lo, hi = np.searchsorted(srt, [r0, r1])
            for c in range(lo, hi, _READ_CHUNK_ROWS):
                ce = min(hi, c + _READ_CHUNK_ROWS)
                out[order[c:ce]] = mm[srt[c:ce] - r0]
        # rows straddling two parts (not covered by any part's whole rows)
        covered = np.zeros(srt.shape[0], dtype=bool)
        for r0, r1, _ in self._maps:
            lo, hi = np.searchsorted(srt, [r0, r1])
            covered[lo:hi] = True
        for i in np.flatnonzero(~covered):
            out[order[i]] = self._straddler(int(srt[i]))
        return out


# --------------------------------------------------------------------------- segment map
class SegmmFeatures:
    """Per-segment visual features of the SegMM release (``FeatureSource`` in docs/internals.md)."""

    def __init__(self, matrix: FeatureMatrix, photo_id: np.ndarray, segment: np.ndarray, line: np.ndarray,
                 map_path: Path | str = MAP_FILE, segment_base: int = 0, missing: str = "raise"):
        if missing not in ("raise", "zero"):
            raise ValueError(f"missing must be 'raise' or 'zero', got {missing!r}")
        self.matrix = matrix
        self.dim = matrix.dim
        self.map_path = Path(map_path)
        self.segment_base = int(segment_base)
        self.missing = missing
        comp = (photo_id.astype(np.int64) << _SEG_SHIFT) | segment.astype(np.int64)
        order = np.argsort(comp, kind="stable")
        self._keys = comp[order]
        self._lines = line.astype(np.int64)[order]
        dup = np.flatnonzero(self._keys[1:] == self._keys[:-1])
        if dup.size:
            k = self._keys[dup[0]]
            raise DataFormatError(f"{self.map_path}: duplicate key {k >> _SEG_SHIFT}-{k & ((1 << _SEG_SHIFT) - 1)}")

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def _lookup(self, video_ids: np.ndarray, n_segments: np.ndarray, missing: str):
        offsets = np.zeros(video_ids.shape[0] + 1, dtype=np.int64)
        np.cumsum(n_segments, out=offsets[1:])
        total = int(offsets[-1])
        owner = np.repeat(np.arange(video_ids.shape[0], dtype=np.int64), n_segments)
        seg = np.arange(total, dtype=np.int64) - offsets[:-1][owner] + self.segment_base
        comp = (video_ids[owner] << _SEG_SHIFT) | seg
        pos = np.searchsorted(self._keys, comp)
        pos_c = np.minimum(pos, max(len(self._keys) - 1, 0))
        found = (pos < len(self._keys)) & (self._keys[pos_c] == comp) if len(self._keys) else np.zeros(total, bool)
        rows = np.where(found, self._lines[pos_c] if len(self._keys) else -1, -1)
        if missing == "raise" and not found.all():
            miss = np.flatnonzero(~found)
            i = miss[0]
            nv = np.unique(owner[miss]).size
            raise DataFormatError(
                f"{self.map_path}: no feature row for key \"{video_ids[owner[i]]}-{seg[i]}\" "
                f"({miss.size} segment(s) of {nv} video(s) missing); the map must hold every segment "
                f"{self.segment_base}..{self.segment_base}+N-1 of each video (N = ceil(duration_ms/5000))")
        return offsets, rows

    def rows_for(self, video_ids, n_segments, missing: str | None = None):
        """Feature rows of the segments of videos.

        Vector input -> (offsets int64 [V+1], rows int64 [sum N]); video j's segment i is
        ``rows[offsets[j] + i]``. Scalar input -> rows int64 [N]. A missing segment raises DataFormatError
        naming its key (``missing="raise"``, the default) or gets row -1 (``missing="zero"``: read()
        returns zeros for it).
        """
        missing = self.missing if missing is None else missing
        scalar = np.ndim(video_ids) == 0
        v = np.asarray(video_ids, dtype=np.int64).reshape(-1)
        n = np.asarray(n_segments, dtype=np.int64).reshape(-1)
        if v.shape != n.shape:
            raise ValueError(f"video_ids and n_segments differ in length: {v.shape[0]} vs {n.shape[0]}")
        if n.size and n.min() < 0:
            raise ValueError("n_segments must be >= 0")
        offsets, rows = self._lookup(v, n, missing)
        return rows if scalar else (offsets, rows)

    def has_all(self, video_ids, n_segments) -> np.ndarray:
        """bool [V]: whether every segment of each video has a feature row."""
        v = np.asarray(video_ids, dtype=np.int64).reshape(-1)
        n = np.asarray(n_segments, dtype=np.int64).reshape(-1)
        offsets, rows = self._lookup(v, n, "zero")
        bad = np.add.reduceat((rows < 0).astype(np.int64), offsets[:-1]) if rows.size else np.zeros(v.size, np.int64)
        bad = np.where(n > 0, bad, 0)
        return bad == 0

    def read(self, rows) -> np.ndarray:
        """float64 [len(rows), dim]; row -1 (a missing segment under missing="zero") reads as zeros."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        neg = rows < 0
        if not neg.any():
            return self.matrix.read(rows)
        out = np.zeros((rows.shape[0], self.dim), dtype=np.float64)
        ok = ~neg
        out[ok] = self.matrix.read(rows[ok])
        return out


def feature_parts(features_dir: Path) -> list[Path]:
    """The feature file, or its parts ``SegMM_feat_memmap.dat.*`` in sorted order (numeric suffixes
    sorted as numbers)."""
    single = features_dir / FEAT_FILE
    if single.is_file():
        return [single]
    parts = [p for p in features_dir.glob(FEAT_FILE + ".*") if p.is_file()]
    if not parts:
        return []

    def key(p: Path):
        suf = p.name[len(FEAT_FILE) + 1:]
        return (0, int(suf), "") if suf.isdigit() else (1, 0, suf)

    return sorted(parts, key=key)


def load_segment_map(path: Path):
    """Parse the JSON map -> (photo_id, segment, line) int64 arrays."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: file is empty (expected a JSON object \"<photo_id>-<segment>\": line_id)")
    try:
        with open(path, "rb") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict) or not d:
        raise DataFormatError(f"{path}: expected a non-empty JSON object mapping \"<photo_id>-<segment>\" to a line id")
    keys = list(d.keys())
    pat = re.compile(r"^\d+-\d+$")
    try:
        if sum(1 for k in keys if k.count("-") != 1):
            raise ValueError
        parts = np.array("-".join(keys).split("-"), dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((k for k in keys if not pat.match(k)), keys[0])
        raise DataFormatError(f"{path}: key {bad!r}: expected \"<photo_id>-<segment_index>\"") from None
    if parts.min() < 0:
        bad = next((k for k in keys if not pat.match(k)), keys[0])
        raise DataFormatError(f"{path}: key {bad!r}: expected \"<photo_id>-<segment_index>\"")
    vals = list(d.values())
    line = np.array(vals)
    if line.ndim != 1 or line.dtype.kind not in "iu":
        bad = next((k for k, x in d.items() if not isinstance(x, int) or isinstance(x, bool)), keys[0])
        raise DataFormatError(f"{path}: key {bad!r}: expected an integer line id, got {d[bad]!r}")
    line = line.astype(np.int64)
    if line.min() < 0:
        i = int(np.argmin(line))
        raise DataFormatError(f"{path}: key {keys[i]!r}: negative line id {line[i]}")
    return parts[0::2].copy(), parts[1::2].copy(), line


def open_features(features_dir, feature_dim: int = 1024, missing: str = "raise") -> SegmmFeatures:
    features_dir = Path(features_dir)
    map_path = features_dir / MAP_FILE
    parts = feature_parts(features_dir)
    if not map_path.is_file() or not parts:
        raise DataFormatError(
            f"{features_dir}: expected the SegMM feature files {MAP_FILE} and {FEAT_FILE} (or its parts "
            f"{FEAT_FILE}.*); missing: "
            + ", ".join(n for n, ok in ((MAP_FILE, map_path.is_file()), (FEAT_FILE, bool(parts))) if not ok))
    photo, seg, line = load_segment_map(map_path)
    matrix = FeatureMatrix(parts, feature_dim)
    need = int(line.max()) + 1
    if matrix.rows != need:
        # exact: a longer file is as wrong as a shorter one (a wrong --feature-dim reads a file of dimension
        # 2d as twice the rows of dimension d, which "at least" would have accepted)
        raise DataFormatError(
            f"{', '.join(str(p) for p in parts)}: size {matrix.rows * matrix.row_bytes} bytes "
            f"({matrix.rows} rows of {feature_dim} float64) but {map_path.name} refers to line ids 0..{need - 1}; "
            f"expected exactly {need} x {feature_dim} x 8 = {need * matrix.row_bytes} bytes "
            f"({'wrong --feature-dim, or extra data after the last vector' if matrix.rows > need else 'a truncated or missing part?'})")
    base = int(seg.min())
    if base not in (0, 1):
        raise DataFormatError(f"{map_path}: smallest segment index is {base}; expected 0 (or 1 for a 1-based map)")
    return SegmmFeatures(matrix, photo, seg, line, map_path=map_path, segment_base=base, missing=missing)


# --------------------------------------------------------------------------- interactions
def read_segmm_interactions(path) -> RawInteractions:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected {INTER_FILE} with columns {', '.join(INTER_COLUMNS)})")
    header = read_csv_header(path)
    check_header(path, header, INTER_COLUMNS)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.int64() for c in _USED}, include_columns=list(_USED)),
        )
    except pa.ArrowInvalid as e:
        where = locate_bad_int(path, header, _USED)
        raise DataFormatError(f"{path}: {where or 'bad CSV'} ({e})") from None
    if table.num_rows == 0:
        raise DataFormatError(f"{path}: no data rows after the header")
    cols = {}
    for c in _USED:
        col = table.column(c)
        if col.null_count:
            r = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataFormatError(f"{path}: line {r + 2} (data row {r}), field {c!r}: expected an integer, got an empty value")
        cols[c] = col.to_numpy().astype(np.int64, copy=False)
    del table
    n = cols["user_id"].shape[0]
    keep, dropped = apply_filters(play_time_ms=cols["playing_time"], duration_ms=cols["duration_ms"])
    return RawInteractions(
        user_id=cols["user_id"][keep], video_id=cols["photo_id"][keep], time_ms=cols["time_ms"][keep],
        duration_ms=cols["duration_ms"][keep], play_time_ms=cols["playing_time"][keep],
        source_row=np.flatnonzero(keep).astype(np.int64), rows_read=n, dropped=dropped, source="segmm")


def read_segmm(input_dir, features_dir=None, feature_dim: int = 1024, with_features: bool = True,
               missing: str = "raise"):
    """Read the SegMM release -> (RawInteractions, SegmmFeatures or None when ``with_features`` is False).

    ``features_dir`` defaults to ``input_dir``. The interactions are filtered (play_time <= 0,
    duration outside (0, 200000)), not checked against the feature map: call
    ``features.rows_for(video_ids, n_segments)`` for that (it raises naming the first missing key).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataFormatError(f"{input_dir}: not a directory (expected the SegMM release folder with {INTER_FILE}, "
                              f"{MAP_FILE} and {FEAT_FILE})")
    inter = input_dir / INTER_FILE
    if not inter.is_file():
        raise DataFormatError(f"{input_dir}: {INTER_FILE} not found (the SegMM release folder must hold "
                              f"{INTER_FILE}, {MAP_FILE} and {FEAT_FILE} or its parts)")
    raw = read_segmm_interactions(inter)
    feats = None
    if with_features:
        feats = open_features(Path(features_dir) if features_dir is not None else input_dir, feature_dim, missing)
    return raw, feats
