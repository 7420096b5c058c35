"""Splits, histories and visual user histories (SPEC section 4), vectorised with numpy.

All functions work on the table *sorted* by (user, time_ms, source_row) (see :func:`sort_order`); a row
number below is a position in that sorted table, which is also the row number of
``interactions.parquet``.

Choices fixed here (docs/internals.md style):

- **Random split keys.** Each row gets a pseudo-random 64-bit key from a splitmix64 hash of
  (seed, user_id, video_id, time_ms, duration_ms, play_time_ms), i.e. of the row's *content*, not its
  position in the file. The split is therefore deterministic for a seed and independent of the input row
  order (only exact duplicate rows are told apart by position, which cannot change the split counts).
  Within a user, the non-profile rows are ranked by key (ties by position); the first ``n_test`` ranks
  are test, the next ``n_dev`` dev, the rest train.
- **Rounding.** ``n_test = round_half_up(n / 10)`` and ``n_dev = round_half_up((n - n_test) / 10)`` with
  n the user's non-profile row count, computed in integers (``(n + 5) // 10``) so no float rounding
  (or banker's rounding) is involved. n = 1000 gives 100 test, 90 dev, 810 train.
- **Profile.** The first ``profile_len`` rows of each user by (time_ms, source_row) get split 3. For rows
  tied in time at the boundary, the source row decides.
- **History.** ``hist_len = min(hist_cap, position within the user)``: rows [r - hist_len, r), any split.
- **Visual history** (sources with features). For row r at user position p with history length h, the
  candidate *videos* are the history rows most recent first (r-1, r-2, ..., r-h), then the user's profile
  rows that precede the history window (positions min(profile_len, p - h) - 1 down to 0, most recent
  first). Profile rows are identified by row, not by video id: a video watched twice appears twice.
  Only past rows are ever used, so a profile row's own visual history never looks into the future.
  Each candidate video contributes its watched segments, slots 0 .. view_length-1 in slot order (all N
  for a full watch, none when the user left in the first segment). When a row has more than
  ``vhist_cap`` candidate segments, a seeded sample of ``vhist_cap`` is kept in candidate order; the
  sample keys are splitmix64 hashes of (seed, row, candidate index), so the result does not depend on
  chunking. Every row (profile rows included) gets a visual history.
- **Cold.** A video is cold when it has no row in the train split (``n_train == 0``); the flag is set on
  every row of such a video (train rows are never cold).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from segfast._hash import GOLDEN, splitmix64

__all__ = [
    "SPLIT_CODES",
    "SPLIT_NAMES",
    "sort_order",
    "first_occurrences",
    "group_starts",
    "hash_keys",
    "filter_users",
    "assign_splits",
    "history_lengths",
    "cold_flags",
    "vhist_lengths",
    "vhist_chunks",
    "visual_histories",
]

SPLIT_CODES = {"train": 0, "dev": 1, "test": 2, "profile": 3}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}

_GOLDEN = GOLDEN
_mix = splitmix64  # the one SplitMix64 finaliser (segfast._hash)


def hash_keys(seed: int, *columns: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random uint64 key per element from a seed and int columns (same length)."""
    if not columns:
        raise ValueError("hash_keys needs at least one column")
    n = np.asarray(columns[0]).shape[0]
    s = _mix(np.array([np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _GOLDEN], dtype=np.uint64))[0]
    h = np.full(n, s, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:
            c = np.asarray(c)
            if c.shape[0] != n:
                raise ValueError("hash_keys columns differ in length")
            h ^= c.astype(np.int64, copy=False).view(np.uint64)
            h += _GOLDEN
            h = _mix(h)
    return h


def sort_order(user_id: np.ndarray, time_ms: np.ndarray, source_row: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (user_id, time_ms, source_row)."""
    return np.lexsort((source_row, time_ms, user_id)).astype(np.int64)


def first_occurrences(sorted_user_id: np.ndarray, video_id: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
    """Keep mask over rows sorted by (user, time_ms, source_row): False for a row whose (user, video, time_ms)
    already occurred earlier (an exact duplicate interaction); the first occurrence is kept."""
    n = sorted_user_id.shape[0]
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    # duplicates share user and time, so they sit in one (user, time) run; order each run by video,
    # stable in row order, and mark every repeat of the previous (user, time, video)
    o = np.lexsort((np.arange(n), video_id, time_ms, sorted_user_id))
    u, t, v = sorted_user_id[o], time_ms[o], video_id[o]
    rep = (u[1:] == u[:-1]) & (t[1:] == t[:-1]) & (v[1:] == v[:-1])
    keep[o[1:][rep]] = False
    return keep


def group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a sorted key column: (starts int64[G], counts int64[G], group int64[R] per row)."""
    n = sorted_keys.shape[0]
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    brk = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], brk)).astype(np.int64)
    counts = np.diff(np.concatenate((starts, [n]))).astype(np.int64)
    group = np.repeat(np.arange(starts.shape[0], dtype=np.int64), counts)
    return starts, counts, group


