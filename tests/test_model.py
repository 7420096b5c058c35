"""The model (SPEC section 5), its config, and checkpoint files."""
from __future__ import annotations

import json

import pytest
import torch

import segfast.ops as ops
from segfast.checkpoint import (CheckpointError, load_run, load_tensors, optimizer_tensors, load_optimizer_tensors,
                                save_model, save_tensors, write_run_config, check_compatible)
from segfast.model import ConfigError, ModelConfig, SegInterestModel, TrainConfig, model_preset, train_preset

F = 12
NU, NV = 5, 9


def make_batch(B=4, M=6, F=F, seed=0, with_feats=True):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([3, 40, 1, 7, 12, 25, 2, 9][:B])
    target = torch.tensor([1, 40, 0, 7, 3, 10, 1, 8][:B])
    slot_mask = torch.arange(40)[None, :] < n[:, None]
    labels = torch.full((B, 40), -1, dtype=torch.int8)
    labels[torch.arange(40)[None, :] < target[:, None]] = 1
    labels[(torch.arange(40)[None, :] == target[:, None]) & (target < n)[:, None]] = 0
    b = {
        "row": torch.arange(B) * 3 + 1,
        "user_idx": torch.randint(0, NU, (B,), generator=g),
        "video_idx": torch.randint(0, NV, (B,), generator=g),
        "n_segments": n, "slot_mask": slot_mask, "slot_index": torch.arange(40).expand(B, 40).clone(),
        "target": target, "labels": labels, "is_cold": torch.zeros(B, dtype=torch.bool),
        "hist_video_idx": torch.zeros(B, 50, dtype=torch.long), "hist_mask": torch.zeros(B, 50, dtype=torch.bool),
    }
    if with_feats:
        vf = torch.rand(B, 40, F, generator=g) * slot_mask[..., None]
        um = torch.rand(B, M, generator=g) > 0.3
        um[:, 0] = True
        um[min(2, B - 1)] = False  # a row without visual history
        uf = torch.rand(B, M, F, generator=g) * um[..., None]
        b.update(video_feat=vf.half(), user_feat=uf.half(), user_mask=um)
    return b


def cfg(modality="id", **kw):
    base = dict(d_model=16, n_heads=2, n_layers=2, d_ff=24, dropout=0.1, n_users=NU, n_videos=NV,
                feature_dim=None if modality == "id" else F)
    base.update(kw)
    return ModelConfig(modality=modality, **base)


# ---------------------------------------------------------------------------------------- config

