"""Input representations per modality (SPEC section 5): tokens V [B, 40, d] (video slots) and
U [B, M, d] (user tokens) with their masks, after the learned position embedding, LayerNorm and dropout.

- ID: U = user embedding (M = 1, mask all True); V_i = [video embedding (d/2) ; Linear(1 -> d/2)(i)]; a video
  without training rows uses a shared learned "unknown video" embedding (``video_seen``, ``video_id_dropout``).
- Visual: each feature vector is cast to float32 and L1-normalised (x / (||x||_1 + 1e-6)), then one
  Linear(feature_dim -> d) shared by the video and user tokens; U = the visual history (``user_feat``,
  ``user_mask``), V = the target video's segment vectors (``video_feat``, zeros on padding).

Slot types (``ModelConfig.slot_types``, on by default): a learned embedding of three slot types is added to
V before the LayerNorm: 0 = a real segment (i < N), 1 = the "completed" pseudo-slot (i == N, the target of
a full watch), 2 = padding after it. The spec's literal representation gives a padded ID slot the same
tokens as a real one, so the model cannot tell where the video ends, which the 40-slot ranking protocol
rewards (the position baselines know N); ``slot_types=False`` restores the literal form.

``pos_index`` [B, 40] is the slot index used for the ID slot feature and the slot position embedding:
``slot_index`` normally, a per-row permutation under the ``no-position`` ablation (see model.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segfast.model.config import ModelConfig

__all__ = ["IDRepresentation", "VisualRepresentation", "l1_normalise", "slot_types"]

SLOT_REAL, SLOT_END, SLOT_PAD = 0, 1, 2


def slot_types(slot_mask: Tensor) -> Tensor:
    """[B, S] bool (True = real segment) -> [B, S] int64: 0 real, 1 the completed pseudo-slot N, 2 padding."""
    n = slot_mask.sum(dim=1, keepdim=True)
    idx = torch.arange(slot_mask.shape[1], device=slot_mask.device)[None, :]
    end = torch.full_like(idx, SLOT_END).expand_as(slot_mask)
    pad = torch.full_like(idx, SLOT_PAD).expand_as(slot_mask)
    return torch.where(slot_mask.bool(), torch.zeros_like(end), torch.where(idx == n, end, pad))


def l1_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / (||x||_1 + eps) along the last dimension, in float32."""
    x = x.float()
    return x / (x.abs().sum(dim=-1, keepdim=True) + eps)


class _Finish(nn.Module):
    """Learned position embedding + LayerNorm + dropout, for the V and U token sets."""

    def __init__(self, d: int, n_video_pos: int, n_user_pos: int, dropout: float, use_slot_types: bool = True):
        super().__init__()
        self.slot_type = nn.Embedding(3, d) if use_slot_types else None
        if self.slot_type is not None:
            nn.init.normal_(self.slot_type.weight, std=0.02)
        self.pos_v = nn.Embedding(n_video_pos, d)
        self.pos_u = nn.Embedding(n_user_pos, d)
        nn.init.normal_(self.pos_v.weight, std=0.02)
        nn.init.normal_(self.pos_u.weight, std=0.02)
        self.ln_v = nn.LayerNorm(d)
        self.ln_u = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, v: Tensor, u: Tensor, pos_index: Tensor, slot_mask: Tensor = None) -> tuple[Tensor, Tensor]:
        """v [B, S, d], u [B, M, d], pos_index [B, S], slot_mask [B, S] (needed with slot types)."""
        m = u.shape[1]
        if self.slot_type is not None:
            if slot_mask is None:
                raise ValueError("this model marks slot types: pass slot_mask to the representation")
            v = v + self.slot_type(slot_types(slot_mask))
        if m > self.pos_u.num_embeddings:
            raise ValueError(f"{m} user tokens in the batch, but the model has position embeddings for "
                             f"{self.pos_u.num_embeddings} (ModelConfig.max_user_tokens)")
        return self.finish_v(v, pos_index, slot_mask, typed=True), self.finish_u(u)

    def finish_v(self, v: Tensor, pos_index: Tensor, slot_mask: Tensor = None, typed: bool = False) -> Tensor:
        """The video tokens' half of forward (slot type unless ``typed``, position, LayerNorm, dropout)."""
        if self.slot_type is not None and not typed:
            if slot_mask is None:
                raise ValueError("this model marks slot types: pass slot_mask to the representation")
            v = v + self.slot_type(slot_types(slot_mask))
        return self.drop(self.ln_v(v + self.pos_v(pos_index)))

    def finish_u(self, u: Tensor) -> Tensor:
        """The user tokens' half of forward (position, LayerNorm, dropout); independent of the video tokens."""
        m = u.shape[1]
        if m > self.pos_u.num_embeddings:
            raise ValueError(f"{m} user tokens in the batch, but the model has position embeddings for "
                             f"{self.pos_u.num_embeddings} (ModelConfig.max_user_tokens)")
        return self.drop(self.ln_u(u + self.pos_u.weight[:m].unsqueeze(0)))


