"""Position priors (ModelConfig.prior, segfast/priors.py, docs/model.md "Position priors"): the tables against a
hand-computed case, the zero-content model against the position baselines, every backend and path against the
reference, gradients, save / load, training, and prior "none" unchanged."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

import segfast.ops as ops
from segfast.checkpoint import load_run, save_model, write_run_config
from segfast.evaluate import PositionBaseline, S, target_ranks
from segfast.model import ConfigError, ModelConfig, SegInterestModel, TrainConfig
from segfast.model.model import expand_unique
from segfast.priors import compute_priors, exposure_table, hazard_tables, leave_log_prob

pytestmark = pytest.mark.usefixtures("one_thread")

NU, NV = 5, 9


# ------------------------------------------------------------------------------------------------ tables

def _tiny_inter():
    # user 0: three train rows; user 1: one train row; user 2: only a test row; a dev row must not count
    return {
        "user_idx": np.array([0, 0, 0, 1, 2, 1]),
        "video_idx": np.zeros(6, dtype=np.int64),
        "target": np.array([0, 1, 3, 1, 0, 0]),
        "n_segments": np.array([3, 3, 3, 2, 3, 3]),
        "split": np.array([0, 0, 0, 0, 2, 1]),
    }


def test_tables_hand_computed():
    inter = _tiny_inter()
    # train rows (target, N): (0,3) (1,3) (3,3: full watch, censored at 3) (1,2)
    # slot 0: at risk 4, leave 1 -> 1/4; slot 1: at risk 3 (targets 1, 3, 1), leave 2 -> 2/3;
    # slot 2: at risk 1 (the row (3,3)), leave 0 -> 0; slots >= 3: nobody at risk -> 0
    hg, hu = hazard_tables(inter, n_users=4, prior_strength=2.0)
    want = np.zeros(S)
    want[:2] = [1 / 4, 2 / 3]
    np.testing.assert_allclose(hg, want, rtol=0, atol=1e-15)
    # user 0: slot 0 leave 1 / at risk 3 -> (1 + 2/4) / (3 + 2); slot 1: leave 1 / 2 -> (1 + 4/3) / (2 + 2)
    np.testing.assert_allclose(hu[0, :3], [(1 + 2 * 0.25) / 5, (1 + 4 / 3) / 4, (0 + 0) / (1 + 2)], atol=1e-15)
    # user 1, row (1,2): slot 0 leave 0 / 1 -> (0 + 0.5) / (1 + 2), slot 1 leave 1 / 1 -> (1 + 4/3) / (1 + 2)
    np.testing.assert_allclose(hu[1, :2], [0.5 / 3, (1 + 4 / 3) / 3], atol=1e-15)
    # user 2 (test row only) and user 3 (no row at all): the global row
    np.testing.assert_allclose(hu[2], hg, atol=0)
    np.testing.assert_allclose(hu[3], hg, atol=0)
    # exposure: P(target >= i | N > i), Laplace-smoothed (reached + 1) / (N > i rows + 2): slot 0: (4+1)/(4+2),
    # slot 1: (3+1)/(4+2), slot 2: (N > 2: three rows, target >= 2: one) (1+1)/(3+2)
    e = exposure_table(inter)
    np.testing.assert_allclose(e[:3], [5 / 6, 4 / 6, 2 / 5], atol=1e-15)
    assert (e[3:] == 1.0).all()  # no training video that long: neutral
    np.testing.assert_array_equal(compute_priors(inter, "global", 0)[0], hg.astype(np.float32))
    assert compute_priors(inter, "user", 4, 2.0).dtype == np.float32
    assert compute_priors(inter, "exposure", 4).shape == (S,)
    with pytest.raises(ValueError, match="users"):
        hazard_tables(inter, n_users=2)
    with pytest.raises(ValueError, match="training rows"):
        hazard_tables({**inter, "split": np.ones(6, dtype=np.int64)}, n_users=4)


def test_leave_log_prob_matches_baseline():
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 0.4, (6, S))
    h[0, 5] = 1.0  # everybody leaves at slot 5: later slots impossible (floored)
    n = np.array([1, 7, 40, 12, 39, 3])
    inter = {"n_segments": n}
    base = PositionBaseline("AllPosition")
    base.hazards = lambda inter_, rows: h[rows]
    P = base.leave_probabilities(inter, np.arange(6))
    got = leave_log_prob(torch.from_numpy(h), torch.from_numpy(n))
    want = -np.log(np.maximum(P, 1e-12))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-5)
    assert got.dtype == torch.float32
    assert (got.numpy()[np.arange(S)[None, :] > n[:, None]] == np.float32(-math.log(1e-12))).all()
    torch.testing.assert_close(leave_log_prob(torch.from_numpy(h), torch.from_numpy(n), 13), got[:, :13])


# ------------------------------------------------------------------------------------------------ config

def test_config_validation_and_old_configs():
    for kw, match in [({"prior": "item"}, "prior"), ({"prior_strength": -1.0}, "prior_strength"),
                      ({"prior_strength": float("nan")}, "prior_strength"),
                      ({"prior_strength": True}, "prior_strength")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**kw)
    with pytest.raises(ConfigError, match="n_users"):
        ModelConfig(modality="visual", feature_dim=8, prior="user").validate(require_data=True)
    old = ModelConfig().to_dict()
    del old["prior"], old["prior_strength"]
    c = ModelConfig.from_dict(old)
    assert (c.prior, c.prior_strength) == ("none", 5.0)
    from segfast.train import configs_from_args
    a = argparse.Namespace(preset="small", modality="id", loss=None, ablation=None, backend=None, epochs=None,
                           batch_size=None, lr=None, seed=None, eval_every=None, patience=None, device="cpu",
                           set=["prior=user", "prior_strength=2"])
    mc, _ = configs_from_args(a)
    assert (mc.prior, mc.prior_strength) == ("user", 2)


# ------------------------------------------------------------------------------------------------ model

def _batch(B=6, seed=0, feats=False, F=8):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([3, 40, 1, 7, 12, 25, 2, 9][:B])
    target = torch.tensor([1, 40, 0, 7, 3, 10, 1, 8][:B])
    b = {"row": torch.arange(B), "user_idx": torch.randint(0, NU, (B,), generator=g),
         "video_idx": torch.randint(0, NV, (B,), generator=g), "n_segments": n,
         "slot_mask": torch.arange(S)[None, :] < n[:, None], "slot_index": torch.arange(S).expand(B, S).clone(),
         "target": target}
    if feats:
        b["video_feat"] = torch.rand(B, S, F, generator=g) * b["slot_mask"][..., None]
        b["user_feat"] = torch.rand(B, 4, F, generator=g)
        b["user_mask"] = torch.ones(B, 4, dtype=torch.bool)
    return b


def _table(prior, seed=0):
    rng = np.random.default_rng(seed)
    if prior == "exposure":
        return np.sort(rng.uniform(0.05, 1.0, S))[::-1].copy()
    rows = NU if prior == "user" else 1
    return rng.uniform(0.0, 0.5, (rows, S))


def _model(prior, modality="id", backend="torch", seed=1, n_layers=1, **kw):
    cfg = ModelConfig(modality=modality, d_model=16, n_heads=2, n_layers=n_layers, d_ff=16, dropout=0.0,
                      n_users=NU, n_videos=NV, feature_dim=8 if modality != "id" else None, prior=prior,
                      backend=backend, **kw)
    torch.manual_seed(seed)
    m = SegInterestModel(cfg)
    if prior != "none":
        m.install_prior(_table(prior))
    with torch.no_grad():
        m.decoder.pos_a.normal_(0, 0.1)
        if m.decoder.prior_weight is not None:
            m.decoder.prior_weight.fill_(0.7)
    return m


def test_prior_none_adds_nothing_and_draws_nothing():
    torch.manual_seed(5)
    plain = SegInterestModel(ModelConfig(modality="both", d_model=16, n_heads=2, n_layers=1, d_ff=16,
                                         n_users=NU, n_videos=NV, feature_dim=8))
    torch.manual_seed(5)
    withp = SegInterestModel(ModelConfig(modality="both", d_model=16, n_heads=2, n_layers=1, d_ff=16,
                                         n_users=NU, n_videos=NV, feature_dim=8, prior="user"))
    a, b = plain.state_dict(), withp.state_dict()
    assert set(b) - set(a) == {"decoder.prior_weight", "decoder.prior_table"}
    assert not any("prior" in k for k in a) and plain.decoder.prior_weight is None
    for k in a:  # the prior's parameter is made without random draws: every other weight is the same
        assert torch.equal(a[k], b[k]), k


def test_uninstalled_prior_raises():
    cfg = ModelConfig(modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16, n_users=NU, n_videos=NV,
                      prior="global")
    m = SegInterestModel(cfg)
    with pytest.raises(RuntimeError, match="not installed"):
        m(_batch())
    with pytest.raises(ValueError, match=r"\(1, 40\)"):
        m.install_prior(np.zeros((NU, S)))
    with pytest.raises(ValueError, match="probabilities"):
        m.install_prior(np.full((1, S), 1.5))


@pytest.mark.parametrize("prior", ["global", "user", "exposure"])
def test_prior_formula_in_the_model(prior):
    """The model's logits equal the no-prior logits transformed by the documented formula."""
    m = _model(prior).eval()
    b = _batch()
    got = m(b)
    dec = m.decoder
    raw = ops.segment_decoder(None, m.id(b, b["slot_index"], b["slot_mask"]), dec.w_x, dec.w_y, dec.bias,
                              dec.fusion, dec.pos_a, dec.pos_c)
    t = torch.from_numpy(_table(prior)).double()
    if prior == "exposure":
        want = torch.nn.functional.logsigmoid(raw.double()) + torch.log(t.float().double().clamp_min(1e-12))
    else:
        h = t.float().double()[b["user_idx"]] if prior == "user" else t.float().double().expand(6, S)
        surv = torch.cat([torch.ones(6, 1, dtype=torch.float64), torch.cumprod(1 - h[:, :-1], 1)], 1)
        n = b["n_segments"][:, None]
        sl = torch.arange(S)[None, :]
        P = torch.where(sl < n, h * surv, torch.where(sl == n, surv, torch.zeros(())))
        want = raw.double() + 0.7 * -torch.log(P.clamp_min(1e-12))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prior", ["global", "user"])
