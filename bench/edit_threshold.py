"""What `segfast edit --threshold T` skips on a run's held-out rows, and whether those are the segments people
actually left (issue 16).

For every row of ``--split`` (default test) of the prepared dataset, the pair (user_id, video_id, time_ms: the
row's own history) goes through ``segfast.apps.edit`` at each threshold, exactly as the CLI runs it (the run's
calibrator, RUN/calibration.json). Each row's observed leave slot y splits its real segments into "reached"
(i <= y) and never reached (i > y); of the reached ones, i < y was watched past ("kept by the user") and i = y
was left (y < N). The table gives, per threshold:

- the share of all segments of the pairs that edit skips (and of the time, edit's own skipped_fraction);
- the observed keep rate (segments watched past / segments reached) of the reached segments edit skips and of
  those it keeps: a calibrated threshold should skip segments with an observed keep rate near or below T;
- the mean calibrated keep probability of the same two groups (``score --probabilities``), beside it;
- for comparison, the same for the old rule, sigmoid(raw logit) < T (not a probability: see docs/model.md).

    python bench/edit_threshold.py --run-dir RUN --data DATA [--split test] [--thresholds 0.3,0.5]
                                   [--which best] [--work DIR] [--json out.json] [--threads 1]

Prints a Markdown table (and writes JSON with --json). Needs the run's calibration.json (segfast calibrate).
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
import pyarrow as pa
import pyarrow.parquet as pq


def _pairs(p, rows: np.ndarray, path: Path) -> None:
    it = p.interactions
    pq.write_table(pa.table({
        "user_id": pa.array(np.asarray(p.users["user_id"])[np.asarray(it["user_idx"])[rows]], pa.int64()),
        "video_id": pa.array(np.asarray(p.videos["video_id"])[np.asarray(it["video_idx"])[rows]], pa.int64()),
        "time_ms": pa.array(np.asarray(it["time_ms"])[rows], pa.int64())}), path)


def _padded(lists, width: int) -> np.ndarray:
    out = np.full((len(lists), width), np.nan)
    for k, x in enumerate(lists):
        out[k, :len(x)] = x
    return out


def _skipped_mask(starts, ends, n_out: np.ndarray, width: int) -> np.ndarray:
    """[R, width] bool: segment i of row k lies in one of the row's skip ranges."""
    seg0 = 5000 * np.arange(width, dtype=np.int64)
    out = np.zeros((len(starts), width), dtype=bool)
    for k, (a, b) in enumerate(zip(starts, ends)):
        for s, e in zip(a, b):
            out[k] |= (seg0 >= s) & (seg0 < e)
    return out & (np.arange(width)[None, :] < n_out[:, None])


def _groups(skip: np.ndarray, reached: np.ndarray, kept_by_user: np.ndarray, keep: np.ndarray, real: np.ndarray,
            durations_skipped=None) -> dict:
    rs, rk = reached & skip, reached & ~skip

    def rate(m):
        return float(kept_by_user[m].mean()) if m.any() else None

    def mean(m):
        return float(keep[m].mean()) if m.any() else None

    return {"segments": int(real.sum()), "skipped_segments": int((skip & real).sum()),
            "skipped_segment_fraction": float((skip & real).sum() / real.sum()),
            "reached_skipped": int(rs.sum()), "reached_kept": int(rk.sum()),
            "observed_keep_rate_skipped": rate(rs), "observed_keep_rate_kept": rate(rk),
            "mean_keep_probability_skipped": mean(rs), "mean_keep_probability_kept": mean(rk)}


