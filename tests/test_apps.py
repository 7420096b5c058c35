"""Applications (thumbnails, editing) on hand-built keep probabilities and on a calibrated run, and the figures.
(tests/test_plots.py checks what the case-study figures show.)"""
import json

import numpy as np
import pytest

from segfast.apps import segment_range, skip_ranges, thumbnail_segment
from segfast.plots import case_study_heatmap, interest_vs_truth, training_curve

PNG = b"\x89PNG\r\n\x1a\n"


def test_segment_range_last_segment_cut_at_duration():
    assert segment_range(0, 12345) == (0, 5000)
    assert segment_range(2, 12345) == (10000, 12345)


def test_thumbnail_hand_scores():
    # 3 segments (12345 ms); slot 1 has the highest keep probability
    assert thumbnail_segment([0.4, 0.9, 0.3], 12345) == (1, 5000, 10000)
    # last (short) segment wins: its range ends at the duration
    assert thumbnail_segment([0.4, 0.9, 0.95], 12345) == (2, 10000, 12345)
    # ties -> earliest; values past N (padding) are ignored
    assert thumbnail_segment([0.7, 0.7, 0.5, 0.99], 15000) == (0, 0, 5000)
    with pytest.raises(ValueError, match="2 scores for a video of 12345 ms, which has 3 segments"):
        thumbnail_segment([0.2, 0.8], 12345)


def test_skip_ranges_merge_consecutive():
    # keep probabilities; threshold .5 skips the segments below .5 (.5 itself is kept)
    s = [0.12, 0.27, 0.73, 0.5, 0.05, 0.38]
    d = 27000  # 6 segments, the last one 2000 ms
    assert skip_ranges(s, d, 0.5) == [(0, 10000), (20000, 27000)]
    assert skip_ranges(s, d, 0.0) == []
    assert skip_ranges(s, d, 1.0) == [(0, 27000)]
    assert skip_ranges(s, d, 0.2) == [(0, 5000), (20000, 25000)]
    assert skip_ranges(s, d, 0.3) == [(0, 10000), (20000, 25000)]
    with pytest.raises(ValueError, match="threshold"):
        skip_ranges(s, d, 1.5)
    with pytest.raises(ValueError, match="not logits"):  # raw logits are not probabilities
        skip_ranges([-2.0, -1.0, 1.0, 0.0, -3.0, -0.5], d, 0.5)


def test_heatmap_png_written(tmp_path):
    rng = np.random.default_rng(0)
    sc = rng.random((4, 6))
    sc[3, 4:] = np.nan  # a shorter row
    out = case_study_heatmap(sc, [0, 2, 6, 3], ["a", "b", "c", "d"], tmp_path / "fig" / "case.png", title="t")
    data = open(out, "rb").read()
    assert data[:8] == PNG and len(data) > 2000
    with pytest.raises(ValueError, match="leave_slots"):
        case_study_heatmap(sc, [0, 1, 7, 0], list("abcd"), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_training_curve_and_interest_vs_truth(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps({"step": s, "train_loss": 1.0 / s, "dev": {"NDCG@5": 0.1 * s}})
                           for s in (1, 2, 3)) + "\n")
    assert open(training_curve(m, tmp_path / "c.png"), "rb").read(8) == PNG
    m.write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        training_curve(m, tmp_path / "c2.png")
    out = interest_vs_truth([np.array([.2, .5, .9])], [np.array([.3, .4, .8])], ["u1 v2"], tmp_path / "i.png",
                            leave_slots=[1])
    assert open(out, "rb").read(8) == PNG


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny synthetic prepared dataset and a Task-1 run with an untrained ID model (and its calibrator)."""
    from _fakes import calibrated_synth_run

    return calibrated_synth_run(tmp_path_factory.mktemp("apps"), users=6, videos=40, interactions=1200, seed=2)


def _row_pairs(p, rows, path):
    """Pairs (user_id, video_id, time_ms) of interaction rows: scored with the same history as the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    it = p.interactions
    uids = np.asarray(p.users["user_id"])[it["user_idx"][rows]]
    vids = np.asarray(p.videos["video_id"])[it["video_idx"][rows]]
    pq.write_table(pa.table({"user_id": pa.array(uids, pa.int64()), "video_id": pa.array(vids, pa.int64()),
                             "time_ms": pa.array(np.asarray(it["time_ms"])[rows], pa.int64())}), path)
    return uids, vids


