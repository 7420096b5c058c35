"""The offline batch scorer against per-batch ``model.score`` on assembled interaction rows (the reference)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast.data.batches import BatchAssembler
from segfast.data.prepared import load_prepared, prepare_raw
from segfast.evaluate import expected_leave_slot
from segfast.scoring import (MANIFEST, OutDirError, ScoreInputError, UnknownIdsError, latest_visual_histories,
                             score)
from _fakes import F, USERS, RandomFeatures, interaction_pairs, prepared_world
from _fakes import make_run as _run, raw_interactions as _raw

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    p = prepared_world(root)
    runs = {m: _run(root, p, m) for m in ("id", "visual", "both")}
    runs["id-nopos"] = _run(root, p, "id", ablation="no-position")
    # every interaction as a pair, time_ms = its own time: history = the rows before it, as in training
    pairs = root / "pairs.parquet"
    pq.write_table(interaction_pairs(p), pairs, row_group_size=97)
    return {"root": root, "p": p, "runs": runs, "pairs": pairs}


def _model(run_dir):
    from segfast.checkpoint import load_run

    return load_run(run_dir)[0]


def _reference(model, p, rows) -> np.ndarray:
    return model.score(BatchAssembler(p).assemble(np.asarray(rows))).numpy()


def _read_parts(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _check_against(tab: pa.Table, ref: np.ndarray, nseg: np.ndarray, atol=2e-5):
    sc = tab.column("scores").to_pylist()
    assert len(sc) == ref.shape[0]
    for i, s in enumerate(sc):
        assert len(s) == nseg[i]
        np.testing.assert_allclose(s, ref[i, :nseg[i]], atol=atol, rtol=1e-5)
    real = np.arange(40)[None, :] < nseg[:, None]
    np.testing.assert_array_equal(tab.column("leave_slot").to_numpy(), np.where(real, ref, np.inf).argmin(1))
    np.testing.assert_array_equal(tab.column("thumbnail_slot").to_numpy(), np.where(real, ref, -np.inf).argmax(1))
    np.testing.assert_allclose(tab.column("expected_watch_segments").to_numpy(), expected_leave_slot(ref, nseg),
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("modality", ["id", "visual", "both", "id-nopos"])
def test_scores_match_model_score(world, tmp_path, modality):
    p = world["p"]
    it = p.interactions
    assert np.array_equal(p.videos["n_segments"][it["video_idx"]], it["n_segments"])  # N per video is fixed here
    man = score(world["runs"][modality], world["root"] / "p", world["pairs"], tmp_path / "o", batch_size=37,
                part_rows=150, progress=False)
    n = len(p)
    assert man["complete"] and man["rows"] == n and man["rows_scored"] == n and man["n_parts"] == -(-n // 150)
    assert [r["input_rows"] for r in man["parts"]] == [[s, min(s + 150, n)] for s in range(0, n, 150)]
    tab = _read_parts(tmp_path / "o")
    assert tab.column_names == ["row", "user_id", "video_id", "time_ms", "n_segments", "scores", "leave_slot",
                                "thumbnail_slot", "expected_watch_segments"]
    assert tab.schema.field("scores").type == pa.list_(pa.float32())
    assert tab.schema.field("n_segments").type == pa.int8()
    np.testing.assert_array_equal(tab.column("row").to_numpy(), np.arange(n))  # input order
    np.testing.assert_array_equal(tab.column("user_id").to_numpy(), p.users["user_id"][it["user_idx"]])
    np.testing.assert_array_equal(tab.column("n_segments").to_numpy(), it["n_segments"])
    _check_against(tab, _reference(_model(world["runs"][modality]), p, np.arange(n)), it["n_segments"].astype(int))


def test_reference_path_matches_fast_path(world, tmp_path):
    a = score(world["runs"]["both"], world["root"] / "p", world["pairs"], tmp_path / "a", batch_size=64,
              part_rows=260, progress=False, fast=False)
    assert a["fast_path"] is False
    tab = _read_parts(tmp_path / "a")
    p = world["p"]
    _check_against(tab, _reference(_model(world["runs"]["both"]), p, np.arange(len(p))),
                   p.interactions["n_segments"].astype(int))


def test_latest_history_is_that_of_an_appended_interaction(world, tmp_path):
    """Without time_ms a pair sees all of the user's interactions: its visual history (seeded sample
    included) and its scores equal those of a new last interaction prepared from the raw data."""
    p = world["p"]
    flat, off = latest_visual_histories(p)
    model = _model(world["runs"]["visual"])
    refs, uids, vids, ns = [], [], [], []
    for u in range(len(USERS)):
        prepare_raw(_raw(extra_user=u), tmp_path / f"p{u}", "segmm", seed=2, feature_source=RandomFeatures(F),
                    progress=False)
        p2 = load_prepared(tmp_path / f"p{u}")
        assert p2.n_users == p.n_users and p2.n_videos == p.n_videos
        assert np.array_equal(p2.videos["feat_offset"], p.videos["feat_offset"])
        it2 = p2.interactions
        r = int(np.cumsum(np.bincount(it2["user_idx"]))[u] - 1)  # the appended row
        assert it2["time_ms"][r] == 10**9 and it2["user_idx"][r] == u
        o, ln = int(it2["vhist_offset"][r]), int(it2["vhist_len"][r])
        assert ln == 100  # 130 earlier rows: the seeded sample is exercised
        np.testing.assert_array_equal(flat[off[u]:off[u + 1]], p2.vhist[o:o + ln])
        refs.append(_reference(model, p2, [r])[0])
        uids.append(int(p2.users["user_id"][u]))
        vids.append(int(p2.videos["video_id"][it2["video_idx"][r]]))
        ns.append(int(it2["n_segments"][r]))
    # end to end: no time_ms column -> "latest"
    pairs = _write(tmp_path / "latest.parquet", user_id=pa.array(uids, pa.int64()), video_id=pa.array(vids, pa.int64()))
    man = score(world["runs"]["visual"], world["root"] / "p", pairs, tmp_path / "o", progress=False)
    assert "time_ms" not in man["columns"]
    _check_against(_read_parts(tmp_path / "o"), np.stack(refs), np.array(ns))


def test_time_ms_cuts_the_history(world, tmp_path):
    p = world["p"]
    it = p.interactions
    u0 = np.flatnonzero(it["user_idx"] == 1)
    k = int(u0[60])  # a row with history; its neighbour k + 1 of the same user
    uid = int(p.users["user_id"][1])
    vid = int(p.videos["video_id"][it["video_idx"][k + 1]])
    t = int(it["time_ms"][k])
    first = int(u0[0])
    times = [t + 1, t, -10**12]  # after row k: history of row k+1; at t: row k excluded; before all: empty
    pq.write_table(pa.table({"user_id": [uid] * 3 + [uid], "video_id": [vid] * 3 + [int(p.videos["video_id"][
        it["video_idx"][first]])], "time_ms": times + [-10**12]}), tmp_path / "t.parquet")
    score(world["runs"]["visual"], world["root"] / "p", tmp_path / "t.parquet", tmp_path / "o", progress=False)
    sc = _read_parts(tmp_path / "o").column("scores").to_pylist()
    model = _model(world["runs"]["visual"])
    ref = _reference(model, p, [k + 1, first])
    n = int(it["n_segments"][k + 1])
    np.testing.assert_allclose(sc[0], ref[0, :n], atol=2e-5)  # same tokens as training row k+1
    assert np.abs(np.array(sc[1]) - ref[0, :n]).max() > 1e-4  # one history video fewer: other user tokens
    assert np.abs(np.array(sc[2]) - np.array(sc[1])).max() > 1e-4
    np.testing.assert_allclose(sc[3], ref[1, :int(it["n_segments"][first])], atol=2e-5)  # empty history


# ---------------------------------------------------------------------------------------------- input

def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing", r"missing column\(s\) \['video_id'\]"),
    ("float", r"column 'user_id' has type double, expected an integer"),
    ("null", r"column 'video_id' is null at row 2"),
    ("corrupt", r"not a readable Parquet file"),
    ("time_null", r"column 'time_ms' is null at row 1"),
])
def test_input_errors_name_file_column_row(world, tmp_path, case, match):
    p = world["p"]
    u = p.users["user_id"][:3].tolist()
    v = p.videos["video_id"][:3].tolist()
    f = tmp_path / "in.parquet"
    if case == "missing":
        _write(f, user_id=pa.array(u, pa.int64()))
    elif case == "float":
        _write(f, user_id=pa.array([float(x) for x in u]), video_id=pa.array(v, pa.int64()))
    elif case == "null":
        _write(f, user_id=pa.array(u, pa.int64()), video_id=pa.array(v[:2] + [None], pa.int64()))
    elif case == "time_null":
        _write(f, user_id=pa.array(u, pa.int64()), video_id=pa.array(v, pa.int64()),
               time_ms=pa.array([1, None, 3], pa.int64()))
    else:
        _write(f, user_id=pa.array(u, pa.int64()), video_id=pa.array(v, pa.int64()))
        data = f.read_bytes()
        f.write_bytes(data[:-20])  # truncated footer
    with pytest.raises(ScoreInputError, match=match) as e:
        score(world["runs"]["id"], world["root"] / "p", f, tmp_path / "o", progress=False)
    assert str(f) in str(e.value)
    assert not list((tmp_path / "o").glob("part-*")) if (tmp_path / "o").exists() else True


def test_unknown_ids_error_then_skip(world, tmp_path):
    p = world["p"]
    it = p.interactions
    uid = p.users["user_id"][it["user_idx"]][:300].copy()
    vid = p.videos["video_id"][it["video_idx"]][:300].copy()
    uid[[7, 100]] = [999, 998]
    vid[[7, 50, 250]] = [77777, 55555, 55555]
    f = _write(tmp_path / "in.parquet", user_id=uid, video_id=vid, time_ms=it["time_ms"][:300])
    with pytest.raises(UnknownIdsError) as e:
        score(world["runs"]["both"], world["root"] / "p", f, tmp_path / "o", progress=False, part_rows=100)
    msg = str(e.value)
    assert "4 pair(s)" in msg and "first at row 7" in msg and "[998, 999]" in msg and "[55555, 77777]" in msg
    assert not list((tmp_path / "o").glob("part-*"))
    man = score(world["runs"]["both"], world["root"] / "p", f, tmp_path / "o2", progress=False, part_rows=100,
                on_unknown="skip")
    bad = [7, 50, 100, 250]
    rej = pq.read_table(tmp_path / "o2" / "_rejected").to_pydict()
    assert rej["row"] == bad
    assert rej["reason"] == ["unknown_user_and_video", "unknown_video", "unknown_user", "unknown_video"]
    assert man["rows_scored"] == 296 and man["rows_rejected"] == 4
    assert [r["rejected"] for r in man["parts"]] == [2, 1, 1]
    tab = _read_parts(tmp_path / "o2")
    keep = np.setdiff1d(np.arange(300), bad)
    np.testing.assert_array_equal(tab.column("row").to_numpy(), keep)
    _check_against(tab, _reference(_model(world["runs"]["both"]), p, keep), it["n_segments"][keep].astype(int))


# ---------------------------------------------------------------------------------------------- out dir, resume

def test_foreign_out_dir_refused_and_rerun_skips(world, tmp_path):
    args = (world["runs"]["id"], world["root"] / "p", world["pairs"], tmp_path / "o")
    score(*args, part_rows=200, progress=False)
    mtimes = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "o").glob("part-*")}
    calls = []
    man = score(*args, part_rows=200, progress=False, on_part=calls.append)  # same job: nothing left to do
    assert calls == [] and man["complete"]
    assert mtimes == {f.name: f.stat().st_mtime_ns for f in (tmp_path / "o").glob("part-*")}
    with pytest.raises(OutDirError, match="part_rows"):
        score(*args, part_rows=100, progress=False)
    with pytest.raises(OutDirError, match="run.fingerprint"):
        score(world["runs"]["both"], *args[1:], part_rows=200, progress=False)
    man = score(*args, part_rows=100, progress=False, overwrite=True)
    assert man["complete"] and len(list((tmp_path / "o").glob("part-*"))) == man["n_parts"] == 6
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match="not a segfast score output"):
        score(*args[:3], tmp_path / "x", overwrite=True, progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


_KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from segfast.scoring import score
def slow(rec):
    time.sleep(0.4)
score(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], batch_size=50, part_rows=60, progress=False,
      on_part=slow)
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _parts_equal(a: Path, b: Path):
    fa, fb = sorted(x.name for x in a.glob("part-*")), sorted(x.name for x in b.glob("part-*"))
    assert fa == fb and fa
    for name in fa:
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        assert ta.equals(tb), name


def test_resume_after_sigkill(world, tmp_path):
    run, data, pairs = world["runs"]["visual"], world["root"] / "p", world["pairs"]
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(run), str(data), str(pairs), str(out)],
                            env=_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 60
    done = []
    while time.time() < deadline:
        m = None
        try:
            m = json.loads((out / MANIFEST).read_text())
        except (OSError, ValueError):
            pass
        if m and len(m["parts"]) >= 2:
            done = m["parts"]
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    m = json.loads((out / MANIFEST).read_text())
    n_parts = m["n_parts"]
    assert 2 <= len(m["parts"]) < n_parts and not m["complete"]
    before = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in m["parts"]}
    for r in m["parts"]:  # listed parts are whole
        assert pq.ParquetFile(out / r["file"]).metadata.num_rows == r["rows"]
    calls = []
    man = score(run, data, pairs, out, batch_size=50, part_rows=60, progress=False, on_part=calls.append)
    assert man["complete"] and len(man["parts"]) == n_parts
    assert sorted(c["part"] for c in calls) == sorted(set(range(n_parts)) - {r["part"] for r in done})
    for f, t in before.items():  # no finished part lost or redone
        assert (out / f).stat().st_mtime_ns == t
    assert not [x for x in out.iterdir() if x.name.startswith(".")]  # no temp files left
    score(run, data, pairs, tmp_path / "ref", batch_size=50, part_rows=60, progress=False)
    _parts_equal(out, tmp_path / "ref")


def test_two_process_sharding_matches_single_process(world, tmp_path):
    run, data, pairs = world["runs"]["both"], world["root"] / "p", world["pairs"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "segfast.scoring", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs),
           "--out", str(tmp_path / "sharded"), "--part-rows", "100", "--batch-size", "64", "--quiet"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((tmp_path / "sharded" / MANIFEST).read_text())
    assert man["complete"] and man["world_size"] == 2 and man["rows_scored"] == len(world["p"])
    assert [rec["rank"] for rec in man["parts"]] == [i % 2 for i in range(man["n_parts"])]
    assert not list((tmp_path / "sharded").glob("_manifest.rank-*"))
    score(run, data, pairs, tmp_path / "single", part_rows=100, batch_size=64, progress=False)
    _parts_equal(tmp_path / "sharded", tmp_path / "single")
