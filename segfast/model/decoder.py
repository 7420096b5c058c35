"""Segment interest decoder (SPEC section 5), a thin parameter holder over ``segfast.ops``.

- single modality: o_i = w . x_i + b (x = the modality's encoder output)
- both: o_i = w_x . x_i + w_y . y_i + b + sum_h x_{i,h}^T W_h y_{i,h} (x visual, y ID, H = fusion_heads)
- position bias p_i = o_i + (i+1) a_i + c_i, a, c in R^40 initialised to 1 (absent under no-position).
- position prior (``config.prior``, docs/model.md "Position priors"): "global" / "user" add
  ``prior_weight * (-log P_i)`` (P = the row's leave distribution under the training split's hazards, buffer
  ``prior_table`` [1 or n_users, 40]); "exposure" maps p_i -> logsigmoid(p_i) + log e_i (buffer
  ``prior_table`` [40], the authors' global P(slot reached)). "none": no parameter, no buffer (the model of before).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

import segfast.ops as ops
from segfast.model.config import ModelConfig
from segfast.priors import P_FLOOR, leave_log_prob

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
        # created last and without random draws: the other parameters get the same values as without a prior
        self.prior = cfg.prior
        self.prior_installed = cfg.prior == "none"
        if cfg.prior in ("global", "user"):
            rows = cfg.n_users if cfg.prior == "user" else 1
            self.prior_weight = nn.Parameter(torch.ones(()))
            self.register_buffer("prior_table", torch.zeros(rows, cfg.max_slots))
        elif cfg.prior == "exposure":
            self.prior_weight = None
            self.register_buffer("prior_table", torch.ones(cfg.max_slots))
        else:
            self.prior_weight = None
            self.prior_table = None
        if cfg.prior != "none":  # loading a state dict (a checkpoint) installs the saved table
            self.register_load_state_dict_post_hook(_mark_installed)

    def install_prior(self, table) -> None:
        """Set the prior's table (``segfast.priors.compute_priors``): [1, 40] / [n_users, 40] hazards or [40]
        exposures."""
        if self.prior_table is None:
            raise ValueError("install_prior: this model has prior='none'")
        t = torch.as_tensor(table, dtype=torch.float32)
        if tuple(t.shape) != tuple(self.prior_table.shape):
            raise ValueError(f"install_prior: expected a {tuple(self.prior_table.shape)} table for prior "
                             f"{self.prior!r}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
            raise ValueError("install_prior: expected probabilities in [0, 1]")
        with torch.no_grad():
            self.prior_table.copy_(t.to(self.prior_table.device))
        self.prior_installed = True

    def prior_terms(self, user_idx: Optional[Tensor], n_segments: Tensor, s: int) -> dict:
        """The keyword arguments (``offset`` / ``log_exposure``) of the ops for a batch with S = ``s`` slots:
        {} without a prior. ``user_idx`` [B] (prior "user"), ``n_segments`` [B]."""
        if self.prior == "none":
            return {}
        if not self.prior_installed:
            raise RuntimeError(f"prior {self.prior!r}: the table is not installed (model.install_prior("
                               "segfast.priors.compute_priors(...)), done by segfast train; a loaded run has it)")
        if self.prior == "exposure":
            return {"log_exposure": torch.log(self.prior_table[:s].clamp_min(P_FLOOR))}
        if self.prior == "user":
            if user_idx is None:
                raise KeyError("prior 'user' needs the batch's user_idx")
            hz = self.prior_table[user_idx.to(self.prior_table.device).long()]
        else:
            hz = self.prior_table.expand(n_segments.shape[0], -1)
        raw = leave_log_prob(hz, n_segments, s)  # no grad: a function of the buffer
        return {"offset": self.prior_weight * raw}

    def _params(self):
        return (self.w_x, self.w_y, self.bias, self.fusion, self.pos_a, self.pos_c)

    def forward(self, x: Optional[Tensor], y: Optional[Tensor], **prior) -> Tensor:
        """-> logits [B, 40] float32. ``prior``: :meth:`prior_terms` of the batch."""
        return ops.segment_decoder(x, y, *self._params(), backend=self.backend, **prior)

    def decode_and_loss(self, x: Optional[Tensor], y: Optional[Tensor], target: Tensor, kind: str,
                        labels: Optional[Tensor] = None, slot_mask: Optional[Tensor] = None, **prior):
        """-> (logits [B, 40], loss []); the loss sees the prior-adjusted logits."""
        return ops.decode_and_loss(x, y, *self._params(), target, kind=kind, labels=labels,
                                   slot_mask=slot_mask, backend=self.backend, **prior)


def _mark_installed(module, incompatible_keys) -> None:
    if not any(k.split(".")[-1] == "prior_table" for k in getattr(incompatible_keys, "missing_keys", ())):
        module.prior_installed = True
