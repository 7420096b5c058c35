"""Applications (thumbnails, editing) on hand-built scores, and the figures."""
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
    # 3 segments (12345 ms); slot 1 is highest
    assert thumbnail_segment([0.1, 2.0, -1.0], 12345) == (1, 5000, 10000)
    # last (short) segment wins: its range ends at the duration
    assert thumbnail_segment([0.1, 2.0, 3.0], 12345) == (2, 10000, 12345)
    # ties -> earliest; scores past N (padding) are ignored
    assert thumbnail_segment([1.0, 1.0, 0.0, 99.0], 15000) == (0, 0, 5000)
    with pytest.raises(ValueError, match="2 scores for a video of 12345 ms, which has 3 segments"):
        thumbnail_segment([0.0, 1.0], 12345)


def test_skip_ranges_merge_consecutive():
    # sigmoid: -2 -> .12, -1 -> .27, 0 -> .5, 1 -> .73 ; threshold .5 skips logits < 0 (0 itself is kept)
    s = [-2.0, -1.0, 1.0, 0.0, -3.0, -0.5]
    d = 27000  # 6 segments, the last one 2000 ms
    assert skip_ranges(s, d, 0.5) == [(0, 10000), (20000, 27000)]
    assert skip_ranges(s, d, 0.0) == []
    assert skip_ranges(s, d, 1.0) == [(0, 27000)]
    assert skip_ranges(s, d, 0.2) == [(0, 5000), (20000, 25000)]
    with pytest.raises(ValueError, match="threshold"):
        skip_ranges(s, d, 1.5)


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
    """A tiny synthetic prepared dataset and a Task-1 run with an untrained ID model."""
    import torch

    from segfast.checkpoint import data_fingerprint, save_model, write_run_config
    from segfast.data.prepared import load_prepared, prepare
    from segfast.data.synth import synth
    from segfast.model.config import model_preset
    from segfast.model.model import SegInterestModel

    root = tmp_path_factory.mktemp("apps")
    synth("segmm", root / "raw", users=6, videos=40, interactions=1200, seed=2, feature_dim=8, progress=False)
    prepare("segmm", root / "raw", root / "prep", seed=0, feature_dim=8, progress=False)
    p = load_prepared(root / "prep")
    mc = model_preset("small", modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16).for_data(
        p.n_users, p.n_videos, None)
    torch.manual_seed(0)
    (root / "run").mkdir()
    write_run_config(root / "run", mc, None, data_fingerprint(p))
    save_model(root / "run" / "model.safetensors", SegInterestModel(mc))
    return root, p


def test_file_level_thumbnails_edit_case_study(tiny_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segfast.apps import edit, thumbnails
    from segfast.plots import case_study

    root, p = tiny_run
    it = p.interactions
    rows = p.rows("test")[:7]
    uids = np.asarray(p.users["user_id"])[it["user_idx"][rows]]
    vids = np.asarray(p.videos["video_id"])[it["video_idx"][rows]]
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"user_id": pa.array(uids, pa.int64()), "video_id": pa.array(vids, pa.int64())}), pairs)
    th = thumbnails(root / "run", root / "prep", pairs, tmp_path / "th.parquet")
    assert th["pairs"] == 7
    t = pq.read_table(tmp_path / "th.parquet").to_pydict()
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
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp leftovers
    cs = case_study(root / "run", root / "prep", tmp_path / "case.png")
    assert open(cs["out"], "rb").read(8) == PNG and len(cs["users"]) >= 1
