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
- backward, no atomics (bitwise deterministic), two paths chosen by ``_launch_meta``:
  fused (default when each source's keys fit one tile, <= 128, and the register model fits): ONE program per
     (b, h); per source it loads K_s, V_s once, keeps dk_s / dv_s in registers and loops over query tiles:
     sT = K q^T, pT = exp2(sT - lse2), dv += pT dO, dpT = V dO^T, dsT = pT (dpT - delta), dk += dsT q,
     dq_s = dsT^T K stored at once (q_s meets only source s's keys). delta = rowsum(dO * O) per tile.
  split (fallback: long sources, D >= 64, fp32, or sm_80):
  1. dq: per query tile; delta = rowsum(dO * O) (stored for 2.), then loops over the key blocks of each
     source: p = exp2(s - lse2), dp = dO V^T, ds = p (dp - delta), dq_s += ds K_s.
  2. dk/dv: per key tile of one source (launched once per source); loops over all query tiles:
     dv += p^T dO, dk += ds^T q_s. Each dk/dv element is written by exactly one program.
- padded keys are never loaded: key loops stop after the last real key of the row (mask scan) and K / V loads
  are masked with the key mask.
- masked keys: logit replaced by -1e30 for the running max and p forced to 0, so a fully masked row ends
  with l = 0, output 0, lse2 = 0, and p = 0 everywhere in the backward (zero gradients), NaN-free.
- dots: on the GPU half-precision operands go to the tensor cores with fp32 accumulation (p / ds are cast to
  the input dtype for the second dot, as flash attention does); fp32 inputs use ``FP32_DOT_PRECISION``
  ("tf32x3" by default: near-fp32 accuracy on the tensor cores). In the interpreter every operand is upcast to
  fp32 (its bf16 dot is wrong) unless a test sets ``_INTERPRETER_UPCAST = False`` (the GPU path, for fp16).
- tiles / warps: a register model calibrated on sm_90 / sm_80 cubins (``_launch_meta``); csrc_notes.
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
# Backward path: None = automatic (the one-kernel "fused" backward whenever each source's keys fit one tile,
# else the "split" dq + dk/dv kernels); tests force either.
_BACKWARD: Optional[str] = None
# In the interpreter fp16 / bf16 operands are upcast to fp32 (its bf16 dot is wrong). Tests set False to run
# the GPU path (native half-precision dots, p / ds cast to the input dtype) with fp16, which it computes right.
_INTERPRETER_UPCAST = True

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _n_keys(Mk, s_ml, L, BLOCK_N: tl.constexpr):
    # 1 + index of the last real key of this row (0 when none): loops stop there, padded tails are skipped
    n = 0
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)                                          # [BN]
        mv = tl.load(Mk + offs_n * s_ml, mask=offs_n < L, other=0)                       # [BN]
        n = tl.maximum(n, tl.max(tl.where(mv != 0, offs_n + 1, 0), 0))
    return n


@triton.jit
def _fwd_source(acc, m_i, l_i, q, K, V, Mk, s_kl, s_vl, s_ml, L, qk_scale,
                offs_d, d_mask,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # acc: [BM, BD] fp32, m_i / l_i: [BM] fp32 (log2 domain), q: [BM, BD]
    # K, V: base pointers of this (b, h) source; Mk: base pointer of this b's key mask row
    n_keys = _n_keys(Mk, s_ml, L, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)                                          # [BN]
        n_in = offs_n < n_keys                                                           # [BN]
        kvalid = (tl.load(Mk + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in           # [BN]
        kv_mask = kvalid[:, None] & d_mask[None, :]                                      # [BN, BD] (no pad loads)
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
    n_keys = _n_keys(Mk, s_ml, L, BLOCK_N)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)                                          # [BN]
        n_in = offs_n < n_keys
        kvalid = (tl.load(Mk + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in           # [BN]
        kv_mask = kvalid[:, None] & d_mask[None, :]                                      # [BN, BD] (no pad loads)
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
    kl_mask = kvalid[:, None] & d_mask[None, :]                                          # [BN, BD] (no pad loads)
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :],
                mask=kl_mask, other=0.0)                                                 # [BN, BD]
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :],
                mask=kl_mask, other=0.0)                                                 # [BN, BD]
    q_end = LQ * tl.max(kvalid.to(tl.int32), 0)                                          # 0: no real key here
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_dob + h * s_doh
    row_base = pid_bh.to(tl.int64) * LQ
    for start in range(0, q_end, BLOCK_M):
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
# backward, fused: one program per (b, h) computes dq, dk, dv of both sources (each source's keys in one tile)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_fused_source(Q, K, V, Mk, O, DO, LSE, DQ, DK, DV,
                      s_ql, s_kl, s_vl, s_ml, s_ol, s_dol, s_dql, s_dkl, s_dvl,
                      LQ, L, qk_scale, sm_scale, offs_d, d_mask,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr):
    # Every pointer is already offset to this (b, h) (LSE to its row of [B*H, LQ]). All L keys of the source
    # are one tile (L <= BLOCK_N): dk / dv accumulate over the query tiles in registers, and each query tile's
    # dq_s is complete after this one pass (q_s meets no other source's keys), so it is stored right away.
    offs_n = tl.arange(0, BLOCK_N)                                                       # [BN]
    n_in = offs_n < L
    kvalid = (tl.load(Mk + offs_n * s_ml, mask=n_in, other=0) != 0) & n_in               # [BN]
    kl_mask = kvalid[:, None] & d_mask[None, :]                                          # [BN, BD] (no pad loads)
    k = tl.load(K + offs_n[:, None] * s_kl + offs_d[None, :], mask=kl_mask, other=0.0)   # [BN, BD]
    v = tl.load(V + offs_n[:, None] * s_vl + offs_d[None, :], mask=kl_mask, other=0.0)   # [BN, BD]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                                  # [BN, BD]
    for start in range(0, LQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)                                           # [BM]
        m_in = offs_m < LQ
        q_mask = m_in[:, None] & d_mask[None, :]                                         # [BM, BD]
        q = tl.load(Q + offs_m[:, None] * s_ql + offs_d[None, :], mask=q_mask, other=0.0)      # [BM, BD]
        do = tl.load(DO + offs_m[:, None] * s_dol + offs_d[None, :], mask=q_mask, other=0.0)   # [BM, BD]
        o = tl.load(O + offs_m[:, None] * s_ol + offs_d[None, :], mask=q_mask, other=0.0)      # [BM, BD]
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                          # [BM]
        lse2 = tl.load(LSE + offs_m, mask=m_in, other=0.0)                               # [BM]
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # transposed (keys on the rows): k, v, dk, dv are split over the warps, not replicated
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale                     # [BN, BM]
        pT = tl.where(kvalid[:, None] & m_in[None, :], tl.exp2(sT - lse2[None, :]), 0.0)  # [BN, BM]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)                          # [BN, BD]
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)                              # [BN, BM]
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)                                  # [BN, BM]
        dk += tl.dot(dsT, q, input_precision=PREC)                                       # [BN, BD]
        dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)                              # [BM, BD]
        tl.store(DQ + offs_m[:, None] * s_dql + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=q_mask)
    kv_mask = n_in[:, None] & d_mask[None, :]                                            # [BN, BD]
    tl.store(DK + offs_n[:, None] * s_dkl + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + offs_n[:, None] * s_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_fused_kernel(
    Q1, K1, V1, M1, Q2, K2, V2, M2, O, DO, LSE, DQ1, DK1, DV1, DQ2, DK2, DV2,
    s_q1b, s_q1h, s_q1l, s_k1b, s_k1h, s_k1l, s_v1b, s_v1h, s_v1l, s_m1b, s_m1l,
    s_q2b, s_q2h, s_q2l, s_k2b, s_k2h, s_k2l, s_v2b, s_v2h, s_v2l, s_m2b, s_m2l,
    s_ob, s_oh, s_ol, s_dob, s_doh, s_dol,
    s_dq1b, s_dq1h, s_dq1l, s_dk1b, s_dk1h, s_dk1l, s_dv1b, s_dv1h, s_dv1l,
    s_dq2b, s_dq2h, s_dq2l, s_dk2b, s_dk2h, s_dk2l, s_dv2b, s_dv2h, s_dv2l,
    H, LQ, L1, L2, qk_scale, sm_scale,
    HAS1: tl.constexpr, HAS2: tl.constexpr, D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)                                                       # [BD]
    d_mask = offs_d < D
    o_base = O + b * s_ob + h * s_oh
    do_base = DO + b * s_dob + h * s_doh
    lse_base = LSE + pid_bh.to(tl.int64) * LQ
    if HAS1:
        _bwd_fused_source(Q1 + b * s_q1b + h * s_q1h, K1 + b * s_k1b + h * s_k1h, V1 + b * s_v1b + h * s_v1h,
                          M1 + b * s_m1b, o_base, do_base, lse_base,
                          DQ1 + b * s_dq1b + h * s_dq1h, DK1 + b * s_dk1b + h * s_dk1h,
                          DV1 + b * s_dv1b + h * s_dv1h,
                          s_q1l, s_k1l, s_v1l, s_m1l, s_ol, s_dol, s_dq1l, s_dk1l, s_dv1l,
                          LQ, L1, qk_scale, sm_scale, offs_d, d_mask,
                          BLOCK_M1, BLOCK_N1, BLOCK_D, UPCAST, PREC)
    if HAS2:
        _bwd_fused_source(Q2 + b * s_q2b + h * s_q2h, K2 + b * s_k2b + h * s_k2h, V2 + b * s_v2b + h * s_v2h,
                          M2 + b * s_m2b, o_base, do_base, lse_base,
                          DQ2 + b * s_dq2b + h * s_dq2h, DK2 + b * s_dk2b + h * s_dk2h,
                          DV2 + b * s_dv2b + h * s_dv2h,
                          s_q2l, s_k2l, s_v2l, s_m2l, s_ol, s_dol, s_dq2l, s_dk2l, s_dv2l,
                          LQ, L2, qk_scale, sm_scale, offs_d, d_mask,
                          BLOCK_M2, BLOCK_N2, BLOCK_D, UPCAST, PREC)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------
# Register model for choosing tiles and warps (calibrated on sm_90 cubins, see csrc_notes/cross_attention.md):
# estimated 32-bit registers per thread = sum over a kernel's live tiles of (elements x weight) / threads, with
# weight 1 for fp32 accumulators / score tiles, 0.5 for fp16 / bf16 dot operands (two per register) and 2.5 for
# fp32 operands (tf32x3 splits each into big + small parts). A config is taken when the estimate is <= the
# budget: 128 registers keeps 16 warps resident per SM (65536 registers) and leaves ptxas headroom below 255.
# Before sm_90 (no wgmma: dot operands live in registers, tf32x3 keeps both fp32 halves there too) the operand
# weights are 1 (fp16 / bf16) and 8 (fp32), programs have 4 warps and the budget is 160 (calibrated on sm_80
# cubins, where the sm_90 choices spilled); fp32 loop tiles stay >= 32 there (16-wide tf32x3 dots spilled).
# fp32 dk/dv query tiles are at most 32 rows on every card (64 spilled with a 1-key source).
_REG_BUDGET = 128


def _op_weight(fp32: bool, arch: int = 90) -> float:
    if arch >= 90:
        return 2.5 if fp32 else 0.5
    return 8.0 if fp32 else 1.0


def _budget(arch: int) -> int:
    return _REG_BUDGET if arch >= 90 else 160


def _warps(arch: int) -> tuple:
    # sm_80: ptxas often caps 8-warp programs at 128 registers and spills a few bytes; 4 warps never did
    return (4, 8) if arch >= 90 else (4,)


def _arch(t: torch.Tensor) -> int:
    """Compute capability as 90 / 80 of the tensor's GPU; 90 (the cards we target) in the interpreter."""
    if interpreting():
        return 90
    major, minor = torch.cuda.get_device_capability(t.device if t.device.type == "cuda" else None)
    return 10 * major + minor


def _est_fwd(BM, BN, BD, op):  # acc, s and p, q, k and v
    return BM * BD + 2 * BM * BN + BM * BD * op + 2 * BN * BD * op


def _est_dq(BM, BN, BD, op):  # dq acc, s / p / dp, q and dO, k and v
    return BM * BD + 2 * BM * BN + 2 * BM * BD * op + 2 * BN * BD * op


def _est_dkdv(BM, BN, BD, op):  # dk and dv acc, sT / pT / dsT, k and v, q and dO
    return 2 * BN * BD + 3 * BM * BN + 2 * BN * BD * op + 2 * BM * BD * op


def _est_fused(BM, BN, BD, op):
    # dk and dv acc, dq, the [BN, BM] tiles x 8 (sT, pT, dpT, dsT live together, plus dsT transposed for the dq
    # dot and both sources' code in one kernel: calibrated on the cubins), k and v, q / dO / O
    return 2 * BN * BD + BM * BD + 8 * BM * BN + 2 * BN * BD * op + 3 * BM * BD * op


def _fit(est, outer, inner, BD, op, budget=_REG_BUDGET, min_inner=16, warps=(4, 8)):
    """(outer, inner, warps) for a kernel whose grid tile is `outer` and loop tile `inner`: 4 warps if the
    estimate fits the budget, else 8; if neither, halve the loop tile (down to min_inner), then the grid
    tile (down to 16)."""
    inner = max(inner, min_inner)
    while True:
        for w in warps:
            if est(outer, inner, BD, op) <= budget * 32 * w:
                return outer, inner, w
        if inner > min_inner:
            inner //= 2
        elif outer > 16:
            outer //= 2
        else:
            return outer, inner, 8  # nothing fits (fp32 operands at D >= 128): smallest tiles, 8 warps


def _launch_meta(LQ: int, L1: int, L2: int, D: int, fp32: bool = False, arch: int = 90) -> dict:
    """Block sizes and warps per kernel: {"fwd" | "dq" | "dkdv1" | "dkdv2": {BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps}, "fused": {BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, BLOCK_D, num_warps} or None when the keys of a
    source do not fit one tile}. One fixed config per shape (no autotune: deterministic and interpreter-safe);
    every dot dim >= 16. "dkdv*" tiles are (BLOCK_N keys of that source) x (BLOCK_M queries per loop step)."""
    BD = pow2_block(D)
    op = _op_weight(fp32, arch)
    budget = _budget(arch)
    big_d = BD >= 128
    cap_m = 64 if big_d else 128
    force = _FORCE_BLOCKS or {}
    fm, fn = force.get("BLOCK_M"), force.get("BLOCK_N")
    cfg = {}
    # forward / dq: all queries of a (b, h) in one tile when Lq <= 128 (64 for D > 64): Q, K, V read once
    for kind, est in (("fwd", _est_fwd), ("dq", _est_dq)):
        BM, BN, w = _fit(est, pow2_block(LQ, 16, cap_m), 32 if big_d else 64, BD, op, budget,
                         32 if fp32 and arch < 90 else 16, _warps(arch))
        cfg[kind] = {"BLOCK_M": fm or BM, "BLOCK_N": fn or BN, "BLOCK_D": BD, "num_warps": w}
    # dk/dv (fallback): all keys of a source in one tile when L <= 128 (64 for D > 64), loop over query tiles
    for kind, L in (("dkdv1", L1), ("dkdv2", L2)):
        BN, BM, w = _fit(lambda n, m, d, o: _est_dkdv(m, n, d, o), pow2_block(L, 16, cap_m),
                         pow2_block(LQ, 16, 32 if fp32 else 64), BD, op, budget, 32 if fp32 and arch < 90 else 16,
                         _warps(arch))
        cfg[kind] = {"BLOCK_M": fm or BM, "BLOCK_N": fn or BN, "BLOCK_D": BD, "num_warps": w}
    cfg["fused"] = _fused_meta(LQ, L1, L2, BD, op, fm, budget=budget, arch=arch)
    if cfg["fused"] is None and _BACKWARD == "fused":
        cfg["fused"] = _fused_meta(LQ, L1, L2, BD, op, fm, forced=True)
    return cfg


def _fused_meta(LQ, L1, L2, BD, op, force_m=None, forced=False, budget=_REG_BUDGET, arch=90) -> Optional[dict]:
    """One program per (b, h): each source's keys in ONE tile (BLOCK_N_s >= L_s, at most 128), query tiles of
    BLOCK_M_s rows in a loop. 4 warps unless that forces query tiles below min(Lq, 32) rows; None when a
    source has more than 128 keys or even 16-row query tiles at 8 warps exceed the register budget (unless
    `forced`: then 16-row tiles at 8 warps, correct but expected to spill)."""
    BN = [pow2_block(L, 16) for L in (L1, L2)]
    if max(BN) > 128 or BD > 128:
        return None
    if forced:
        m = force_m or 16
        return {"BLOCK_M1": m, "BLOCK_N1": BN[0], "BLOCK_M2": m, "BLOCK_N2": BN[1], "BLOCK_D": BD, "num_warps": 8}
    if arch < 90 or op >= 1:
        # sm_80: the fused tiles land at 176-255 registers at 8 warps (the split kernels fit 4 warps); fp32
        # operands (tf32x3) spilled in the fused kernel on sm_90 (176 B with a 1-key source): split kernels
        return None
    top = pow2_block(LQ, 16, 128)
    for w in (4, 8):
        BMs = []
        for n in BN:
            m = top
            while m > 16 and _est_fused(m, n, BD, op) > budget * 32 * w:
                m //= 2
            BMs.append(m if _est_fused(m, n, BD, op) <= budget * 32 * w else 0)
        if min(BMs) >= min(top, 32) or (w == 8 and min(BMs) >= 16):  # 0 in BMs: a source does not fit
            if force_m:
                BMs = [force_m, force_m]
            meta = {"BLOCK_M1": BMs[0], "BLOCK_N1": BN[0], "BLOCK_M2": BMs[1], "BLOCK_N2": BN[1],
                    "BLOCK_D": BD, "num_warps": w}
            if arch >= 90 and w == 8 and op < 1 and max(BN) == 128 and BD <= 32:
                # fp16 / bf16 with a 128-key source (the presets' 100 user keys): ptxas lands at up to 130
                # registers on sm_90; capped at 128, two programs (16 warps) stay resident per SM, no spill
                # (checked on the cubins; with a 1-key source the cap spilled 40 B, so it is not applied there)
                meta["maxnreg"] = 128
            return meta
    return None


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


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (interpreting() and _INTERPRETER_UPCAST)


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
        arch = _arch(qr)
        meta = _launch_meta(LQ, L1, L2, D, dtype == torch.float32, arch)["fwd"]
        upcast = _upcast(dtype)
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
        ctx.arch = arch  # the backward may run on autograd's device thread: decide the card once, here
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
        arch = ctx.arch
        metas = _launch_meta(LQ, L1, L2, D, dtype == torch.float32, arch)
        upcast = _upcast(dtype)
        prec = _dot_prec(dtype)
        qk_scale = scale * _LOG2E
        BH = B * H
        path = _BACKWARD or ("fused" if metas["fused"] is not None else "split")
        if path not in ("fused", "split"):
            raise ValueError(f"cross_attention: _BACKWARD must be None, 'fused' or 'split', got {path!r}")
        if path == "fused" and metas["fused"] is None:
            raise ValueError(f"cross_attention: the fused backward needs <= 128 keys per source and D <= 128, "
                             f"got L1={L1}, L2={L2}, D={D}")
        if BH == 0:
            pass
        elif LQ == 0:
            for t in (dk1, dv1, dk2, dv2):
                if t is not None:
                    t.zero_()
        elif path == "fused":
            _bwd_fused_kernel[(BH,)](
                d_q1, d_k1, d_v1, d_m1, d_q2, d_k2, d_v2, d_m2, o, do, lse,
                *((dq1, dk1, dv1) if has1 else (o, o, o)), *((dq2, dk2, dv2) if has2 else (o, o, o)),
                *_s3(q1), *_s3(k1), *_s3(v1), *_s2(m1),
                *_s3(q2), *_s3(k2), *_s3(v2), *_s2(m2),
                *_s3(o), *_s3(do),
                *_s3(dq1), *_s3(dk1), *_s3(dv1), *_s3(dq2), *_s3(dk2), *_s3(dv2),
                H, LQ, L1, L2, qk_scale, scale,
                HAS1=has1, HAS2=has2, D=D, UPCAST=upcast, PREC=prec, num_stages=2, **metas["fused"],
            )
        else:
            delta = new_output((BH, LQ), torch.float32, qr.device)                  # [B*H, LQ]
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
                if not has or L == 0:
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
