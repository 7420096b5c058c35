"""segfast.features.FeatureStore: the resident table and the host fallback against numpy fancy indexing; the
scorer's resident and host paths give identical scores (bit for bit) and the manifest says which ran; training
batches of feature row indices give the model the same logits as gathered-feature batches."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from segfast.data.batches import BatchAssembler, history_rows
from segfast.features import FeatureStore
from segfast.model import ModelConfig, SegInterestModel
from segfast.scoring import Scorer
from _fakes import F, interaction_pairs, prepared_world
from _fakes import make_run as _run


pytestmark = pytest.mark.usefixtures("one_thread")


def _ref(table: np.ndarray, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
    full = np.concatenate([table, np.zeros((1, table.shape[1]), table.dtype)])
    return full[rows].astype(dtype)


@pytest.mark.parametrize("budget", [None, 0])
@pytest.mark.parametrize("chunk", [7, 65_536])
def test_gather_matches_numpy(budget, chunk):
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((53, 12)) * 100).astype(np.float16)
    st = FeatureStore(table, "cpu", memory_bytes=budget, chunk_rows=chunk)
    assert st.path == ("host" if budget == 0 else "resident") and st.pad_row == 53
    assert st.dtype == torch.float32  # CPU default
    rows = rng.integers(0, 54, (5, 9, 3))  # padding row included
    rows[0, 0, 0] = 53
    got = st.gather(torch.from_numpy(rows))
    assert got.shape == (5, 9, 3, 12) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), _ref(table, rows))
    assert (got[0, 0, 0] == 0).all()
    np.testing.assert_array_equal(st.host_gather(torch.from_numpy(rows)).numpy(), _ref(table, rows))


def test_dtype_budget_and_describe():
    table = np.random.default_rng(1).random((40, 8), dtype=np.float32)
    st = FeatureStore(table, "cpu", dtype="bf16")
    rows = torch.tensor([[0, 39, 40]])
    ref = torch.from_numpy(_ref(table, rows.numpy())).to(torch.bfloat16)
    assert torch.equal(st.gather(rows), ref)
    exact = 41 * 8 * 2
    assert FeatureStore(table, "cpu", dtype="bf16", memory_bytes=exact).path == "resident"
    small = FeatureStore(table, "cpu", dtype="bf16", memory_bytes=exact - 1)
    assert small.path == "host" and small.table is None
    assert torch.equal(small.gather(rows), ref)  # the fallback converts to the same dtype
    d = small.describe()
    assert d == {"path": "host", "device": "cpu", "dtype": "bfloat16", "rows": 40, "dim": 8, "table_bytes": exact,
                 "budget_bytes": exact - 1}


def test_bad_input():
    table = np.zeros((4, 3), np.float32)
    st = FeatureStore(table, "cpu")
    with pytest.raises(IndexError, match=r"padding row 4"):
        st.gather(torch.tensor([5]))
    with pytest.raises(IndexError, match=r"rows in \[-1"):
        st.gather(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64"):
        st.gather(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="ID-only"):
        FeatureStore(None)
    with pytest.raises(ValueError, match="2-D float"):
        FeatureStore(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="memory_bytes"):
        FeatureStore(table, memory_bytes=-1)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        FeatureStore(table, dtype="int8")


def test_history_rows_against_loops():
    rng = np.random.default_rng(2)
    for n_src in (0, 3, 50):
        src = rng.integers(0, 1000, n_src)
        n = 17
        m = 6
        ln = rng.integers(0, min(m, n_src) + 1, n)
        off = np.array([rng.integers(0, n_src - l + 1) for l in ln]) if n_src else np.zeros(n, np.int64)
        got = history_rows(src, off, ln, m, -7)
        ref = np.array([list(src[o:o + l]) + [-7] * (m - l) for o, l in zip(off, ln)])
        np.testing.assert_array_equal(got, ref.reshape(n, m))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_store")
    p = prepared_world(root)
    table = interaction_pairs(p)
    return {"root": root, "p": p, "table": table,
            "runs": {m: _run(root, p, m) for m in ("visual", "both")}}


@pytest.mark.parametrize("modality", ["visual", "both"])
@pytest.mark.parametrize("fast", [True, False])
def test_scorer_host_fallback_gives_identical_scores(world, tmp_path, modality, fast):
    kw = dict(device="cpu", batch_size=53, fast=fast)
    res = Scorer.from_run(world["runs"][modality], world["root"] / "p", **kw)
    host = Scorer.from_run(world["runs"][modality], world["root"] / "p", feature_memory_bytes=0, **kw)
    assert res.features.path == "resident" and host.features.path == "host"
    a, b = res.score(world["table"], part_rows=200), host.score(world["table"], part_rows=200)
    assert a.equals(b)  # every column, the scores bit for bit
    man = host.score_dataset(_pairs(world, tmp_path), tmp_path / "o", progress=False, part_rows=200)
    assert man["feature_store"]["path"] == "host" and man["feature_store"]["budget_bytes"] == 0
    assert ds.dataset(tmp_path / "o").to_table().sort_by("row").column("scores").equals(a.column("scores"))


def _pairs(world, tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(world["table"], path)
    return path


def test_training_batches_of_rows_give_the_same_logits(world):
    p = world["p"]
    cfg = ModelConfig(modality="both", d_model=16, n_heads=2, n_layers=1, d_ff=24, n_users=p.n_users,
                      n_videos=p.n_videos, feature_dim=F, max_user_tokens=100)
    torch.manual_seed(0)
    model = SegInterestModel(cfg).eval()
    model.set_feature_store(FeatureStore(p.features, "cpu"))
    rows = p.rows("train")[:64]
    feats = BatchAssembler(p, features=True).assemble(rows)
    idx = BatchAssembler(p, features=True, feature_rows=True).assemble(rows)
    assert "video_feat" not in idx and idx["video_feat_rows"].dtype == torch.int64
    for k in ("labels", "hist_video_idx", "hist_mask", "slot_mask", "user_mask", "target"):
        assert torch.equal(feats[k], idx[k]), k
    torch.testing.assert_close(model(idx), model(feats), rtol=0, atol=0)
    _, loss_a = model.loss(idx)
    _, loss_b = model.loss(feats)
    assert torch.equal(loss_a, loss_b)


def test_parse_bytes():
    import argparse

    from segfast.features import parse_bytes

    assert [parse_bytes(x) for x in ("8G", "512MiB", "0", "1.5k", "100")] == [8 << 30, 512 << 20, 0, 1536, 100]
    for bad in ("x", "-1G", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="byte count"):
            parse_bytes(bad)


def test_cli_feature_memory_flag(world, tmp_path):
    import json

    from segfast.cli import main

    out = tmp_path / "o"
    rc = main(["score", "--run-dir", str(world["runs"]["visual"]), "--data", str(world["root"] / "p"), "--pairs",
               str(_pairs(world, tmp_path)), "--out", str(out), "--device", "cpu", "--feature-memory", "0", "--quiet",
               "--threads", "1"])
    assert rc in (0, None)
    man = json.loads((out / "_manifest.json").read_text())
    assert man["feature_store"]["path"] == "host" and man["complete"]


def test_finite_rows():
    table = np.ones((70, 4), np.float16)
    table[3, 1] = np.nan
    table[69, 0] = np.inf
    ok = FeatureStore(table, "cpu").finite_rows()
    assert ok.shape == (71,) and ok[70]  # the padding row
    assert np.flatnonzero(~ok).tolist() == [3, 69]


def test_thumbnails_pass_the_budget_through(world, tmp_path):
    from segfast.apps import thumbnails
    from segfast.calibration import CALIBRATION_FILE, calibrate_run

    if not (world["runs"]["visual"] / CALIBRATION_FILE).exists():  # thumbnails needs the run's calibrator
        calibrate_run(world["runs"]["visual"], world["root"] / "p")

    import pyarrow.parquet as pq

    pairs = _pairs(world, tmp_path)
    thumbnails(world["runs"]["visual"], world["root"] / "p", pairs, tmp_path / "a.parquet")
    thumbnails(world["runs"]["visual"], world["root"] / "p", pairs, tmp_path / "b.parquet", feature_memory_bytes=0)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_scoring_user_rows_mixed_sources(world):
    """A batch mixing "latest" histories (pairs after all of a user's rows) and per-interaction histories."""
    from segfast.model import ModelConfig
    from segfast.scoring.batches import Assembler
    from segfast.scoring.index import IdIndex

    p = world["p"]
    cfg = ModelConfig(modality="visual", n_users=p.n_users, n_videos=p.n_videos, feature_dim=F, max_user_tokens=9)
    ix = IdIndex(p, True, 9)
    store = FeatureStore(p.features, "cpu")
    asm = Assembler(ix, p, cfg, fast=False, pin=False, features=store)
    rng = np.random.default_rng(5)
    u = rng.integers(0, p.n_users, 40)
    pos = rng.integers(0, ix.count[u] + 1)
    pos[:5] = ix.count[u[:5]]  # latest
    latest, off, ln = asm._user_rows(u, pos)
    assert latest.any() and not latest.all()
    rows, mask = asm._user_feat_rows(latest, off, ln)
    for i in range(40):
        src = ix.latest if latest[i] else ix.vhist
        want = list(src[off[i]:off[i] + ln[i]]) + [store.pad_row] * (rows.shape[1] - ln[i])
        assert rows[i].tolist() == want and mask[i].sum() == ln[i]


def test_dedupe_against_unique():
    from segfast.scoring.batches import dedupe

    rng = np.random.default_rng(4)
    scratch = np.full(50, 12345, dtype=np.int64)
    for n in (0, 1, 7, 300):
        keys = rng.integers(0, 50, n)
        first, inv = dedupe(keys, scratch)
        assert sorted(keys[first].tolist()) == np.unique(keys).tolist()  # each distinct key once
        np.testing.assert_array_equal(keys[first][inv], keys)
