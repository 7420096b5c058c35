"""The segment label rule (SPEC section 2), vectorised over rows.

- N = ceil(duration_ms / 5000)
- play >= duration: full watch, label = [1] * N, view_length = N
- else k = ceil(play / 5000) - 1, label = [1] * k + [0] + [-1] * (N - k - 1), view_length = k
- target slot y = view_length (slot N, the first padding slot, for a full watch)
"""
from __future__ import annotations

import numpy as np

from segfast import MAX_SLOTS, SEGMENT_MS

__all__ = [
    "n_segments",
    "view_length",
    "target_slot",
    "label_matrix",
    "label_vector",
    "labels_from_rows",
]


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -((-a) // b)


def n_segments(duration_ms) -> np.ndarray:
    """N = ceil(duration_ms / 5000) as int64 (scalar input gives a 0-d array)."""
    d = np.asarray(duration_ms, dtype=np.int64)
    return _ceil_div(d, SEGMENT_MS)


def view_length(play_time_ms, duration_ms) -> np.ndarray:
    """Number of fully watched segments: N when play >= duration, else ceil(play / 5000) - 1.

    Only meaningful for play > 0 (readers drop play <= 0). The result is clipped to [0, N] so that a
    row inconsistent with its duration can never index outside the video.
    """
    p = np.asarray(play_time_ms, dtype=np.int64)
    d = np.asarray(duration_ms, dtype=np.int64)
    n = _ceil_div(d, SEGMENT_MS)
    k = _ceil_div(p, SEGMENT_MS) - 1
    vl = np.where(p >= d, n, k)
    return np.clip(vl, 0, n)


def target_slot(play_time_ms, duration_ms) -> np.ndarray:
    """Target slot y = view_length (the leave slot, or N for a full watch)."""
    return view_length(play_time_ms, duration_ms)


def label_matrix(n_segments, target, slots: int = MAX_SLOTS) -> np.ndarray:
    """int8 [R, slots] labels: 1 before target, 0 at target when target < N, -1 after and on padding."""
    n = np.asarray(n_segments, dtype=np.int64).reshape(-1)
    y = np.asarray(target, dtype=np.int64).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"n_segments and target differ in length: {n.shape[0]} vs {y.shape[0]}")
    if n.size and (n.min() < 0 or n.max() > slots):
        raise ValueError(f"n_segments must be in [0, {slots}], got range [{n.min()}, {n.max()}]")
    if n.size and (y.min() < 0 or np.any(y > n)):
        raise ValueError("target must be in [0, n_segments]")
    i = np.arange(slots, dtype=np.int64)[None, :]
    out = np.full((n.shape[0], slots), -1, dtype=np.int8)
    out[i < y[:, None]] = 1
    out[(i == y[:, None]) & (y[:, None] < n[:, None])] = 0
    return out


def label_vector(play_time_ms: int, duration_ms: int) -> np.ndarray:
    """The unpadded label (length N) of one row, int8, exactly as the SegMM sample's label_1D."""
    n = int(n_segments(duration_ms))
    y = int(view_length(play_time_ms, duration_ms))
    return label_matrix([n], [y], slots=max(n, 1))[0, :n]


def labels_from_rows(play_time_ms, duration_ms) -> tuple[np.ndarray, np.ndarray]:
    """Flat concatenation of the unpadded labels of many rows: (values int8 [sum N], offsets int64 [R+1])."""
    n = n_segments(duration_ms).reshape(-1)
    y = view_length(play_time_ms, duration_ms).reshape(-1)
    offsets = np.zeros(n.shape[0] + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    total = int(offsets[-1])
    row = np.repeat(np.arange(n.shape[0]), n)
    pos = np.arange(total, dtype=np.int64) - offsets[:-1][row]
    yr = y[row]
    vals = np.where(pos < yr, 1, np.where(pos == yr, 0, -1)).astype(np.int8)
    return vals, offsets
