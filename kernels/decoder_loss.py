"""Fused segment decoder + position bias + intra-video loss (SPEC sections 5-6), with its gradients.

Two Triton kernels:

``_decoder_kernel`` (one program per *block* of ``BLOCK_B`` videos x ``BLOCK_S`` slots; no persistent loop),
three uses chosen by constexpr flags:

* scoring      (``segment_decoder`` without grad): logits only; no partial buffers at all.
* training     (``decode_and_loss``): logits, per-row loss (bpr-max / pairwise), dlogits, dx, dy and the small
  weight gradients dw_x, dw_y, dbias, dpos_a, dpos_c as *per-block* partial rows (``[n_blocks, d]``,
  ``[n_blocks, S]``, ``[n_blocks]``), each written exactly once by its block (store only, never read back by
  the kernel), summed by torch afterwards in a fixed order (deterministic, no atomics).
* chain        (backward through the logits): the gradient of the logits ``G [B, S]`` is given; the kernel
  skips the forward and writes the same input / weight gradients for that ``G``.

``_dfusion_kernel``: the fusion-weight gradient ``dW_h = X_h^T diag(g) Y_h`` summed over all (row, slot) pairs,
as a split-K GEMM over the pairs: program (split, tile) owns one ``[BKW, BNW]`` tile of one head and a fixed
contiguous range of pairs, accumulates in registers and stores its tile once into ``[n_splits, Hf, k, n]``;
torch sums the splits (fixed order). No program ever reads a buffer another thread wrote.

Each bilinear product is computed once per block: the forward computes ``T = x_h W_h`` (for the logits) and
parks ``w_y + T`` in the dy output buffer (input dtype); after ``tl.debug_barrier()`` the gradient phase reloads
it and writes ``dy = g * (w_y + T)`` over it. ``U = y_h W_h^T`` is computed once for ``dx = g (w_x + U)``. In the
chain mode (no forward) T is computed in the gradient phase, once.

Dots take their operands in the input dtype (bf16 / fp16 on the GPU: tensor cores, fp32 accumulation; W is cast
to that dtype once on the host; fp32 inputs use tf32 per ``DOT_PRECISION``). The interpreter computes bf16 dots
wrongly, so when interpreting the operands are first rounded to the input dtype and then upcast to fp32: the
products are the same exact products the GPU forms, so the interpreter sees the GPU's numerics. fp16 dots are
right in the interpreter; ``INTERPRET_NATIVE_FP16`` (tests) runs the fp16 GPU path there without any upcast.

Autograd: ``decode_and_loss`` runs the training kernels in the forward and saves the gradients (already scaled
by 1 / n_kept); the backward multiplies them by ``grad_loss``. When the logits output also receives a gradient,
the backward instead launches the chain kernels once with ``G = grad_loss * dlogits + grad_logits`` (dlogits is
kept from the forward), which gives the exact total gradient. ``segment_decoder`` with autograd enabled and an
input that requires grad goes through an autograd Function whose backward is the chain kernel.

Position prior (the model's ``prior`` option): ``offset`` [B, S] or ``log_exposure`` [S], constexpr ``PRIOR``,
applied after the position bias and before the loss (q = p + offset, or q = logsigmoid(p) + log_exposure); the
logits returned are q. csrc_notes/decoder_loss.md, "Position prior".

float64 inputs (gradcheck) fall back to the frozen reference (``segfast.ops.reference``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import interpreting as _interpreting
from ._common import poison_enabled as _poison_enabled

__all__ = ["segment_decoder", "decode_and_loss", "POISON_OUTPUTS", "DOT_PRECISION", "LOSS_KINDS", "TUNE",
           "INTERPRET_NATIVE_FP16"]

# Tests set this: output buffers (logits, dx, dy) start as NaN instead of uninitialised memory, so that an
# element the kernel forgets to write shows up.
POISON_OUTPUTS = False
# tl.dot input precision on the GPU for fp32 inputs: "tf32" (fast, ~1e-3 relative) or "ieee" (exact fp32,
# several times slower). 16-bit inputs use native 16-bit dots. The interpreter always computes in exact fp32.
DOT_PRECISION = "tf32"
# Test-only: run the fp16 GPU path (native fp16 tl.dot operands, no upcast) in the interpreter, whose fp16 dots
# are correct (its bf16 dots are not, so bf16 is always upcast there).
INTERPRET_NATIVE_FP16 = False
LOSS_KINDS = {"bpr-max": 1, "bpr-max-literal": 1, "pairwise": 2}
# bpr-max weights the other slots by softmax(WSIGN * p): -1 = bpr-max (hard others, the default), +1 = the
# SPEC section 6 formula verbatim (see segfast.ops.reference.intra_video_loss).
_WSIGN = {"bpr-max": -1.0, "bpr-max-literal": 1.0, "pairwise": 1.0}
MAX_S = 128  # slots per row held in one tile (S = 40 normally; tested up to 64)
# GPU tuning overrides merged into the launch config (keys: BLOCK_B, BK, BN, BKD, BND, num_warps, BKW, BNW, BP,
# dw_warps, n_splits; an unknown key raises); empty = the defaults of ``_config``. For benchmarking block sizes.
TUNE: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# --------------------------------------------------------------------------------------------------------------
# the kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _operand(t, DT: tl.constexpr, UPCAST: tl.constexpr):
    """A tl.dot operand: rounded to the compute dtype DT; upcast to fp32 afterwards when UPCAST (interpreter)."""
    t = t.to(DT)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _decoder_kernel(
    X, Y, WX, WY, BIAS, W, PA, PC, TGT, G, NKEEP,          # inputs (dummies where absent)
    OFF, LEXP,                                              # position prior: offset [B, S] / log-exposure [S]
    LOGITS, DLOG, DQ, DX, DY,                               # per-pair outputs
    DWX_P, DWY_P, DB_P, DPC_P, LOSS_P,                      # per-block partials, each written once
    B, S, DXD, DYD, KH, NH,
    sxb, sxs, sxd, syb, sys, syd,
    sdxb, sdxs, sdxd, sdyb, sdys, sdyd,
    HAS_X: tl.constexpr, HAS_Y: tl.constexpr, FUSION: tl.constexpr, HF: tl.constexpr,
    HAS_POS: tl.constexpr, COMPUTE_LOGITS: tl.constexpr, LOSS: tl.constexpr, GRADS: tl.constexpr,
    WSIGN: tl.constexpr, PRIOR: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    BKD: tl.constexpr, BND: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    # Chunks: x_h W_h (forward, chain dy) is accumulated [M, BN] wide over BK-wide x chunks; y_h W_h^T (dx) is
    # accumulated [M, BKD] wide over BND-wide y chunks (wide accumulators = fewer re-reads of the other operand).
    # LOSS: 0 = none (G given when GRADS), 1 = bpr-max (weights softmax(WSIGN * p)), 2 = pairwise.
    # HF is the number of fusion heads when FUSION, else 1 (then KH = DXD and NH = DYD).
    # PRIOR (with COMPUTE_LOGITS): 0 = none; 1 = q = p + OFF; 2 = q = logsigmoid(p) + LEXP. The logits output and
    # the loss are q; DLOG gets dL/dp (what the weight gradients and the dW kernel need); with PRIOR 2 also
    # DQ = dL/dq (= dL/dp for PRIOR 1). The chain mode takes G = dL/dp.
    # The dot operand dtype is the fusion weight's (W is cast to the input dtype on the host).
    DT: tl.constexpr = W.dtype.element_ty
    M: tl.constexpr = BLOCK_B * BLOCK_S
    blk = tl.program_id(0)

    offs_m = tl.arange(0, M)                      # [M] pair index inside the block
    ss = offs_m % BLOCK_S                         # [M] slot
    bb = offs_m // BLOCK_S                        # [M] video inside the block
    offs_k = tl.arange(0, BK)                     # [BK]
    offs_n = tl.arange(0, BN)                     # [BN]
    s2 = tl.arange(0, BLOCK_S)[None, :]           # [1, BLOCK_S]
    b2 = tl.arange(0, BLOCK_B)[:, None]           # [BLOCK_B, 1]

    row = blk * BLOCK_B + bb                      # [M]
    pair_ok = (ss < S) & (row < B)                # [M]
    row64 = row.to(tl.int64)
    ss64 = ss.to(tl.int64)
    x_row = row64 * sxb + ss64 * sxs              # [M] int64 offsets
    y_row = row64 * syb + ss64 * sys
    dy_row = row64 * sdyb + ss64 * sdys
    row2 = blk * BLOCK_B + b2                     # [BLOCK_B, 1]
    ok2 = (s2 < S) & (row2 < B)                   # [BLOCK_B, BLOCK_S]
    out2 = row2.to(tl.int64) * S + s2             # [BLOCK_B, BLOCK_S] offsets in [B, S]

    # ---------------------------------------------------------------- forward: logits
    if COMPUTE_LOGITS:
        logit = tl.zeros([M], dtype=tl.float32)                                   # [M]
        if HAS_X:
            for kc in range(0, DXD, BK):
                cols = kc + offs_k                                                # [BK]
                cm = cols < DXD
                xt = tl.load(X + x_row[:, None] + cols[None, :].to(tl.int64) * sxd,
                             mask=pair_ok[:, None] & cm[None, :], other=0.0).to(tl.float32)    # [M, BK]
                wv = tl.load(WX + cols, mask=cm, other=0.0).to(tl.float32)        # [BK]
                logit += tl.sum(xt * wv[None, :], axis=1)
        if HAS_Y:
            for h in range(HF):
                for nc in range(0, NH, BN):
                    ncol = nc + offs_n                                            # [BN] inside head h
                    nm = ncol < NH
                    ycol = (h * NH + ncol).to(tl.int64)
                    t = tl.zeros([M, BN], dtype=tl.float32)                       # [M, BN] = x_h @ W_h
                    if FUSION:
                        for kc in range(0, KH, BK):
                            kcol = kc + offs_k                                    # [BK] inside head h
                            km = kcol < KH
                            xt = _operand(tl.load(X + x_row[:, None] + (h * KH + kcol)[None, :].to(tl.int64) * sxd,
                                                  mask=pair_ok[:, None] & km[None, :], other=0.0), DT, UPCAST)
                            wt = _operand(tl.load(W + h * KH * NH + kcol[:, None] * NH + ncol[None, :],
                                                  mask=km[:, None] & nm[None, :], other=0.0), DT, UPCAST)
                            t = tl.dot(xt, wt, t, input_precision=PREC)
                    t += tl.load(WY + ycol, mask=nm, other=0.0).to(tl.float32)[None, :]      # w_y + x_h W_h
                    yt = tl.load(Y + y_row[:, None] + ycol[None, :] * syd,
                                 mask=pair_ok[:, None] & nm[None, :], other=0.0).to(tl.float32)  # [M, BN]
                    logit += tl.sum(t * yt, axis=1)
                    if GRADS:
                        if FUSION:
                            # park w_y + x_h W_h in dy (input dtype); scaled by g after the loss
                            tl.store(DY + dy_row[:, None] + ycol[None, :] * sdyd, t.to(DY.dtype.element_ty),
                                     mask=pair_ok[:, None] & nm[None, :])
        logit += tl.load(BIAS).to(tl.float32)
        if HAS_POS:
            pa = tl.load(PA + ss, mask=ss < S, other=0.0).to(tl.float32)          # [M]
            pc = tl.load(PC + ss, mask=ss < S, other=0.0).to(tl.float32)
            logit += (ss + 1).to(tl.float32) * pa + pc
        p2 = tl.reshape(logit, (BLOCK_B, BLOCK_S))                                # [BLOCK_B, BLOCK_S] raw
        if PRIOR == 1:
            p2 = p2 + tl.load(OFF + out2, mask=ok2, other=0.0).to(tl.float32)
        if PRIOR == 2:
            raw2 = p2
            le = tl.load(LEXP + s2, mask=s2 < S, other=0.0).to(tl.float32)      # [1, BLOCK_S]
            # logsigmoid(p) = min(p, 0) - log(1 + exp(-|p|))
            p2 = tl.minimum(raw2, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(raw2))) + le
        tl.store(LOGITS + out2, p2, mask=ok2)

    # ---------------------------------------------------------------- loss and dlogits
    if LOSS > 0:
        nk = tl.load(NKEEP).to(tl.float32)
        inv_n = 1.0 / tl.maximum(nk, 1.0)
        row1 = blk * BLOCK_B + tl.arange(0, BLOCK_B)                              # [BLOCK_B]
        tgt1 = tl.load(TGT + row1, mask=row1 < B, other=0)                       # [BLOCK_B] int64
        keep1 = (tgt1 < S) & (tgt1 >= 0) & (row1 < B)                             # [BLOCK_B]
        tgt = tgt1.to(tl.int32)[:, None]                                          # [BLOCK_B, 1]
        keep = keep1[:, None]                                                     # [BLOCK_B, 1]
        other = (s2 < S) & (s2 != tgt)                                            # [BLOCK_B, BLOCK_S]
        is_y = s2 == tgt
        p_y = tl.sum(tl.where(is_y, p2, 0.0), axis=1)                             # [BLOCK_B]
        diff = p2 - p_y[:, None]                                                  # [BLOCK_B, BLOCK_S]
        sg = 1.0 / (1.0 + tl.exp(-diff))                                          # sigmoid(p_j - p_y)
        if LOSS == 1:
            pm = tl.where(other, WSIGN * p2, -1e30)
            mx = tl.max(pm, axis=1)                                               # [BLOCK_B]
            e = tl.where(other, tl.exp(pm - mx[:, None]), 0.0)
            wsm = e / tl.sum(e, axis=1)[:, None]                                  # softmax over j != y
            ssum = tl.sum(wsm * sg, axis=1)                                       # [BLOCK_B]
            sc = tl.minimum(tl.maximum(ssum, 1e-8), 1.0 - 1e-8)
            row_loss = -tl.log(sc)
            inside = (ssum >= 1e-8) & (ssum <= 1.0 - 1e-8)
            coef = tl.where(inside, -1.0 / tl.where(inside, ssum, 1.0), 0.0)      # dL/dS, 0 when clamped
            t1 = wsm * sg * (1.0 - sg)                                            # w_j s_j (1 - s_j)
            d_other = coef[:, None] * (t1 + WSIGN * wsm * (sg - ssum[:, None]))   # + dw_j/dp_j term
            d_y = -coef * tl.sum(t1, axis=1)                                      # [BLOCK_B]
        else:
            # log sigmoid(d) = min(d, 0) - log(1 + exp(-|d|))
            ls = tl.minimum(diff, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(diff)))
            inv_s1 = 1.0 / (S - 1.0)
            row_loss = -tl.sum(tl.where(other, ls, 0.0), axis=1) * inv_s1
            om = tl.where(other, 1.0 - sg, 0.0)                                   # sigmoid(-(p_j - p_y))
            d_other = -om * inv_s1
            d_y = tl.sum(om, axis=1) * inv_s1
        dp = tl.where(other, d_other, 0.0) + tl.where(is_y, d_y[:, None], 0.0)
        g2 = tl.where(keep & (s2 < S), dp * inv_n, 0.0)                           # [BLOCK_B, BLOCK_S]
        tl.store(LOSS_P + blk, tl.sum(tl.where(keep1, row_loss, 0.0), axis=0))
        if GRADS:
            if PRIOR == 2:
                tl.store(DQ + out2, g2, mask=ok2)                                 # dL/dq
                g2 = g2 / (1.0 + tl.exp(raw2))                                    # dL/dp = dL/dq sigmoid(-p)
            tl.store(DLOG + out2, g2, mask=ok2)
    elif GRADS:
        g2 = tl.load(G + out2, mask=ok2, other=0.0).to(tl.float32)                # [BLOCK_B, BLOCK_S]

    # ---------------------------------------------------------------- gradients
    if GRADS:
        g = tl.reshape(g2, (M,))                                                  # [M]
        tl.store(DB_P + blk, tl.sum(tl.sum(g2, axis=1), axis=0))
        if HAS_POS:
            offs_s = tl.arange(0, BLOCK_S)
            tl.store(DPC_P + blk.to(tl.int64) * S + offs_s, tl.sum(g2, axis=0), mask=offs_s < S)
        if HAS_X:
            offs_kd = tl.arange(0, BKD)
            offs_nd = tl.arange(0, BND)
            for h in range(HF):
                for kc in range(0, KH, BKD):
                    kcol = kc + offs_kd                                           # [BKD]
                    km = kcol < KH
                    xcol = (h * KH + kcol).to(tl.int64)
                    xm = pair_ok[:, None] & km[None, :]
                    xt = tl.load(X + x_row[:, None] + xcol[None, :] * sxd, mask=xm, other=0.0).to(tl.float32)
                    tl.store(DWX_P + blk.to(tl.int64) * DXD + xcol, tl.sum(g[:, None] * xt, axis=0), mask=km)
                    u = tl.zeros([M, BKD], dtype=tl.float32)                      # [M, BKD] = y_h @ W_h^T
                    if FUSION:
                        for nc in range(0, NH, BND):
                            ncol = nc + offs_nd                                   # [BND]
                            nm = ncol < NH
                            yt = _operand(tl.load(Y + y_row[:, None] + (h * NH + ncol)[None, :].to(tl.int64) * syd,
                                                  mask=pair_ok[:, None] & nm[None, :], other=0.0), DT, UPCAST)
                            wt = _operand(tl.load(W + h * KH * NH + kcol[:, None] * NH + ncol[None, :],
                                                  mask=km[:, None] & nm[None, :], other=0.0), DT, UPCAST)
                            u = tl.dot(yt, tl.trans(wt), u, input_precision=PREC)                   # [M, BKD]
                    wv = tl.load(WX + xcol, mask=km, other=0.0).to(tl.float32)                      # [BKD]
                    dxt = g[:, None] * (wv[None, :] + u)                                            # [M, BKD]
                    tl.store(DX + row64[:, None] * sdxb + ss64[:, None] * sdxs + xcol[None, :] * sdxd,
                             dxt.to(DX.dtype.element_ty), mask=xm)
        if HAS_Y:
            if FUSION:
                if COMPUTE_LOGITS:
                    # w_y + x_h W_h was stored to dy by other threads of this program: make it visible
                    tl.debug_barrier()
            for h in range(HF):
                for nc in range(0, NH, BN):
                    ncol = nc + offs_n                                            # [BN]
                    nm = ncol < NH
                    ycol = (h * NH + ncol).to(tl.int64)
                    ym = pair_ok[:, None] & nm[None, :]
                    yt = tl.load(Y + y_row[:, None] + ycol[None, :] * syd, mask=ym, other=0.0).to(tl.float32)
                    tl.store(DWY_P + blk.to(tl.int64) * DYD + ycol, tl.sum(g[:, None] * yt, axis=0), mask=nm)
                    dy_off = dy_row[:, None] + ycol[None, :] * sdyd                                 # [M, BN]
                    if FUSION and COMPUTE_LOGITS:
                        t = tl.load(DY + dy_off, mask=ym, other=0.0).to(tl.float32)  # w_y + x_h W_h (forward)
                    else:
                        t = tl.zeros([M, BN], dtype=tl.float32)
                        if FUSION:
                            for kc in range(0, KH, BK):
                                kcol = kc + offs_k                                # [BK]
                                km = kcol < KH
                                xt = _operand(tl.load(X + x_row[:, None] + (h * KH + kcol)[None, :].to(tl.int64) * sxd,
                                                      mask=pair_ok[:, None] & km[None, :], other=0.0), DT, UPCAST)
                                wt = _operand(tl.load(W + h * KH * NH + kcol[:, None] * NH + ncol[None, :],
                                                      mask=km[:, None] & nm[None, :], other=0.0), DT, UPCAST)
                                t = tl.dot(xt, wt, t, input_precision=PREC)
                        t += tl.load(WY + ycol, mask=nm, other=0.0).to(tl.float32)[None, :]
                    tl.store(DY + dy_off, (g[:, None] * t).to(DY.dtype.element_ty), mask=ym)


@triton.jit
def _dfusion_kernel(
    X, Y, G, DW_P,
    S, KH, NH, P, pairs_per_split,
    sxb, sxs, sxd, syb, sys, syd,
    HF: tl.constexpr, BKW: tl.constexpr, BNW: tl.constexpr, BP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """dW_h[k, n] = sum over pairs p of x[p, h, k] * g[p] * y[p, h, n]: program = (split, tile); the tile index
    varies fastest, so the programs that read the same pairs run side by side (L2 reuse of x and y)."""
    DT: tl.constexpr = X.dtype.element_ty
    pid = tl.program_id(0)
    n_kt = tl.cdiv(KH, BKW)
    n_nt = tl.cdiv(NH, BNW)
    n_tiles = HF * n_kt * n_nt
    tile = pid % n_tiles
    split = pid // n_tiles
    h = tile // (n_kt * n_nt)
    kt = (tile // n_nt) % n_kt
    nt = tile % n_nt
    kcol = kt * BKW + tl.arange(0, BKW)                                           # [BKW] inside head h
    ncol = nt * BNW + tl.arange(0, BNW)                                           # [BNW]
    km = kcol < KH
    nm = ncol < NH
    xcol = (h * KH + kcol).to(tl.int64)
    ycol = (h * NH + ncol).to(tl.int64)
    offs_p = tl.arange(0, BP)
    p0 = split * pairs_per_split
    p1 = tl.minimum(p0 + pairs_per_split, P)
    acc = tl.zeros([BKW, BNW], dtype=tl.float32)
    for pc in range(p0, p1, BP):
        p = pc + offs_p                                                           # [BP] flat pair index
        pm = p < p1
        r = (p // S).to(tl.int64)
        s = (p % S).to(tl.int64)
        gv = tl.load(G + p, mask=pm, other=0.0)                                   # [BP] (G contiguous [B, S])
        xt = _operand(tl.load(X + (r * sxb + s * sxs)[:, None] + xcol[None, :] * sxd,
                              mask=pm[:, None] & km[None, :], other=0.0), DT, UPCAST)   # [BP, BKW]
        yt = tl.load(Y + (r * syb + s * sys)[:, None] + ycol[None, :] * syd,
                     mask=pm[:, None] & nm[None, :], other=0.0).to(tl.float32)         # [BP, BNW]
        gy = _operand(yt * gv[:, None], DT, UPCAST)
        acc = tl.dot(tl.trans(xt), gy, acc, input_precision=PREC)
    base = DW_P + split.to(tl.int64) * (HF * KH * NH) + h * KH * NH
    tl.store(base + kcol[:, None] * NH + ncol[None, :], acc, mask=km[:, None] & nm[None, :])


# --------------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------------
def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not _interpreting()


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(S: int, KH: int, NH: int, dtype: torch.dtype, device: torch.device, grads: bool = True,
            on_gpu: Optional[bool] = None) -> dict:
    """Block sizes and warps of both kernels. Interpreter: small blocks (cheap programs, several blocks and
    several dW splits even at test sizes). GPU: 128 pairs per block, 8 warps, 32-wide feature chunks (two
    programs per SM: ~120 registers in training, 16-bit); the forward-only kernel with 16-bit inputs
    accumulates x_h W_h 64 wide (half the re-reads of x, still two programs per SM on sm_90). Register counts
    per variant: csrc_notes/decoder_loss.md and csrc_notes/compiled.md."""
    block_s = max(16, _next_pow2(S))
    bk = max(16, min(32, _next_pow2(KH)))
    bn = max(16, min(32, _next_pow2(NH)))
    if not (_on_gpu(device) if on_gpu is None else on_gpu):
        # different chunk widths per phase on purpose (exercises the masks and the BK / BKD split)
        return dict(BLOCK_B=2 if block_s <= 64 else 1, BLOCK_S=block_s, BK=16, BN=bn, BKD=bk, BND=16,
                    num_warps=4, BKW=max(16, min(64, _next_pow2(KH))), BNW=max(16, min(64, _next_pow2(NH))),
                    BP=32, dw_warps=4, n_sm=8)
    half = dtype in (torch.float16, torch.bfloat16)
    if half and not grads:
        bn = max(16, min(64, _next_pow2(NH)))
    cfg = dict(BLOCK_B=max(1, 128 // block_s), BLOCK_S=block_s, BK=bk, BN=bn, BKD=bk, BND=bn, num_warps=8,
               BKW=max(16, min(128, _next_pow2(KH))), BNW=max(16, min(128, _next_pow2(NH))),
               BP=64 if half else 32, dw_warps=8, n_sm=_num_sms(device))
    unknown = sorted(set(TUNE) - set(cfg) - {"n_splits"})
    if unknown:
        raise ValueError(f"decoder_loss.TUNE: unknown key(s) {unknown}; known: {sorted(k for k in cfg if k != 'n_sm')}"
                         " and n_splits")
    cfg.update(TUNE)
    return cfg


def _upcast(dtype: torch.dtype) -> bool:
    """Upcast the dot operands to fp32 (after rounding them to ``dtype``): interpreter only."""
    if dtype == torch.float32 or not _interpreting():
        return False
    return not (dtype == torch.float16 and INTERPRET_NATIVE_FP16)


def _n_splits(P: int, n_tiles: int, BP: int, n_sm: int) -> int:
    """Splits of the pair range for the dW kernel: about one wave of programs (n_sm), at least one chunk of BP
    pairs each."""
    return max(1, min(triton.cdiv(P, BP), triton.cdiv(n_sm, n_tiles)))


def _poisoned(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS or _poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check(x, y, w_x, w_y, bias, fusion, pos_a, pos_c):
    if x is None and y is None:
        raise ValueError("segment_decoder needs at least one modality")
    ref = x if x is not None else y
    if ref.dim() != 3:
        raise ValueError(f"x / y must be [B, S, d], got {tuple(ref.shape)}")
    B, S = ref.shape[0], ref.shape[1]
    if x is not None and y is not None and tuple(y.shape[:2]) != (B, S):
        raise ValueError("x and y must share [B, S]")
    for name, t in (("x", x), ("y", y)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if x is not None and (w_x is None or w_x.shape != (x.shape[2],)):
        raise ValueError("w_x must be [dx]")
    if y is not None and (w_y is None or w_y.shape != (y.shape[2],)):
        raise ValueError("w_y must be [dy]")
    if fusion is not None:
        if x is None or y is None:
            raise ValueError("the bilinear fusion needs both modalities")
        hf = fusion.shape[0]
        if x.shape[2] % hf or y.shape[2] % hf or tuple(fusion.shape) != (hf, x.shape[2] // hf, y.shape[2] // hf):
            raise ValueError("fusion must be [Hf, dx/Hf, dy/Hf]")
    if (pos_a is None) != (pos_c is None):
        raise ValueError("pos_a and pos_c go together")
    if pos_a is not None and (pos_a.shape != (S,) or pos_c.shape != (S,)):
        raise ValueError("pos_a / pos_c must be [S]")
    if S > MAX_S:
        raise ValueError(f"at most {MAX_S} slots per row, got S={S}")
    if B * S >= 2 ** 31:
        raise ValueError(f"at most 2^31 - 1 (row, slot) pairs per call, got B*S={B * S}")
    return B, S


def _launch(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, *, target=None, G=None, loss=0,
            compute_logits=True, grads=False, wsign=-1.0, on_gpu=None, offset=None, log_exposure=None):
    """Run the kernels once; returns a dict of the requested outputs (per-block / per-split partials are summed
    here, in torch, in a fixed order). ``offset`` [B, S] / ``log_exposure`` [S]: the position prior (at most one;
    with the forward only)."""
    B, S = _check(x, y, w_x, w_y, bias, fusion, pos_a, pos_c)
    prior = 1 if offset is not None else (2 if log_exposure is not None else 0)
    if prior and (offset is not None and log_exposure is not None or not compute_logits):
        raise ValueError("the position prior: one of offset / log_exposure, with the forward")
    if offset is not None and tuple(offset.shape) != (B, S):
        raise ValueError(f"offset must be [B, S]=[{B}, {S}], got {tuple(offset.shape)}")
    if log_exposure is not None and tuple(log_exposure.shape) != (S,):
        raise ValueError(f"log_exposure must be [S]=[{S}], got {tuple(log_exposure.shape)}")
    ref = x if x is not None else y
    dev = ref.device
    f32 = torch.float32
    cdt = ref.dtype  # dot operand dtype: the input dtype (x's when both are given)
    has_x, has_y, has_f, has_pos = x is not None, y is not None, fusion is not None, pos_a is not None
    DXD = x.shape[2] if has_x else 0
    DYD = y.shape[2] if has_y else 0
    HF = fusion.shape[0] if has_f else 1
    KH, NH = (DXD // HF, DYD // HF) if has_f else (DXD, DYD)
    cfg = _config(S, max(KH, 1), max(NH, 1), cdt, dev, grads, on_gpu)
    BLOCK_B = cfg["BLOCK_B"]
    n_blocks = triton.cdiv(B, BLOCK_B)
    upcast = _upcast(cdt)
    prec = DOT_PRECISION if cdt == f32 else "ieee"  # input_precision only matters for fp32 operands

    dummy = torch.zeros(1, dtype=f32, device=dev)
    dummy_c = torch.zeros(1, dtype=cdt, device=dev)
    Xa = x if has_x else dummy_c
    Ya = y if has_y else dummy_c
    WXa = w_x.contiguous() if has_x else dummy
    WYa = w_y.contiguous() if has_y else dummy
    Wa = fusion.to(cdt).contiguous() if has_f else dummy_c  # cast once: tiles load in the input dtype
    PAa = pos_a.contiguous() if has_pos else dummy
    PCa = pos_c.contiguous() if has_pos else dummy
    bias_t = bias.reshape(1) if torch.is_tensor(bias) else torch.full((1,), float(bias), dtype=f32, device=dev)
    if loss > 0:
        tgt = target.to(device=dev, dtype=torch.int64).contiguous()
        if tgt.shape != (B,):
            raise ValueError(f"target must be [B]=[{B}], got {tuple(tgt.shape)}")
        nkeep = ((tgt >= 0) & (tgt < S)).sum().reshape(1)
    else:
        tgt = torch.zeros(1, dtype=torch.int64, device=dev)
        nkeep = torch.zeros(1, dtype=torch.int64, device=dev)
    if G is not None and tuple(G.shape) != (B, S):
        raise ValueError(f"the logits gradient must be [B, S]=[{B}, {S}], got {tuple(G.shape)}")
    Ga = G.to(f32).contiguous() if G is not None else dummy
    OFFa = offset.detach().to(device=dev, dtype=f32).contiguous() if prior == 1 else dummy
    LEXPa = log_exposure.detach().to(device=dev, dtype=f32).contiguous() if prior == 2 else dummy

    logits = _poisoned((B, S), f32, dev) if compute_logits else dummy
    dlog = _poisoned((B, S), f32, dev) if (grads and loss > 0) else dummy
    dq = _poisoned((B, S), f32, dev) if (grads and loss > 0 and prior == 2) else dummy
    dx = _poisoned(x.shape, x.dtype, dev) if (grads and has_x) else dummy_c
    dy = _poisoned(y.shape, y.dtype, dev) if (grads and has_y) else dummy_c
    # per-block partials: every element is written by its block (poisoned too, so a miss would show)
    dwx_p = _poisoned((n_blocks, DXD), f32, dev) if (grads and has_x) else dummy
    dwy_p = _poisoned((n_blocks, DYD), f32, dev) if (grads and has_y) else dummy
    db_p = _poisoned((n_blocks,), f32, dev) if grads else dummy
    dpc_p = _poisoned((n_blocks, S), f32, dev) if (grads and has_pos) else dummy
    loss_p = _poisoned((n_blocks,), f32, dev) if loss > 0 else dummy

    sx = x.stride() if has_x else (0, 0, 0)
    sy = y.stride() if has_y else (0, 0, 0)
    sdx = dx.stride() if (grads and has_x) else (0, 0, 0)
    sdy = dy.stride() if (grads and has_y) else (0, 0, 0)

    if B > 0:
        _decoder_kernel[(n_blocks,)](
            Xa, Ya, WXa, WYa, bias_t, Wa, PAa, PCa, tgt, Ga, nkeep,
            OFFa, LEXPa,
            logits, dlog, dq, dx, dy,
            dwx_p, dwy_p, db_p, dpc_p, loss_p,
            B, S, DXD, DYD, KH, NH,
            sx[0], sx[1], sx[2], sy[0], sy[1], sy[2],
            sdx[0], sdx[1], sdx[2], sdy[0], sdy[1], sdy[2],
            HAS_X=has_x, HAS_Y=has_y, FUSION=has_f, HF=HF, HAS_POS=has_pos,
            COMPUTE_LOGITS=compute_logits, LOSS=loss, GRADS=grads, WSIGN=float(wsign), PRIOR=prior,
            BLOCK_B=BLOCK_B, BLOCK_S=cfg["BLOCK_S"], BK=cfg["BK"], BN=cfg["BN"], BKD=cfg["BKD"], BND=cfg["BND"],
            UPCAST=upcast, PREC=prec, num_warps=cfg["num_warps"], num_stages=2,
        )

    dfusion = None
    if grads and has_f:
        P = B * S
        n_tiles = HF * triton.cdiv(KH, cfg["BKW"]) * triton.cdiv(NH, cfg["BNW"])
        n_splits = cfg.get("n_splits") or _n_splits(P, n_tiles, cfg["BP"], cfg["n_sm"])
        per = triton.cdiv(triton.cdiv(max(P, 1), n_splits), cfg["BP"]) * cfg["BP"]  # whole BP chunks per split
        n_splits = triton.cdiv(max(P, 1), per)
        dw_p = _poisoned((n_splits, HF, KH, NH), f32, dev)
        if P > 0:
            gflat = dlog if loss > 0 else Ga  # [B, S] fp32, contiguous
            _dfusion_kernel[(n_splits * n_tiles,)](
                Xa, Ya, gflat, dw_p,
                S, KH, NH, P, per,
                sx[0], sx[1], sx[2], sy[0], sy[1], sy[2],
                HF=HF, BKW=cfg["BKW"], BNW=cfg["BNW"], BP=cfg["BP"], UPCAST=upcast, PREC=prec,
                num_warps=cfg["dw_warps"], num_stages=2,
            )
        else:
            dw_p.zero_()
        dfusion = dw_p.sum(0).to(fusion.dtype)

    out = {}
    if compute_logits:
        out["logits"] = logits
    if loss > 0:
        out["loss"] = loss_p.sum() / nkeep[0].clamp_min(1).to(f32)
    if grads:
        if loss > 0:
            out["dlogits"] = dlog  # dL/d(raw logits)
            out["dq"] = dq if prior == 2 else dlog  # dL/d(the returned logits)
        out["dx"] = dx if has_x else None
        out["dy"] = dy if has_y else None
        out["dw_x"] = dwx_p.sum(0).to(w_x.dtype) if has_x else None
        out["dw_y"] = dwy_p.sum(0).to(w_y.dtype) if has_y else None
        out["dfusion"] = dfusion
        out["dbias"] = db_p.sum().reshape(bias.shape).to(bias.dtype) if torch.is_tensor(bias) else None
        if has_pos:
            dpc = dpc_p.sum(0)
            out["dpos_a"] = (dpc * torch.arange(1, S + 1, device=dev, dtype=f32)).to(pos_a.dtype)
            out["dpos_c"] = dpc.to(pos_c.dtype)
        else:
            out["dpos_a"] = out["dpos_c"] = None
    return out


_GRAD_KEYS = ("dx", "dy", "dw_x", "dw_y", "dbias", "dfusion", "dpos_a", "dpos_c")


def _chain(inputs, G: Tensor, on_gpu: Optional[bool] = None):
    """Gradients of every input for a given dL/dlogits ``G [B, S]`` (the chain kernel). ``on_gpu``: the
    forward's choice of launch config (kept, so the backward never decides differently from the forward)."""
    out = _launch(*inputs, G=G, compute_logits=False, grads=True, on_gpu=on_gpu)
    return tuple(out[k] for k in _GRAD_KEYS)


