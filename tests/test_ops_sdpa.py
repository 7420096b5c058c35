"""backend="sdpa" (segfast/ops/sdpa.py: the two-source softmax through F.scaled_dot_product_attention) vs the
frozen reference: forward and all six gradients, edge shapes, dtypes; the model on "sdpa" vs on "torch".

Tolerance table: err = max|x - ref| must be <= atol + rtol * max|ref| (per tensor). The reference computes in
fp32 from the same (rounded) half-precision inputs; SDPA keeps p / ds in the inputs' dtype.

    dtype  | output (atol, rtol) | gradients (atol, rtol)
    fp64   | 1e-12, 1e-10        | 1e-12, 1e-10     (plus torch.autograd.gradcheck)
    fp32   | 1e-5, 1e-4          | 1e-5, 1e-4
    fp16   | 2e-3, 4e-3          | 4e-3, 8e-3
    bf16   | 1.6e-2, 3e-2        | 3e-2, 6e-2
(the same bounds as the Triton kernel's, tests/test_kernel_cross_attention.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segfast.ops as ops
from segfast.model.config import ConfigError, ModelConfig, model_preset
from segfast.ops import reference, sdpa
from _fakes import assert_within, attn_leaves

TOL = {
    torch.float64: {"out": (1e-12, 1e-10), "grad": (1e-12, 1e-10)},
    torch.float32: {"out": (1e-5, 1e-4), "grad": (1e-5, 1e-4)},
    torch.float16: {"out": (2e-3, 4e-3), "grad": (4e-3, 8e-3)},
    torch.bfloat16: {"out": (1.6e-2, 3e-2), "grad": (3e-2, 6e-2)},
}
NAMES = ("q1", "k1", "v1", "q2", "k2", "v2")
GRAD_IDX = (0, 1, 2, 4, 5, 6)  # positions of q1 k1 v1 q2 k2 v2 in the 8 arguments


def _mask(B, L, n_real, gen):
    """[B, L] bool: the first n_real[b] keys real (SegMM padding layout), or random when n_real is None."""
    if n_real is None:
        return torch.rand(B, L, generator=gen) < 0.7
    return torch.arange(L)[None, :] < torch.as_tensor(n_real)[:, None]


def _inputs(B, H, LQ, L1, L2, D, dtype=torch.float32, n1=None, n2=None, layout="bhld", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(L):
        if layout == "blhd":  # a [B, L, H, D] buffer seen as [B, H, L, D] (non-contiguous view)
            return torch.randn(B, L, H, D, generator=gen).transpose(1, 2).to(dtype)
        return torch.randn(B, H, L, D, generator=gen).to(dtype)

    src1 = (t(LQ), t(L1), t(L1), _mask(B, L1, n1, gen)) if L1 is not None else (None,) * 4
    src2 = (t(LQ), t(L2), t(L2), _mask(B, L2, n2, gen)) if L2 is not None else (None,) * 4
    return (*src1, *src2)


def _leaves(args):
    return attn_leaves(args)


def _close(name, x, ref, dtype, kind):
    assert_within(name, x, ref, *TOL[dtype][kind])


def _check(args, dtype=torch.float32, scale=None, seed=1, via_ops=False):
    """sdpa vs reference on the same inputs: output and every present gradient. Returns (out, grads)."""
    a_s, a_r = _leaves(args), _leaves(args)
    if via_ops:
        out = ops.cross_attention(*a_s, scale=scale, backend="sdpa")
    else:
        out = sdpa.cross_attention(*a_s, scale=scale)
    ref = reference.cross_attention(*a_r, scale=scale)
    _close("out", out, ref, dtype, "out")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(ref.dtype)
    idx = [i for i in GRAD_IDX if a_s[i] is not None]
    gs = torch.autograd.grad(out, [a_s[i] for i in idx], g)
    gr = torch.autograd.grad(ref, [a_r[i] for i in idx], g)
    for i, x, r in zip(idx, gs, gr):
        _close("d" + NAMES[GRAD_IDX.index(i)], x, r, dtype, "grad")
    return out, gs


# ------------------------------------------------------------------------------------------- op vs reference
@pytest.mark.parametrize("B,H,LQ,L1,L2,D", [
    (2, 2, 40, 40, 100, 16),   # video stream of the small preset: 40 slots, 40 video + 100 user keys
    (1, 2, 100, 40, 100, 32),  # user stream: Lq = 100 (paper-code head dim 32)
    (1, 1, 1, 1, 1, 16),       # one pair, Lq = 1, one key per source
    (3, 1, 7, 5, 13, 24),      # non-power-of-two head dim
    (2, 1, 9, 40, 1, 64),      # ID modality: M = 1 user key
    (1, 1, 5, 6, 7, 128),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_forward_and_grads_match_reference(B, H, LQ, L1, L2, D, dtype):
    out, _ = _check(_inputs(B, H, LQ, L1, L2, D, dtype=dtype, seed=B * 100 + LQ + D), dtype=dtype)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padding_layout_and_fully_masked_history(dtype):
    # first-N masks as SegMM batches produce; row 1 has no user history at all (mask2 all False)
    args = _inputs(3, 2, 12, 12, 30, 16, dtype=dtype, n1=[12, 3, 1], n2=[30, 0, 17], seed=3)
    _check(args, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_all_keys_masked_row_gives_zeros_and_no_nan(dtype):
    args = list(_inputs(3, 2, 5, 6, 9, 16, dtype=dtype, seed=4))
    args[3][1] = False
    args[7][1] = False  # row 1: no valid key in either source
    args[3][2] = False  # row 2: source 1 fully masked, source 2 partly real
    out, grads = _check(args, dtype=dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[2].abs().max() > 0
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("missing", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_source_none(missing, dtype):
    L1, L2 = (None, 23) if missing == 1 else (17, None)
    args = list(_inputs(3, 2, 11, L1, L2, 24, dtype=dtype, seed=5 + missing))
    present = 7 if missing == 1 else 3
    args[present][0] = False  # a fully masked row on the single-source path too
    out, grads = _check(args, dtype=dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for g in grads:
        assert torch.equal(g[0], torch.zeros_like(g[0]))


def test_every_key_of_the_batch_masked():
    args = list(_inputs(2, 1, 4, 3, 5, 16, seed=13))
    args[3][:] = False
    args[7][:] = False
    out, grads = _check(args)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_empty_key_axis_gives_zeros():
    args = list(_inputs(2, 1, 4, 3, 5, 16, seed=14))
    args[5], args[6] = args[5][:, :, :0], args[6][:, :, :0]
    args[7] = args[7][:, :0]
    _check(args)


def test_strided_views_and_explicit_scale():
    args = _inputs(2, 2, 9, 8, 21, 16, layout="blhd", seed=8)
    assert not args[0].is_contiguous() and not args[5].is_contiguous()
    _check(args, scale=0.37)
    _check(_inputs(2, 2, 9, 8, 21, 16, dtype=torch.bfloat16, layout="blhd", seed=9), dtype=torch.bfloat16)


def test_scale_is_the_single_source_head_dim():
    # the concatenated queries have 2D columns; the default scale must stay 1/sqrt(D), as in the reference
    args = _inputs(2, 1, 6, 5, 7, 16, seed=10)
    a = sdpa.cross_attention(*args)
    assert torch.allclose(a, reference.cross_attention(*args, scale=0.25), atol=1e-5)
    assert not torch.allclose(a, reference.cross_attention(*args, scale=32 ** -0.5), atol=1e-3)


def test_gradcheck_fp64():
    args = list(_inputs(2, 1, 3, 4, 5, 8, dtype=torch.float64, seed=11))
    args[3][1] = False
    args[7][1] = False
    _check(args, dtype=torch.float64)
    leaves = [args[i].detach().requires_grad_(True) for i in GRAD_IDX]
    m1, m2 = args[3], args[7]

    def f(q1, k1, v1, q2, k2, v2):
        return sdpa.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2)

    assert torch.autograd.gradcheck(f, leaves)


def test_mixed_dtypes_promote_and_return_the_query_dtype():
    args = list(_inputs(2, 1, 4, 3, 5, 16, seed=12))
    args[1] = args[1].half()  # k1 in fp16, the rest fp32: the reference computes in fp32, so does sdpa
    out = sdpa.cross_attention(*args)
    assert out.dtype == torch.float32
    assert torch.allclose(out, reference.cross_attention(*args), atol=1e-5)


def test_bad_inputs_name_what_was_expected():
    args = list(_inputs(2, 1, 4, 3, 5, 16, seed=15))
    bad = list(args)
    bad[3] = bad[3][:, :2]
    with pytest.raises(ValueError, match=r"mask \[B, L\]"):
        sdpa.cross_attention(*bad)
    bad = list(args)
    bad[4] = bad[4][..., :8]
    with pytest.raises(ValueError, match=r"q \[B, H, Lq, D\]"):
        sdpa.cross_attention(*bad)
    with pytest.raises(ValueError, match="at least one key source"):
        sdpa.cross_attention(*(None,) * 8)
    bad = list(args)
    bad[2] = None
    with pytest.raises(ValueError, match="all of q, k, v and mask"):
        sdpa.cross_attention(*bad)


# ------------------------------------------------------------------------------------------- the switch
def test_backend_switch_routes_to_sdpa(monkeypatch):
    assert "sdpa" in ops.BACKENDS
    calls = []
    real = sdpa.cross_attention
    monkeypatch.setattr(sdpa, "cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = _inputs(1, 1, 3, 4, 5, 16, seed=16)
    _check(args, via_ops=True)
    assert calls == [1]
    previous = ops.get_backend()
    try:
        ops.set_backend("sdpa")
        ops.cross_attention(*args)
        assert calls == [1, 1]
        # the decoder ops have no sdpa version: the reference's, bitwise
        x, y = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
        w = (torch.randn(8), torch.randn(8), torch.tensor(0.1), torch.randn(2, 4, 4), torch.ones(40),
             torch.ones(40))
        assert torch.equal(ops.segment_decoder(x, y, *w), reference.segment_decoder(x, y, *w))
    finally:
        ops.set_backend(previous)
    with pytest.raises(ValueError, match="sdpa"):
        ops.set_backend("flash")
    assert ModelConfig(backend="sdpa").backend == "sdpa"
    with pytest.raises(ConfigError, match="sdpa"):
        ModelConfig(backend="flash")


# ------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from segfast.data.prepared import prepare
    from segfast.data.synth import synth

    base = tmp_path_factory.mktemp("sdpa")
    synth("segmm", base / "raw", users=6, videos=120, interactions=900, seed=5, feature_dim=32, progress=False)
    prepare("segmm", base / "raw", base / "data", seed=5, feature_dim=32, progress=False)
    return base / "data"


def _train(data, backend: str, steps: int):
    from segfast.data.batches import BatchAssembler
    from segfast.data.prepared import load_prepared
    from segfast.model.model import SegInterestModel

    prep = load_prepared(data)
    torch.manual_seed(0)
    # the small preset (d 64, 4 heads, 2 layers), both modalities; pos_init=0 so the loss is not saturated
    cfg = model_preset("small", modality="both", backend=backend, pos_init=0.0,
                       max_user_tokens=16).for_data(prep.n_users, prep.n_videos, prep.feature_dim)
    model = SegInterestModel(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # SGD, not AdamW: AdamW would scale the rounding noise of exactly-zero gradients to lr-sized steps
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    asm = BatchAssembler(prep, features=True, max_user_tokens=16)
    rows = prep.rows("train")
    rows = rows[np.asarray(prep.interactions["target"])[rows] < 40]
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = asm.assemble(np.sort(rng.choice(rows, size=8, replace=False)))
        opt.zero_grad()
        _, loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        scores = model(asm.assemble(np.sort(rows[:16])))
    return np.array(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}, init, scores


def test_model_trains_and_scores_alike_on_sdpa_and_torch(tiny_data):
    l_ref, w_ref, init, s_ref = _train(tiny_data, "torch", steps=6)
    l_sdpa, w_sdpa, _, s_sdpa = _train(tiny_data, "sdpa", steps=6)
    assert np.isfinite(l_ref).all() and np.isfinite(l_sdpa).all()
    np.testing.assert_allclose(l_sdpa, l_ref, rtol=1e-4, atol=1e-6)
    for k in w_ref:
        np.testing.assert_allclose(w_sdpa[k].numpy(), w_ref[k].numpy(), rtol=1e-3, atol=1e-5, err_msg=k)
    # fp32 rounding differences grown over 6 SGD steps, relative to the logits' scale (|logit| up to ~40)
    np.testing.assert_allclose(s_sdpa.numpy(), s_ref.numpy(), rtol=1e-4,
                               atol=1e-5 * float(s_ref.abs().max()))
    # the comparison is not vacuous: the weights moved, and the attention reached the loss
    moved = max(float((w_ref[k].float() - init[k].float()).abs().max()) for k in init)
    assert moved > 1e-2, moved
    assert float(np.abs(s_ref.numpy()).max()) > 0


def test_model_set_backend_reaches_every_attention_call(monkeypatch):
    from segfast.model.model import SegInterestModel

    cfg = model_preset("small", modality="both", backend="torch", max_user_tokens=8).for_data(5, 20, 16)
    model = SegInterestModel(cfg)
    seen = []
    real = ops.cross_attention
    monkeypatch.setattr(ops, "cross_attention", lambda *a, backend=None, **k: seen.append(backend) or
                        real(*a, backend=backend, **k))
    model.set_backend("sdpa")
    assert model.config.backend == "sdpa" and model.decoder.backend == "sdpa"
    B, M, F = 2, 8, 16
    batch = {"row": torch.arange(B), "user_idx": torch.tensor([0, 4]), "video_idx": torch.tensor([1, 19]),
             "slot_mask": torch.arange(40)[None] < torch.tensor([[5], [40]]),
             "slot_index": torch.arange(40).expand(B, 40).contiguous(), "target": torch.tensor([2, 39]),
             "video_feat": torch.rand(B, 40, F).half(), "user_feat": torch.rand(B, M, F).half(),
             "user_mask": torch.arange(M)[None] < torch.tensor([[1], [8]])}
    model.eval()
    with torch.no_grad():
        model(batch)
    # 2 encoders (visual, ID) x (layer 0: video + user stream, layer 1: video stream)
    assert seen == ["sdpa"] * 6
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("flash")


# ------------------------------------------------------------------------------------------- the encoder split
def test_encoder_split_parts_are_the_packed_projections():
    from segfast.model.encoder import EncoderLayer

    torch.manual_seed(2)
    cfg = model_preset("small", modality="id", d_model=16, n_heads=2).for_data(3, 4, None)
    layer = EncoderLayer(cfg)
    x = torch.randn(3, 7, 16, requires_grad=True)
    parts = layer._split(x, layer.proj_v, layer.v_names)
    assert list(parts) == list(layer.v_names)
    W, b = layer.proj_v.weight, layer.proj_v.bias
    gs = []
    for i, n in enumerate(layer.v_names):  # independent: one Linear(d, d) per part, heads split by hand
        ref = (x @ W[i * 16:(i + 1) * 16].T + b[i * 16:(i + 1) * 16]).view(3, 7, 2, 8).transpose(1, 2)
        assert parts[n].shape == (3, 2, 7, 8)
        torch.testing.assert_close(parts[n], ref)
        gs.append(torch.randn(ref.shape))
    # the backward through the split: d(packed weight) = the parts' weight gradients side by side
    (dW,) = torch.autograd.grad(sum((parts[n] * g).sum() for n, g in zip(layer.v_names, gs)), [W])
    xs = x.detach().view(-1, 16)
    for i, g in enumerate(gs):
        gi = g.transpose(1, 2).reshape(-1, 16)
        torch.testing.assert_close(dW[i * 16:(i + 1) * 16], gi.T @ xs, rtol=1e-5, atol=1e-5)
