"""How many kernel builds would a pytest selection trigger on a GPU? Counted on CPU, in the Triton interpreter.

Wraps every Triton kernel launch (``InterpretedFunction.run``) while pytest runs the selection and records the
JIT's specialisation key of each launch: the kernel, every constexpr value, the dtype of every tensor argument
and whether its address is 16-byte aligned, the integer arguments' 1 / multiple-of-16 specialisation, and the
launch options (num_warps, num_stages). Each distinct key is one compile on a cold GPU machine (one
``triton.compile``: TTIR -> TTGIR -> LLVM -> PTX -> ptxas). Alignment is read from the CPU tensors; the CUDA
caching allocator aligns at least as well, so the count is an upper bound only through views with odd offsets.

    python bench/count_builds.py [--dry] [--csv builds.csv] -- tests/test_kernel_cross_attention.py -m "not slow"

``--dry``: launches are recorded but not executed (no interpreter cost, outputs left as allocated) and the
tests marked ``gpu`` are run too (their CUDA skip is lifted), so the count covers what a GPU session runs. So
that a test whose forward output is wrong still reaches its backward launches, dry mode runs Python with ``-O``
and pytest with ``--assert=plain`` (assert statements removed). Test outcomes in dry mode mean nothing; only
the counts do. Prints the distinct builds per kernel and per test file,
and writes one row per (test, build) to --csv (test, kernel, key, new = first seen in this run).
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import inspect
import os
import sys
import time

import pytest


def _key_of(fn, args, kwargs) -> tuple:
    import torch

    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    nospec = set(getattr(fn, "do_not_specialize", ()) or ())
    parts = []
    for p in params:
        v = bound.get(p.name, p.default)
        ann = p.annotation
        is_const = "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))
        if is_const:
            parts.append((p.name, "c", repr(v)))
        elif isinstance(v, torch.Tensor):
            parts.append((p.name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, bool):
            parts.append((p.name, "i1"))
        elif isinstance(v, int):
            width = "i32" if -2**31 <= v < 2**31 else "i64"
            parts.append((p.name, width) if p.name in nospec else (p.name, width, v == 1, v % 16 == 0))
        elif isinstance(v, float):
            parts.append((p.name, "fp32"))
        else:
            parts.append((p.name, repr(v) if v is None else type(v).__name__))
    opts = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in bound))
    return (fn.__name__, tuple(parts), opts)


class Recorder:
    """pytest plugin: records launches per test; in dry mode skips execution and lifts the CUDA skip."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.test = "<collection>"
        self.launches = collections.defaultdict(list)  # test -> [key]
        self.first_seen = {}  # key -> test

    def install(self):
        from triton.runtime.interpreter import InterpretedFunction

        orig = InterpretedFunction.run
        rec = self

        def run(self_, *args, grid, warmup, **kwargs):
            key = _key_of(self_.fn, args, kwargs)
            rec.launches[rec.test].append(key)
            rec.first_seen.setdefault(key, rec.test)
            if rec.dry:
                return None
            return orig(self_, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    # ---- pytest hooks
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not self.dry:
            return
        for item in items:  # runs after conftest's hook added the skip for "gpu" tests: lift it
            if "gpu" in item.keywords:
                item.own_markers[:] = [m for m in item.own_markers
                                       if not (m.name == "skip" and "CUDA" in str(m.kwargs.get("reason", "")))]

    def pytest_runtest_setup(self, item):
        self.test = item.nodeid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="record launches without executing them; run gpu tests too")
    ap.add_argument("--csv", default=None, help="one row per (test, distinct build)")
    ap.add_argument("--seconds-per-build", type=float, default=None,
                    help="print the cold compile estimate with this cost per build")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args(argv)
    if a.dry and not sys.flags.optimize:  # asserts off, so that every test runs to its last launch
        os.execv(sys.executable, [sys.executable, "-O", os.path.abspath(__file__),
                                  *(sys.argv[1:] if argv is None else argv)])
    os.environ["TRITON_INTERPRET"] = "1"
    rec = Recorder(a.dry)
    rec.install()
    t0 = time.perf_counter()
    extra = ["--assert=plain", "-W", "ignore::pytest.PytestConfigWarning"] if a.dry else []
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *extra, *a.pytest_args], plugins=[rec])
    wall = time.perf_counter() - t0
    keys = set(rec.first_seen)
    per_kernel = collections.Counter(k[0] for k in keys)
    per_file = collections.Counter(t.split("::")[0] for t in rec.first_seen.values())
    print(f"\ncount_builds: {len(keys)} distinct kernel builds from "
          f"{sum(len(v) for v in rec.launches.values())} launches in {len(rec.launches)} tests "
          f"({'dry' if a.dry else 'executed'}, {wall:.1f} s, pytest rc {int(rc)})")
    for k, n in sorted(per_kernel.items()):
        print(f"  {k:28s} {n:4d}")
    print("  first needed by: " + ", ".join(f"{f} {n}" for f, n in sorted(per_file.items())))
    if a.seconds_per_build:
        print(f"  cold compile estimate: {len(keys)} x {a.seconds_per_build:.2f} s = "
              f"{len(keys) * a.seconds_per_build:.0f} s serial")
    if a.csv:
        tmp = a.csv + ".tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["test", "kernel", "key", "new"])
            for test, ks in rec.launches.items():
                for k in dict.fromkeys(ks):
                    h = hashlib.sha1(repr(k).encode()).hexdigest()[:12]
                    w.writerow([test, k[0], h, int(rec.first_seen[k] == test)])
        os.replace(tmp, a.csv)
    return 0 if len(keys) or not a.dry else 1


if __name__ == "__main__":
    sys.exit(main())
