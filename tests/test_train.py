"""The training loop: checkpoints, exact resume, run-directory rules, data errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from segfast.checkpoint import check_compatible, load_run, load_tensors
from segfast.data.prepared import load_prepared, prepare_raw
from segfast.data.sources import RawInteractions
from segfast.model import ModelConfig, TrainConfig
from segfast.train import RunDirError, TrainDataError, train

DIM = 8


class _Features:
    """A feature source (dim, rows_for, read) over a fixed random matrix: row = video_id * 40 + segment."""

    def __init__(self, dim, n_videos):
        self.dim = dim
        self.mat = np.random.default_rng(1).standard_normal((n_videos * 40, dim))

    def rows_for(self, video_ids, nseg):
        nseg = np.asarray(nseg, np.int64)
        off = np.concatenate(([0], np.cumsum(nseg)))
        rows = np.concatenate([int(v) * 40 + np.arange(n) for v, n in zip(video_ids, nseg)])
        return off, rows

    def read(self, rows):
        return self.mat[np.asarray(rows)]


def _make(out, users=4, per_user=30, videos=40, features=True, seed=0, min_interactions=None):
    rng = np.random.default_rng(seed)
    n = users * per_user
    dur = rng.integers(1000, 199_000, n)
    raw = RawInteractions(
        user_id=np.repeat(np.arange(users) + 100, per_user).astype(np.int64),
        video_id=rng.integers(0, videos, n).astype(np.int64),
        time_ms=np.tile(np.arange(per_user) * 1000, users).astype(np.int64),
        duration_ms=dur.astype(np.int64),
        play_time_ms=np.maximum(1, (dur * rng.uniform(0.05, 1.1, n))).astype(np.int64),
        source_row=np.arange(n, dtype=np.int64), rows_read=n, dropped={}, source="kuairand")
    prepare_raw(raw, out, source="kuairand", seed=seed, feature_source=_Features(DIM, videos) if features else None,
                progress=False, min_interactions=min_interactions)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("data") / "prep")


def _mc(**kw):
    base = dict(modality="both", d_model=16, n_heads=2, n_layers=2, d_ff=16, dropout=0.2, max_user_tokens=24)
    base.update(kw)
    return ModelConfig(**base)


def _tc(**kw):
    base = dict(batch_size=24, epochs=3, eval_every=3, patience=10, seed=7, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run, which="last"):
    return load_tensors(run / which / "model.safetensors")[0]


def test_lr_schedule_values():
    tc = TrainConfig(lr=1e-2, lr_schedule="cosine", warmup_steps=4, lr_min_ratio=0.1)
    assert [tc.lr_at(s, 14) for s in range(4)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    # after warm-up: cosine from lr (step 4) to 0.1 lr (step 14 = the planned end), half way at step 9
    assert tc.lr_at(4, 14) == pytest.approx(1e-2)
    assert tc.lr_at(9, 14) == pytest.approx(1e-3 + 9e-3 * 0.5)
    assert tc.lr_at(14, 14) == pytest.approx(1e-3) and tc.lr_at(20, 14) == pytest.approx(1e-3)
    assert TrainConfig(lr=1e-3).lr_at(123, 10) == 1e-3  # constant, no warm-up
    for bad in (dict(lr_schedule="step"), dict(warmup_steps=-1), dict(lr_min_ratio=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_resume_continues_identically(data, tmp_path):
    # the cosine schedule with warm-up is a function of the step: a resumed run must continue it exactly
    mc, tc = _mc(ablation="no-position"), _tc(lr_schedule="cosine", warmup_steps=3)
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train(data, a, mc, tc, progress=False, max_steps=7)
    spe = sa["steps_per_epoch"]
    assert sa["step"] == 7 and sa["stopped"] == "max_steps" and spe == 4
    sb = train(data, b, mc, tc, progress=False, max_steps=2)  # stop off an eval point, mid-epoch
    assert sb["step"] == 2
    sb = train(data, b, mc, tc, progress=False, max_steps=7)  # resume
    assert sb["step"] == 7
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa, ob = load_tensors(a / "last" / "optimizer.safetensors")[0], load_tensors(b / "last" / "optimizer.safetensors")[0]
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
    # the weights did change, and the metric lines agree (step / epoch / dev metrics)
    m0 = load_tensors(a / "best" / "model.safetensors")[0]
    assert any(not torch.equal(m0[k], wa[k]) for k in wa) or sa["best_step"] == 7
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["dev"]) for r in la] == [(r["step"], r["epoch"], r["dev"]) for r in lb]
    assert [r["step"] for r in la] == [3, 4, 6]  # every 3 steps and at the end of epoch 0 (4 steps)
    assert [r["epoch"] for r in la] == [0, 1, 1]


def test_full_run_early_stopping_and_load(data, tmp_path):
    run = tmp_path / "run"
    s = train(data, run, _mc(modality="id"), _tc(patience=1, epochs=4), progress=False)
    assert s["finished"] and s["stopped"] in ("early_stop", "epochs")
    assert s["best_dev"] is not None and 0.0 <= s["best_dev"]["NDCG@5"] <= 1.0
    model, meta = load_run(run, which="best")
    prepared = load_prepared(data)
    check_compatible(meta, prepared)
    # the videos without training rows are marked unseen in the saved model (they use the unknown embedding)
    seen = np.asarray(prepared.videos["n_train"]) > 0
    assert not seen.all() and model.id.rep.video_seen.numpy().tolist() == seen.tolist()
    best = load_tensors(run / "best" / "model.safetensors")[0]
    exported = load_tensors(run / "model.safetensors")[0]
    assert all(torch.equal(best[k], exported[k]) for k in best)
    # calling again on a finished run trains nothing and returns the summary
    assert train(data, run, _mc(modality="id"), _tc(patience=1, epochs=4), progress=False)["step"] == s["step"]


def test_refuses_foreign_or_different_run_dir(data, tmp_path):
    run = tmp_path / "run"
    train(data, run, _mc(modality="id"), _tc(), progress=False, max_steps=1)
    with pytest.raises(RunDirError, match="lr"):
        train(data, run, _mc(modality="id"), _tc(lr=1e-4), progress=False, max_steps=2)
    with pytest.raises(RunDirError, match="d_model"):
        train(data, run, _mc(modality="id", d_model=32), _tc(), progress=False, max_steps=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(RunDirError, match="no config.json"):
        train(data, other, _mc(modality="id"), _tc(), progress=False, max_steps=1)


def test_empty_dev_split(tmp_path):
    d = _make(tmp_path / "few", users=3, per_user=5, min_interactions=5, features=False)
    assert load_prepared(d).rows("dev").size == 0
    with pytest.raises(TrainDataError, match="'dev'"):
        train(d, tmp_path / "run", _mc(modality="id"), _tc(), progress=False)


def test_nan_features(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    feats = np.load(bad / "features.npy", mmap_mode="r+")
    feats[:] = np.nan
    feats.flush()
    del feats
    with pytest.raises(TrainDataError, match="non-finite"):
        train(bad, tmp_path / "run", _mc(modality="visual"), _tc(), progress=False, max_steps=2)


def test_visual_model_needs_features(tmp_path):
    d = _make(tmp_path / "idonly", users=3, per_user=30, features=False)
    from segfast.model import ConfigError
    with pytest.raises(ConfigError, match="ID-only"):
        train(d, tmp_path / "run", _mc(modality="visual"), _tc(), progress=False, max_steps=1)


def test_configs_from_cli_args():
    import argparse

    from segfast.model import ConfigError
    from segfast.train import configs_from_args
    a = argparse.Namespace(preset="paper-code", modality="id", loss=None, ablation="no-position", backend=None,
                           epochs=2, batch_size=None, lr=None, seed=None, eval_every=None, patience=None,
                           device="cpu", set=["d_model=128", "n_heads=8", "grad_clip=1.5"])
    mc, tc = configs_from_args(a)
    assert (mc.d_model, mc.n_heads, mc.n_layers, mc.ablation, mc.modality) == (128, 8, 6, "no-position", "id")
    assert (tc.batch_size, tc.epochs, tc.grad_clip) == (1024, 2, 1.5)
    a.set = ["width=3"]
    with pytest.raises(ConfigError, match="width"):
        configs_from_args(a)
