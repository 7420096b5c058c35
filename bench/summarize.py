"""Summary table of a gpu_check output folder, read back from its CSVs (whatever rows they hold).

One table per benchmark: one line per measured case, one column per implementation (triton, sdpa, eager,
compile) with its time and, in brackets, eager's time divided by it (> 1: faster than eager). A cell says
"skip" or "err" where the row records that instead of a time, and "-" where no row exists (e.g. cut by a time
limit). The test step gets its outcome counts and the first failures. Also written to OUTDIR/summary.txt.

    python bench/summarize.py OUTDIR
"""
from __future__ import annotations

import collections
import csv
import os
import sys
from pathlib import Path

IMPLS = ("triton", "sdpa", "eager", "compile")
# csv name -> (key columns, metric column, unit)
SPECS = {
    "bench_attention.csv": (("stream", "mode", "dtype", "B", "H", "D"), "ms", "ms"),
    "bench_decoder.csv": (("mode", "dtype", "B", "d"), "ms", "ms"),
    "bench_train_step.csv": (("preset", "modality", "mode", "batch"), "ms", "ms"),
    "bench_score.csv": (("preset", "modality", "pairs"), "wall_s", "s"),
}


def _read(path: Path) -> list:
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r]  # a killed writer leaves whole rows only (one write each)


def _fmt_float(v: str) -> str:
    try:
        x = float(v)
    except ValueError:
        return v
    return f"{x:.4g}"


def bench_table(rows: list, keys, metric: str, unit: str) -> list:
    cases = collections.OrderedDict()
    for r in rows:
        case = tuple(r.get(k, "") for k in keys)
        if r.get("mode", "").startswith("build"):
            continue
        cases.setdefault(case, {})
        impl = r.get("impl", "")
        st = r.get("status", "ok")
        if st == "ok" and r.get(metric, "") != "":
            cases[case][impl] = float(r[metric])
        else:
            cases[case].setdefault(impl, "skip" if st.startswith("skipped") else "err")
    impls = [i for i in IMPLS if any(i in c for c in cases.values())]
    impls += sorted({i for c in cases.values() for i in c} - set(impls))
    head = [*keys, *[f"{i} {unit} (x eager)" for i in impls]]
    out = [head]
    for case, by in cases.items():
        eager = by.get("eager")
        cells = []
        for i in impls:
            v = by.get(i, "-")
            if isinstance(v, float):
                ratio = f" ({eager / v:.3g}x)" if isinstance(eager, float) and v > 0 else ""
                cells.append(f"{v:.4g}{ratio}")
            else:
                cells.append(v)
        out.append([*case, *cells])
    return out


def render(table: list) -> str:
    w = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(str(c).rjust(w[i]) for i, c in enumerate(r)) for r in table)


def tests_summary(rows: list) -> str:
    n = collections.Counter(r.get("outcome", "?") for r in rows)
    secs = sum(float(r.get("seconds") or 0) for r in rows)
    lines = [", ".join(f"{k} {v}" for k, v in sorted(n.items())) + f"  ({secs:.0f} s in tests)"]
    bad = [r for r in rows if r.get("outcome") in ("failed", "error")]
    for r in bad[:8]:
        lines.append(f"  {r['outcome']}: {r['test']}  {r.get('message', '')[:110]}")
    if len(bad) > 8:
        lines.append(f"  ... and {len(bad) - 8} more")
    return "\n".join(lines)


def summarize(outdir) -> str:
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise SystemExit(f"summarize: {outdir} is not a folder (expected a gpu_check output folder)")
    parts = []
    env = outdir / "env.txt"
    if env.exists():
        parts.append(" | ".join(env.read_text().strip().splitlines()))
    tests = outdir / "tests.csv"
    if tests.exists():
        parts.append("== tests ==\n" + tests_summary(_read(tests)))
    for name, (keys, metric, unit) in SPECS.items():
        p = outdir / name
        if not p.exists():
            parts.append(f"== {name[:-4]} ==\n(no CSV: the step did not start or measured nothing)")
            continue
        rows = _read(p)
        if not rows:
            parts.append(f"== {name[:-4]} ==\n(no rows)")
            continue
        meta = rows[0]
        parts.append(f"== {name[:-4]} ({len(rows)} rows; {meta.get('card', '?')}, commit {meta.get('commit', '?')}) ==\n"
                     + render(bench_table(rows, keys, metric, unit)))
    for p in sorted(outdir.glob("*.csv")):
        if p.name not in SPECS and p.name != "tests.csv":
            parts.append(f"== {p.stem} ==\n{len(_read(p))} rows")
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    text = summarize(argv[0])
    print(text, end="")
    tmp = Path(argv[0]) / ".summary.txt.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(argv[0]) / "summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