def test_presets_and_json_round_trip():
    p = model_preset("paper-code")
    assert (p.d_model, p.n_heads, p.n_layers, p.d_ff, p.dropout) == (512, 16, 6, 512, 0.1)
    s = model_preset("small", d_model=32)
    assert (s.d_model, s.n_heads, s.n_layers, s.d_ff) == (32, 4, 2, 128)
    assert train_preset("paper-code").batch_size == 1024 and train_preset("small").batch_size == 256
    c = cfg("both", ablation="cross-only", loss="pairwise")
    assert ModelConfig.from_json(c.to_json()) == c
    t = TrainConfig(lr=3e-4, grad_clip=1.0)
    assert TrainConfig.from_json(t.to_json()) == t


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=18, n_heads=4), "n_heads"),
    (dict(d_model=15, n_heads=3), "even"),
    (dict(modality="both", d_model=18, n_heads=2, fusion_heads=4, feature_dim=4), "fusion_heads"),
    (dict(modality="video"), "modality"),
    (dict(ablation="no-ffn"), "ablation"),
    (dict(loss="mse"), "loss"),
    (dict(backend="cuda"), "backend"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_config_needs_data_to_build():
    with pytest.raises(ConfigError, match="feature_dim"):
        SegInterestModel(ModelConfig(modality="visual"))
    with pytest.raises(ConfigError, match="n_users"):
        SegInterestModel(ModelConfig(modality="id"))
    with pytest.raises(ConfigError, match="ID-only"):
        ModelConfig(modality="both").for_data(3, 4, None)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_json(json.dumps({"d_model": 8, "heads": 2}))
    with pytest.raises(ConfigError, match="unknown preset"):
        model_preset("huge")


# ---------------------------------------------------------------------------------------- forward / loss

@pytest.mark.parametrize("modality", ["id", "visual", "both"])
@pytest.mark.parametrize("loss", ["bpr-max", "pairwise", "bce"])
def test_forward_and_loss(modality, loss):
    torch.manual_seed(0)
    m = SegInterestModel(cfg(modality, loss=loss))
    b = make_batch()
    logits, l = m.loss(b)
    assert logits.shape == (4, 40) and logits.dtype == torch.float32
    expect = ops.reference.intra_video_loss(logits.detach(), b["target"], loss, b["labels"], b["slot_mask"])
    torch.testing.assert_close(l.detach(), expect)
    l.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    m.eval()
    torch.testing.assert_close(m.score(b), m(b))
    assert not m.score(b).requires_grad


@pytest.mark.parametrize("modality", ["id", "visual", "both"])
def test_padding_invariance(modality):
    """Padded slots' inputs and masked user tokens do not change the real slots' scores."""
    torch.manual_seed(1)
    m = SegInterestModel(cfg(modality)).eval()
    b = make_batch()
    base = m.score(b)
    b2 = {k: v.clone() for k, v in b.items()}
    pad = ~b["slot_mask"]
    if modality != "id":
        b2["video_feat"][pad] = torch.randn(int(pad.sum()), F).half() * 5
        um = b["user_mask"]
        b2["user_feat"][~um] = torch.randn(int((~um).sum()), F).half() * 5
        # extra masked user tokens at the end change M but not the scores
        B, M, _ = b2["user_feat"].shape
        b2["user_feat"] = torch.cat([b2["user_feat"], torch.randn(B, 3, F).half()], 1)
        b2["user_mask"] = torch.cat([um, torch.zeros(B, 3, dtype=torch.bool)], 1)
    # the ID representation of padded slots: perturb it through a forward hook on every representation
    hooks = []
    if modality != "visual":
        def hook(mod, inp, out):
            v, u, um = out
            v = v.clone()
            v[pad] = torch.randn_like(v[pad]) * 3
            return v, u, um
        hooks.append(m.id.rep.register_forward_hook(hook))
    out = m.score(b2)
    for h in hooks:
        h.remove()
    real = b["slot_mask"]
    torch.testing.assert_close(out[real], base[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[pad], base[pad]) or modality == "visual"


def test_unseen_videos_share_the_unknown_embedding():
    torch.manual_seed(4)
    m = SegInterestModel(cfg("id"))
    seen = torch.ones(NV, dtype=torch.bool)
    seen[[2, 5]] = False
    m.set_seen_videos(seen)
    m.eval()
    b = make_batch(with_feats=False)
    b2 = {k: v.clone() for k, v in b.items()}
    b["video_idx"][:] = 2
    b2["video_idx"][:] = 5
    torch.testing.assert_close(m.score(b), m.score(b2), rtol=0, atol=0)  # both unseen: the same embedding
    b2["video_idx"][:] = 3
    assert not torch.allclose(m.score(b), m.score(b2))  # a seen video uses its own
    with pytest.raises(ValueError, match="one per video"):
        m.set_seen_videos(torch.ones(NV + 1, dtype=torch.bool))
    # training: rows are switched to the unknown embedding at rate video_id_dropout, so it gets a gradient
    m = SegInterestModel(cfg("id", video_id_dropout=0.5)).train()
    _, loss = m.loss(make_batch(B=8, with_feats=False))
    loss.backward()
    assert m.id.rep.unk_video.grad is not None and m.id.rep.unk_video.grad.abs().sum() > 0
    # video_id_dropout=0 is the literal model: every video keeps its own embedding, seen or not
    m0 = SegInterestModel(cfg("id", video_id_dropout=0.0))
    m0.set_seen_videos(seen)
    m0.eval()
    b2["video_idx"][:] = 5
    assert not torch.allclose(m0.score(b), m0.score(b2))
    _, loss = m0.train().loss(make_batch(B=8, with_feats=False))
    loss.backward()
    assert m0.id.rep.unk_video.grad is None


def test_feature_rescale_is_a_reparametrisation():
    """feature_rescale multiplies the L1-normalised features by feature_dim: the same function as the literal
    form with the projection weights scaled by feature_dim (only the optimiser's view of the scale differs)."""
    torch.manual_seed(3)
    lit = SegInterestModel(cfg("both", feature_rescale=False)).eval()
    res = SegInterestModel(cfg("both", feature_rescale=True)).eval()
    res.load_state_dict(lit.state_dict())
    with torch.no_grad():
        res.visual.rep.proj.weight.div_(F)
    b = make_batch()
    torch.testing.assert_close(res.score(b), lit.score(b), rtol=1e-5, atol=1e-5)
    x = b["video_feat"][0, :3].float()
    expect = lit.visual.rep.proj(x / (x.abs().sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(lit.visual.rep.embed(b["video_feat"][0, :3]), expect)
    torch.testing.assert_close(res.visual.rep.embed(b["video_feat"][0, :3]),
                               res.visual.rep.proj(F * x / (x.abs().sum(-1, keepdim=True) + 1e-6)))


def test_visual_history_changes_scores():
    """Sanity for the invariance test: real user tokens do matter."""
    torch.manual_seed(2)
    m = SegInterestModel(cfg("visual")).eval()
    b = make_batch()
    b2 = {k: v.clone() for k, v in b.items()}
    b2["user_feat"][b["user_mask"]] = torch.rand(int(b["user_mask"].sum()), F).half()
    assert not torch.allclose(m.score(b)[b["slot_mask"]], m.score(b2)[b["slot_mask"]])


@pytest.mark.parametrize("ablation", ["none", "cross-only", "self-only", "no-attention", "no-position"])
@pytest.mark.parametrize("modality", ["id", "both"])
def test_ablations_run_and_count_attention_calls(ablation, modality, monkeypatch):
    calls = []
    real = ops.cross_attention

    def counting(*a, **k):
        calls.append([x is None for x in a[:8]])
        return real(*a, **k)

    monkeypatch.setattr(ops, "cross_attention", counting)
    torch.manual_seed(3)
    m = SegInterestModel(cfg(modality, ablation=ablation, n_layers=2))
    logits, loss = m.loss(make_batch())
    loss.backward()
    assert torch.isfinite(logits).all()
    n_enc = 2 if modality == "both" else 1
    expect = {"none": 3, "cross-only": 3, "self-only": 2, "no-attention": 0, "no-position": 3}[ablation] * n_enc
    assert len(calls) == expect
    first, second = [True] * 4 + [False] * 4, [False] * 4 + [True] * 4  # which source is absent
    if ablation == "cross-only":  # per encoder: layer 0 video (uv only), layer 0 user (vu only), layer 1 video
        assert calls == [first, second, first] * n_enc
    if ablation == "self-only":  # video streams only (vv), no user stream at all
        assert calls == [second, second] * n_enc
    if ablation == "none":
        assert calls == [[False] * 8] * expect
    if ablation == "no-position":
        assert m.decoder.pos_a is None and m.decoder.pos_c is None
    else:
        assert torch.equal(m.decoder.pos_a.detach(), torch.ones(40))


def test_no_position_shuffles_slot_index_deterministically_in_eval():
    torch.manual_seed(4)
    m = SegInterestModel(cfg("id", ablation="no-position")).eval()
    b = make_batch()
    p1 = m._pos_index(b)
    assert torch.equal(p1, m._pos_index(b))
    assert torch.equal(p1.sort(dim=1).values, torch.arange(40).expand(4, 40))  # a permutation per row
    assert not torch.equal(p1, b["slot_index"])
    torch.testing.assert_close(m.score(b), m.score(b))
    m.train()
    assert not torch.equal(m._pos_index(b), m._pos_index(b))


def test_batch_errors():
    m = SegInterestModel(cfg("visual"))
    b = make_batch(with_feats=False)
    with pytest.raises(KeyError, match="video_feat"):
        m(b)
    mi = SegInterestModel(cfg("id"))
    b = make_batch()
    b["video_idx"][0] = NV
    with pytest.raises(IndexError, match="video_idx"):
        mi(b)
    with pytest.raises(ValueError, match="max_user_tokens"):
        SegInterestModel(cfg("visual", max_user_tokens=4))(make_batch(M=6))
    with pytest.raises(ValueError, match="unknown backend"):
        mi.set_backend("cuda")


def test_paper_code_preset_forward_backward_cpu():
    torch.manual_seed(5)
    c = model_preset("paper-code", modality="both", n_users=NU, n_videos=NV, feature_dim=F)
    m = SegInterestModel(c)
    logits, loss = m.loss(make_batch(B=2))
    loss.backward()
    assert logits.shape == (2, 40) and torch.isfinite(logits).all() and torch.isfinite(loss)
    assert len(m.visual.encoder.layers) == 6
    assert all(p.grad is not None for n, p in m.named_parameters() if "layers.5" in n and "video" in n)


# ---------------------------------------------------------------------------------------- checkpoints

def test_save_load_round_trip_identical_scores(tmp_path):
    torch.manual_seed(6)
    c = cfg("both", ablation="no-position")
    m = SegInterestModel(c)
    write_run_config(tmp_path, c, TrainConfig(), {"source": "kuairand", "n_users": NU, "n_videos": NV})
    save_model(tmp_path / "model.safetensors", m)
    m.eval()
    b = make_batch()
    loaded, meta = load_run(tmp_path, which="best")  # falls back to the exported model
    assert meta["model_config"] == c and not loaded.training
    assert torch.equal(loaded.score(b), m.score(b))
    with pytest.raises(CheckpointError, match="last"):
        load_run(tmp_path, which="last")


def test_corrupt_and_truncated_safetensors(tmp_path):
    torch.manual_seed(7)
    c = cfg("id")
    m = SegInterestModel(c)
    write_run_config(tmp_path, c, None, None)
    path = tmp_path / "model.safetensors"
    save_model(path, m)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        load_run(tmp_path, which="final")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # in the tensor data: the header survives, the digest does not
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_run(tmp_path, which="final")
    path.write_bytes(b"\x00" * 4 + data[4:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(tmp_path, which="final")
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_run(tmp_path, which="final")


def test_weights_of_another_config_rejected(tmp_path):
    save_model(tmp_path / "w.safetensors", SegInterestModel(cfg("id", d_model=16)))
    from segfast.checkpoint import load_model_weights
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_model_weights(tmp_path / "w.safetensors", SegInterestModel(cfg("id", d_model=32)))


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(8)
    m = SegInterestModel(cfg("id"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(2):
        _, l = m.loss(make_batch())
        opt.zero_grad()
        l.backward()
        opt.step()
    t, info = optimizer_tensors(m, opt)
    save_tensors(tmp_path / "o.safetensors", t)
    info = json.loads(json.dumps(info))
    t2, _ = load_tensors(tmp_path / "o.safetensors")
    opt2 = torch.optim.AdamW(m.parameters(), lr=5.0)
    load_optimizer_tensors(m, opt2, t2, info, "o")
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_check_compatible():
    class P:
        path = "data"
        n_users, n_videos, feature_dim = NU, NV, None
        manifest = {"source": "kuairand"}

    meta = {"model_config": cfg("id"), "data": {"source": "kuairand"}}
    check_compatible(meta, P())
    P.n_videos = NV + 1
    with pytest.raises(ValueError, match="videos"):
        check_compatible(meta, P())
    with pytest.raises(ValueError, match="ID-only"):
        check_compatible({"model_config": cfg("visual")}, P())
    P.feature_dim = F + 1
    with pytest.raises(ValueError, match="dimensional"):
        check_compatible({"model_config": cfg("visual")}, P())
