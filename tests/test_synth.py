"""Synthetic releases: read back through the real readers, ground truth consistency, determinism."""
import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from segfast.data import synth as synth_mod
from segfast.data.labels import n_segments, view_length
from segfast.data.sources.kuairand import KUAIRAND_COLUMNS, read_kuairand
from segfast.data.sources.segmm import read_segmm
from segfast.data.synth import synth


@pytest.fixture(scope="module")
def segmm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "segmm"
    summary = synth("segmm", out, users=60, videos=800, interactions=12000, seed=5, feature_dim=16, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def kuairand_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("k") / "kr"
    summary = synth("kuairand", out, users=40, videos=3000, interactions=60000, seed=6, progress=False)
    return out, summary


def _gt(out):
    t = pq.read_table(out / "ground_truth.parquet")
    return {c: t.column(c).to_numpy() for c in t.column_names}


def _pair_keys(u, v):
    return u.astype(np.int64) * (1 << 32) + v.astype(np.int64)


def test_segmm_roundtrip(segmm_dir):
    out, s = segmm_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "SegMM_feat_memmap.dat", "SegMM_inter.csv", "SegMM_photoidframeid2lineid.json", "ground_truth.parquet",
        "synth.json"]
    assert not list(out.parent.glob(".segmm.tmp-*"))
    raw, feats = read_segmm(out, feature_dim=16)
    assert raw.rows_read == s["rows"] == 12000
    assert len(raw) == s["rows_kept"] and raw.dropped == s["dropped"]
    assert raw.dropped["duration_out_of_range"] == 0
    # every video in the catalogue has all its segments, and the sizes agree
    vids, first = np.unique(raw.video_id, return_index=True)
    n = n_segments(raw.duration_ms[first])
    offs, rows = feats.rows_for(vids, n)
    assert feats.matrix.rows == s["feature_rows"] == len(feats)
    x = feats.read(rows)
    assert x.shape == (offs[-1], 16) and np.isfinite(x).all()
    # features carry the content: segments of one video are closer than segments of different videos
    owner = np.repeat(np.arange(vids.size), n)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    i = np.flatnonzero(n[owner] >= 2)
    same = np.einsum("rd,rd->r", xn[i[:-1]], xn[i[:-1] + 1])[owner[i[:-1]] == owner[i[:-1] + 1]].mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, x.shape[0], (2, 4000))
    diff = np.einsum("rd,rd->r", xn[a], xn[b])[owner[a] != owner[b]].mean()
    assert same > diff + 0.2
    # per-user counts straddle SegMM's 100-interaction threshold; timestamps within the span
    per_user = np.bincount(np.unique(raw.user_id, return_inverse=True)[1])
    assert (per_user >= 100).sum() == s["users_ge_100"] and 0 < s["users_ge_100"] < 60
    assert raw.time_ms.min() >= 0 and raw.time_ms.max() < synth_mod.SEGMM_SPAN_MS
    # Zipf popularity: videos repeat across users
    pairs = np.unique(_pair_keys(raw.user_id, raw.video_id))
    users_per_video = np.bincount(np.unique(pairs % (1 << 32), return_inverse=True)[1])
    assert (users_per_video >= 5).sum() > 50


def test_segmm_ground_truth_consistent(segmm_dir):
    out, s = segmm_dir
    raw, _ = read_segmm(out, with_features=False)
    g = _gt(out)
    assert g["interest"].dtype == np.float32 and g["segment"].dtype == np.int8
    assert ((g["interest"] > 0) & (g["interest"] < 1)).all()
    gk = _pair_keys(g["user_id"], g["video_id"])
    gpairs, gstart, gcount = np.unique(gk, return_index=True, return_counts=True)
    assert gpairs.size == s["pairs"]
    rk = _pair_keys(raw.user_id, raw.video_id)
    assert np.isin(rk, gpairs).all()                       # every read interaction has its ground truth
    pos = np.searchsorted(gpairs, rk)
    N = n_segments(raw.duration_ms)
    assert np.array_equal(gcount[pos], N)                  # one value per segment 0..N-1
    # the leave behaviour follows the interest: the leave slot's interest is well below the watched ones
    y = view_length(raw.play_time_ms, raw.duration_ms)
    order = np.argsort(gk, kind="stable")
    interest = g["interest"][order]
    seg = g["segment"][order]
    start = np.searchsorted(gk[order], gpairs)
    base = start[pos]
    assert (seg[base] == 0).all()
    skip = y < N
    leave_int = interest[base[skip] + y[skip]]
    watched = np.concatenate([interest[base[i]:base[i] + y[i]] for i in np.flatnonzero(skip)[:3000]])
    assert leave_int.mean() < watched.mean() - 0.05
    # full watches: play >= duration, and some replays beyond it; skips: play inside the leave segment
    full = ~skip
    assert 0.2 < full.mean() < 0.6 and 0.2 < (skip & (y == 0)).mean() < 0.55
    assert (raw.play_time_ms[full] >= raw.duration_ms[full]).all()
    assert (raw.play_time_ms[full] > raw.duration_ms[full]).mean() > 0.5
    p = raw.play_time_ms[skip]
    assert ((p > 5000 * y[skip]) & (p <= 5000 * (y[skip] + 1)) & (p < raw.duration_ms[skip])).all()