def test_zero_content_model_ranks_as_the_position_baseline(prior, tmp_path):
    """w = 1 and every content term zero: the model ranks rows exactly as AllPosition / UserPosition fitted on
    the training split (the sign convention: low logit = likely leave slot, as the baselines' scores)."""
    from _fakes import prepared_world

    from segfast.data.batches import make_loader

    p = prepared_world(tmp_path)
    inter = p.interactions
    cfg = ModelConfig(modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16, n_users=p.n_users,
                      n_videos=p.n_videos, prior=prior, prior_strength=3.0)
    m = SegInterestModel(cfg).eval()
    m.install_prior(compute_priors(inter, prior, p.n_users, 3.0))
    with torch.no_grad():
        for t in (m.decoder.w_y, m.decoder.bias, m.decoder.pos_a, m.decoder.pos_c):
            t.zero_()
    kind = "UserPosition" if prior == "user" else "AllPosition"
    base = PositionBaseline(kind, 3.0).fit(inter, np.flatnonzero(inter["split"] == 0))
    n_rows = 0
    for split in ("train", "dev", "test"):
        for batch in make_loader(p, split, 64, shuffle=False, features=False, exclude_full_40=True):
            logits = m.score(batch)
            rows = batch["row"].numpy()
            sc = base.scores(inter, rows)
            for strict in (False, True):
                a = target_ranks(logits, batch["target"], batch["n_segments"], strict=strict, row_ids=rows)
                r = target_ranks(sc, batch["target"], batch["n_segments"], strict=strict, row_ids=rows)
                np.testing.assert_array_equal(a, r)
            n_rows += len(rows)
    assert n_rows > 150