def measure(run_dir, data_dir, thresholds=(0.3,), split: str = "test", which: str = "best", work=None,
            device: str = "cpu") -> dict:
    from segfast.apps import edit
    from segfast.data.prepared import load_prepared
    from segfast.scoring import score

    p = load_prepared(data_dir)
    rows = p.rows(split)
    if rows.size == 0:
        raise SystemExit(f"{data_dir}: split {split!r} is empty")
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="edit_threshold-")) if own else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        pairs = work / "pairs.parquet"
        _pairs(p, rows, pairs)
        it = p.interactions
        y = np.asarray(it["target"], dtype=np.int64)[rows]
        n_row = np.asarray(it["n_segments"], dtype=np.int64)[rows]
        # the calibrated keep probabilities and the raw logits of the same pairs (one scoring pass)
        shutil.rmtree(work / "scores", ignore_errors=True)
        score(run_dir, data_dir, pairs, work / "scores", device=device, which=which, probabilities=True,
              progress=False)
        t = pa.concat_tables([pq.read_table(f, columns=["row", "n_segments", "scores", "keep_probability"])
                              for f in sorted((work / "scores").glob("part-*.parquet"))])
        if t.column("row").to_pylist() != list(range(rows.size)):
            raise AssertionError("score did not return every pair in input order")
        n_out = t.column("n_segments").to_numpy().astype(np.int64)
        if (n_out != n_row).any():  # a video's N is the largest over its rows; the rows here must agree
            k = int(np.flatnonzero(n_out != n_row)[0])
            raise SystemExit(f"row {rows[k]}: the scored pair has {n_out[k]} segments, the row {n_row[k]}")
        width = int(n_out.max())
        keep = _padded(t.column("keep_probability").to_pylist(), width)
        logit = _padded(t.column("scores").to_pylist(), width)
        slots = np.arange(width)[None, :]
        real = slots < n_out[:, None]
        reached = real & (slots <= y[:, None])
        kept_by_user = slots < y[:, None]
        out = {"run_dir": str(run_dir), "data": str(data_dir), "split": split, "which": which, "pairs": int(rows.size),
               "segments": int(real.sum()), "reached_segments": int(reached.sum()),
               "observed_keep_rate": float(kept_by_user[reached].mean()), "thresholds": []}
        for thr in thresholds:
            t0 = time.perf_counter()
            dst = work / f"edit-{thr:g}.parquet"
            res = edit(run_dir, data_dir, pairs, dst, threshold=float(thr), device=device, which=which,
                       overwrite=True)
            e = pq.read_table(dst).to_pydict()
            skip = _skipped_mask(e["skip_start_ms"], e["skip_end_ms"], np.asarray(e["n_segments"], np.int64), width)
            # the edit's skip set is exactly the calibrated probabilities below the threshold
            expect = real & (keep < float(thr))
            if not np.array_equal(skip, expect):
                bad = int(np.flatnonzero((skip != expect).any(axis=1))[0])
                raise AssertionError(f"pair {bad}: edit skipped {np.flatnonzero(skip[bad]).tolist()}, keep < "
                                     f"{thr} at {np.flatnonzero(expect[bad]).tolist()}")
            with np.errstate(over="ignore"):
                sig = 1.0 / (1.0 + np.exp(-logit))
            out["thresholds"].append({
                "threshold": float(thr), "seconds": round(time.perf_counter() - t0, 1),
                "calibrated": dict(_groups(skip, reached, kept_by_user, keep, real),
                                   skipped_time_fraction=res["skipped_fraction"],
                                   calibration=res["calibration"]),
                "sigmoid_logit": _groups(real & (sig < float(thr)), reached, kept_by_user, sig, real)})
        return out
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict) -> str:
    def f(x, d=3):
        return "n/a" if x is None else f"{x:.{d}f}"

    lines = [f"{res['pairs']:,} {res['split']} pairs, {res['segments']:,} segments, {res['reached_segments']:,} "
             f"reached (observed keep rate {res['observed_keep_rate']:.3f})", "",
             "| threshold | rule | skipped segments | skipped time | reached: skipped / kept | observed keep rate: "
             "skipped / kept | mean predicted keep: skipped / kept |",
             "|---|---|---|---|---|---|---|"]
    for t in res["thresholds"]:
        for rule, g in (("calibrated (edit)", t["calibrated"]), ("sigmoid(logit), old", t["sigmoid_logit"])):
            st = f"{100 * g['skipped_time_fraction']:.1f}%" if "skipped_time_fraction" in g else ""
            lines.append(f"| {t['threshold']:g} | {rule} | {100 * g['skipped_segment_fraction']:.1f}% | {st} | "
                         f"{g['reached_skipped']:,} / {g['reached_kept']:,} | "
                         f"{f(g['observed_keep_rate_skipped'])} / {f(g['observed_keep_rate_kept'])} | "
                         f"{f(g['mean_keep_probability_skipped'])} / {f(g['mean_keep_probability_kept'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test", choices=["train", "dev", "test"])
    ap.add_argument("--thresholds", default="0.3", help="comma-separated, each in [0, 1]")
    ap.add_argument("--which", default="best", choices=["best", "last", "final"])
    ap.add_argument("--work", default=None, help="keep the pairs, scores and edit outputs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    thr = [float(x) for x in a.thresholds.split(",") if x.strip()]
    res = measure(a.run_dir, a.data, thr, split=a.split, which=a.which, work=a.work)
    print(markdown(res))
    if a.json:
        from segfast import _io

        _io.write_json(Path(a.json), res, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