def test_kuairand_roundtrip(kuairand_dir, tmp_path):
    out, s = kuairand_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "ground_truth.parquet", "log_standard_4_08_to_4_21_1k.csv", "synth.json"]
    r = read_kuairand(out, chunk_bytes=256 << 10, progress=False)
    assert r.rows_read == s["rows"] == 60000
    assert r.dropped == s["dropped"] and len(r) == s["rows_kept"]
    d = r.dropped
    assert d["not_clicked"] > 0.7 * 60000 and d["play_time_nonpositive"] > 0 and d["duration_out_of_range"] > 0
    assert 0.08 < len(r) / 60000 < 0.25
    # the raw log: 19 int64 columns, time increasing per user, date/hourmin consistent with time_ms
    t = pacsv.read_csv(out / "log_standard_4_08_to_4_21_1k.csv")
    assert t.column_names == list(KUAIRAND_COLUMNS)
    assert all(str(c.type) == "int64" for c in t.columns)
    u, tm = t.column("user_id").to_numpy(), t.column("time_ms").to_numpy()
    same = u[1:] == u[:-1]
    assert (np.diff(tm)[same] >= 0).all() and (np.diff(u) >= 0).all()
    local = tm - synth_mod.KUAIRAND_START_MS
    assert local.min() >= 0 and local.max() < 14 * 86400000
    assert (t.column("date").to_numpy() == 20220408 + local // 86400000).all()  # April 8..21
    hm = t.column("hourmin").to_numpy()
    assert (hm // 100 * 60 + hm % 100 == (local % 86400000) // 60000).all()
    # ground truth: exactly the kept (clicked, valid) pairs
    g = _gt(out)
    gpairs, gcount = np.unique(_pair_keys(g["user_id"], g["video_id"]), return_counts=True)
    rpairs, first = np.unique(_pair_keys(r.user_id, r.video_id), return_index=True)
    assert np.array_equal(gpairs, rpairs) and gpairs.size == s["pairs"]
    assert np.array_equal(gcount, n_segments(r.duration_ms[first]))
    per_user = np.bincount(np.unique(r.user_id, return_inverse=True)[1])
    assert (per_user >= 20).sum() == s["users_ge_20"] >= 30


def test_determinism_and_seed(tmp_path):
    kw = dict(users=8, videos=50, interactions=400, feature_dim=4, progress=False)
    a = synth("segmm", tmp_path / "a", seed=11, **kw)
    b = synth("segmm", tmp_path / "b", seed=11, **kw)
    c = synth("segmm", tmp_path / "c", seed=12, **kw)
    for name in ("SegMM_inter.csv", "SegMM_photoidframeid2lineid.json", "SegMM_feat_memmap.dat"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert _gt(tmp_path / "a")["interest"].tolist() == _gt(tmp_path / "b")["interest"].tolist()
    assert {k: v for k, v in a.items() if k not in ("out", "seconds")} == \
        {k: v for k, v in b.items() if k not in ("out", "seconds")}
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["rows"] == 400
    k1 = synth("kuairand", tmp_path / "k1", seed=3, users=5, videos=40, interactions=700, progress=False)
    k2 = synth("kuairand", tmp_path / "k2", seed=3, users=5, videos=40, interactions=700, progress=False)
    f = "log_standard_4_08_to_4_21_1k.csv"
    assert (tmp_path / "k1" / f).read_bytes() == (tmp_path / "k2" / f).read_bytes()
    assert k1["dropped"] == k2["dropped"]


def test_chunked_paths_agree_with_reader(tmp_path, monkeypatch):
    """Tiny chunk sizes force many user blocks and feature blocks; the reader still sees a coherent release."""
    monkeypatch.setattr(synth_mod, "ROW_CHUNK", 97)
    monkeypatch.setattr(synth_mod, "HAZ_CHUNK", 13)
    monkeypatch.setattr(synth_mod, "FEATURE_CHUNK_BYTES", 3 * 8 * 8)
    s = synth("segmm", tmp_path / "s", users=10, videos=70, interactions=1500, seed=2, feature_dim=8, progress=True)
    raw, feats = read_segmm(tmp_path / "s", feature_dim=8)
    assert raw.rows_read == 1500 and len(raw) == s["rows_kept"]
    vids, first = np.unique(raw.video_id, return_index=True)
    _, rows = feats.rows_for(vids, n_segments(raw.duration_ms[first]))
    assert np.unique(rows).size == rows.size and feats.matrix.rows == s["feature_rows"]
    g = _gt(tmp_path / "s")
    assert np.unique(_pair_keys(g["user_id"], g["video_id"])).size == s["pairs"]


def test_output_handling(tmp_path, monkeypatch):
    out = tmp_path / "o"
    synth("kuairand", out, users=3, videos=20, interactions=100, seed=0, progress=False)
    with pytest.raises(FileExistsError):
        synth("kuairand", out, users=3, videos=20, interactions=100, seed=0, progress=False)
    s = synth("kuairand", out, users=3, videos=20, interactions=200, seed=0, progress=False, overwrite=True)
    assert read_kuairand(out, progress=False).rows_read == 200 == s["rows"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_mod, "_write_features", boom)
    with pytest.raises(RuntimeError):
        synth("segmm", tmp_path / "f", users=3, videos=20, interactions=100, seed=0, progress=False)
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".f.tmp-*"))
    with pytest.raises(ValueError, match="format"):
        synth("movielens", tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="interactions"):
        synth("segmm", tmp_path / "g", users=10, interactions=5, progress=False)