class IDRepresentation(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.video_emb = nn.Embedding(cfg.n_videos, d // 2)
        # Videos without a training row would otherwise keep their random initial embedding (noise at test
        # time); they share one learned "unknown video" embedding, trained by replacing a row's video
        # embedding with it at rate cfg.video_id_dropout (0 turns the mechanism off: the literal model).
        # ``video_seen`` is set from the training split by segfast.train and saved with the weights.
        self.unk_video = nn.Parameter(torch.zeros(d // 2))
        self.register_buffer("video_seen", torch.ones(cfg.n_videos, dtype=torch.bool))
        self.video_id_dropout = float(cfg.video_id_dropout)
        self.slot_lin = nn.Linear(1, d // 2)
        self.user_emb = nn.Embedding(cfg.n_users, d)
        self.finish = _Finish(d, cfg.max_slots, 1, cfg.dropout, cfg.slot_types)

    def forward(self, batch: dict, pos_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> V [B, 40, d], U [B, 1, d], user_mask [B, 1] (all True)."""
        v = self.video_tokens(batch["video_idx"], pos_index, batch["slot_mask"], finish=False)
        u = self.user_emb(batch["user_idx"])[:, None, :]
        v, u = self.finish(v, u, pos_index, batch["slot_mask"])
        return v, u, torch.ones((v.shape[0], 1), dtype=torch.bool, device=v.device)

    def user_tokens(self, uid: Tensor) -> Tensor:
        """U [B, 1, d] of user ids ``uid`` [B] (finished)."""
        return self.finish.finish_u(self.user_emb(uid)[:, None, :])

    def video_tokens(self, vid: Tensor, pos_index: Tensor, slot_mask: Tensor, finish: bool = True) -> Tensor:
        """V [B, S, d] of video ids ``vid`` [B] (finished unless ``finish=False``)."""
        b, s = pos_index.shape
        ve = self.video_emb(vid)
        if self.video_id_dropout > 0:  # 0 = the literal model: every video uses its own embedding
            known = self.video_seen[vid]
            if self.training:
                known = known & (torch.rand(known.shape, device=known.device) >= self.video_id_dropout)
            ve = torch.where(known[:, None], ve, self.unk_video.to(ve.dtype))
        ve = ve[:, None, :].expand(b, s, -1)
        se = self.slot_lin(pos_index.to(ve.dtype).unsqueeze(-1))
        v = torch.cat([ve, se], dim=-1)
        return self.finish.finish_v(v, pos_index, slot_mask) if finish else v


class VisualRepresentation(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.feature_dim = int(cfg.feature_dim)
        self.proj = nn.Linear(self.feature_dim, d)
        self.in_scale = float(self.feature_dim) if cfg.feature_rescale else 1.0
        self.finish = _Finish(d, cfg.max_slots, cfg.max_user_tokens, cfg.dropout, cfg.slot_types)

    def embed(self, feat: Tensor) -> Tensor:
        """[..., feature_dim] raw features -> [..., d]: L1-normalise, rescale, project (before position etc.)."""
        return self.proj(l1_normalise(feat) * self.in_scale)

    def forward(self, batch: dict, pos_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> V [B, 40, d], U [B, M, d], user_mask [B, M]."""
        vf, uf, um = batch["video_feat"], batch["user_feat"], batch["user_mask"]
        for name, t in (("video_feat", vf), ("user_feat", uf)):
            if t.shape[-1] != self.feature_dim:
                raise ValueError(f"batch[{name!r}] has feature dimension {t.shape[-1]}, the model expects "
                                 f"{self.feature_dim}")
        if um.shape != uf.shape[:2]:
            raise ValueError(f"batch['user_mask'] has shape {tuple(um.shape)}, expected {tuple(uf.shape[:2])}")
        v = self.embed(vf)
        u = self.embed(uf)
        v, u = self.finish(v, u, pos_index, batch["slot_mask"])
        return v, u, um.bool()
