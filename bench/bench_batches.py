"""Batch assembly throughput on one core: ID-only and visual (40 + up to 100 vectors of 1024 features).

Builds a synthetic SegMM-like prepared dataset (random float16 features, default 20K videos) with
``prepare_raw`` in a temp dir, then times, over shuffled batches of ``--batch`` rows, one thread:

- training batches (``segfast.data.batches.BatchAssembler``): ID-only; visual / both with the device-resident
  feature store (``feature_rows=True``: integer feature rows only, the host touches no feature bytes; the
  batch of a "both" model is the visual one); and the host-gathered float16 / float32 feature batches;
- scoring batches (``segfast.scoring.batches.Assembler``, unique batches as ``segfast score`` builds them) for
  id, visual and both models over random (user, video, history position) pairs, with a resident store.

Targets (issue 14): >= 1,000,000 rows/s for every modality with the resident store (SPEC: >= 200,000 ID-only,
>= 20,000 with host-gathered features).

    python bench/bench_batches.py [--users 200] [--per-user 1000] [--videos 20000] [--batch 1024] [--json f]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segfast.data.batches import BatchAssembler
from segfast.features import FeatureStore
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


def score_rate(p, store, modality: str, batch: int, min_s: float = 3.0, seed: int = 2) -> float:
    """Rows/s of the scorer's batch assembly (unique batches) for a ``modality`` model over random pairs."""
    from segfast.model import ModelConfig
    from segfast.scoring.batches import Assembler
    from segfast.scoring.index import IdIndex

    cfg = ModelConfig(modality=modality, n_users=p.n_users, n_videos=p.n_videos,
                      feature_dim=None if modality == "id" else p.feature_dim)
    ix = IdIndex(p, cfg.uses_visual, cfg.max_user_tokens)
    asm = Assembler(ix, p, cfg, fast=True, pin=False, features=store if cfg.uses_visual else None)
    rng = np.random.default_rng(seed)
    n = 64 * batch
    u = rng.integers(0, p.n_users, n)
    v = rng.integers(0, p.n_videos, n)
    v = v[ix.feat_off[v] >= 0] if cfg.uses_visual else v
    n = v.shape[0] - v.shape[0] % batch
    u, v = u[:n], v[:n]
    pos = rng.integers(0, ix.count[u] + 1)  # a history position of the user (count = all of them: "latest")
    nseg = ix.nseg[v]
    # the scorer buckets each part by N before batching
    order = np.argsort(nseg, kind="stable")
    rows_in, u, v, nseg, pos = np.arange(n)[order], u[order], v[order], nseg[order], pos[order]
    asm.assemble(rows_in[:batch], u[:batch], v[:batch], nseg[:batch], pos[:batch])
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, n, batch):
            sl = slice(i, i + batch)
            asm.assemble(rows_in[sl], u[sl], v[sl], nseg[sl], pos[sl])
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
    ap.add_argument("--skip-host-gather", action="store_true", help="skip the (slow) host-gathered feature rows")
    ap.add_argument("--json", default=None, help="write the rates here")
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
        res = {}

        def show(key, r, note=""):
            res[key] = round(r, 1)
            print(f"{key:34s} {r:12,.0f} rows/s {note}", flush=True)

        # a resident store (CPU, the stored float16: the host-side assembly does not depend on its device)
        t0 = time.perf_counter()
        store = FeatureStore(p.features, "cpu", dtype=torch.float16)
        print(f"{store} built in {time.perf_counter() - t0:.1f} s")
        show("train id", rate(BatchAssembler(p, features=False), rows, args.batch), "(target >= 1,000,000)")
        r = rate(BatchAssembler(p, features=True, feature_rows=True), rows, args.batch)
        show("train visual, resident store", r, "(target >= 1,000,000)")
        show("train both, resident store", r, "(the same batch as visual)")
        for modality in ("id", "visual", "both"):
            show(f"score {modality}" + (", resident store" if modality != "id" else ""),
                 score_rate(p, store, modality, args.batch), "(target >= 1,000,000)")
        if not args.skip_host_gather:
            show("train visual, host float16 out",
                 rate(BatchAssembler(p, features=True, feature_dtype=None), rows, args.batch))
            show("train visual, host float32 out",
                 rate(BatchAssembler(p, features=True, feature_dtype=torch.float32), rows, args.batch))
        if args.json:
            Path(args.json).write_text(json.dumps({"threads": args.threads, "batch": args.batch,
                                                   "rows_per_s": res}, indent=2) + "\n")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
