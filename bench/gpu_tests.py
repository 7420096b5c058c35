"""Run a pytest selection in N parallel shards, one CSV row per test outcome as it finishes (gpu_check's test step).

A cold GPU machine compiles every kernel specialisation a test launches (~2 s each, CPU-bound: LLVM + ptxas),
so the compile time, not the GPU, bounds the test step. N pytest processes, each running every N-th collected
test (same collection order in every process), compile their own kernels in parallel on the machine's cores and
share the GPU; the Triton disk cache is shared, so a specialisation two shards need is at worst compiled twice.
Each outcome is appended to --csv the moment the test ends (bench/_csvlog.py), so a shard killed by the time
limit leaves the outcomes so far, and a line per shard says how far it got.

    python bench/gpu_tests.py --shards 8 --timeout 130 --csv out/tests.csv -- tests/test_kernel_x.py -m "not slow"
    python bench/gpu_tests.py --shard-index 1 --shards 8 ...     # (internal) one shard

Tests marked ``gpu`` run first in every shard. Build counts of a selection: bench/count_builds.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COLUMNS = ["shard", "test", "outcome", "seconds", "message"]


class ShardPlugin:
    """Keeps every N-th test (index i; gpu-marked tests first) and logs each outcome to the CSV as it is known."""

    def __init__(self, index: int, shards: int, csv_path, commit, device):
        sys.path.insert(0, str(HERE))
        from _csvlog import CsvLog

        self.index, self.shards = index, shards
        self.log = CsvLog(csv_path, COLUMNS, device=device, commit=commit, echo=False)

    @pytest.hookimpl(trylast=True)  # after -k / -m deselection: shard the selected tests, not all collected
    def pytest_collection_modifyitems(self, config, items):
        # tests marked gpu first (spread over the shards), so that a time limit cuts the interpreter-sized ones
        items[:] = sorted(items, key=lambda it: 0 if "gpu" in it.keywords else 1)
        keep = [it for i, it in enumerate(items) if i % self.shards == self.index]
        drop = [it for i, it in enumerate(items) if i % self.shards != self.index]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
            msg = ""
            if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
                msg = str(report.longrepr[-1])[:200]
            elif report.longrepr is not None and outcome != "passed":
                text = report.longreprtext if hasattr(report, "longreprtext") else str(report.longrepr)
                lines = [ln for ln in text.splitlines() if ln.startswith("E ")] or text.splitlines()[-1:]
                msg = (lines[0] if lines else "")[:200]
            self.log.row(shard=f"{self.index}/{self.shards}", test=report.nodeid, outcome=outcome,
                         seconds=round(report.duration, 3), message=msg)


def _shard_main(a, rest) -> int:
    plugin = ShardPlugin(a.shard_index, a.shards, a.csv, a.commit, a.device)
    return int(pytest.main(["-q", "-p", "no:cacheprovider", *rest], plugins=[plugin]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=150, help="seconds for all shards together")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--log-dir", default=None, help="one pytest log per shard here (default: next to --csv)")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    rest = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
    if a.shards < 1:
        ap.error("--shards must be >= 1")
    if a.shard_index is not None:
        return _shard_main(a, rest)
    if a.csv:  # header first, so that concurrent shards only ever append rows
        sys.path.insert(0, str(HERE))
        from _csvlog import CsvLog

        CsvLog(a.csv, COLUMNS, device=a.device, commit=a.commit, echo=False).header()
    log_dir = Path(a.log_dir or (Path(a.csv).parent if a.csv else "."))
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    procs = []

    def _stop(signum, frame):  # gpu_check's time limit (SIGTERM) must not leave shards running on the GPU
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    for i in range(a.shards):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--shard-index", str(i), "--shards", str(a.shards),
               "--device", a.device, "--commit", a.commit] + (["--csv", a.csv] if a.csv else []) + ["--", *rest]
        fh = open(log_dir / f"tests-shard{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT), fh))
    rcs = []
    for i, (p, fh) in enumerate(procs):
        left = max(1.0, a.timeout - (time.monotonic() - t0))
        try:
            rcs.append(p.wait(timeout=left))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rcs.append("timeout")
        fh.close()
        tail = (log_dir / f"tests-shard{i}.log").read_text(errors="replace").strip().splitlines()[-1:]
        print(f"shard {i}/{a.shards}: rc {rcs[-1]}  {tail[0] if tail else ''}", flush=True)
    print(f"test step: {time.monotonic() - t0:.0f} s wall, {a.shards} shards", flush=True)
    # pytest rc 5 = nothing collected in this shard (fewer tests than shards): not a failure
    return 0 if all(rc in (0, 5) for rc in rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