def _mask_needed(ctx, grads):
    # order of the Function inputs: x, y, w_x, w_y, bias, fusion, pos_a, pos_c
    return tuple(g if (g is not None and need) else None for g, need in zip(grads, ctx.needs_input_grad[:8]))


class _DecodeAndLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind, offset=None, log_exposure=None):
        inputs = (x, y, w_x, w_y, bias, fusion, pos_a, pos_c)
        out = _launch(*inputs, target=target, loss=LOSS_KINDS[kind], grads=True, wsign=_WSIGN[kind],
                      offset=offset, log_exposure=log_exposure)
        ctx.set_materialize_grads(False)
        ctx.on_gpu = _on_gpu((x if x is not None else y).device)
        ctx.inputs = inputs  # saved by reference (not save_for_backward: the chain path re-reads x, y)
        ctx.dlogits = out["dlogits"]  # dL/dp (raw logits)
        ctx.dq = out["dq"]            # dL/dq (the returned logits; the same tensor without the exposure prior)
        ctx.grads = tuple(out[k] for k in _GRAD_KEYS)
        ctx.log_exposure = log_exposure
        ctx.logits = out["logits"] if log_exposure is not None else None
        return out["logits"], out["loss"]

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        if grad_logits is None:
            if grad_loss is None:
                return (None,) * 12
            gl = grad_loss.to(torch.float32)
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
            gq = ctx.dq * gl
        else:
            gq = grad_logits.to(torch.float32)
            if grad_loss is not None:
                gq = gq + ctx.dq * grad_loss.to(torch.float32)
            G = gq
            if ctx.log_exposure is not None:  # dL/dp = dL/dq sigmoid(-p), sigmoid(p) = exp(q - log e)
                G = gq * -torch.expm1(ctx.logits - ctx.log_exposure.detach().to(torch.float32))
            grads = _chain(ctx.inputs, G, ctx.on_gpu)
        d_off = gq if ctx.needs_input_grad[10] else None
        d_le = gq.sum(0) if ctx.needs_input_grad[11] else None
        return _mask_needed(ctx, grads) + (None, None, d_off, d_le)


