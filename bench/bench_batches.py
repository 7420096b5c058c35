"""Batch assembly throughput on one core: ID-only and visual (40 + up to 100 vectors of 1024 features).

Builds a synthetic SegMM-like prepared dataset (random float16 features, default 20K videos) with
``prepare_raw`` in a temp dir, then times ``BatchAssembler.assemble`` over shuffled train batches.
Targets (SPEC/brief): >= 200,000 rows/s ID-only, >= 20,000 rows/s visual.

    python bench/bench_batches.py [--users 200] [--per-user 1000] [--videos 20000] [--batch 1024]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segfast.data.batches import BatchAssembler
from segfast.data.prepared import load_prepared, prepare_raw
from segfast.data.sources import RawInteractions


class RandomFeatures:
    """Feature source with random (finite) features; segment rows are laid out video by video."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim = dim
        self.rng = np.random.default_rng(seed)

    def rows_for(self, video_ids, n_segments):
        off = np.zeros(len(video_ids) + 1, dtype=np.int64)
        np.cumsum(n_segments, out=off[1:])
        return off, np.arange(off[-1], dtype=np.int64)

    def read(self, rows):
        return self.rng.random((len(rows), self.dim), dtype=np.float32).astype(np.float64)


def synth_raw(users: int, per_user: int, videos: int, seed: int = 0) -> RawInteractions:
    rng = np.random.default_rng(seed)
    n = users * per_user
    dur = rng.integers(1000, 199_999, n)
    play = np.maximum(1, (dur * rng.exponential(0.6, n)).astype(np.int64))
    return RawInteractions(
        user_id=np.repeat(np.arange(users, dtype=np.int64), per_user),
        video_id=rng.integers(0, videos, n), time_ms=rng.integers(0, 3 * 86_400_000, n),
        duration_ms=dur, play_time_ms=play, source_row=np.arange(n, dtype=np.int64), rows_read=n)


def rate(asm: BatchAssembler, rows: np.ndarray, batch: int, min_s: float = 3.0) -> float:
    asm.assemble(rows[:batch])  # warm-up (page cache, allocator)
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, rows.shape[0] - batch + 1, batch):
            asm.assemble(rows[i:i + batch])
            done += batch
            if time.perf_counter() - t0 >= min_s:
                return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--per-user", type=int, default=1000)
    ap.add_argument("--videos", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--keep", help="prepared dir to (re)use instead of a temp dir")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (index_select gathers in parallel)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.keep and (Path(args.keep) / "manifest.json").exists():
        out = Path(args.keep)
    else:
        tmp = None if args.keep else tempfile.mkdtemp(prefix="segfast-bench-")
        out = Path(args.keep) if args.keep else Path(tmp) / "prepared"
        t0 = time.perf_counter()
        prepare_raw(synth_raw(args.users, args.per_user, args.videos), out, source="segmm",
                    feature_source=RandomFeatures(args.dim), progress=False)
        print(f"built prepared dataset in {time.perf_counter() - t0:.1f} s")
    try:
        p = load_prepared(out)
        rows = np.random.default_rng(1).permutation(p.rows("train"))
        print(f"{p}; train rows {rows.shape[0]}, mean vhist_len "
              f"{p.interactions['vhist_len'][rows].mean():.1f}, mean N {p.interactions['n_segments'].mean():.1f}")
        r = rate(BatchAssembler(p, features=False), rows, args.batch)
        print(f"ID-only:              {r:12,.0f} rows/s (target >= 200,000)")
        r = rate(BatchAssembler(p, features=True, feature_dtype=None), rows, args.batch)
        print(f"visual, float16 out:  {r:12,.0f} rows/s (target >= 20,000)")
        r = rate(BatchAssembler(p, features=True, feature_dtype=torch.float32), rows, args.batch)
        print(f"visual, float32 out:  {r:12,.0f} rows/s")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
