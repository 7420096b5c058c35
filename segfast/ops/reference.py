"""Frozen PyTorch reference of every functional op (SPEC section 5-6).

These functions change only with the spec. Every Triton kernel in ``segfast.kernels`` is tested against
them. They are written for readability, not speed: math is carried out in float32 (float64 when the
inputs are float64, for gradcheck), outputs are cast back to the input dtype where stated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

MAX_SLOTS = 40
_NEG = -1e30  # finite "minus infinity": keeps fully masked rows NaN-free


def _math_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    for t in ts:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def key_sources(q1, k1, v1, mask1, q2, k2, v2, mask2) -> list:
    """The present key sources of a cross_attention call as (q, k, v, mask) tuples, validated."""
    srcs = [(q, k, v, m) for (q, k, v, m) in ((q1, k1, v1, mask1), (q2, k2, v2, mask2)) if q is not None]
    if not srcs:
        raise ValueError("cross_attention needs at least one key source")
    for q, k, v, m in srcs:
        if k is None or v is None or m is None:
            raise ValueError("a key source needs all of q, k, v and mask")
    return srcs


def cross_attention(
    q1: Optional[Tensor], k1: Optional[Tensor], v1: Optional[Tensor], mask1: Optional[Tensor],
    q2: Optional[Tensor], k2: Optional[Tensor], v2: Optional[Tensor], mask2: Optional[Tensor],
    scale: Optional[float] = None,
) -> Tensor:
    """One softmax over the keys of two sources (the user-video cross-attention of one stream).

    q1, q2: [B, H, Lq, D]; k1, v1: [B, H, L1, D]; mask1: [B, L1] bool (True = real key);
    k2, v2: [B, H, L2, D]; mask2: [B, L2] bool. A source may be absent (all four of its args None).
    Returns [B, H, Lq, D] in the queries' dtype. Queries whose keys are all masked get zeros.
    """
    srcs = key_sources(q1, k1, v1, mask1, q2, k2, v2, mask2)
    dt = _math_dtype(*[t for s in srcs for t in s[:3]])
    out_dtype = srcs[0][0].dtype
    D = srcs[0][0].shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    logits, values, valid = [], [], []
    for q, k, v, m in srcs:
        s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
        s = s.masked_fill(~m[:, None, None, :].bool(), _NEG)
        logits.append(s)
        values.append(v.to(dt))
        valid.append(m.bool())
    s = torch.cat(logits, dim=-1)
    v = torch.cat(values, dim=-2)
    any_valid = torch.cat(valid, dim=-1).any(dim=-1)  # [B]
    p = torch.softmax(s, dim=-1) * any_valid[:, None, None, None].to(dt)
    return torch.matmul(p, v).to(out_dtype)


def segment_decoder(
    x: Optional[Tensor], y: Optional[Tensor],
    w_x: Optional[Tensor], w_y: Optional[Tensor], bias: Tensor,
    fusion: Optional[Tensor], pos_a: Optional[Tensor], pos_c: Optional[Tensor],
    offset: Optional[Tensor] = None, log_exposure: Optional[Tensor] = None,
) -> Tensor:
    """Segment interest decoder with position bias. Returns fp32 (fp64 for fp64 inputs) logits [B, S].

    x: [B, S, dx] (visual) or None; y: [B, S, dy] (ID) or None; w_x: [dx]; w_y: [dy]; bias: [];
    fusion: [Hf, dx/Hf, dy/Hf] or None; pos_a, pos_c: [S] or None.
    o_i = w_x.x_i + w_y.y_i + b + sum_h x_{i,h}^T W_h y_{i,h};  p_i = o_i + (i+1) a_i + c_i.
    offset [B, S] / log_exposure [S] (optional, the model's position prior): see :func:`apply_prior`.
    """
    if x is None and y is None:
        raise ValueError("segment_decoder needs at least one modality")
    dt = _math_dtype(x, y, w_x, w_y, fusion)
    ref = x if x is not None else y
    B, S = ref.shape[0], ref.shape[1]
    o = bias.to(dt).expand(B, S).clone()
    if x is not None:
        o = o + torch.matmul(x.to(dt), w_x.to(dt))
    if y is not None:
        o = o + torch.matmul(y.to(dt), w_y.to(dt))
    if fusion is not None:
        if x is None or y is None:
            raise ValueError("the bilinear fusion needs both modalities")
        Hf = fusion.shape[0]
        xh = x.to(dt).reshape(B, S, Hf, -1)
        yh = y.to(dt).reshape(B, S, Hf, -1)
        o = o + torch.einsum("bshi,hij,bshj->bs", xh, fusion.to(dt), yh)
    if pos_a is not None:
        pos = torch.arange(1, S + 1, device=o.device, dtype=dt)
        o = o + pos * pos_a.to(dt) + pos_c.to(dt)
    return apply_prior(o, offset, log_exposure)


def apply_prior(logits: Tensor, offset: Optional[Tensor] = None, log_exposure: Optional[Tensor] = None) -> Tensor:
    """The position prior on decoder logits p [B, S] (docs/model.md, "Position priors"):

    log_exposure [S] (the authors' multiplicative form): p'_i = logsigmoid(p_i) + log_exposure_i, the log of
      sigmoid(p_i) * e_i;  offset [B, S] (additive, already scaled by the learned weight): p'_i = p_i + offset_i.
    Both absent: p unchanged (the same tensor). Math in the logits' dtype (fp32, or fp64 for gradcheck)."""
    if log_exposure is None and offset is None:
        return logits
    B, S = logits.shape
    if log_exposure is not None:
        if log_exposure.dim() != 1 or log_exposure.shape[0] != S:
            raise ValueError(f"log_exposure: expected shape [{S}], got {tuple(log_exposure.shape)}")
        logits = torch.nn.functional.logsigmoid(logits) + log_exposure.to(logits.dtype)
    if offset is not None:
        if tuple(offset.shape) != (B, S):
            raise ValueError(f"offset: expected shape [{B}, {S}], got {tuple(offset.shape)}")
        logits = logits + offset.to(logits.dtype)
    return logits


def intra_video_loss(
    logits: Tensor, target: Tensor, kind: str = "bpr-max",
    labels: Optional[Tensor] = None, slot_mask: Optional[Tensor] = None,
) -> Tensor:
    """Intra-video loss over all S slots (padding included, as the authors do), mean over kept rows.

    logits: [B, S]; target: [B] int (rows with target >= S are excluded).
    bpr-max: BPR-max oriented as the task is (the leave slot y must score LOWEST): the other slots are
      weighted by w = softmax_{j != y}(-p_j), so the hard ones (scored at or below p_y) dominate;
      loss = -log(clamp(sum_j w_j sigmoid(p_j - p_y), 1e-8, 1 - 1e-8)).
    bpr-max-literal: SPEC section 6 verbatim, w = softmax_{j != y}(+p_j): the weight sits on the slots that
      are already far above p_y (the easy ones), and with the spec's position bias (a = c = 1) the loss
      starts saturated at 0 and the model never leaves the position prior (csrc_notes/../docs/model.md).
    pairwise: per-row mean over the other slots of -log sigmoid(p_j - p_y) (paper eq. 8).
    bce: per-slot BCE on real slots (slot_mask), label 1 -> 1, else 0.
    """
    dt = _math_dtype(logits)
    p = logits.to(dt)
    B, S = p.shape
    target = target.long()
    keep = target < S
    n_keep = keep.sum()
    if kind == "bce":
        if labels is None or slot_mask is None:
            raise ValueError("the bce loss needs labels and slot_mask")
        m = slot_mask.bool() & keep[:, None]
        t = (labels == 1).to(dt)
        per = torch.nn.functional.binary_cross_entropy_with_logits(p, t, reduction="none")
        per = (per * m.to(dt)).sum(1) / m.sum(1).clamp_min(1).to(dt)
    else:
        ty = target.clamp(max=S - 1)
        py = p.gather(1, ty[:, None])  # [B, 1]
        other = torch.ones_like(p, dtype=torch.bool).scatter(1, ty[:, None], False)
        diff = p - py
        if kind in ("bpr-max", "bpr-max-literal"):
            sign = -1.0 if kind == "bpr-max" else 1.0
            w = torch.softmax((sign * p).masked_fill(~other, _NEG), dim=1)
            s = (w * torch.sigmoid(diff)).sum(1)
            per = -torch.log(s.clamp(1e-8, 1 - 1e-8))
        elif kind == "pairwise":
            per = -(torch.nn.functional.logsigmoid(diff) * other.to(dt)).sum(1) / (S - 1)
        else:
            raise ValueError(f"unknown loss {kind!r}; expected bpr-max, bpr-max-literal, pairwise or bce")
    per = per * keep.to(dt)
    return per.sum() / n_keep.clamp_min(1).to(dt)


def decode_and_loss(
    x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind: str = "bpr-max",
    labels=None, slot_mask=None, offset=None, log_exposure=None,
):
    """segment_decoder (with the optional prior) followed by intra_video_loss: returns (logits [B, S], loss [])."""
    logits = segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, offset, log_exposure)
    return logits, intra_video_loss(logits, target, kind, labels, slot_mask)
