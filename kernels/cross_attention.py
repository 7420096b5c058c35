"""Fused user-video cross-attention (forward + backward) in Triton.

    out = cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=None)   # [B, H, Lq, D]

Semantics are those of ``segfast.ops.reference.cross_attention`` (docs/internals.md section 4): one softmax
over the keys of two sources, source s scored by its own queries q_s:
    logits = [q1 k1^T ; q2 k2^T] * scale (masked keys excluded), p = softmax(logits), out = p [v1 ; v2].
Either source may be None. A query whose keys are all masked gets zeros and zero gradients. Math in fp32,
output in the first present query's dtype; fp32 / fp16 / bf16 inputs (fp64 falls back to the reference).

Design (see csrc_notes/cross_attention.md):
- forward: 1-D grid over (B*H) x query tiles; a program loads its query tiles of both sources once, then
  streams key blocks of source 1 then source 2 with an online (flash) softmax in the log2 domain. The
  concatenated logits / values never exist in memory. Saves lse2 = log2-sum-exp2 of the scaled logits per
  query ([B*H, Lq] fp32) for the backward. At the paper shapes (Lq = 40 or 100, 40 + 100 keys) a program
  holds all its queries in one tile, so each (b, h) reads Q, K, V exactly once.
- backward: two kernels, no atomics (bitwise deterministic):
  1. dq: per query tile; delta = rowsum(dO * O) (stored for 2.), then loops over the key blocks of each
     source: p = exp2(s - lse2), dp = dO V^T, ds = p (dp - delta), dq_s += ds K_s.
  2. dk/dv: per key tile of one source (launched once per source); loops over all query tiles:
     dv += p^T dO, dk += ds^T q_s. Each dk/dv element is written by exactly one program.
- masked keys: logit replaced by -1e30 for the running max and p forced to 0, so a fully masked row ends
  with l = 0, output 0, lse2 = 0, and p = 0 everywhere in the backward (zero gradients), NaN-free.
- dots: on the GPU half-precision operands go to the tensor cores with fp32 accumulation (p / ds are cast to
  the input dtype for the second dot, as flash attention does); fp32 inputs use ``FP32_DOT_PRECISION``
  ("tf32x3" by default: near-fp32 accuracy on the tensor cores). In the interpreter every operand is upcast to
  fp32 (its bf16 dot is wrong).
- inputs may be strided views (e.g. [B, L, H, D] transposed to [B, H, L, D]): batch / head / row strides are
  passed, only a non-unit last-dim stride forces a copy. Outputs and gradients keep the inputs' stride order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from segfast.kernels._common import check_device, interpreting, new_like, new_output, pow2_block

# Dots on fp32 inputs (GPU): "tf32x3" (default: 3 TF32 tensor-core products, ~fp32 accuracy), "ieee" (exact
# fp32 on CUDA cores: ~5x slower and spills registers at these tiles) or "tf32" (fast, ~1e-3 relative error).
FP32_DOT_PRECISION = "tf32x3"
# Tests set e.g. {"BLOCK_M": 16, "BLOCK_N": 16} to exercise multi-tile paths on small shapes.
_FORCE_BLOCKS: Optional[dict] = None

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_source(acc, m_i, l_i, q, K, V, Mk, s_kl, s_vl, s_ml, L, qk_scale,
                offs_d, d_mask,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # acc: [BM, BD] fp32, m_i / l_i: [BM] fp32 (log2 domain), q: [BM, BD]
    # K, V: base pointers of this (b, h) source; Mk: base pointer of this b's key mask row
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)                                          # [BN]
        n_in = offs_n < L                                                                # [BN]
        kvalid = (tl.load(Mk + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in           # [BN]
        kv_mask = n_in[:, None] & d_mask[None, :]                                        # [BN, BD]
        k = tl.load(K + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(V + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale                       # [BM, BN]
        s = tl.where(kvalid[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))                                            # [BM]
        alpha = tl.exp2(m_i - m_new)                                                     # [BM]
        p = tl.where(kvalid[None, :], tl.exp2(s - m_new[:, None]), 0.0)                  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)      # [BM, BD]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q1, K1, V1, M1, Q2, K2, V2, M2, O, LSE,
    s_q1b, s_q1h, s_q1l, s_k1b, s_k1h, s_k1l, s_v1b, s_v1h, s_v1l, s_m1b, s_m1l,
    s_q2b, s_q2h, s_q2l, s_k2b, s_k2h, s_k2l, s_v2b, s_v2h, s_v2l, s_m2b, s_m2l,
    s_ob, s_oh, s_ol,
    H, LQ, L1, L2, N_MT, qk_scale,
    HAS1: tl.constexpr, HAS2: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % N_MT
    pid_bh = pid // N_MT
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                     # [BM]
    offs_d = tl.arange(0, BLOCK_D)                                                       # [BD]
    m_in = offs_m < LQ
    d_mask = offs_d < D
    q_mask = m_in[:, None] & d_mask[None, :]                                             # [BM, BD]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                                 # [BM, BD]
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)                                  # [BM]
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                                          # [BM]
    if HAS1:
        q1 = tl.load(Q1 + b * s_q1b + h * s_q1h + offs_m[:, None] * s_q1l + offs_d[None, :],
                     mask=q_mask, other=0.0)                                             # [BM, BD]
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q1,
                                    K1 + b * s_k1b + h * s_k1h, V1 + b * s_v1b + h * s_v1h, M1 + b * s_m1b,
                                    s_k1l, s_v1l, s_m1l, L1, qk_scale, offs_d, d_mask,
                                    BLOCK_N, UPCAST, PREC)
    if HAS2:
        q2 = tl.load(Q2 + b * s_q2b + h * s_q2h + offs_m[:, None] * s_q2l + offs_d[None, :],
                     mask=q_mask, other=0.0)                                             # [BM, BD]
        if UPCAST:
            q2 = q2.to(tl.float32)
        acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q2,
                                    K2 + b * s_k2b + h * s_k2h, V2 + b * s_v2b + h * s_v2h, M2 + b * s_m2b,
                                    s_k2l, s_v2l, s_m2l, L2, qk_scale, offs_d, d_mask,
                                    BLOCK_N, UPCAST, PREC)
    valid = l_i > 0.0                                                                    # [BM]
    o = acc / tl.where(valid, l_i, 1.0)[:, None]                                         # [BM, BD]
    lse2 = tl.where(valid, m_i + tl.log2(tl.where(valid, l_i, 1.0)), 0.0)                # [BM]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse2, mask=m_in)


# --------------------------------------------------------------------------------------------------------------
# backward 1: delta and dq (per query tile)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_source(q, do, lse2, delta, K, V, Mk, s_kl, s_vl, s_ml, L, qk_scale,
               offs_d, d_mask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    # q, do: [BM, BD]; lse2, delta: [BM] fp32. Returns dq / scale: [BM, BD] fp32.
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                                  # [BM, BD]
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)                                          # [BN]
        n_in = offs_n < L
        kvalid = (tl.load(Mk + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in           # [BN]
        kv_mask = n_in[:, None] & d_mask[None, :]                                        # [BN, BD]
        k = tl.load(K + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(V + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale                       # [BM, BN]
        p = tl.where(kvalid[None, :], tl.exp2(s - lse2[:, None]), 0.0)                   # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)                               # [BM, BN]
        ds = p * (dp - delta[:, None])                                                   # [BM, BN]
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)                            # [BM, BD]
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q1, K1, V1, M1, Q2, K2, V2, M2, O, DO, LSE, DELTA, DQ1, DQ2,
    s_q1b, s_q1h, s_q1l, s_k1b, s_k1h, s_k1l, s_v1b, s_v1h, s_v1l, s_m1b, s_m1l,
    s_q2b, s_q2h, s_q2l, s_k2b, s_k2h, s_k2l, s_v2b, s_v2h, s_v2l, s_m2b, s_m2l,
    s_ob, s_oh, s_ol, s_dob, s_doh, s_dol,
    s_dq1b, s_dq1h, s_dq1l, s_dq2b, s_dq2h, s_dq2l,
    H, LQ, L1, L2, N_MT, qk_scale, sm_scale,
    HAS1: tl.constexpr, HAS2: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % N_MT
    pid_bh = pid // N_MT
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                     # [BM]
    offs_d = tl.arange(0, BLOCK_D)                                                       # [BD]
    m_in = offs_m < LQ
    d_mask = offs_d < D
    q_mask = m_in[:, None] & d_mask[None, :]                                             # [BM, BD]

    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dol + offs_d[None, :],
                 mask=q_mask, other=0.0)                                                 # [BM, BD]
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
                mask=q_mask, other=0.0)                                                  # [BM, BD]
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                              # [BM]
    row = pid_bh.to(tl.int64) * LQ + offs_m                                              # [BM]
    tl.store(DELTA + row, delta, mask=m_in)
    lse2 = tl.load(LSE + row, mask=m_in, other=0.0)                                      # [BM]
    if UPCAST:
        do = do.to(tl.float32)
    if HAS1:
        q1 = tl.load(Q1 + b * s_q1b + h * s_q1h + offs_m[:, None] * s_q1l + offs_d[None, :],
                     mask=q_mask, other=0.0)                                             # [BM, BD]
        if UPCAST:
            q1 = q1.to(tl.float32)
        dq1 = _dq_source(q1, do, lse2, delta,
                         K1 + b * s_k1b + h * s_k1h, V1 + b * s_v1b + h * s_v1h, M1 + b * s_m1b,
                         s_k1l, s_v1l, s_m1l, L1, qk_scale, offs_d, d_mask,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)                        # [BM, BD]
        tl.store(DQ1 + b * s_dq1b + h * s_dq1h + offs_m[:, None] * s_dq1l + offs_d[None, :],
                 (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=q_mask)
    if HAS2:
        q2 = tl.load(Q2 + b * s_q2b + h * s_q2h + offs_m[:, None] * s_q2l + offs_d[None, :],
                     mask=q_mask, other=0.0)                                             # [BM, BD]
        if UPCAST:
            q2 = q2.to(tl.float32)
        dq2 = _dq_source(q2, do, lse2, delta,
                         K2 + b * s_k2b + h * s_k2h, V2 + b * s_v2b + h * s_v2h, M2 + b * s_m2b,
                         s_k2l, s_v2l, s_m2l, L2, qk_scale, offs_d, d_mask,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)                        # [BM, BD]
        tl.store(DQ2 + b * s_dq2b + h * s_dq2h + offs_m[:, None] * s_dq2l + offs_d[None, :],
                 (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------------------
# backward 2: dk, dv of one source (per key tile, loop over all query tiles)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mk, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_mb, s_ml,
    s_dob, s_doh, s_dol, s_dkb, s_dkh, s_dkl, s_dvb, s_dvh, s_dvl,
    H, LQ, L, N_NT, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % N_NT
    pid_bh = pid // N_NT
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                     # [BN]
    offs_d = tl.arange(0, BLOCK_D)                                                       # [BD]
    n_in = offs_n < L
    d_mask = offs_d < D
    kv_mask = n_in[:, None] & d_mask[None, :]                                            # [BN, BD]
    kvalid = (tl.load(Mk + b * s_mb + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in    # [BN]
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :],
                mask=kv_mask, other=0.0)                                                 # [BN, BD]
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :],
                mask=kv_mask, other=0.0)                                                 # [BN, BD]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * s_doh
    row_base = pid_bh.to(tl.int64) * LQ
    for start in range(0, LQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)                                           # [BM]
        m_in = offs_m < LQ
        q_mask = m_in[:, None] & d_mask[None, :]                                         # [BM, BD]
        q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=q_mask, other=0.0)     # [BM, BD]
        do = tl.load(do_base + offs_m[:, None] * s_dol + offs_d[None, :], mask=q_mask, other=0.0)  # [BM, BD]
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_in, other=0.0)                    # [BM]
        delta = tl.load(DELTA + row_base + offs_m, mask=m_in, other=0.0)                 # [BM]
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale                     # [BN, BM]
        pT = tl.where(kvalid[:, None] & m_in[None, :], tl.exp2(sT - lse2[None, :]), 0.0)  # [BN, BM]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)                          # [BN, BD]
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)                              # [BN, BM]
        dsT = pT * (dpT - delta[None, :])                                                # [BN, BM]
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)                           # [BN, BD]
    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvl + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------
def _launch_meta(LQ: int, L1: int, L2: int, D: int, fp32: bool = False) -> dict:
    """Block sizes and warps per kernel: {"fwd" | "dq" | "dkdv1" | "dkdv2": {BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps}}. One fixed config per shape (no autotune: deterministic and interpreter-safe); every dot
    dim >= 16. "dkdv*" tiles are (BLOCK_N keys of that source) x (BLOCK_M queries per loop step)."""
    BD = pow2_block(D)
    big_d = BD >= 128
    cap_m = 64 if big_d else 128
    cfg = {
        # forward: all queries of a (b, h) in one tile when Lq <= 128 (<= 64 for D > 64): Q, K, V read once.
        "fwd": {"BLOCK_M": pow2_block(LQ, 16, cap_m), "BLOCK_N": 32 if big_d else 64},
        # dq: also holds dO and a dq accumulator: 32 rows for D > 64 (no register spills on sm_90).
        "dq": {"BLOCK_M": pow2_block(LQ, 16, 32 if big_d else 128), "BLOCK_N": 32 if big_d else 64},
        # dk/dv: all keys of a source in one tile when L <= 128 (<= 64 for D > 64), loop over query tiles.
        "dkdv1": {"BLOCK_M": pow2_block(LQ, 16, 32 if big_d else 64), "BLOCK_N": pow2_block(L1, 16, cap_m)},
        "dkdv2": {"BLOCK_M": pow2_block(LQ, 16, 32 if big_d else 64), "BLOCK_N": pow2_block(L2, 16, cap_m)},
    }
    for kind, c in cfg.items():
        if _FORCE_BLOCKS:
            c.update({k: v for k, v in _FORCE_BLOCKS.items() if k in ("BLOCK_M", "BLOCK_N")})
        c["BLOCK_D"] = BD
        # fp32 live tiles per program: fwd / dq: s [BM, BN] + acc [BM, BD]; dk/dv: sT [BN, BM] + 2 x [BN, BD]
        if kind.startswith("dkdv"):
            live = c["BLOCK_N"] * (c["BLOCK_M"] + 2 * BD)
        else:
            live = c["BLOCK_M"] * (c["BLOCK_N"] + BD)
        # 8 warps when > ~96 fp32 registers per thread at 4 warps (half that for fp32 operands)
        c["num_warps"] = 8 if live * (2 if fp32 else 1) > 128 * 96 else 4
    return cfg


def _last_unit(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    return t


def _mask_u8(m: torch.Tensor) -> torch.Tensor:
    m = m if m.dtype == torch.bool else m.bool()
    return m.view(torch.uint8)


def _s3(t: Optional[torch.Tensor]):
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _s2(t: Optional[torch.Tensor]):
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _dot_prec(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


class _CrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, k1, v1, m1, q2, k2, v2, m2, scale, out_dtype):
        has1, has2 = q1 is not None, q2 is not None
        qr = q1 if has1 else q2
        kr = k1 if has1 else k2
        B, H, LQ, D = qr.shape
        L1 = k1.shape[2] if has1 else 0
        L2 = k2.shape[2] if has2 else 0
        dtype = qr.dtype
        # absent source: any present tensor stands in for its pointers (never dereferenced: HAS* constexpr)
        d_q1, d_k1, d_v1, d_m1 = (q1, k1, v1, m1) if has1 else (qr, kr, kr, m2)
        d_q2, d_k2, d_v2, d_m2 = (q2, k2, v2, m2) if has2 else (qr, kr, kr, m1)
        o = new_like(qr, dtype=out_dtype)                                           # [B, H, LQ, D]
        lse = new_output((B * H, LQ), torch.float32, qr.device)                     # [B*H, LQ]
        meta = _launch_meta(LQ, L1, L2, D, dtype == torch.float32)["fwd"]
        upcast = interpreting() or dtype == torch.float32
        prec = _dot_prec(dtype)
        qk_scale = scale * _LOG2E
        if B * H > 0 and LQ > 0:
            n_mt = triton.cdiv(LQ, meta["BLOCK_M"])
            _fwd_kernel[(B * H * n_mt,)](
                d_q1, d_k1, d_v1, d_m1, d_q2, d_k2, d_v2, d_m2, o, lse,
                *_s3(q1), *_s3(k1), *_s3(v1), *_s2(m1),
                *_s3(q2), *_s3(k2), *_s3(v2), *_s2(m2),
                *_s3(o),
                H, LQ, L1, L2, n_mt, qk_scale,
                HAS1=has1, HAS2=has2, D=D, UPCAST=upcast, PREC=prec, num_stages=2, **meta,
            )
        ctx.save_for_backward(q1, k1, v1, m1, q2, k2, v2, m2, o, lse)
        ctx.scale = scale
        ctx.has = (has1, has2)
        ctx.dims = (B, H, LQ, D, L1, L2)
        return o

    @staticmethod
    def backward(ctx, do):
        q1, k1, v1, m1, q2, k2, v2, m2, o, lse = ctx.saved_tensors
        has1, has2 = ctx.has
        B, H, LQ, D, L1, L2 = ctx.dims
        scale = ctx.scale
        qr = q1 if has1 else q2
        kr = k1 if has1 else k2
        dtype = qr.dtype
        if do.stride(-1) != 1 and D > 1:
            do = do.contiguous()
        d_q1, d_k1, d_v1, d_m1 = (q1, k1, v1, m1) if has1 else (qr, kr, kr, m2)
        d_q2, d_k2, d_v2, d_m2 = (q2, k2, v2, m2) if has2 else (qr, kr, kr, m1)
        dq1 = new_like(q1) if has1 else None
        dq2 = new_like(q2) if has2 else None
        dk1, dv1 = (new_like(k1), new_like(v1)) if has1 else (None, None)
        dk2, dv2 = (new_like(k2), new_like(v2)) if has2 else (None, None)
        delta = new_output((B * H, LQ), torch.float32, qr.device)                  # [B*H, LQ]
        metas = _launch_meta(LQ, L1, L2, D, dtype == torch.float32)
        upcast = interpreting() or dtype == torch.float32
        prec = _dot_prec(dtype)
        qk_scale = scale * _LOG2E
        BH = B * H
        if BH > 0 and LQ > 0:
            n_mt = triton.cdiv(LQ, metas["dq"]["BLOCK_M"])
            _bwd_dq_kernel[(BH * n_mt,)](
                d_q1, d_k1, d_v1, d_m1, d_q2, d_k2, d_v2, d_m2, o, do, lse, delta,
                dq1 if has1 else o, dq2 if has2 else o,
                *_s3(q1), *_s3(k1), *_s3(v1), *_s2(m1),
                *_s3(q2), *_s3(k2), *_s3(v2), *_s2(m2),
                *_s3(o), *_s3(do), *_s3(dq1), *_s3(dq2),
                H, LQ, L1, L2, n_mt, qk_scale, scale,
                HAS1=has1, HAS2=has2, D=D, UPCAST=upcast, PREC=prec, num_stages=2, **metas["dq"],
            )
        for has, q, k, v, m, dk, dv, L, meta in ((has1, q1, k1, v1, m1, dk1, dv1, L1, metas["dkdv1"]),
                                                 (has2, q2, k2, v2, m2, dk2, dv2, L2, metas["dkdv2"])):
            if not has or L == 0 or BH == 0:
                continue
            if LQ == 0:
                dk.zero_()
                dv.zero_()
                continue
            n_nt = triton.cdiv(L, meta["BLOCK_N"])
            _bwd_dkdv_kernel[(BH * n_nt,)](
                q, k, v, m, do, lse, delta, dk, dv,
                *_s3(q), *_s3(k), *_s3(v), *_s2(m),
                *_s3(do), *_s3(dk), *_s3(dv),
                H, LQ, L, n_nt, qk_scale, scale,
                D=D, UPCAST=upcast, PREC=prec, num_stages=2, **meta,
            )
        return dq1, dk1, dv1, None, dq2, dk2, dv2, None, None, None


def cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=None):
    """Fused Triton version of ``segfast.ops.reference.cross_attention`` (same arguments and result).

    q1, q2: [B, H, Lq, D]; k1, v1: [B, H, L1, D]; mask1: [B, L1] bool (True = real key); k2, v2: [B, H, L2, D];
    mask2: [B, L2]. A source may be None (all four of its arguments). Returns [B, H, Lq, D] in q's dtype.
    """
    from segfast.ops.reference import key_sources

    srcs = key_sources(q1, k1, v1, mask1, q2, k2, v2, mask2)
    floats = [t for s in srcs for t in s[:3]]
    if any(t.dtype == torch.float64 for t in floats):
        from segfast.ops import reference  # fp64 (gradcheck): the reference is the implementation
        return reference.cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=scale)
    check_device(*floats)
    out_dtype = srcs[0][0].dtype
    D = srcs[0][0].shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dtypes = {t.dtype for t in floats}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cross_attention kernel supports fp32/fp16/bf16 inputs, got {dtype}")
    ref_q = srcs[0][0]
    B, H, LQ, _ = ref_q.shape
    for q, k, v, m in srcs:
        if q.shape != ref_q.shape or k.dim() != 4 or k.shape[:2] != (B, H) or k.shape[3] != D \
                or v.shape != k.shape or tuple(m.shape) != (B, k.shape[2]):
            raise ValueError("cross_attention: expected q [B, H, Lq, D], k, v [B, H, L, D], mask [B, L]; got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(m.shape)}")
    q1, k1, v1, q2, k2, v2 = (_last_unit(t, dtype) for t in (q1, k1, v1, q2, k2, v2))
    m1 = _mask_u8(mask1) if q1 is not None else None
    m2 = _mask_u8(mask2) if q2 is not None else None
    return _CrossAttention.apply(q1, k1, v1, m1, q2, k2, v2, m2, float(scale), out_dtype)


__all__ = ["cross_attention", "FP32_DOT_PRECISION"]