def _gap_threshold(values) -> float:
    """A threshold amid the values, in the widest gap of their middle half: no value lies near it, so float32
    outputs and float64 references agree on which side each value is."""
    v = np.unique(np.asarray(values, dtype=np.float64))
    mid = np.arange(v.size // 4, 3 * v.size // 4)
    k = int(mid[np.argmax(v[mid + 1] - v[mid])])
    return float(0.5 * (v[k] + v[k + 1]))


def test_file_level_thumbnails_edit_case_study(tiny_run, tmp_path):
    import pyarrow.parquet as pq

    from segfast.apps import edit, thumbnails
    from segfast.calibration import checkpoint_digest
    from segfast.plots import case_study, row_keep_probability

    root, p = tiny_run
    it = p.interactions
    rows = p.rows("test")[:7]
    pairs = tmp_path / "pairs.parquet"
    uids, vids = _row_pairs(p, rows, pairs)
    th = thumbnails(root / "run", root / "prep", pairs, tmp_path / "th.parquet")
    assert th["pairs"] == 7
    digest = checkpoint_digest(root / "run", "best")["digest"]
    assert th["calibration"]["checkpoint_digest"] == digest and th["calibration"]["which"] == "best"
    meta = pq.read_schema(tmp_path / "th.parquet").metadata
    assert json.loads(meta[b"segfast.calibration"])["checkpoint_digest"] == digest  # the output records it
    t = pq.read_table(tmp_path / "th.parquet").to_pydict()
    # the thumbnail is the segment with the highest calibrated keep probability of the row (scored separately)
    ref = row_keep_probability(root / "run", p, rows)["keep"]
    for k in range(7):
        n = int(it["n_segments"][rows[k]])
        assert t["n_segments"][k] == n  # the video's N is the row's (one duration per synthetic video)
        assert t["thumbnail_slot"][k] == int(np.argmax(ref[k, :n]))
        assert t["keep_probability"][k] == pytest.approx(ref[k, :n].max(), rel=1e-5)
    assert t["user_id"] == uids.tolist() and t["video_id"] == vids.tolist()  # input order
    dmax = {}
    for v, d in zip(it["video_idx"], it["duration_ms"]):
        dmax[int(v)] = max(dmax.get(int(v), 0), int(d))
    for k in range(7):
        d = dmax[int(it["video_idx"][rows[k]])]
        assert t["duration_ms"][k] == d and t["n_segments"][k] == -(-d // 5000)
        i = t["thumbnail_slot"][k]
        assert (t["start_ms"][k], t["end_ms"][k]) == (5000 * i, min(5000 * (i + 1), d))
    e1 = edit(root / "run", root / "prep", pairs, tmp_path / "ed.parquet", threshold=1.0)
    e = pq.read_table(tmp_path / "ed.parquet").to_pydict()
    # threshold 1: every segment is below it -> one range covering the whole video
    assert e["skip_start_ms"] == [[0]] * 7 and e["skip_end_ms"] == [[d] for d in t["duration_ms"]]
    assert e1["skipped_fraction"] == pytest.approx(1.0)
    edit(root / "run", root / "prep", pairs, tmp_path / "ed0.parquet", threshold=0.0)
    assert pq.read_table(tmp_path / "ed0.parquet").to_pydict()["skipped_ms"] == [0] * 7
    # a threshold inside the keep probabilities: exactly the segments below it are skipped
    real = np.arange(40)[None, :] < np.asarray(it["n_segments"])[rows][:, None]
    thr = _gap_threshold(ref[real])
    em = edit(root / "run", root / "prep", pairs, tmp_path / "edm.parquet", threshold=thr)
    e = pq.read_table(tmp_path / "edm.parquet").to_pydict()
    for k in range(7):
        n = int(it["n_segments"][rows[k]])
        low = [i for i in range(n) if ref[k, i] < thr]
        skipped = [i for i in range(n) if any(a <= 5000 * i < b for a, b in zip(e["skip_start_ms"][k],
                                                                                e["skip_end_ms"][k]))]
        assert skipped == low
    assert em["skipped_segment_fraction"] == pytest.approx((ref[real] < thr).mean())
    assert em["threshold"] == thr and em["calibration"]["checkpoint_digest"] == digest
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp leftovers
    cs = case_study(root / "run", root / "prep", tmp_path / "case.png")
    assert open(cs["out"], "rb").read(8) == PNG and len(cs["users"]) >= 1


def test_position_dependent_calibration_moves_the_thumbnail(tiny_run, tmp_path):
    """With a calibrator that depends on the slot, the thumbnail is the highest calibrated keep probability, not
    the highest logit, and edit thresholds the calibrated probability: checked against the calibrator's formula
    applied to the model's logits of the same rows."""
    import shutil

    import pyarrow.parquet as pq

    from segfast.apps import edit, thumbnails
    from segfast.calibration import DEFAULT_GROUPS, Calibrator, checkpoint_digest, save_calibrator
    from segfast.demo import score_rows

    root, p = tiny_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    # keep = sigmoid(p_i + 4) on slot 1 (group [1, 2)), sigmoid(p_i) elsewhere
    params = [[1.0, 4.0 if g == (1, 2) else 0.0, 0.0] for g in DEFAULT_GROUPS]
    save_calibrator(run, Calibrator("platt-groups", "raw", DEFAULT_GROUPS, params,
                                    checkpoint=checkpoint_digest(run, "best")))
    it = p.interactions
    rows = p.rows("test")
    rows = rows[np.asarray(it["n_segments"])[rows] >= 2][:12]
    pairs = tmp_path / "pairs.parquet"
    _row_pairs(p, rows, pairs)
    logits = score_rows(run, root / "prep", rows).astype(np.float64)
    thumbnails(run, root / "prep", pairs, tmp_path / "th.parquet")
    t = pq.read_table(tmp_path / "th.parquet").to_pydict()
    moved = 0
    for k, r in enumerate(rows):
        n = int(it["n_segments"][r])
        keep = 1.0 / (1.0 + np.exp(-(logits[k, :n] + 4.0 * (np.arange(n) == 1))))
        assert t["thumbnail_slot"][k] == int(np.argmax(keep))
        assert t["keep_probability"][k] == pytest.approx(keep.max(), rel=1e-5)
        moved += int(np.argmax(keep)) != int(np.argmax(logits[k, :n]))
    assert moved > 0  # the calibrated choice differs from the raw-logit choice for some pairs
    edit(run, root / "prep", pairs, tmp_path / "ed.parquet", threshold=0.5)
    e = pq.read_table(tmp_path / "ed.parquet").to_pydict()
    for k, r in enumerate(rows):
        n = int(it["n_segments"][r])
        keep = 1.0 / (1.0 + np.exp(-(logits[k, :n] + 4.0 * (np.arange(n) == 1))))
        skipped = [i for i in range(n) if any(a <= 5000 * i < b for a, b in zip(e["skip_start_ms"][k],
                                                                                e["skip_end_ms"][k]))]
        assert skipped == [i for i in range(n) if keep[i] < 0.5]


def test_apps_without_calibration_name_segfast_calibrate(tiny_run, tmp_path, capsys):
    import shutil

    from segfast.apps import edit, thumbnails
    from segfast.calibration import CALIBRATION_FILE
    from segfast.cli import main

    root, p = tiny_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / CALIBRATION_FILE).unlink()
    pairs = tmp_path / "pairs.parquet"
    _row_pairs(p, p.rows("test")[:3], pairs)
    with pytest.raises(ValueError, match="segfast calibrate"):
        thumbnails(run, root / "prep", pairs, tmp_path / "th.parquet")
    with pytest.raises(ValueError, match="segfast calibrate"):
        edit(run, root / "prep", pairs, tmp_path / "ed.parquet", threshold=0.3)
    capsys.readouterr()
    rc = main(["edit", "--run-dir", str(run), "--data", str(root / "prep"), "--pairs", str(pairs),
               "--out", str(tmp_path / "ed.parquet"), "--threshold", "0.3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "segfast calibrate --run-dir" in err[0]
    assert not [f for f in tmp_path.iterdir() if f.suffix == ".parquet" and f.name != "pairs.parquet"]


def test_bench_edit_threshold_counts(tiny_run, tmp_path):
    """bench/edit_threshold.py's table on the tiny run, recounted from the rows' own calibrated keep
    probabilities and observed leave slots."""
    import importlib.util
    from pathlib import Path

    from segfast.plots import row_keep_probability

    spec = importlib.util.spec_from_file_location("edit_threshold", Path(__file__).resolve().parents[1] / "bench" /
                                                  "edit_threshold.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root, p = tiny_run
    rows = p.rows("test")
    keep = row_keep_probability(root / "run", p, rows)["keep"]
    it = p.interactions
    n = np.asarray(it["n_segments"])[rows].astype(np.int64)
    y = np.asarray(it["target"])[rows].astype(np.int64)
    slot = np.arange(40)[None, :]
    real, reached, watched = slot < n[:, None], (slot < n[:, None]) & (slot <= y[:, None]), slot < y[:, None]
    thr = _gap_threshold(keep[real])
    res = bench.measure(root / "run", root / "prep", [thr], work=tmp_path / "w")
    assert res["pairs"] == rows.size and res["segments"] == int(real.sum())
    assert res["reached_segments"] == int(reached.sum())
    g = res["thresholds"][0]["calibrated"]
    skip = real & (keep < thr)
    assert g["skipped_segments"] == int(skip.sum()) and g["reached_skipped"] == int((skip & reached).sum())
    assert g["observed_keep_rate_skipped"] == pytest.approx(watched[skip & reached].mean())
    assert g["observed_keep_rate_kept"] == pytest.approx(watched[~skip & reached].mean())
    assert g["mean_keep_probability_kept"] == pytest.approx(keep[~skip & reached].mean(), rel=1e-5)
    assert "| calibrated (edit) |" in bench.markdown(res)