# ------------------------------------------------------------------------------------------------ backends

def _unique(b):
    """The per-row batch as a unique batch (every row distinct, identity inverse indices)."""
    B = b["user_idx"].shape[0]
    u = {k: v for k, v in b.items() if k not in ("target",)}
    u.update(video_inv=torch.arange(B), user_inv=torch.arange(B), video_idx_u=b["video_idx"],
             user_idx_u=b["user_idx"])
    return u


@pytest.mark.parametrize("prior", ["global", "user", "exposure"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_agree_with_the_reference(prior, backend, monkeypatch):
    from segfast.kernels import decoder_loss as dl
    monkeypatch.setattr(dl, "POISON_OUTPUTS", True)
    b = _batch(B=4)
    ref = _model(prior, backend="torch")
    got = _model(prior, backend=backend)
    got.load_state_dict(ref.state_dict())
    # training loss + every gradient
    lr, Lr = ref.loss(b)
    lg, Lg = got.loss(b)
    assert torch.isfinite(lg).all()
    torch.testing.assert_close(lg, lr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Lg, Lr, rtol=1e-4, atol=1e-5)
    Lr.backward()
    Lg.backward()
    gr = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        if gr[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, gr[name].grad, rtol=1e-3, atol=1e-5, msg=name)
    if prior != "exposure":
        assert gr["decoder.prior_weight"].grad.abs().item() > 0
    # scoring: per-row and unique batches
    ref.eval(), got.eval()
    sr = ref.score(b)
    torch.testing.assert_close(got.score(b), sr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.score(_unique(b)), sr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref.score(_unique(b)), sr, rtol=0, atol=2e-5)


@pytest.mark.parametrize("prior", ["user", "exposure"])
def test_unique_batch_with_duplicates_and_trimmed_slots(prior):
    """The scorer's unique batch (user index user_idx_u[user_inv], S trimmed to the longest video + 1) gives the
    per-row scores, also for a visual-only model (no ID tokens, the user index only feeds the prior)."""
    for modality in ("id", "visual"):
        m = _model(prior, modality=modality).eval()
        b = _batch(B=6, feats=True)
        ub = {k: v for k, v in b.items() if k not in ("target", "video_feat", "user_feat", "user_mask",
                                                       "user_idx", "video_idx")}
        vinv = torch.tensor([0, 1, 0, 2, 1, 2])
        uinv = torch.tensor([0, 0, 1, 1, 2, 0])
        vid = torch.tensor([3, 5, 7])
        nseg = torch.tensor([4, 9, 2])
        s = 10
        uid = torch.tensor([4, 1, 2])
        if modality == "id":  # the scorer's ID batch also carries the per-row ids; a visual one may not
            ub.update(user_idx=uid[uinv], video_idx=vid[vinv])
        ub.update(video_inv=vinv, user_inv=uinv, video_idx_u=vid, user_idx_u=uid,
                  n_segments=nseg[vinv], slot_mask=torch.arange(s)[None, :] < nseg[vinv][:, None],
                  slot_index=torch.arange(s).expand(6, s).clone(), row=torch.arange(6))
        if modality == "visual":
            g = torch.Generator().manual_seed(1)
            ub["video_feat_u"] = torch.rand(3, s, 8, generator=g)
            ub["user_feat_u"] = torch.rand(3, 4, 8, generator=g)
            ub["user_mask_u"] = torch.ones(3, 4, dtype=torch.bool)
        got = m(ub)
        assert got.shape == (6, s)
        full = expand_unique(ub)
        full["slot_mask"] = torch.arange(S)[None, :] < full["n_segments"][:, None]
        full["slot_index"] = torch.arange(S).expand(6, S).clone()
        if modality == "visual":
            full["video_feat"] = torch.cat([full["video_feat"], torch.zeros(6, S - s, 8)], 1)
        full["target"] = torch.zeros(6, dtype=torch.long)
        ref = m(full)[:, :s]
        real = ub["slot_mask"] | (torch.arange(s)[None, :] == ub["n_segments"][:, None])
        torch.testing.assert_close(got[real], ref[real], rtol=0, atol=2e-5)


def test_op_gradients_fp64():
    """gradcheck of the reference op with an offset / a log-exposure (the path every backend's prior takes)."""
    g = torch.Generator().manual_seed(0)
    B, d = 3, 4
    y = torch.randn(B, S, d, generator=g, dtype=torch.float64, requires_grad=True)
    wy = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    off = torch.randn(B, S, generator=g, dtype=torch.float64, requires_grad=True)
    le = torch.log(torch.rand(S, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    tgt = torch.tensor([0, 5, 39])
    for kw in ({"offset": off}, {"log_exposure": le}):
        def f(y, wy, bias, extra):
            k = {next(iter(kw)): extra}
            return ops.decode_and_loss(None, y, None, wy, bias, None, None, None, tgt, backend="torch", **k)[1]
        assert torch.autograd.gradcheck(f, (y, wy, bias, next(iter(kw.values()))))


# ------------------------------------------------------------------------------------------------ save / load / train

@pytest.mark.parametrize("prior", ["user", "exposure"])
def test_save_load_round_trip(prior, tmp_path):
    m = _model(prior).eval()
    c = m.config
    write_run_config(tmp_path, c, TrainConfig(), {"source": "kuairand", "n_users": NU, "n_videos": NV})
    save_model(tmp_path / "model.safetensors", m)
    loaded, meta = load_run(tmp_path, which="best")
    assert meta["model_config"].prior == prior
    torch.testing.assert_close(loaded.decoder.prior_table, m.decoder.prior_table, rtol=0, atol=0)
    b = _batch()
    assert torch.equal(loaded.score(b), m.score(b))


def test_old_weights_without_prior_fields_load(tmp_path):
    """Weights saved before the prior option (their metadata config has no prior fields) still load."""
    import json

    from segfast.checkpoint import load_model_weights, load_tensors, save_tensors
    m = _model("none")
    save_model(tmp_path / "w.safetensors", m)
    tensors, meta = load_tensors(tmp_path / "w.safetensors")
    key = [k for k in meta if "config" in k][0]
    cfg = json.loads(meta[key])
    del cfg["prior"], cfg["prior_strength"]
    meta[key] = json.dumps(cfg, sort_keys=True)
    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    fresh = _model("none", seed=9)
    load_model_weights(tmp_path / "old.safetensors", fresh)
    assert torch.equal(fresh.score(_batch()), m.score(_batch()))


def test_train_installs_the_training_split_tables(tmp_path):
    from test_train import _make

    from segfast.data.prepared import load_prepared
    from segfast.train import train

    data = _make(tmp_path / "prep", features=False)
    mc = ModelConfig(modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16, prior="user", prior_strength=2.0)
    tc = TrainConfig(batch_size=24, epochs=1, eval_every=2, patience=10, seed=3, lr=3e-3)
    run = tmp_path / "run"
    train(data, run, mc, tc, progress=False, max_steps=2)
    p = load_prepared(data)
    model, _ = load_run(run, which="last")
    want = compute_priors(p.interactions, "user", p.n_users, 2.0)
    np.testing.assert_array_equal(model.decoder.prior_table.numpy(), want)
    assert model.decoder.prior_weight.item() != 1.0  # learned
    st = train(data, run, mc, tc, progress=False, max_steps=3)  # resume takes the table from the checkpoint
    assert st["step"] == 3
    from segfast.verify import verify
    res = verify(run)  # `segfast verify`: the weights (table included) load strictly with the run's config
    assert not res["problems"], res["problems"]
    assert any("model.safetensors" in c for c in res["checked"])


# ------------------------------------------------------------------------------------------------ fused kernel

def _op_inputs(B, S_, seed, fusion=True):
    g = torch.Generator().manual_seed(seed)
    d = 16
    x = torch.randn(B, S_, d, generator=g)
    y = torch.randn(B, S_, d, generator=g)
    w_x, w_y = torch.randn(d, generator=g) * 0.3, torch.randn(d, generator=g) * 0.3
    bias = torch.tensor(0.2)
    fus = torch.randn(1, d, d, generator=g) * 0.1 if fusion else None
    pa, pc = torch.randn(S_, generator=g) * 0.1, torch.randn(S_, generator=g) * 0.1
    off = torch.randn(B, S_, generator=g) * 2
    le = torch.log(torch.rand(S_, generator=g) * 0.9 + 0.05)
    tgt = torch.randint(0, S_, (B,), generator=g)
    tgt[0] = S_  # an excluded row
    return [x, y, w_x, w_y, bias, fus, pa, pc], off, le, tgt


@pytest.mark.parametrize("kind", ["bpr-max", "bpr-max-literal", "pairwise"])
@pytest.mark.parametrize("which", ["offset", "log_exposure"])
@pytest.mark.parametrize("through_logits", [False, True])
def test_fused_kernel_prior_against_reference(kind, which, through_logits, monkeypatch):
    """The prior inside the fused training kernel: logits, loss and the gradient of every input (the prior's
    included), through the loss alone and through loss and logits (the chain path); NaN-poisoned outputs."""
    from segfast.kernels import decoder_loss as dl
    monkeypatch.setattr(dl, "POISON_OUTPUTS", True)
    args, off, le, tgt = _op_inputs(5, 40, seed=len(kind) + len(which))
    # on a GPU (bench/gpu_check.sh) the compiled kernel, with fp32 dots in tf32 there (DOT_PRECISION)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [None if t is None else t.to(dev) for t in args]
    off, le, tgt = off.to(dev), le.to(dev), tgt.to(dev)
    tol = 5e-3 if dev == "cuda" else None  # the decoder kernel tests' fp32 tolerance on CUDA
    extra = off if which == "offset" else le
    res = {}
    for backend in ("torch", "triton"):
        a = [t.clone().requires_grad_(True) if t is not None else None for t in args]
        e = extra.clone().requires_grad_(True)
        logits, loss = ops.decode_and_loss(*a, tgt, kind=kind, backend=backend, **{which: e})
        obj = loss + ((logits * torch.linspace(-1, 1, 40, device=dev)).sum() * 0.01 if through_logits else 0.0)
        obj.backward()
        res[backend] = (logits.detach(), loss.detach(), [t.grad for t in a if t is not None], e.grad)
    (lr, Lr, gr, er), (lk, Lk, gk, ek) = res["torch"], res["triton"]
    def close(a, b, rtol, atol, **kw):
        torch.testing.assert_close(a, b, rtol=tol or rtol, atol=tol or atol, **kw)

    assert torch.isfinite(lk).all()
    close(lk, lr, 1e-5, 1e-4)
    close(Lk, Lr, 1e-5, 1e-5)
    for i, (a, b) in enumerate(zip(gk, gr)):
        assert torch.isfinite(a).all(), i
        close(a, b, 1e-4, 1e-5, msg=f"grad {i}")
    close(ek, er, 1e-4, 1e-6)
    # scoring (no grad): the prior inside the forward-only kernel
    with torch.no_grad():
        sk = ops.segment_decoder(*args, backend="triton", **{which: extra})
        sl, ls = ops.decode_and_loss(*args, tgt, kind=kind, backend="triton", **{which: extra})
    close(sk, lr, 1e-5, 1e-4)
    close(sl, lr, 1e-5, 1e-4)
    close(ls, Lr, 1e-5, 1e-5)


_AOT_PRIOR = """
import json, sys, torch
sys.path.insert(0, "bench")
import compile_table as C
from segfast.kernels import _aot
from segfast.model.config import model_preset
from segfast.model.model import SegInterestModel

out = []
for arch in (90, 80):
    rec = _aot.Recorder()
    card = _aot.CARDS[arch]
    for prior in ("user", "exposure"):
        torch.manual_seed(0)
        cfg = model_preset("paper-code", modality="both", backend="triton", feature_dim=C.FEATURE_DIM,
                           n_users=64, n_videos=64, prior=prior)
        model = SegInterestModel(cfg)
        model.decoder.prior_installed = True  # meta tensors: the table's values do not matter for compiling
        model = _aot.meta_module(model)
        for amp in (None, torch.bfloat16):
            with _aot.capture(card, autocast=amp, recorder=rec):
                model.train()
                _, loss = model.loss(C._meta_batch(1024, 64, 64))
                with _aot.no_autocast():
                    loss.backward()
                model.zero_grad(set_to_none=True)
                model.eval()
                model.score(C._meta_batch(2048, 64, 64))
    variants = C.group_variants([la for la in rec.launches if la.name == "_decoder_kernel"], [arch])
    for v in variants.values():
        r = _aot.compile_variant(v["job"])
        consts = C.describe(v)["variant"]
        out.append({"arch": arch, "variant": consts, "error": r.get("error"), "regs": r.get("regs"),
                    "stack": r.get("stack")})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_prior_kernel_variants_compile_for_sm90_and_sm80_without_spills():
    """The fused kernel with a prior (PRIOR=1 offset, PRIOR=2 exposure), as the paper-code model launches it in
    training and scoring (fp32 and bf16 autocast), compiles for sm_90 and sm_80 with no register spills."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_PRIOR], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    priors = {row["variant"].split("PRIOR=")[1].split()[0] for row in rows if "PRIOR=" in row["variant"]}
    assert {"1", "2"} <= priors, rows
    bad = [row for row in rows if row["error"] or row["stack"]]
    assert not bad, bad
    print("\n".join(f"sm_{r['arch']} regs {r['regs']} stack {r['stack']}: {r['variant']}" for r in rows))
