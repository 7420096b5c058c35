"""The two-source cross-attention through PyTorch's fused attention (``backend="sdpa"``).

    out = cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=None)   # [B, H, Lq, D]

Same arguments and result as ``segfast.ops.reference.cross_attention`` (docs/internals.md section 4): one
softmax over the keys of two sources, source s scored by its own queries q_s. With both sources present the
call is one ``torch.nn.functional.scaled_dot_product_attention`` over a single key axis:

    Q = [q1, q2]                      [B, H, Lq, 2D]   (queries concatenated along the head dimension)
    K = [[k1, 0], [0, k2]]            [B, H, L1 + L2, 2D]  (block-diagonal: a key of source s only sees q_s)
    V = [[v1, 0] ; [v2, 0]]           [B, H, L1 + L2, 2D]  (values concatenated along the key axis, zero-padded)
    attn_mask = [mask1, mask2]        [B, 1, 1, L1 + L2] bool (True = the key takes part)
    scale = 1 / sqrt(D)               (the head dimension of ONE source, passed explicitly: SDPA would use 2D)
    out = SDPA(Q, K, V)[..., :D]

so Q K^T = [q1 k1^T, q2 k2^T], exactly the reference's concatenated logits. The values are padded to the
queries' head dimension because SDPA's flash kernels (the CPU one included) need q, k and v of one head
dimension; with V of width D the call runs SDPA's unfused math kernel, 2.5-14x slower on CPU for forward +
backward at the model's shapes (measured on the 2-core box). With one source absent the call is plain SDPA on
the other one.

A query whose keys are all masked gets zeros (the reference's contract). SDPA gives NaN (or, in some kernels,
a uniform average) for a fully masked row, so those rows are handled explicitly: their mask is opened to
every key (a finite, harmless softmax) and their output is replaced by 0 through ``torch.where``, which also
zeroes their gradient; no NaN exists in the forward or the backward. The mask is per (batch row, key), so a
batch row is either fully masked for all its queries or for none.

Gradients come from autograd (SDPA's own backward). Math follows SDPA for the inputs' dtype (fp32 / fp16 /
bf16; fp64 works too, through SDPA's math kernel, for gradcheck); inputs of mixed dtypes are promoted.
The output is in the first present query's dtype, as in the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_attention"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(srcs) -> tuple:
    ref_q = srcs[0][0]
    if ref_q.dim() != 4:
        raise ValueError(f"cross_attention: expected q [B, H, Lq, D], got {tuple(ref_q.shape)}")
    B, H, _, D = ref_q.shape
    for q, k, v, m in srcs:
        if q.shape != ref_q.shape or k.dim() != 4 or k.shape[:2] != (B, H) or k.shape[3] != D \
                or v.shape != k.shape or m.dim() != 2 or tuple(m.shape) != (B, k.shape[2]):
            raise ValueError("cross_attention: expected q [B, H, Lq, D], k, v [B, H, L, D], mask [B, L]; got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(m.shape)}")
        for t in (q, k, v):
            if t.dtype not in _FLOATS:
                raise TypeError(f"cross_attention: expected fp32 / fp16 / bf16 / fp64 q, k, v, got {t.dtype}")
    return B, H, D


def cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=None) -> Tensor:
    """SDPA version of ``segfast.ops.reference.cross_attention`` (same arguments and result)."""
    from segfast.ops.reference import key_sources

    srcs = key_sources(q1, k1, v1, mask1, q2, k2, v2, mask2)
    B, H, D = _check(srcs)
    out_dtype = srcs[0][0].dtype
    dt = srcs[0][0].dtype
    for s in srcs:
        for t in s[:3]:
            dt = torch.promote_types(dt, t.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    if len(srcs) == 1:
        q, k, v, m = srcs[0]
        q, k, v, mask = q.to(dt), k.to(dt), v.to(dt), m.bool()
    else:
        (q1, k1, v1, m1), (q2, k2, v2, m2) = srcs
        q1, k1, v1, q2, k2, v2 = (t.to(dt) for t in (q1, k1, v1, q2, k2, v2))
        q = torch.cat([q1, q2], dim=-1)                                                  # [B, H, Lq, 2D]
        k = torch.cat([F.pad(k1, (0, D)), F.pad(k2, (D, 0))], dim=-2)                    # [B, H, L1+L2, 2D]
        # values zero-padded to 2D (output sliced back to D): the flash kernels need equal q / k / v head dims,
        # without them SDPA falls back to its unfused math kernel (CPU: 2.5-14x slower with the backward)
        v = F.pad(torch.cat([v1, v2], dim=-2), (0, D))                                   # [B, H, L1+L2, 2D]
        mask = torch.cat([m1.bool(), m2.bool()], dim=-1)                                 # [B, L1+L2]

    any_valid = mask.any(dim=-1)                                                         # [B]
    # on CPU the check is free (no device sync): skip the two extra passes when every row has a key
    fix = mask.device.type != "cpu" or not bool(any_valid.all())
    if fix:  # open the fully masked rows to every key (finite softmax), then zero their output below
        mask = mask | ~any_valid[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=float(scale))
    if out.shape[-1] != D:
        out = out[..., :D]
    if fix:
        out = torch.where(any_valid[:, None, None, None], out, out.new_zeros(()))
    return out.to(out_dtype)