class _SegmentDecoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, w_x, w_y, bias, fusion, pos_a, pos_c):
        inputs = (x, y, w_x, w_y, bias, fusion, pos_a, pos_c)
        ctx.inputs = inputs
        ctx.on_gpu = _on_gpu((x if x is not None else y).device)
        ctx.set_materialize_grads(False)
        return _launch(*inputs)["logits"]

    @staticmethod
    def backward(ctx, grad_logits):
        if grad_logits is None:
            return (None,) * 8
        return _mask_needed(ctx, _chain(ctx.inputs, grad_logits, ctx.on_gpu))


# --------------------------------------------------------------------------------------------------------------
# public API (called by segfast.ops when backend == "triton")
# --------------------------------------------------------------------------------------------------------------
def _has_f64(*ts) -> bool:
    return any(torch.is_tensor(t) and t.dtype == torch.float64 for t in ts)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in ts)


def segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, offset=None, log_exposure=None) -> Tensor:
    """Logits [B, S] fp32 of the segment decoder with position bias (see ``reference.segment_decoder``), with the
    optional position prior (``offset`` [B, S] / ``log_exposure`` [S], ``reference.apply_prior``).

    Without grad: one scoring kernel (forward only, the prior in the kernel). With autograd on and an input
    requiring grad: an autograd Function whose backward is the chain kernel, the prior applied by torch after it.
    float64: the reference.
    """
    from segfast.ops import reference
    args = (x, y, w_x, w_y, bias, fusion, pos_a, pos_c)
    if _has_f64(*args, offset, log_exposure):
        return reference.segment_decoder(*args, offset, log_exposure)
    if _needs_grad(*args, offset, log_exposure):
        return reference.apply_prior(_SegmentDecoder.apply(*args), offset, log_exposure)
    if offset is not None and log_exposure is not None:
        return reference.apply_prior(_launch(*args, log_exposure=log_exposure)["logits"], offset)
    return _launch(*args, offset=offset, log_exposure=log_exposure)["logits"]


