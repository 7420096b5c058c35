"""Issue 15 item 8: thumbnails and edit stream their output (row group by row group from the scorer's parts, never
every score of every pair in Python lists) and take the unknown-id policy. Checked pair by pair against the
per-pair reference functions (thumbnail_segment, skip_ranges) applied to `segfast score --probabilities`'s own
calibrated keep probabilities, over several parts and several chunks per part."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast import apps
from segfast.apps import edit, skip_ranges, thumbnail_segment, thumbnails


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from _fakes import interaction_pairs, make_run, prepared_world

    root = tmp_path_factory.mktemp("apps_stream")
    p = prepared_world(root)
    from segfast.calibration import calibrate_run

    runs = {m: make_run(root, p, m) for m in ("id", "visual")}
    for run in runs.values():
        calibrate_run(run, root / "p")
    t = interaction_pairs(p).select(["user_id", "video_id"]).slice(0, 300)
    pq.write_table(t, root / "pairs.parquet")
    dmax = {}
    it = p.interactions
    vids = np.asarray(p.videos["video_id"])[it["video_idx"]]
    for v, d in zip(vids.tolist(), it["duration_ms"].tolist()):
        dmax[v] = max(dmax.get(v, 0), d)
    return root, p, runs, dmax


def _reference_scores(root, run, pairs, out):
    from segfast.scoring import score

    score(run, root / "p", pairs, out, device="cpu", part_rows=64, on_unknown="skip", probabilities=True)
    t = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))])
    return t.column("row").to_pylist(), t.column("video_id").to_pylist(), t.column("keep_probability").to_pylist()


@pytest.mark.parametrize("modality", ["id", "visual"])
def test_stream_matches_per_pair_reference(world, tmp_path, monkeypatch, modality):
    root, p, runs, dmax = world
    monkeypatch.setattr(apps, "_CHUNK_ROWS", 17)  # several chunks per part, several parts (part_rows 64)
    rows, vids, scores = _reference_scores(root, runs[modality], root / "pairs.parquet", tmp_path / "ref")
    assert rows == list(range(300))
    th = thumbnails(runs[modality], root / "p", root / "pairs.parquet", tmp_path / "th.parquet", part_rows=64)
    f = pq.ParquetFile(tmp_path / "th.parquet")
    assert th["pairs"] == 300 and f.metadata.num_rows == 300 and f.num_row_groups > 5  # written incrementally
    t = f.read().to_pydict()
    assert t["video_id"] == vids
    for k, (v, s) in enumerate(zip(vids, scores)):
        i, a, b = thumbnail_segment(s, dmax[v])
        assert (t["thumbnail_slot"][k], t["start_ms"][k], t["end_ms"][k]) == (i, a, b)
        assert t["duration_ms"][k] == dmax[v] and t["n_segments"][k] == len(s)
        assert t["keep_probability"][k] == s[i]  # the chosen segment's calibrated keep probability
    # a threshold in the middle of the keep probabilities, so that ranges start, stop and merge
    thr = float(np.median(np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])))
    ed = edit(runs[modality], root / "p", root / "pairs.parquet", tmp_path / "ed.parquet", threshold=thr,
              part_rows=64)
    e = pq.read_table(tmp_path / "ed.parquet").to_pydict()
    skipped = total = 0
    n_multi = 0
    for k, (v, s) in enumerate(zip(vids, scores)):
        r = skip_ranges(s, dmax[v], thr)
        assert list(zip(e["skip_start_ms"][k], e["skip_end_ms"][k])) == r
        assert e["skipped_ms"][k] == sum(b - a for a, b in r) and e["kept_ms"][k] == dmax[v] - e["skipped_ms"][k]
        skipped, total, n_multi = skipped + e["skipped_ms"][k], total + dmax[v], n_multi + (len(r) > 1)
    assert n_multi > 10  # the comparison saw split ranges
    assert ed["skipped_fraction"] == pytest.approx(skipped / total)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".") and not x.name.endswith(".segfast.lock")]


def test_unknown_id_policy(world, tmp_path):
    root, p, runs, dmax = world
    t = pq.read_table(root / "pairs.parquet").slice(0, 40)
    uid = t.column("user_id").to_numpy().copy()
    uid[[5, 30]] = 987654321  # users the dataset does not know
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(t.set_column(0, "user_id", pa.array(uid)), pairs)
    for fn in (thumbnails, edit):
        out = tmp_path / f"{fn.__name__}.parquet"
        with pytest.raises(ValueError, match="987654321"):
            fn(runs["id"], root / "p", pairs, out, part_rows=16)
        assert not out.exists()
        res = fn(runs["id"], root / "p", pairs, out, part_rows=16, on_unknown="skip")
        assert res["pairs"] == 38 and res["rejected"] == 2
        got = pq.read_table(out)
        keep = np.ones(40, bool)
        keep[[5, 30]] = False
        assert got.column("user_id").to_pylist() == uid[keep].tolist()  # input order, the unknown left out
        assert got.column("video_id").to_pylist() == t.column("video_id").to_numpy()[keep].tolist()


def test_empty_output_after_skip(world, tmp_path):
    root, p, runs, _ = world
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "video_id": pa.array([3, 4], pa.int64())}),
                   pairs)
    res = thumbnails(runs["id"], root / "p", pairs, tmp_path / "th.parquet", on_unknown="skip")
    assert res["pairs"] == 0 and res["rejected"] == 2
    t = pq.read_table(tmp_path / "th.parquet")
    assert t.num_rows == 0 and "thumbnail_slot" in t.column_names
