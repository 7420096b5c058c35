"""Time the synthetic generator and the raw readers at a given scale; prints a table.

    python bench/bench_synth.py --format kuairand --scale 1k --out /tmp/segfast_bench
    python bench/bench_synth.py --format segmm --users 2400 --videos 362430 --interactions 902115 --feature-dim 64
    python bench/bench_synth.py --format kuairand --users 60 --videos 800 --interactions 100000 --keep

Peak RSS is the process maximum (resource.getrusage), so run one configuration per process for clean
memory numbers. The output folder is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from segfast.data.labels import n_segments
from segfast.data.synth import (
    DEFAULT_FEATURE_DIM, DEFAULT_INTERACTIONS, DEFAULT_SEED, DEFAULT_USERS, DEFAULT_VIDEOS, synth,
)

SCALES = {
    # name: (format, users, videos, interactions)
    "demo": (None, DEFAULT_USERS, DEFAULT_VIDEOS, DEFAULT_INTERACTIONS),
    "1k": ("kuairand", 1000, 4_369_953, 11_700_000),        # KuaiRand-1K: raw log rows
    "segmm": ("segmm", 2400, 362_430, 902_115),             # SegMM release
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=("segmm", "kuairand"), default="kuairand")
    ap.add_argument("--scale", choices=sorted(SCALES), default=None, help="preset sizes (overridden by explicit flags)")
    ap.add_argument("--users", type=int)
    ap.add_argument("--videos", type=int)
    ap.add_argument("--interactions", type=int)
    ap.add_argument("--feature-dim", type=int, default=DEFAULT_FEATURE_DIM)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--chunk-mb", type=int, default=64, help="read_kuairand chunk_bytes in MiB")
    ap.add_argument("--out", default="/tmp/segfast_bench_synth")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)

    fmt, users, videos, inter = a.format, DEFAULT_USERS, DEFAULT_VIDEOS, DEFAULT_INTERACTIONS
    if a.scale:
        pf, users, videos, inter = SCALES[a.scale]
        fmt = pf or fmt
    users = a.users or users
    videos = a.videos or videos
    inter = a.interactions or inter
    out = Path(a.out) / f"{fmt}_{users}u_{inter}r"
    if out.exists():
        shutil.rmtree(out)
    free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
    est = inter * 80 + (videos * 11 * a.feature_dim * 8 if fmt == "segmm" else 0)
    if est > 0.8 * free:
        print(f"refusing: about {est / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free", file=sys.stderr)
        return 2

    rows = []
    t0 = time.perf_counter()
    s = synth(fmt, out, users=users, videos=videos, interactions=inter, seed=a.seed, feature_dim=a.feature_dim,
              progress=a.progress)
    t_synth = time.perf_counter() - t0
    rows.append(("synth", t_synth, s["rows"] / t_synth, _rss_mb(), _dir_bytes(out)))

    t0 = time.perf_counter()
    if fmt == "kuairand":
        from segfast.data.sources.kuairand import read_kuairand

        raw = read_kuairand(out, chunk_bytes=a.chunk_mb << 20, progress=a.progress)
        t_read = time.perf_counter() - t0
        rows.append(("read_kuairand", t_read, raw.rows_read / t_read, _rss_mb(), 0))
    else:
        from segfast.data.sources.segmm import read_segmm

        raw, feats = read_segmm(out, feature_dim=a.feature_dim)
        t_read = time.perf_counter() - t0
        rows.append(("read_segmm (csv + map)", t_read, raw.rows_read / t_read, _rss_mb(), 0))
        t0 = time.perf_counter()
        vids, first = np.unique(raw.video_id, return_index=True)
        offs, frows = feats.rows_for(vids, n_segments(raw.duration_ms[first]))
        t_rows = time.perf_counter() - t0
        rows.append(("rows_for (all videos)", t_rows, frows.size / t_rows, _rss_mb(), 0))
        rng = np.random.default_rng(0)
        pick = frows[rng.integers(0, frows.size, min(200_000, frows.size))]
        t0 = time.perf_counter()
        x = feats.read(pick)
        t_feat = time.perf_counter() - t0
        rows.append((f"read {pick.size} random segments", t_feat, pick.size / t_feat, _rss_mb(), x.nbytes))
    assert raw.rows_read == s["rows"] and raw.dropped == s["dropped"] and len(raw) == s["rows_kept"]

    print(f"\nformat={fmt} users={users} videos={videos} interactions={inter} feature_dim={a.feature_dim} "
          f"kept={s['rows_kept']} dropped={s['dropped']}")
    print(f"{'step':34s} {'seconds':>9s} {'rows/s':>12s} {'peak RSS MB':>12s} {'bytes':>14s}")
    for name, sec, rate, rss, nbytes in rows:
        print(f"{name:34s} {sec:9.2f} {rate:12.0f} {rss:12.0f} {nbytes:14d}")
    if not a.keep:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
