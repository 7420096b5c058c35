"""The user-video cross-attention encoder (SPEC section 5).

Each layer has four projection sets vv, uv, vu, uu (query side, key side), each Q, K, V Linear(d, d).
Projections that read the same input are packed into one Linear (identical math, one matmul):
``proj_v`` maps V to [q_vv, k_vv, v_vv, q_uv, k_vu, v_vu] and ``proj_u`` maps U to
[k_uv, v_uv, q_vu, q_uu, k_uu, v_uu] (only the parts the layer needs; each d columns, initialised like
a separate Linear(d, d)).

- Video stream: cross_attention(Q_vv(V), K_vv(V), V_vv(V), slot_mask, Q_uv(V), K_uv(U), V_uv(U), user_mask).
- User stream:  cross_attention(Q_vu(U), K_vu(V), V_vu(V), slot_mask, Q_uu(U), K_uu(U), V_uu(U), user_mask).
- Each stream: out Linear, dropout, residual, LayerNorm; FFN d -> d_ff -> d (GELU), dropout, residual,
  LayerNorm (post-LN).

The user stream of the LAST layer feeds nothing (only V^(L) reaches the decoder), so the last layer has
no user stream at all; under ``self-only`` no layer has one (V never reads U). The output V^(L) of the
last layer is what the decoder gets (the authors' discarded-last-layer defect is not reproduced).
Ablations: ``cross-only`` keeps only the uv / vu sources, ``self-only`` only vv / uu.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

import segfast.ops as ops
from segfast.model.config import ModelConfig

__all__ = ["EncoderLayer", "Encoder"]


class _Stream(nn.Module):
    """Output projection + residual + LN, then FFN + residual + LN."""

    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, d_ff)
        self.ff2 = nn.Linear(d_ff, d)
        self.act = nn.GELU()
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, att: Tensor) -> Tensor:
        x = self.ln1(x + self.drop(self.out(att)))
        return self.ln2(x + self.drop(self.ff2(self.act(self.ff1(x)))))


def _packed_linear(d: int, k: int) -> Optional[nn.Linear]:
    if k == 0:
        return None
    lin = nn.Linear(d, k * d)
    # same distribution as k separate Linear(d, d): bound 1/sqrt(fan_in) with fan_in = d (already so)
    return lin


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, user_stream: bool = True):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.d, self.h, self.dh = d, h, d // h
        self.backend = cfg.backend
        ab = cfg.ablation
        self.self_src = ab != "cross-only"   # vv (video stream) and uu (user stream)
        self.cross_src = ab != "self-only"   # uv (video stream) and vu (user stream)
        self.user_stream = bool(user_stream) and ab != "self-only"
        v_names, u_names = [], []
        if self.self_src:
            v_names += ["q_vv", "k_vv", "v_vv"]
        if self.cross_src:
            v_names += ["q_uv"]
            u_names += ["k_uv", "v_uv"]
        if self.user_stream:
            if self.cross_src:
                u_names += ["q_vu"]
                v_names += ["k_vu", "v_vu"]
            if self.self_src:
                u_names += ["q_uu", "k_uu", "v_uu"]
        self.v_names, self.u_names = tuple(v_names), tuple(u_names)
        self.proj_v = _packed_linear(d, len(v_names))
        self.proj_u = _packed_linear(d, len(u_names))
        self.video = _Stream(d, cfg.d_ff, cfg.dropout)
        self.user = _Stream(d, cfg.d_ff, cfg.dropout) if self.user_stream else None

    def _split(self, x: Tensor, lin: Optional[nn.Linear], names) -> dict:
        if lin is None:
            return {}
        b, l, _ = x.shape
        y = lin(x).view(b, l, len(names), self.h, self.dh).permute(2, 0, 3, 1, 4)  # [k, B, H, L, dh]
        # unbind, not y[i]: its backward stacks the parts' gradients once, where indexing allocates a full-size
        # zero gradient per part and sums them (about 2x the split + backward time on CPU, docs/model.md)
        return dict(zip(names, y.unbind(0)))

    def _merge(self, att: Tensor) -> Tensor:
        b, h, l, dh = att.shape
        return att.transpose(1, 2).reshape(b, l, h * dh)

    def forward(self, v: Tensor, u: Tensor, slot_mask: Tensor, user_mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        p = self._split(v, self.proj_v, self.v_names)
        p.update(self._split(u, self.proj_u, self.u_names))
        g = p.get
        if self.self_src:
            a1 = (g("q_vv"), g("k_vv"), g("v_vv"), slot_mask)
        else:
            a1 = (None, None, None, None)
        a2 = (g("q_uv"), g("k_uv"), g("v_uv"), user_mask) if self.cross_src else (None, None, None, None)
        att_v = ops.cross_attention(*a1, *a2, backend=self.backend)
        new_v = self.video(v, self._merge(att_v))
        new_u = None
        if self.user_stream:
            b1 = (g("q_vu"), g("k_vu"), g("v_vu"), slot_mask) if self.cross_src else (None, None, None, None)
            b2 = (g("q_uu"), g("k_uu"), g("v_uu"), user_mask) if self.self_src else (None, None, None, None)
            att_u = ops.cross_attention(*b1, *b2, backend=self.backend)
            new_u = self.user(u, self._merge(att_u))
        return new_v, new_u


class Encoder(nn.Module):
    """L layers; returns V^(L) [B, 40, d]. ``no-attention`` (or n_layers 0) has no layers: V^(0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = 0 if cfg.ablation == "no-attention" else cfg.n_layers
        self.layers = nn.ModuleList(EncoderLayer(cfg, user_stream=(i < n - 1)) for i in range(n))

    def set_backend(self, name: str) -> None:
        for layer in self.layers:
            layer.backend = name

    def forward(self, v: Tensor, u: Tensor, slot_mask: Tensor, user_mask: Tensor) -> Tensor:
        for layer in self.layers:
            v, u = layer(v, u, slot_mask, user_mask)
        return v