def decode_and_loss(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind: str = "bpr-max", offset=None,
                    log_exposure=None):
    """Fused decoder + position prior + intra-video loss: returns (logits [B, S] fp32, loss [] fp32).

    ``kind``: "bpr-max" or "pairwise". Rows with target >= S are excluded; loss 0 (and zero gradients) when no
    row is kept. Gradients are computed in the forward pass; backward through the loss scales them, backward
    through the logits runs the chain kernel. ``offset`` [B, S] / ``log_exposure`` [S] (at most one): the prior
    (``reference.apply_prior``) applied in the kernel before the loss; the logits returned include it.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"the fused kernel supports {tuple(LOSS_KINDS)}, not {kind!r}")
    if offset is not None and log_exposure is not None:
        raise ValueError("decode_and_loss: pass one of offset / log_exposure")
    args = (x, y, w_x, w_y, bias, fusion, pos_a, pos_c)
    if _has_f64(*args, offset, log_exposure):
        from segfast.ops import reference
        return reference.decode_and_loss(*args, target, kind, offset=offset, log_exposure=log_exposure)
    ref = x if x is not None else y
    if ref is not None and ref.shape[1] < 2:
        raise ValueError("the intra-video loss needs S >= 2 slots")
    if not _needs_grad(*args, offset, log_exposure):
        out = _launch(*args, target=target, loss=LOSS_KINDS[kind], grads=False, wsign=_WSIGN[kind],
                      offset=offset, log_exposure=log_exposure)
        return out["logits"], out["loss"]
    return _DecodeAndLoss.apply(*args, target, kind, offset, log_exposure)
