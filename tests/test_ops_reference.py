"""The frozen reference ops: float64 gradcheck, hand-computed values, masking rules."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from segfast.ops import reference as R

torch.manual_seed(0)


def _rand(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------- cross_attention

def _attn_inputs(B=2, H=2, Lq=3, L1=4, L2=3, D=4):
    q1, k1, v1 = _rand(B, H, Lq, D), _rand(B, H, L1, D), _rand(B, H, L1, D)
    q2, k2, v2 = _rand(B, H, Lq, D), _rand(B, H, L2, D), _rand(B, H, L2, D)
    m1 = torch.tensor([[True, True, False, True], [True, False, False, False]])[:B, :L1]
    m2 = torch.tensor([[True, False, True], [False, True, True]])[:B, :L2]
    return q1, k1, v1, m1, q2, k2, v2, m2


def test_cross_attention_gradcheck_two_sources():
    q1, k1, v1, m1, q2, k2, v2, m2 = _attn_inputs()
    f = lambda q1, k1, v1, q2, k2, v2: R.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2)  # noqa: E731
    assert gradcheck(f, (q1, k1, v1, q2, k2, v2), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("which", [1, 2])
def test_cross_attention_gradcheck_one_source(which):
    q1, k1, v1, m1, q2, k2, v2, m2 = _attn_inputs()
    if which == 1:
        f = lambda q, k, v: R.cross_attention(q, k, v, m1, None, None, None, None)  # noqa: E731
        args = (q1, k1, v1)
    else:
        f = lambda q, k, v: R.cross_attention(None, None, None, None, q, k, v, m2)  # noqa: E731
        args = (q2, k2, v2)
    assert gradcheck(f, args, eps=1e-6, atol=1e-5)


def test_cross_attention_fully_masked_row_zero_output_and_grads():
    q1, k1, v1, m1, q2, k2, v2, m2 = _attn_inputs()
    m1 = m1.clone()
    m2 = m2.clone()
    m1[1] = False
    m2[1] = False  # row 1 has no key at all
    f = lambda q1, k1, v1, q2, k2, v2: R.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2)  # noqa: E731
    assert gradcheck(f, (q1, k1, v1, q2, k2, v2), eps=1e-6, atol=1e-5)
    out = f(q1, k1, v1, q2, k2, v2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q1, k1, v1, q2, k2, v2):
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))


def test_cross_attention_matches_explicit_loops():
    q1, k1, v1, m1, q2, k2, v2, m2 = (t.detach() if torch.is_tensor(t) and t.is_floating_point() else t
                                      for t in _attn_inputs())
    out = R.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2)
    B, H, Lq, D = q1.shape
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                keys = [(k1[b, h, j], v1[b, h, j]) for j in range(k1.shape[2]) if m1[b, j]]
                keys += [(k2[b, h, j], v2[b, h, j]) for j in range(k2.shape[2]) if m2[b, j]]
                # q1 scores source 1 keys, q2 scores source 2 keys
                s = [float(q1[b, h, i] @ k1[b, h, j]) / math.sqrt(D) for j in range(k1.shape[2]) if m1[b, j]]
                s += [float(q2[b, h, i] @ k2[b, h, j]) / math.sqrt(D) for j in range(k2.shape[2]) if m2[b, j]]
                mx = max(s)
                w = [math.exp(x - mx) for x in s]
                z = sum(w)
                expect = sum((wi / z) * kv[1] for wi, kv in zip(w, keys))
                torch.testing.assert_close(out[b, h, i], expect, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------- segment_decoder

def test_segment_decoder_gradcheck_single_modalities():
    B, S, d = 2, 5, 4
    x, w, b = _rand(B, S, d), _rand(d), _rand(())
    a, c = _rand(S), _rand(S)
    assert gradcheck(lambda x, w, b, a, c: R.segment_decoder(x, None, w, None, b, None, a, c),
                     (x, w, b, a, c), eps=1e-6, atol=1e-5)
    assert gradcheck(lambda y, w, b: R.segment_decoder(None, y, None, w, b, None, None, None),
                     (x, w, b), eps=1e-6, atol=1e-5)


def test_segment_decoder_gradcheck_both_with_fusion_and_position():
    B, S, d, hf = 2, 5, 4, 2
    args = (_rand(B, S, d), _rand(B, S, d), _rand(d), _rand(d), _rand(()), _rand(hf, d // hf, d // hf),
            _rand(S), _rand(S))
    assert gradcheck(R.segment_decoder, args, eps=1e-6, atol=1e-5)


def test_segment_decoder_hand_computed():
    # one slot pair per position, d = 2, two fusion heads of size 1
    x = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]], dtype=torch.float64)
    y = torch.tensor([[[3.0, -1.0], [2.0, 0.0]]], dtype=torch.float64)
    wx = torch.tensor([0.1, 0.2], dtype=torch.float64)
    wy = torch.tensor([-0.3, 0.4], dtype=torch.float64)
    b = torch.tensor(0.5, dtype=torch.float64)
    W = torch.tensor([[[2.0]], [[-1.0]]], dtype=torch.float64)
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    c = torch.tensor([0.25, -0.25], dtype=torch.float64)
    out = R.segment_decoder(x, y, wx, wy, b, W, a, c)
    # slot 0: 0.1+0.4 + (-0.9-0.4) + 0.5 + (1*2*3 + 2*(-1)*(-1)) + 1*1 + 0.25
    s0 = 0.5 - 1.3 + 0.5 + 8.0 + 1.0 + 0.25
    # slot 1: 0.05-0.2 + (-0.6+0) + 0.5 + (0.5*2*2 + (-1)*(-1)*0) + 2*0.5 - 0.25
    s1 = -0.15 - 0.6 + 0.5 + 2.0 + 1.0 - 0.25
    torch.testing.assert_close(out, torch.tensor([[s0, s1]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------- intra_video_loss

P = [0.5, -1.0, 2.0, 0.0]
Y = 1


def _bpr_max_hand(p, y, sign=-1.0):
    """sign -1: bpr-max (w = softmax(-p) over the other slots); +1: bpr-max-literal (softmax(+p))."""
    others = [j for j in range(len(p)) if j != y]
    z = sum(math.exp(sign * p[j]) for j in others)
    s = sum(math.exp(sign * p[j]) / z * _sig(p[j] - p[y]) for j in others)
    return -math.log(min(max(s, 1e-8), 1 - 1e-8))


def _pairwise_hand(p, y):
    others = [j for j in range(len(p)) if j != y]
    return -sum(math.log(_sig(p[j] - p[y])) for j in others) / (len(p) - 1)


def test_bpr_max_literal_hand_computed():
    # SPEC section 6 verbatim: w = softmax(0.5, 2.0, 0.0); terms sigmoid(1.5), sigmoid(3.0), sigmoid(1.0)
    e = [math.exp(0.5), math.exp(2.0), math.exp(0.0)]
    s = (e[0] * _sig(1.5) + e[1] * _sig(3.0) + e[2] * _sig(1.0)) / sum(e)
    expect = -math.log(s)
    assert abs(expect - _bpr_max_hand(P, Y, sign=1.0)) < 1e-12
    got = R.intra_video_loss(torch.tensor([P], dtype=torch.float64), torch.tensor([Y]), "bpr-max-literal")
    assert abs(float(got) - expect) < 1e-12


def test_bpr_max_hand_computed():
    # hard-other weighting: w = softmax(-0.5, -2.0, -0.0); the same sigmoid terms
    e = [math.exp(-0.5), math.exp(-2.0), math.exp(0.0)]
    s = (e[0] * _sig(1.5) + e[1] * _sig(3.0) + e[2] * _sig(1.0)) / sum(e)
    expect = -math.log(s)
    assert abs(expect - _bpr_max_hand(P, Y)) < 1e-12
    got = R.intra_video_loss(torch.tensor([P], dtype=torch.float64), torch.tensor([Y]), "bpr-max")
    assert abs(float(got) - expect) < 1e-12
    # the slot scored furthest below the leave slot weighs most: raising it lowers the loss most
    lit = R.intra_video_loss(torch.tensor([P], dtype=torch.float64), torch.tensor([Y]), "bpr-max-literal")
    assert float(got) > float(lit)


def test_pairwise_hand_computed():
    expect = -(math.log(_sig(1.5)) + math.log(_sig(3.0)) + math.log(_sig(1.0))) / 3
    got = R.intra_video_loss(torch.tensor([P], dtype=torch.float64), torch.tensor([Y]), "pairwise")
    assert abs(float(got) - expect) < 1e-12


def test_bce_hand_computed():
    # N = 3 real slots, target 1: labels [1, 0, -1, pad -1]; BCE over the 3 real slots
    labels = torch.tensor([[1, 0, -1, -1]], dtype=torch.int8)
    mask = torch.tensor([[True, True, True, False]])
    expect = -(math.log(_sig(0.5)) + math.log(1 - _sig(-1.0)) + math.log(1 - _sig(2.0))) / 3
    got = R.intra_video_loss(torch.tensor([P], dtype=torch.float64), torch.tensor([Y]), "bce", labels, mask)
    assert abs(float(got) - expect) < 1e-12


def test_loss_excludes_target_S_rows_and_means_over_kept():
    p = torch.tensor([P, [3.0, 1.0, -2.0, 0.5], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([Y, 4, 3])  # row 1 has target == S: excluded
    for kind, hand in (("bpr-max", _bpr_max_hand), ("pairwise", _pairwise_hand)):
        got = float(R.intra_video_loss(p, t, kind))
        expect = (hand(P, Y) + hand([0.0, 0.0, 1.0, 1.0], 3)) / 2
        assert abs(got - expect) < 1e-12, kind
    assert float(R.intra_video_loss(p[1:2], t[1:2], "bpr-max")) == 0.0
    with pytest.raises(ValueError, match="unknown loss"):
        R.intra_video_loss(p, t, "hinge")
    with pytest.raises(ValueError, match="labels"):
        R.intra_video_loss(p, t, "bce")


@pytest.mark.parametrize("kind", ["bpr-max", "bpr-max-literal", "pairwise", "bce"])
def test_intra_video_loss_gradcheck(kind):
    p = _rand(3, 6)
    t = torch.tensor([0, 2, 6])
    labels = torch.tensor([[0, -1, -1, -1, -1, -1], [1, 1, 0, -1, -1, -1], [1, 1, 1, 1, -1, -1]], dtype=torch.int8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert gradcheck(lambda p: R.intra_video_loss(p, t, kind, labels, mask), (p,), eps=1e-6, atol=1e-5)


def test_decode_and_loss_is_decoder_then_loss():
    B, S, d = 3, 6, 4
    x, w, b, a, c = _rand(B, S, d), _rand(d), _rand(()), _rand(S), _rand(S)
    t = torch.tensor([1, 6, 0])
    logits, loss = R.decode_and_loss(x, None, w, None, b, None, a, c, t, "pairwise")
    ref = R.segment_decoder(x, None, w, None, b, None, a, c)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(loss, R.intra_video_loss(ref, t, "pairwise"))
