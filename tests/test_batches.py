"""Batch assembly against a naive per-row reference, and the DataLoader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segfast.data.batches import BatchAssembler, make_loader
from segfast.data.prepared import load_prepared, prepare_raw
from segfast.data.sources import RawInteractions
from _fakes import RandomFeatures

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 3 * 130
    dur = rng.integers(1, 199_999, n)
    dur[:5] = 199_999  # 40-segment videos, some fully watched -> target 40
    play = np.maximum(1, (dur * rng.uniform(0.05, 1.3, n)).astype(np.int64))
    raw = RawInteractions(user_id=np.repeat([4, 8, 9], 130), video_id=rng.integers(0, 60, n),
                          time_ms=rng.integers(0, 10**6, n), duration_ms=dur, play_time_ms=play,
                          source_row=np.arange(n), rows_read=n)
    out = tmp_path_factory.mktemp("b") / "p"
    prepare_raw(raw, out, "segmm", seed=2, feature_source=RandomFeatures(), progress=False)
    return load_prepared(out)


def reference_row(p, r, max_tokens=100):
    it = p.interactions
    n, y = int(it["n_segments"][r]), int(it["target"][r])
    labels = [1 if i < y else (0 if i == y and y < n else -1) for i in range(40)]
    hl = int(it["hist_len"][r])
    hist = [int(it["video_idx"][r - hl + j]) if j < hl else 0 for j in range(50)]
    v = int(it["video_idx"][r])
    f = np.asarray(p.features, dtype=np.float32)
    vf = np.zeros((40, f.shape[1]), np.float32)
    for i in range(n):
        vf[i] = f[p.videos["feat_offset"][v] + i]
    o, ln = int(it["vhist_offset"][r]), min(int(it["vhist_len"][r]), max_tokens)
    uf = [f[p.vhist[o + j]] for j in range(ln)]
    return labels, hist, hl, vf, uf


@pytest.mark.parametrize("max_tokens", [100, 7])
def test_assemble_matches_reference(prepared, max_tokens):
    p = prepared
    rows = np.array([0, 1, 2, 3, 4, 200, 131, 389, 50, 300])
    b = BatchAssembler(p, max_user_tokens=max_tokens).assemble(rows)
    it = p.interactions
    assert b["row"].tolist() == rows.tolist()
    assert b["user_idx"].tolist() == it["user_idx"][rows].tolist()
    assert b["video_idx"].dtype == torch.int64 and b["video_idx"].tolist() == it["video_idx"][rows].tolist()
    assert b["target"].tolist() == it["target"][rows].tolist()
    assert b["is_cold"].tolist() == it["is_cold"][rows].tolist()
    assert b["slot_index"].tolist() == [list(range(40))] * len(rows)
    M = b["user_feat"].shape[1]
    assert M == max(1, min(max_tokens, int(it["vhist_len"][rows].max())))
    for k, r in enumerate(rows):
        labels, hist, hl, vf, uf = reference_row(p, r, max_tokens)
        n = int(it["n_segments"][r])
        assert b["labels"][k].tolist() == labels
        assert b["slot_mask"][k].tolist() == [i < n for i in range(40)]
        assert b["hist_video_idx"][k].tolist() == hist
        assert b["hist_mask"][k].tolist() == [j < hl for j in range(50)]
        assert b["video_feat"].dtype == torch.float32
        assert torch.equal(b["video_feat"][k], torch.from_numpy(vf))
        assert b["user_mask"][k].tolist() == [j < len(uf) for j in range(M)]
        ref_u = np.zeros((M, vf.shape[1]), np.float32)
        if uf:
            ref_u[:len(uf)] = np.stack(uf)
        assert torch.equal(b["user_feat"][k], torch.from_numpy(ref_u))
    assert int(it["target"][0]) in range(41)


def test_id_only_and_stored_dtype(prepared):
    b = BatchAssembler(prepared, features=False).assemble(np.array([5, 6]))
    assert "video_feat" not in b and "user_feat" not in b
    b16 = BatchAssembler(prepared, feature_dtype=None).assemble(np.array([5, 6]))
    b32 = BatchAssembler(prepared).assemble(np.array([5, 6]))
    assert b16["video_feat"].dtype == torch.float16
    assert torch.equal(b16["video_feat"].float(), b32["video_feat"])
    with pytest.raises(IndexError):
        BatchAssembler(prepared).assemble(np.array([len(prepared)]))


def test_kept_batches_are_not_overwritten(prepared):
    asm = BatchAssembler(prepared)
    first = asm.assemble(np.arange(100, 120))
    keep = first["user_feat"].clone(), first["video_feat"].clone()
    for s in range(0, 300, 20):
        asm.assemble(np.arange(s, s + 20))
    assert torch.equal(first["user_feat"], keep[0]) and torch.equal(first["video_feat"], keep[1])


def batches_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_order_epochs_and_workers(prepared):
    dl = make_loader(prepared, "train", 32, shuffle=True, seed=1)
    e0 = [b["row"] for b in dl]
    rows = torch.cat(e0)
    assert sorted(rows.tolist()) == prepared.rows("train").tolist()
    assert all(torch.equal(x, y["row"]) for x, y in zip(e0, dl))  # same epoch, same order
    dl.set_epoch(1)
    assert not torch.equal(torch.cat([b["row"] for b in dl]), rows)
    dl.set_epoch(0)
    b0 = list(dl)
    dl2 = make_loader(prepared.path, "train", 32, shuffle=True, seed=1, num_workers=2)
    b2 = list(dl2)
    assert len(b0) == len(b2) and all(batches_equal(x, y) for x, y in zip(b0, b2))


def test_loader_options(prepared):
    it = prepared.interactions
    dl = make_loader(prepared, "profile", 50, drop_last=True, exclude_full_40=True, features=False)
    rows = torch.cat([b["row"] for b in dl]).numpy()
    expect = np.flatnonzero((it["split"] == 3) & (it["target"] < 40))
    assert len(dl) == len(expect) // 50 and rows.tolist() == expect[:len(rows)].tolist()
    assert (it["target"][it["split"] == 3] == 40).any()  # the filter has something to drop
