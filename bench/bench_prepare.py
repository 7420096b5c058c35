"""Time ``segfast prepare`` on a synthetic KuaiRand-1K-scale log (11.7M raw rows by default).

Target: <= 90 s wall and <= 6 GB peak RSS on the 2-core dev machine. The log is synthesised with
``segfast.data.synth`` (not timed), then prepare runs in a child process so that its peak RSS is its own.

    python bench/bench_prepare.py [--interactions 11700000] [--users 1000] [--videos 1000000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(inp: str, out: str) -> None:
    from segfast.data.prepared import prepare
    t0 = time.perf_counter()
    m = prepare("kuairand", inp, out, seed=0, progress=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    print(json.dumps({"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2), "counts": m["counts"]}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=11_700_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--videos", type=int, default=1_000_000)
    ap.add_argument("--keep", help="directory for the synthetic log and output (kept afterwards)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segfast-bench-prepare-"))
    try:
        raw_dir, out = base / "kuairand", base / "prepared"
        if not (raw_dir.exists() and any(raw_dir.iterdir())):
            from segfast.data.synth import synth
            t0 = time.perf_counter()
            synth("kuairand", raw_dir, users=args.users, videos=args.videos,
                  interactions=args.interactions, seed=0)
            print(f"synthesised in {time.perf_counter() - t0:.1f} s", flush=True)
        if out.exists():
            shutil.rmtree(out)
        r = subprocess.run([sys.executable, __file__, "--child", str(raw_dir), str(out)],
                           capture_output=False, stdout=subprocess.PIPE, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"prepare: {res['wall_s']} s wall (target <= 90), peak RSS {res['peak_rss_gib']} GiB "
              f"(target <= 6); rows read {res['counts']['rows_read']:,}, kept {res['counts']['rows_kept']:,}")
        print(json.dumps(res["counts"]))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
