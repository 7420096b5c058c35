"""Segment interest decoder (SPEC section 5), a thin parameter holder over ``segfast.ops``.

- single modality: o_i = w . x_i + b (x = the modality's encoder output)
- both: o_i = w_x . x_i + w_y . y_i + b + sum_h x_{i,h}^T W_h y_{i,h} (x visual, y ID, H = fusion_heads)
- position bias p_i = o_i + (i+1) a_i + c_i, a, c in R^40 initialised to 1 (absent under no-position).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

import segfast.ops as ops
from segfast.model.config import ModelConfig

__all__ = ["SegmentDecoder"]


class SegmentDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.backend = cfg.backend
        bound = 1.0 / math.sqrt(d)
        self.w_x = nn.Parameter(torch.empty(d).uniform_(-bound, bound)) if cfg.uses_visual else None
        self.w_y = nn.Parameter(torch.empty(d).uniform_(-bound, bound)) if cfg.uses_id else None
        self.bias = nn.Parameter(torch.zeros(()))
        if cfg.modality == "both":
            hf = cfg.fusion_heads
            dh = d // hf
            self.fusion = nn.Parameter(torch.empty(hf, dh, dh).normal_(0.0, 1.0 / dh))
        else:
            self.fusion = None
        if cfg.ablation == "no-position":
            self.pos_a = self.pos_c = None
        else:
            self.pos_a = nn.Parameter(torch.full((cfg.max_slots,), float(cfg.pos_init)))
            self.pos_c = nn.Parameter(torch.full((cfg.max_slots,), float(cfg.pos_init)))

    def _params(self):
        return (self.w_x, self.w_y, self.bias, self.fusion, self.pos_a, self.pos_c)

    def forward(self, x: Optional[Tensor], y: Optional[Tensor]) -> Tensor:
        """-> logits [B, 40] float32."""
        return ops.segment_decoder(x, y, *self._params(), backend=self.backend)

    def decode_and_loss(self, x: Optional[Tensor], y: Optional[Tensor], target: Tensor, kind: str,
                        labels: Optional[Tensor] = None, slot_mask: Optional[Tensor] = None):
        """-> (logits [B, 40], loss [])."""
        return ops.decode_and_loss(x, y, *self._params(), target, kind=kind, labels=labels,
                                   slot_mask=slot_mask, backend=self.backend)
