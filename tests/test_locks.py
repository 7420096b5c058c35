"""Issue 15 item 2: the advisory lock on every output (segfast._lock) and two real `segfast score` processes on
one --out (the second refused with one line naming the first's pid and host; the first's output complete)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast._lock import LockHeldError, lock_path, output_lock, read_holder
from _fakes import interaction_pairs, make_run, prepared_world

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **kw)
    for k in ("RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        if k not in kw:
            env.pop(k, None)
    return env


_HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": int(sys.argv[2]), "host": sys.argv[3], "command": "score"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def _holder(path: Path, pid: int, host: str):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(pid), host], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_records_holder_and_refuses_a_second_writer(tmp_path):
    out = tmp_path / "o"
    with output_lock(out, "score") as lf:
        assert lf == lock_path(out) == tmp_path / ".o.segfast.lock"
        h = read_holder(lf)
        assert h["pid"] == os.getpid() and h["host"] == socket.gethostname() and h["command"] == "score"
        with output_lock(out, "score"):  # re-entrant within one process
            pass
        # another process cannot take it while we hold it
        code = ("import sys; from segfast._lock import output_lock, LockHeldError\n"
                "try:\n    output_lock(sys.argv[1], 'train').__enter__()\n"
                "except LockHeldError as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(out)], env=_env(), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 3, r.stderr
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in r.stdout
    assert read_holder(lf) is None  # released: emptied and unlocked
    with output_lock(out, "train"):
        assert read_holder(lf)["command"] == "train"


def test_stale_lock_file_of_a_dead_process_is_taken(tmp_path):
    out = tmp_path / "o"
    lf = lock_path(out)
    lf.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "score"}))
    with output_lock(out, "score"):
        assert read_holder(lf)["pid"] == os.getpid()


def test_lock_held_for_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    """An orphan (say a forked worker) keeps the flock after its parent died: the recorded pid is dead."""
    out = tmp_path / "o"
    p = _holder(lock_path(out), _dead_pid(), socket.gethostname())
    try:
        with output_lock(out, "score") as lf:
            assert read_holder(lf)["pid"] == os.getpid()
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_live_or_remote_holder_is_refused(tmp_path):
    out = tmp_path / "o"
    for pid, host in ((os.getpid(), socket.gethostname()), (_dead_pid(), "some-other-host")):
        p = _holder(lock_path(out), pid, host)
        try:
            with pytest.raises(LockHeldError, match=f"pid {pid} on host {host}"):
                with output_lock(out, "score"):
                    pass
        finally:
            p.kill()
            p.wait()


def test_other_ranks_refuse_a_lock_of_another_job(tmp_path, monkeypatch):
    out = tmp_path / "o"
    p = _holder(lock_path(out), 12345, "h")  # held, run_id absent: not this torchrun job
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
        with pytest.raises(LockHeldError, match="rank 1 refuses"):
            with output_lock(out, "score"):
                pass
    finally:
        p.kill()
        p.wait()
    # rank 0 of this job holds it: rank 1 goes ahead
    monkeypatch.setenv("RANK", "0")
    with output_lock(out, "score"):
        monkeypatch.setenv("RANK", "1")
        with output_lock(out, "score"):
            pass
        monkeypatch.setenv("RANK", "0")


# a real `segfast score` whose part writes are slowed down, so that a second process meets it mid-run
_SLOW_SCORE = """
import sys, time
import segfast.scoring.runner as r
_write = r.atomic_parquet
def slow(path, table):
    time.sleep(0.7)
    _write(path, table)
r.atomic_parquet = slow
from segfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_score_processes_on_one_out(tmp_path):
    p = prepared_world(tmp_path)
    run = make_run(tmp_path, p, "visual")
    pairs_a, pairs_b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    tab = interaction_pairs(p)
    pq.write_table(tab, pairs_a)
    pq.write_table(tab.slice(0, 100), pairs_b)
    out = tmp_path / "scores"
    common = ["--run-dir", str(run), "--data", str(tmp_path / "p"), "--out", str(out), "--device", "cpu",
              "--part-rows", "60", "--batch-size", "50", "--quiet", "--json"]
    first = subprocess.Popen([sys.executable, "-c", _SLOW_SCORE, "score", "--pairs", str(pairs_a), *common],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lf = lock_path(out)
    deadline = time.time() + 120
    while not ((read_holder(lf) or {}).get("pid") == first.pid):
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "segfast", "score", "--pairs", str(pairs_b), "--overwrite",
                             *common], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first writer ended before the second tried: no overlap tested"
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segfast score: error:")
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
    assert second.stdout == ""
    so, se = first.communicate(timeout=300)
    assert first.returncode == 0, se
    man = json.loads((out / "_manifest.json").read_text())
    assert man["complete"] and man["rows"] == tab.num_rows and man["n_parts"] == len(man["parts"])
    got = pa.concat_tables([pq.read_table(out / r["file"]) for r in man["parts"]])
    assert got.num_rows == tab.num_rows
    assert got.column("row").to_pylist() == list(range(tab.num_rows))
    assert got.column("user_id").to_pylist() == tab.column("user_id").to_pylist()
    assert read_holder(lf) is None  # released
    v = subprocess.run([sys.executable, "-m", "segfast", "verify", str(out), "--json"], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["ok"] is True


@pytest.mark.parametrize("command", ["prepare", "score", "train", "thumbnails", "edit"])
def test_every_writing_command_is_refused_while_another_holds_its_out(tmp_path, capfd, command):
    from segfast.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "pairs.parquet").write_bytes(b"")
    out = tmp_path / ("o.parquet" if command in ("thumbnails", "edit") else "o")
    argv = {"prepare": ["--source", "segmm", "--input", str(tmp_path / "in")],
            "train": ["--data", str(tmp_path / "in")],
            }.get(command, ["--run-dir", str(tmp_path / "in"), "--data", str(tmp_path / "in"), "--pairs",
                            str(tmp_path / "pairs.parquet"), "--device", "cpu"])
    h = _holder(lock_path(out), 4242, "other-host")
    try:
        capfd.readouterr()
        rc = main([command, *argv, "--out", str(out), "--json", "--quiet"])
        o, e = capfd.readouterr()
    finally:
        h.kill()
        h.wait()
    assert rc == 2 and o == "" and e.count("\n") == 1, e
    assert "another segfast writer holds it: pid 4242 on host other-host" in e
    assert not out.exists()  # nothing written
