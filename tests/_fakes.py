"""Small stand-ins shared by the tests (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import numpy as np


class RandomFeatures:
    """A feature source (dim, rows_for, read) with random normal features, segment rows laid out video by
    video; a read is a function of its first row, so repeated prepares give the same store."""

    def __init__(self, dim: int = 16):
        self.dim = dim

    def rows_for(self, video_ids, n_segments):
        off = np.zeros(len(video_ids) + 1, dtype=np.int64)
        np.cumsum(n_segments, out=off[1:])
        return off, np.arange(off[-1], dtype=np.int64)

    def read(self, rows):
        return np.random.default_rng(np.asarray(rows)[:1].tolist()).normal(size=(len(rows), self.dim))
