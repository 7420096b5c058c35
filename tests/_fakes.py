"""Small stand-ins shared by the tests (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from segfast.checkpoint import data_fingerprint, save_model, write_run_config
from segfast.data.sources import RawInteractions
from segfast.model import ModelConfig, SegInterestModel


class RandomFeatures:
    """A feature source (dim, rows_for, read) with random normal features, segment rows laid out video by
    video; a read is a function of its first row, so repeated prepares give the same store."""

    def __init__(self, dim: int = 16):
        self.dim = dim

    def rows_for(self, video_ids, n_segments):
        off = np.zeros(len(video_ids) + 1, dtype=np.int64)
        np.cumsum(n_segments, out=off[1:])
        return off, np.arange(off[-1], dtype=np.int64)

    def read(self, rows):
        return np.random.default_rng(np.asarray(rows)[:1].tolist()).normal(size=(len(rows), self.dim))


# ---------------------------------------------------------------------------------------------------------------
# A tiny prepared SegMM-style dataset (4 users x 130 interactions, feature dim F) and untrained runs on it:
# the shared world of the scoring tests.
F = 16
USERS = [4, 8, 9, 11]
PER_USER = 130


def raw_interactions(extra_user=None):
    rng = np.random.default_rng(0)
    n = len(USERS) * PER_USER
    vids = np.arange(100, 160)
    vdur = rng.integers(1, 199_999, vids.size)
    vdur[:3] = 199_999  # 40-segment videos
    vv = rng.choice(vids, n)
    dur = vdur[vv - 100]
    play = np.maximum(1, (dur * rng.uniform(0.05, 1.3, n)).astype(np.int64))
    cols = dict(user_id=np.repeat(USERS, PER_USER), video_id=vv, time_ms=rng.permutation(n) * 10 + 1000,
                duration_ms=dur, play_time_ms=play)
    if extra_user is not None:  # one more, latest interaction of that user, with an already known video
        ev = vids[[5, 17, 23, 42][extra_user]]
        extra = dict(user_id=USERS[extra_user], video_id=ev, time_ms=10**9, duration_ms=vdur[ev - 100],
                     play_time_ms=vdur[ev - 100] // 2 + 1)
        cols = {k: np.append(v, extra[k]) for k, v in cols.items()}
    m = cols["user_id"].shape[0]
    return RawInteractions(source_row=np.arange(m), rows_read=m, **cols)


def make_run(root: Path, prepared, modality: str, **kw) -> Path:
    cfg = ModelConfig(modality=modality, d_model=16, n_heads=2, n_layers=2, d_ff=24, n_users=prepared.n_users,
                      n_videos=prepared.n_videos, feature_dim=None if modality == "id" else F, **kw)
    torch.manual_seed(1)
    model = SegInterestModel(cfg)
    with torch.no_grad():  # untrained position biases are all ones: make slots distinguishable
        model.decoder.pos_a.normal_() if model.decoder.pos_a is not None else None
    rd = root / f"run_{modality}_{kw.get('ablation', 'none')}"
    rd.mkdir()
    write_run_config(rd, cfg, None, data_fingerprint(prepared))
    save_model(rd / "model.safetensors", model)
    return rd


def calibrated_synth_run(root: Path, users: int, videos: int, interactions: int, seed: int):
    """synth (SegMM, feature dim 8) -> prepare under root/raw, root/prep, and an untrained small ID run in
    root/run with its calibrator fitted on dev (what segfast train does at the end): (root, prepared)."""
    from segfast.calibration import calibrate_run
    from segfast.data.prepared import load_prepared, prepare
    from segfast.data.synth import synth
    from segfast.model.config import model_preset

    synth("segmm", root / "raw", users=users, videos=videos, interactions=interactions, seed=seed, feature_dim=8,
          progress=False)
    prepare("segmm", root / "raw", root / "prep", seed=0, feature_dim=8, progress=False)
    p = load_prepared(root / "prep")
    mc = model_preset("small", modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16).for_data(
        p.n_users, p.n_videos, None)
    torch.manual_seed(0)
    (root / "run").mkdir()
    write_run_config(root / "run", mc, None, data_fingerprint(p))
    save_model(root / "run" / "model.safetensors", SegInterestModel(mc))
    calibrate_run(root / "run", root / "prep")
    return root, p


def prepared_world(root: Path):
    """Prepare ``raw_interactions()`` under root/p (random features of dim F) and load it."""
    from segfast.data.prepared import load_prepared, prepare_raw

    prepare_raw(raw_interactions(), root / "p", "segmm", seed=2, feature_source=RandomFeatures(F), progress=False)
    return load_prepared(root / "p")


def interaction_pairs(p, **extra) -> pa.Table:
    """Every interaction of prepared dataset p as a (user_id, video_id, time_ms) pair, plus extra columns."""
    it = p.interactions
    return pa.table({"user_id": p.users["user_id"][it["user_idx"]], "video_id": p.videos["video_id"][it["video_idx"]],
                     "time_ms": it["time_ms"], **extra})


# ---------------------------------------------------------------------------------------------------------------
# cross-attention tests (kernel and sdpa backends against the reference)
ATTN_GRAD_IDX = (0, 1, 2, 4, 5, 6)  # q1, k1, v1, q2, k2, v2 in the op's argument list


def attn_leaves(args, idx=ATTN_GRAD_IDX):
    """The op's arguments with its float inputs made fresh leaves that require grad."""
    out = list(args)
    for i in idx:
        if out[i] is not None:
            out[i] = out[i].detach().requires_grad_(True)
    return out


def assert_within(name, x, ref, atol, rtol):
    """Same dtype and shape, finite (catches an unwritten NaN-poisoned output), and
    max |x - ref| <= atol + rtol * max |ref| (in float64)."""
    assert x.dtype == ref.dtype, (name, x.dtype, ref.dtype)
    assert x.shape == ref.shape, (name, x.shape, ref.shape)
    assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten poisoned output?)"
    err = (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0
    bound = atol + rtol * (ref.double().abs().max().item() if ref.numel() else 0.0)
    assert err <= bound, f"{name} ({x.dtype}): max err {err:.3e} > {bound:.3e}"
