"""prepare: splits, histories, visual histories, cold flags, manifest, atomic writes, load errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segfast.data import splits as sp
from segfast.data.prepared import PreparedFormatError, load_prepared, prepare, prepare_raw
from segfast.data.sources import RawInteractions

SAMPLE = Path(os.environ.get("SEGFAST_SEGMM_SAMPLE")  # as tests/conftest.py: .ci/run sets it
              or Path(__file__).resolve().parents[2] / "shared" / "data" / "SegMM_inter_sample.csv")


def make_raw(users, per_user, videos=50, seed=0, dropped=None):
    rng = np.random.default_rng(seed)
    uid = np.concatenate([np.full(k, u, dtype=np.int64) for u, k in zip(users, per_user)])
    n = uid.shape[0]
    dur = rng.integers(1, 199_999, n)
    play = np.maximum(1, (dur * rng.uniform(0.05, 1.3, n)).astype(np.int64))
    dropped = dropped or {}
    return RawInteractions(user_id=uid, video_id=rng.integers(0, videos, n) * 7 + 3,
                           time_ms=rng.permutation(n).astype(np.int64) * 10, duration_ms=dur,
                           play_time_ms=play, source_row=np.arange(n, dtype=np.int64),
                           rows_read=n + sum(dropped.values()), dropped=dict(dropped))


def permuted(raw, perm):
    return RawInteractions(**{k: getattr(raw, k)[perm] for k in
                              ("user_id", "video_id", "time_ms", "duration_ms", "play_time_ms")},
                           source_row=np.arange(len(raw), dtype=np.int64), rows_read=raw.rows_read,
                           dropped=dict(raw.dropped))


class ArangeFeatures:
    """Feature source whose segment s of the i-th requested video has value 1000*i + s everywhere."""

    def __init__(self, dim=4, bad=None):
        self.dim, self.bad = dim, bad

    def rows_for(self, video_ids, n_segments):
        off = np.zeros(len(video_ids) + 1, dtype=np.int64)
        np.cumsum(n_segments, out=off[1:])
        vidx = np.repeat(np.arange(len(video_ids)), n_segments)
        return off, vidx * 1000 + (np.arange(off[-1]) - off[:-1][vidx])

    def read(self, rows):
        x = np.repeat(np.asarray(rows, dtype=np.float64)[:, None], self.dim, axis=1)
        if self.bad is not None:
            x[np.asarray(rows) == self.bad, 1] = np.nan
        return x


# ---------------------------------------------------------------------------------------- splits

def test_split_determinism_and_row_order_independence():
    raw = make_raw([5, 9, 2], [300, 150, 120])
    args = lambda r, o: (r.user_id[o], r.video_id[o], r.time_ms[o], r.duration_ms[o], r.play_time_ms[o])  # noqa
    o1 = sp.sort_order(raw.user_id, raw.time_ms, raw.source_row)
    s1 = sp.assign_splits(*args(raw, o1), seed=3, profile_len=80)
    assert np.array_equal(s1, sp.assign_splits(*args(raw, o1), seed=3, profile_len=80))
    assert not np.array_equal(s1, sp.assign_splits(*args(raw, o1), seed=4, profile_len=80))
    perm = np.random.default_rng(1).permutation(len(raw))
    raw2 = permuted(raw, perm)
    o2 = sp.sort_order(raw2.user_id, raw2.time_ms, raw2.source_row)
    s2 = sp.assign_splits(*args(raw2, o2), seed=3, profile_len=80)
    # times are distinct, so the sorted tables are the same rows in the same order
    assert np.array_equal(raw.time_ms[o1], raw2.time_ms[o2])
    assert np.array_equal(s1, s2)


def test_split_proportions_per_user():
    raw = make_raw([1, 2], [1080, 33])
    o = sp.sort_order(raw.user_id, raw.time_ms, raw.source_row)
    s = sp.assign_splits(raw.user_id[o], raw.video_id[o], raw.time_ms[o], raw.duration_ms[o],
                         raw.play_time_ms[o], seed=0, profile_len=80)
    u = raw.user_id[o]
    # user 1: 1000 non-profile rows -> 100 test, round(90) dev, 810 train
    assert np.bincount(s[u == 1], minlength=4).tolist() == [810, 90, 100, 80]
    # user 2 (no user filter here): 0 non-profile rows -> all profile
    assert np.bincount(s[u == 2], minlength=4).tolist() == [0, 0, 0, 33]
    # no profile: 25 rows -> test round_half_up(2.5) = 3, dev round_half_up(2.2) = 2
    s0 = sp.assign_splits(np.zeros(25, np.int64), np.arange(25), np.arange(25), np.ones(25, np.int64),
                          np.ones(25, np.int64), seed=0)
    assert np.bincount(s0, minlength=4).tolist() == [20, 2, 3, 0]


def test_history_lengths():
    u = np.array([0] * 3 + [1] * 60 + [2])
    h = sp.history_lengths(u, 50)
    assert h[:3].tolist() == [0, 1, 2]
    assert h[3:63].tolist() == list(range(50)) + [50] * 10
    assert h[63] == 0


# ---------------------------------------------------------------------------------------- visual history

def test_visual_history_hand_built():
    # one user, 6 rows; view lengths and video feature offsets by hand; profile = first 2 rows
    u = np.zeros(6, dtype=np.int64)
    vl = np.array([2, 0, 1, 3, 1, 2])
    foff = np.array([100, 200, 300, 400, 500, 600])
    hl = np.array([0, 1, 1, 2, 2, 2])  # short windows so that the profile part shows
    flat, off = sp.visual_histories(u, foff, vl, hl, profile_len=2, cap=100, seed=0)
    got = [flat[off[r]:off[r + 1]].tolist() for r in range(6)]
    assert got[0] == []
    assert got[1] == [100, 101]                               # history row 0
    assert got[2] == [] + [100, 101]                          # window row 1 (vl 0); profile row 0
    assert got[3] == [300] + [100, 101]                       # window rows 2, 1; profile row 0
    assert got[4] == [400, 401, 402, 300] + [100, 101]        # window rows 3, 2; profile rows 1, 0
    assert got[5] == [500, 400, 401, 402] + [100, 101]        # window rows 4, 3; profile (row 1 vl 0, row 0)


def test_visual_history_cap_sample():
    n = 40
    u = np.zeros(n, dtype=np.int64)
    vl = np.full(n, 5)
    foff = np.arange(n) * 10
    hl = sp.history_lengths(u, 50)
    flat, off = sp.visual_histories(u, foff, vl, hl, 0, cap=100, seed=7)
    lens = np.diff(off)
    assert lens.tolist() == [min(5 * i, 100) for i in range(n)]
    for r in (25, 39):
        full = np.concatenate([foff[r - 1 - j] + np.arange(5) for j in range(r)])  # most recent first
        got = flat[off[r]:off[r + 1]]
        where = {v: i for i, v in enumerate(full)}
        idx = [where[v] for v in got]
        assert len(set(got.tolist())) == 100 and all(np.diff(idx) > 0)  # a subset, order kept
    flat2, _ = sp.visual_histories(u, foff, vl, hl, 0, cap=100, seed=7)
    flat3, _ = sp.visual_histories(u, foff, vl, hl, 0, cap=100, seed=8)
    assert np.array_equal(flat, flat2) and not np.array_equal(flat, flat3)
    # chunking does not change the result
    parts = [c for _, _, c in sp.vhist_chunks(u, foff, vl, hl, 0, 100, 7, chunk_elems=150)]
    assert np.array_equal(np.concatenate(parts), flat)


# ---------------------------------------------------------------------------------------- prepare

def test_prepare_raw_segmm_rules(tmp_path):
    raw = make_raw([10, 20, 30], [150, 99, 100], dropped={"play_time_nonpositive": 7})
    m = prepare_raw(raw, tmp_path / "p", "segmm", seed=1, feature_source=ArangeFeatures(), progress=False)
    c = m["counts"]
    assert c["rows_read"] == 356 and c["rows_kept"] == 250
    assert c["rows_dropped"] == {"play_time_nonpositive": 7, "user_too_few_interactions": 99,
                                 "duplicate_interaction": 0}
    assert c["rows_read"] == c["rows_kept"] + sum(c["rows_dropped"].values())
    assert c["users"] == 2 and sum(c["splits"].values()) == 250 and c["splits"]["profile"] == 160
    p = load_prepared(tmp_path / "p")
    it = p.interactions
    assert p.manifest == json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert p.users["user_id"].tolist() == [10, 30] and p.users["n_interactions"].tolist() == [150, 100]
    # sorted by (user, time); first 80 per user are profile
    key = it["user_idx"].astype(np.int64) * 10**9 + it["time_ms"]
    assert np.all(np.diff(key) > 0)
    for u in (0, 1):
        s = it["split"][it["user_idx"] == u]
        assert np.all(s[:80] == 3) and not np.any(s[80:] == 3)
    # columns against the raw rows
    src = it["source_row"]
    assert np.array_equal(p.videos["video_id"][it["video_idx"]], raw.video_id[src])
    n = -(-raw.duration_ms[src] // 5000)
    assert np.array_equal(it["n_segments"], n)
    full = raw.play_time_ms[src] >= raw.duration_ms[src]
    vl = np.where(full, n, -(-raw.play_time_ms[src] // 5000) - 1)
    assert np.array_equal(it["target"], vl) and np.array_equal(it["view_length"], vl)
    # cold flags: video has no train row
    vid_train = set(it["video_idx"][it["split"] == 0].tolist())
    assert it["is_cold"].tolist() == [v not in vid_train for v in it["video_idx"].tolist()]
    assert c["cold_test"] == int((it["is_cold"] & (it["split"] == 2)).sum())
    assert p.videos["n_train"].tolist() == np.bincount(it["video_idx"][it["split"] == 0],
                                                        minlength=p.n_videos).tolist()
    assert p.rows("test").tolist() == np.flatnonzero(it["split"] == 2).tolist()
    # features: video v's segment i at feat_offset[v] + i; value 1000 * v + i
    fo = p.videos["feat_offset"]
    assert p.features.dtype == np.float16 and p.features.shape == (c["segments"], 4)
    v = 5
    for i in range(int(p.videos["n_segments"][v])):
        assert p.features[fo[v] + i, 0] == np.float16(1000 * v + i)
    # visual history == the in-memory reference
    flat, off = sp.visual_histories(it["user_idx"], fo[it["video_idx"]], it["view_length"], it["hist_len"],
                                    80, 100, seed=1)
    assert np.array_equal(np.asarray(p.vhist), flat)
    assert np.array_equal(it["vhist_offset"], off[:-1]) and np.array_equal(it["vhist_len"], np.diff(off))


def test_prepare_same_result_for_permuted_input(tmp_path):
    raw = make_raw([1, 2], [130, 120])
    prepare_raw(raw, tmp_path / "a", "segmm", seed=5, progress=False)
    perm = np.random.default_rng(3).permutation(len(raw))
    prepare_raw(permuted(raw, perm), tmp_path / "b", "segmm", seed=5, progress=False)
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    for k in ("user_idx", "video_idx", "time_ms", "split", "is_cold", "hist_len", "target"):
        assert np.array_equal(a.interactions[k], b.interactions[k]), k
    assert a.interactions["vhist_offset"].tolist() == [-1] * 250 and a.features is None


def test_bad_features_named(tmp_path):
    raw = make_raw([1], [100])
    with pytest.raises(ValueError, match=r"features of video \d+ segment \d+.*non-finite"):
        prepare_raw(raw, tmp_path / "p", "segmm", feature_source=ArangeFeatures(bad=2001), progress=False)
    assert os.listdir(tmp_path) == []


def test_atomic_write(tmp_path, monkeypatch):
    raw = make_raw([1], [120])
    import segfast.data.prepared as prep

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(prep, "_write_parquet", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_raw(raw, tmp_path / "p", "segmm", feature_source=ArangeFeatures(), progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    prepare_raw(raw, tmp_path / "p", "segmm", progress=False)
    with pytest.raises(FileExistsError):
        prepare_raw(raw, tmp_path / "p", "segmm", progress=False)
    m = prepare_raw(raw, tmp_path / "p", "segmm", seed=9, progress=False, overwrite=True)
    assert load_prepared(tmp_path / "p").manifest["seed"] == 9 == m["seed"]
    assert os.listdir(tmp_path) == ["p"]


def test_load_prepared_errors(tmp_path):
    prepare_raw(make_raw([1], [100]), tmp_path / "p", "kuairand", progress=False)
    p = tmp_path / "p"
    assert load_prepared(p).manifest["counts"]["splits"]["profile"] == 0
    m = json.loads((p / "manifest.json").read_text())
    m["schema_version"] = 2
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PreparedFormatError, match="manifest.json.*schema_version 2, expected 1"):
        load_prepared(p)
    m["schema_version"] = 1
    (p / "manifest.json").write_text(json.dumps(m))
    (p / "users.parquet").unlink()
    with pytest.raises(PreparedFormatError, match="users.parquet: missing"):
        load_prepared(p)
    with pytest.raises(PreparedFormatError, match="nope: not a directory"):
        load_prepared(tmp_path / "nope")


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"SegMM sample not found at {SAMPLE} (set SEGFAST_SEGMM_SAMPLE)")
def test_prepare_real_sample(tmp_path):
    m = prepare("segmm-sample", SAMPLE, tmp_path / "s", seed=0, progress=False)
    c = m["counts"]
    assert c["rows_read"] == 10_000
    assert c["rows_read"] == c["rows_kept"] + sum(c["rows_dropped"].values())
    p = load_prepared(tmp_path / "s")
    assert p.n_users == c["users"] and len(p) == c["rows_kept"]
    assert np.all(p.users["n_interactions"] >= 100)
    assert c["splits"]["profile"] == 80 * c["users"]
    assert m["features"] is None and p.features is None
    print("sample:", c)
