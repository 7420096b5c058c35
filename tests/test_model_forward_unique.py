"""The model's unique-batch forward (per-distinct video / user work, expanded by inverse indices) against the plain
per-row forward on the expanded batch, with duplicates, for every modality; features as tensors and as row
indices into a FeatureStore.

Equality: asserted within fp32 rounding (atol 2e-5 on logits of magnitude ~1); bitwise on the 2-core dev box with
one thread, but not guaranteed: the unique path runs the
representation's Linear and LayerNorm over [Vu, S, .] instead of [B, S, .]; a row's result does not depend on
the other rows mathematically, but the matmul kernel's blocking (and so the summation order) may depend on the
row count, which changes the last bits. Everything after the expansion (encoder, decoder) sees the same inputs
up to those bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segfast.features import FeatureStore
from segfast.model import ModelConfig, SegInterestModel
from segfast.model.model import expand_unique

F, S, M = 16, 40, 7
N_USERS, N_VIDEOS, N_ROWS = 6, 9, 120


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(modality, **kw):
    cfg = ModelConfig(modality=modality, d_model=16, n_heads=2, n_layers=2, d_ff=24, n_users=N_USERS,
                      n_videos=N_VIDEOS, feature_dim=None if modality == "id" else F, max_user_tokens=M, **kw)
    torch.manual_seed(3)
    model = SegInterestModel(cfg)
    with torch.no_grad():
        if model.decoder.pos_a is not None:
            model.decoder.pos_a.normal_()
    return model.eval()


def _unique_batch(rng, table, s=S, b=23, vu=4, uu=5):
    """A unique batch with b pairs over vu distinct videos and uu distinct user histories (duplicates)."""
    pad = table.shape[0]
    nseg = rng.integers(1, s, vu)  # at most s - 1 real slots (the end slot stays in the batch)
    foff = rng.integers(0, pad - s, vu)
    vinv = np.concatenate([np.arange(vu), rng.integers(0, vu, b - vu)])
    uinv = np.concatenate([np.arange(uu), rng.integers(0, uu, b - uu)])
    rng.shuffle(vinv)
    rng.shuffle(uinv)
    slots = np.arange(s)
    vmask = slots[None, :] < nseg[:, None]
    vrows = np.where(vmask, foff[:, None] + slots[None, :], pad)
    ulen = rng.integers(0, M + 1, uu)
    ulen[0] = M
    umask = np.arange(M)[None, :] < ulen[:, None]
    urows = np.where(umask, rng.integers(0, pad, (uu, M)), pad)
    user_idx_u = rng.integers(0, N_USERS, uu)
    video_idx_u = rng.choice(N_VIDEOS, vu, replace=False)
    t = torch.from_numpy
    return {
        "row": t(rng.integers(0, N_ROWS, b)), "user_idx": t(user_idx_u[uinv]), "video_idx": t(video_idx_u[vinv]),
        "n_segments": t(nseg[vinv]), "slot_mask": t(vmask[vinv]),
        "slot_index": t(np.broadcast_to(slots, (b, s)).copy()), "target": torch.zeros(b, dtype=torch.int64),
        "video_inv": t(vinv), "user_inv": t(uinv), "video_idx_u": t(video_idx_u), "user_idx_u": t(user_idx_u),
        "video_feat_rows_u": t(vrows), "user_feat_rows_u": t(urows), "user_mask_u": t(umask),
    }


def _with_features(batch, table):
    """The same batch with the features gathered by numpy (padding row = zeros) instead of row indices."""
    full = np.concatenate([table, np.zeros((1, table.shape[1]), table.dtype)])
    out = {k: v for k, v in batch.items() if "_rows" not in k}
    for key in [k for k in batch if "_rows" in k]:
        out[key.replace("_rows", "")] = torch.from_numpy(full[batch[key].numpy()].astype(np.float32))
    return out


CASES = [("id", {}), ("visual", {}), ("both", {}), ("both", {"ablation": "no-position"}),
         ("visual", {"slot_types": False}), ("id", {"ablation": "no-position"})]


@pytest.mark.parametrize("modality,kw", CASES)
def test_unique_forward_equals_per_row(modality, kw):
    rng = np.random.default_rng(len(modality) + len(kw))
    table = rng.random((300, F), dtype=np.float32).astype(np.float16)
    model = _model(modality, **kw)
    store = FeatureStore(table, "cpu")
    model.set_feature_store(store)
    ub = _unique_batch(rng, table)
    assert torch.unique(ub["video_inv"]).numel() < ub["video_inv"].numel()  # duplicates present
    got = model(ub)
    assert got.shape == (23, S) and got.dtype == torch.float32
    ref_rows = model(expand_unique(ub))  # per-row path, rows gathered from the store
    ref_feat = model(expand_unique(_with_features(ub, table)))  # per-row path, features gathered by numpy
    torch.testing.assert_close(ref_rows, ref_feat, rtol=0, atol=0)  # store gather == numpy gather, bitwise
    torch.testing.assert_close(got, ref_feat, rtol=0, atol=2e-5)
    # the unique batch with tensors instead of rows: the same numbers as with rows, bitwise
    torch.testing.assert_close(model(_with_features(ub, table)), got, rtol=0, atol=0)
    # duplicates of a (video, user history) get the same scores
    key = ub["video_inv"] * 100 + ub["user_inv"]
    if kw.get("ablation") != "no-position":  # (no-position: the slot permutation is per row)
        for k in torch.unique(key):
            sel = torch.nonzero(key == k).flatten()
            torch.testing.assert_close(got[sel], got[sel[:1]].expand(len(sel), S), rtol=0, atol=0)


@pytest.mark.parametrize("modality", ["id", "visual", "both"])
def test_trimmed_slots_match_full_slots(modality):
    """The scorer trims S to the longest video + 1: the real slots' scores equal those of 40 slots."""
    rng = np.random.default_rng(7)
    table = rng.random((300, F), dtype=np.float32)
    model = _model(modality)
    model.set_feature_store(FeatureStore(table, "cpu"))
    full = _unique_batch(rng, table)
    s = int(full["n_segments"].max()) + 1
    cut = dict(full)
    for k in ("slot_mask", "slot_index", "video_feat_rows_u"):
        cut[k] = full[k][:, :s].contiguous()
    a, b = model(full), model(cut)
    real = full["slot_mask"][:, :s]
    torch.testing.assert_close(b[real], a[:, :s][real], rtol=0, atol=2e-5)


def test_unique_batch_errors():
    rng = np.random.default_rng(0)
    table = rng.random((300, F), dtype=np.float32)
    model = _model("visual")
    ub = _unique_batch(rng, table)
    with pytest.raises(ValueError, match="no feature store"):
        model(ub)
    model.set_feature_store(FeatureStore(table, "cpu"))
    bad = {k: v for k, v in ub.items() if k != "user_inv"}
    with pytest.raises(KeyError, match="user_inv"):
        model(bad)
    model.train()
    with pytest.raises(ValueError, match="for inference"):
        model(ub)
    with pytest.raises(ValueError, match="dimension 8"):
        model.set_feature_store(FeatureStore(table[:, :8], "cpu"))
