"""The SegRec "effective view" label (SPEC section 8), fitted on the training split only.

Choices fixed here:

- Duration buckets: 10 buckets by the deciles of ``duration_ms`` over the *training rows* (numpy's default
  linear quantiles at 0.1 .. 0.9 give 9 edges). A duration d falls in bucket ``searchsorted(edges, d,
  side="right")``, i.e. the number of edges <= d (0..9). Duplicate edges (many equal durations) leave some
  buckets empty; that is allowed.
- Medians: per bucket, the median of ``play_time_ms / duration_ms`` over the training rows of the bucket
  (the ratio may exceed 1 for replays). A bucket with no training row uses the median over all training rows.
- Label: effective = ratio > median of the row's bucket, strictly; a ratio equal to the median (a tie) is
  *not* effective.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["N_BUCKETS", "EffectiveViewLabeler", "duration_bucket_edges", "duration_buckets", "bucket_medians",
           "effective_view_labels"]

N_BUCKETS = 10


def _check(duration_ms, play_time_ms=None):
    d = np.asarray(duration_ms)
    if d.ndim != 1:
        raise ValueError(f"duration_ms: expected a 1-D array, got shape {list(d.shape)}")
    d = d.astype(np.int64)
    if d.size and d.min() <= 0:
        i = int(np.flatnonzero(d <= 0)[0])
        raise ValueError(f"duration_ms: row {i} has duration {int(d[i])}; durations must be > 0")
    if play_time_ms is None:
        return d
    p = np.asarray(play_time_ms)
    if p.shape != d.shape:
        raise ValueError(f"play_time_ms has shape {list(p.shape)}, duration_ms {list(d.shape)}")
    p = p.astype(np.int64)
    if p.size and p.min() < 0:
        i = int(np.flatnonzero(p < 0)[0])
        raise ValueError(f"play_time_ms: row {i} has play time {int(p[i])}; play times must be >= 0")
    return d, p


def duration_bucket_edges(train_duration_ms, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """The ``n_buckets - 1`` interior quantile edges (float64) of the training durations."""
    d = _check(train_duration_ms)
    if d.size == 0:
        raise ValueError("duration_bucket_edges: no training rows")
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    return np.quantile(d.astype(np.float64), np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])


def duration_buckets(duration_ms, edges: np.ndarray) -> np.ndarray:
    """int64 bucket of each duration: the number of edges <= d."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), _check(duration_ms).astype(np.float64),
                           side="right").astype(np.int64)


def bucket_medians(ratio, bucket, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """float64 [n_buckets]: the median ratio per bucket; an empty bucket gets the overall median."""
    ratio = np.asarray(ratio, dtype=np.float64)
    bucket = np.asarray(bucket, dtype=np.int64)
    if ratio.size == 0:
        raise ValueError("bucket_medians: no training rows")
    overall = float(np.median(ratio))
    out = np.full(n_buckets, overall)
    for q in range(n_buckets):
        m = bucket == q
        if m.any():
            out[q] = float(np.median(ratio[m]))
    return out


@dataclass
class EffectiveViewLabeler:
    """Bucket edges and medians fitted on training rows; ``label`` applies them to any rows."""

    edges: np.ndarray
    medians: np.ndarray

    @classmethod
    def fit(cls, train_play_time_ms, train_duration_ms, n_buckets: int = N_BUCKETS) -> "EffectiveViewLabeler":
        d, p = _check(train_duration_ms, train_play_time_ms)
        edges = duration_bucket_edges(d, n_buckets)
        med = bucket_medians(p / d, duration_buckets(d, edges), n_buckets)
        return cls(edges=edges, medians=med)

    def label(self, play_time_ms, duration_ms) -> np.ndarray:
        """int8 [R]: 1 when play/duration > the median of the duration's bucket, else 0."""
        d, p = _check(duration_ms, play_time_ms)
        return (p / d > self.medians[duration_buckets(d, self.edges)]).astype(np.int8)

    def to_dict(self) -> dict:
        return {"edges_ms": [float(x) for x in self.edges], "medians": [float(x) for x in self.medians]}


def effective_view_labels(interactions: dict, train_rows=None) -> tuple[np.ndarray, EffectiveViewLabeler]:
    """(int8 labels of every row of a prepared interactions table, the fitted labeler). Fitted on
    ``train_rows`` (default: the rows with split == 0)."""
    for k in ("play_time_ms", "duration_ms"):
        if k not in interactions:
            raise ValueError(f"prepared interactions: missing column {k!r}")
    p = np.asarray(interactions["play_time_ms"], dtype=np.int64)
    d = np.asarray(interactions["duration_ms"], dtype=np.int64)
    if train_rows is None:
        train_rows = np.flatnonzero(np.asarray(interactions["split"]) == 0)
    train_rows = np.asarray(train_rows, dtype=np.int64)
    lab = EffectiveViewLabeler.fit(p[train_rows], d[train_rows])
    return lab.label(p, d), lab