def filter_users(sorted_user_id: np.ndarray, min_interactions: int) -> np.ndarray:
    """Boolean keep mask over sorted rows: users with at least ``min_interactions`` rows."""
    _, counts, group = group_starts(sorted_user_id)
    return (counts >= min_interactions)[group]


def _position_in_group(n: int, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.arange(n, dtype=np.int64) - np.repeat(starts, counts)


def assign_splits(
    user_id: np.ndarray,
    video_id: np.ndarray,
    time_ms: np.ndarray,
    duration_ms: np.ndarray,
    play_time_ms: np.ndarray,
    seed: int,
    profile_len: int = 0,
) -> np.ndarray:
    """Split code (int8: 0 train, 1 dev, 2 test, 3 profile) per row of a table sorted by user then time.

    Rows must already be sorted by (user_id, time_ms, source_row) and filtered.
    """
    n = user_id.shape[0]
    split = np.zeros(n, dtype=np.int8)
    if n == 0:
        return split
    starts, counts, group = group_starts(user_id)
    pos = _position_in_group(n, starts, counts)
    is_profile = pos < profile_len
    split[is_profile] = SPLIT_CODES["profile"]
    rest = np.flatnonzero(~is_profile)
    if rest.size == 0:
        return split
    key = hash_keys(seed, user_id[rest], video_id[rest], time_ms[rest], duration_ms[rest], play_time_ms[rest])
    g = group[rest]
    order = np.lexsort((rest, key, g))  # by group, then key, then position
    g_sorted = g[order]
    m = np.maximum(counts - profile_len, 0)  # non-profile rows per user
    m_starts = np.concatenate(([0], np.cumsum(m)[:-1]))
    rank = np.arange(rest.size, dtype=np.int64) - m_starts[g_sorted]
    n_test = (m + 5) // 10
    n_dev = (m - n_test + 5) // 10
    code = np.where(
        rank < n_test[g_sorted], SPLIT_CODES["test"],
        np.where(rank < (n_test + n_dev)[g_sorted], SPLIT_CODES["dev"], SPLIT_CODES["train"]),
    ).astype(np.int8)
    split[rest[order]] = code
    return split


def history_lengths(sorted_user_id: np.ndarray, cap: int = 50) -> np.ndarray:
    """hist_len = min(cap, position within the user) as int64."""
    n = sorted_user_id.shape[0]
    starts, counts, _ = group_starts(sorted_user_id)
    return np.minimum(_position_in_group(n, starts, counts), cap)


def cold_flags(video_idx: np.ndarray, split: np.ndarray, n_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_train int64[n_videos], is_cold bool[R]): cold = the row's video has no train row."""
    n_train = np.bincount(video_idx[split == SPLIT_CODES["train"]], minlength=n_videos).astype(np.int64)
    return n_train, n_train[video_idx] == 0


# ----------------------------------------------------------------------------------------------------
# Visual user histories
# ----------------------------------------------------------------------------------------------------

def _vhist_geometry(sorted_user_id, view_length, hist_len, profile_len):
    """Per row: (user start row, number of profile videos before the window, candidate segment total)."""
    n = sorted_user_id.shape[0]
    starts, counts, _ = group_starts(sorted_user_id)
    g_start = np.repeat(starts, counts)
    pos = np.arange(n, dtype=np.int64) - g_start
    hl = hist_len.astype(np.int64)
    nb = np.clip(np.minimum(profile_len, pos - hl), 0, None)
    csum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(view_length.astype(np.int64), out=csum[1:])
    rows = np.arange(n, dtype=np.int64)
    total = (csum[rows] - csum[rows - hl]) + (csum[g_start + nb] - csum[g_start])
    return g_start, nb, total


def vhist_lengths(sorted_user_id, view_length, hist_len, profile_len: int = 0, cap: int = 100) -> np.ndarray:
    """Visual history length per row (min(candidate segments, cap)), int64."""
    _, _, total = _vhist_geometry(sorted_user_id, view_length, hist_len, profile_len)
    return np.minimum(total, cap)


def vhist_chunks(
    sorted_user_id: np.ndarray,
    video_feat_offset: np.ndarray,
    view_length: np.ndarray,
    hist_len: np.ndarray,
    profile_len: int = 0,
    cap: int = 100,
    seed: int = 0,
    chunk_elems: int = 4_000_000,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (row_start, row_end, flat feature rows) for consecutive row ranges covering the table.

    ``video_feat_offset`` is the feature row of slot 0 of each row's video (per row, int64). The
    concatenation of the yielded arrays is vhist.npy; lengths are :func:`vhist_lengths`.
    """
    n = sorted_user_id.shape[0]
    g_start, nb, total = _vhist_geometry(sorted_user_id, view_length, hist_len, profile_len)
    vl = view_length.astype(np.int64)
    hl = hist_len.astype(np.int64)
    nvid = hl + nb
    # chunk boundaries so that the candidate segments of a chunk stay under chunk_elems
    csum_t = np.cumsum(total)
    r0 = 0
    while r0 < n:
        base = csum_t[r0 - 1] if r0 > 0 else 0
        r1 = int(np.searchsorted(csum_t, base + chunk_elems, side="right"))
        r1 = min(max(r1, r0 + 1), n)
        yield r0, r1, _vhist_rows(r0, r1, g_start, nb, hl, nvid, vl, video_feat_offset, total, cap, seed)
        r0 = r1


def _vhist_rows(r0, r1, g_start, nb, hl, nvid, vl, feat_off, total, cap, seed):
    rows = np.arange(r0, r1, dtype=np.int64)
    nv = nvid[r0:r1]
    if nv.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    # candidate videos, flat: index j within the row's candidate list
    vrow = np.repeat(rows, nv)
    v_start = np.concatenate(([0], np.cumsum(nv)[:-1]))
    j = np.arange(vrow.shape[0], dtype=np.int64) - np.repeat(v_start, nv)
    h = hl[vrow]
    cand = np.where(j < h, vrow - 1 - j, g_start[vrow] + nb[vrow] - 1 - (j - h))
    # expand candidate videos into their watched segments
    cvl = vl[cand]
    seg_owner = np.repeat(np.arange(cand.shape[0], dtype=np.int64), cvl)
    s_start = np.concatenate(([0], np.cumsum(cvl)[:-1]))
    slot = np.arange(seg_owner.shape[0], dtype=np.int64) - np.repeat(s_start, cvl)
    feat = feat_off[cand[seg_owner]] + slot
    srow = vrow[seg_owner]
    tot = total[r0:r1]
    over = tot > cap
    if not over.any():
        return feat
    # seeded order-preserving sample of `cap` segments for rows with more than `cap` candidates
    seg_start_row = np.concatenate(([0], np.cumsum(tot)[:-1]))
    t_idx = np.arange(srow.shape[0], dtype=np.int64) - np.repeat(seg_start_row, tot)
    sel = over[srow - r0]
    idx_over = np.flatnonzero(sel)
    key = hash_keys(seed, srow[idx_over], t_idx[idx_over])
    # one uint64 sort key: chunk-local row in the top 24 bits, 40 bits of hash below
    combined = ((srow[idx_over] - r0).astype(np.uint64) << np.uint64(40)) | (key >> np.uint64(24))
    o = np.argsort(combined)
    rsorted = srow[idx_over][o] - r0
    tot_over = np.where(over, tot, 0)
    start_over = np.concatenate(([0], np.cumsum(tot_over)[:-1]))
    rank = np.arange(o.shape[0], dtype=np.int64) - start_over[rsorted]
    keep = ~sel
    keep[idx_over[o[rank < cap]]] = True
    return feat[keep]


def visual_histories(sorted_user_id, video_feat_offset, view_length, hist_len, profile_len=0, cap=100,
                     seed=0) -> tuple[np.ndarray, np.ndarray]:
    """In-memory (flat int64 feature rows, offsets int64[R+1]); for tests and small tables."""
    parts = [c for _, _, c in vhist_chunks(sorted_user_id, video_feat_offset, view_length, hist_len,
                                           profile_len, cap, seed)]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    lens = vhist_lengths(sorted_user_id, view_length, hist_len, profile_len, cap)
    off = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    if off[-1] != flat.shape[0]:
        raise AssertionError("visual history lengths disagree")  # internal invariant
    return flat, off
