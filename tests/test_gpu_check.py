"""The GPU check's pipeline on CPU: `bench/gpu_check.sh --smoke`, rows that survive a kill, the summary.

No GPU needed (CI runs these): the smoke run is the GPU check's own script with the Triton interpreter and tiny
shapes, so a broken step, a CSV written only at the end or a summary that cannot read the CSVs shows here
before a GPU session finds it.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
META = ("commit", "card", "torch", "triton", "cuda", "python", "time_utc")
sys.path.insert(0, str(BENCH))

from _csvlog import CsvLog  # noqa: E402
import summarize  # noqa: E402


def _rows(path: Path) -> list:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    env.pop("SEGFAST_POISON", None)
    return env


# ------------------------------------------------------------------------------------------- CsvLog
def test_csvlog_appends_each_row_with_versions_and_commit(tmp_path, capsys):
    p = tmp_path / "sub" / "rows.csv"
    log = CsvLog(str(p), ["impl", "ms", "note"], device="cpu", commit="abc1234")
    log.row(impl="triton", ms=1.5, note='has "quotes", commas\nand a newline')
    first = p.read_text()
    assert first.count("commit,card,torch") == 1 and "abc1234" in first  # on disk before the next row
    log.row(impl="eager", status="skipped: because")
    rows = _rows(p)
    assert [r["impl"] for r in rows] == ["triton", "eager"]
    assert rows[0]["note"] == 'has "quotes", commas\nand a newline' and rows[0]["status"] == "ok"
    assert rows[1]["ms"] == "" and rows[1]["status"] == "skipped: because"
    for r in rows:
        assert all(r[k] for k in META), r
        assert r["commit"] == "abc1234" and r["cuda"] == "none" and r["card"].startswith("cpu")
    # a second writer appends under the same header; a different column list is refused with both named
    CsvLog(str(p), ["impl", "ms", "note"], device="cpu", commit="abc1234").row(impl="sdpa", ms=2)
    assert p.read_text().count("commit,card") == 1 and len(_rows(p)) == 3
    with pytest.raises(ValueError, match="already has columns"):
        CsvLog(str(p), ["impl", "seconds"], device="cpu")
    with pytest.raises(ValueError, match="unknown columns"):
        log.row(impl="x", speed=3)
    assert "impl=triton" in capsys.readouterr().out  # printed as measured


def test_summarize_marks_missing_skipped_and_failed_cells(tmp_path):
    log = CsvLog(str(tmp_path / "bench_attention.csv"), ["impl", "stream", "mode", "dtype", "B", "H", "D", "ms"],
                 device="cpu", commit="c0ffee0", echo=False)
    case = dict(stream="video", mode="fwd", dtype="bf16", B=4, H=2, D=32)
    log.row(impl="triton", **case, ms=0.5)
    log.row(impl="sdpa", **case, status="skipped: no backend")
    log.row(impl="eager", **case, ms=2.0)
    log.row(impl="triton", **dict(case, mode="fwd+bwd"), status="error: RuntimeError: boom")
    text = summarize.summarize(tmp_path)
    line_fwd = next(ln for ln in text.splitlines() if " fwd " in ln)
    assert "0.5 (4x)" in line_fwd and "skip" in line_fwd and "2 (1x)" in line_fwd
    line_bwd = next(ln for ln in text.splitlines() if "fwd+bwd" in ln)
    assert "err" in line_bwd and line_bwd.split()[-1] == "-"  # no eager row for that case
    assert "bench_train_step ==\n(no CSV" in text


# ------------------------------------------------------------------------------------------- killed bench
def test_killed_benchmark_keeps_the_rows_measured_so_far(tmp_path):
    out = tmp_path / "att.csv"
    # eager rows are quick; the triton rows (interpreter, 30 repetitions each) take seconds: kill in between
    cmd = [sys.executable, str(BENCH / "bench_attention.py"), "--device", "cpu", "--impls", "eager,triton",
           "--batch", "1", "--heads", "1", "--rep", "30", "--csv", str(out), "--commit", "deadbee"]
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            if out.exists() and len(out.read_text().splitlines()) >= 2:  # header + a first row
                break
            if p.poll() is not None:
                pytest.fail(f"the benchmark ended before it was killed:\n{p.stdout.read()[-3000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no row within 120 s")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    rows = _rows(out)
    assert 1 <= len(rows) < 8, rows  # 2 streams x 2 modes x 2 impls when complete
    assert rows[0]["impl"] == "eager" and rows[0]["stream"] == "video" and rows[0]["mode"] == "fwd"
    for r in rows:
        assert None not in r.values() and None not in r, r  # whole rows only: no short or overlong line
        assert r["commit"] == "deadbee" and all(r[k] for k in META)
        assert r["status"] == "ok" and float(r["ms"]) > 0


# ------------------------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
def test_gpu_check_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "smoke"
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", str(out)], cwd=tmp_path,
                       env=dict(_env(), COMMIT="c0ffee1"), capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert r.returncode == 0, f"gpu_check --smoke failed (rc {r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    commit = "c0ffee1"  # passed down to every step (the default is git HEAD)
    for name in ("bench_attention", "bench_decoder", "bench_train_step", "bench_score", "tests"):
        rows = _rows(out / f"{name}.csv")
        assert rows, name
        for row in rows:
            assert all(row[k] for k in META), (name, row)
            assert row["commit"] == commit and row["cuda"] == "none"
    # order inside each benchmark: triton, then sdpa, then eager (first appearance in the CSV)
    for name in ("bench_attention", "bench_train_step", "bench_score"):
        rows = _rows(out / f"{name}.csv")
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        assert impls == ["triton", "sdpa", "eager"], (name, impls)
        ok = {r["impl"] for r in rows if r["status"] == "ok"}
        assert {"triton", "eager"} <= ok, (name, [(r["impl"], r["status"]) for r in rows])
    att = _rows(out / "bench_attention.csv")
    assert {(r["stream"], r["mode"]) for r in att if r["impl"] == "triton"} == {
        ("video", "fwd"), ("video", "fwd+bwd"), ("user", "fwd"), ("user", "fwd+bwd")}
    tests = _rows(out / "tests.csv")
    assert {r["outcome"] for r in tests} <= {"passed", "skipped"} and len(tests) == 2
    assert {r["shard"] for r in tests} == {"0/2", "1/2"}
    summary = (out / "summary.txt").read_text()
    assert summary in r.stdout  # printed at the end, and kept
    for section in ("== tests ==", "== bench_attention", "== bench_decoder", "== bench_train_step", "== bench_score"):
        assert section in summary, section
    assert "sdpa ms (x eager)" in summary and "triton s (x eager)" in summary
    print(f"gpu_check --smoke: {wall:.0f} s wall")
