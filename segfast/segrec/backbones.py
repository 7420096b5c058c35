"""SegRec backbones: per-slot scores y'_i from (user, video id, slot position[, segment feature]).

A backbone scores *items*: (row of the batch, slot position). The base class gathers the real items of a
[B, S] position grid (``mask``), builds their embeddings once (user, video, position and, when the backbone
was built with ``feature_dim``, the projected segment feature) and hands them to ``score_items``; it scatters
the result back to [B, S] with 0 on masked-out slots. A new backbone is therefore one small class with a
``score_items(batch, items) -> [T]`` method.

Positions: 0..39 are the segment slots; ``VIDEO_POS`` = 40 is the "video" position used by the plain
video-level model (weighting ``video``: one item per row at position 40, whose feature is the mean of the
video's real segment features).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from segfast import MAX_SLOTS

__all__ = ["VIDEO_POS", "Backbone", "WideDeep", "DIN", "BACKBONES", "make_backbone"]

VIDEO_POS = MAX_SLOTS  # 40


class Backbone(nn.Module):
    """Shared embeddings and the item gather/scatter. Subclasses implement :meth:`score_items`."""

    def __init__(self, n_users: int, n_videos: int, dim: int = 16, feature_dim: int | None = None):
        super().__init__()
        if n_users < 1 or n_videos < 1 or dim < 1:
            raise ValueError(f"backbone: need n_users, n_videos, dim >= 1, got {n_users}, {n_videos}, {dim}")
        self.n_users, self.n_videos, self.dim, self.feature_dim = n_users, n_videos, dim, feature_dim
        self.user_emb = nn.Embedding(n_users, dim)
        self.video_emb = nn.Embedding(n_videos, dim)
        self.pos_emb = nn.Embedding(MAX_SLOTS + 1, dim)
        self.feat_proj = nn.Linear(feature_dim, dim) if feature_dim else None
        for e in (self.user_emb, self.video_emb, self.pos_emb):
            nn.init.normal_(e.weight, std=0.05)

    @property
    def n_fields(self) -> int:
        return 4 if self.feat_proj is not None else 3

    def items(self, batch: dict, pos: Tensor, mask: Tensor) -> dict:
        """Embeddings of the items where ``mask`` [B, S] is True; ``pos`` [B, S] their positions."""
        b_idx, s_idx = mask.nonzero(as_tuple=True)
        p = pos[b_idx, s_idx].long()
        u = batch["user_idx"].long()[b_idx]
        v = batch["video_idx"].long()[b_idx]
        it = {"b": b_idx, "s": s_idx, "pos_idx": p, "user_idx": u, "video_idx": v,
              "user": self.user_emb(u), "video": self.video_emb(v), "pos": self.pos_emb(p)}
        if self.feat_proj is not None:
            if "video_feat" not in batch:
                raise KeyError("this backbone uses segment features: the batch has no 'video_feat' "
                               "(assemble it with features=True)")
            vf = batch["video_feat"].float()  # [B, 40, F]
            seg = p < MAX_SLOTS
            f = torch.zeros((p.shape[0], vf.shape[-1]), dtype=vf.dtype, device=vf.device)
            if bool(seg.any()):
                f[seg] = vf[b_idx[seg], p[seg]]
            if not bool(seg.all()):  # the video position: mean over the real segments
                sm = batch["slot_mask"].to(vf.dtype)
                mean = (vf * sm[..., None]).sum(1) / sm.sum(1).clamp_min(1)[:, None]
                f[~seg] = mean[b_idx[~seg]]
            f = f / (f.abs().sum(-1, keepdim=True) + 1e-6)  # L1 normalisation as in the Task-1 model
            it["feat"] = self.feat_proj(f)
        return it

    def fields(self, it: dict) -> list:
        out = [it["user"], it["video"], it["pos"]]
        if "feat" in it:
            out.append(it["feat"])
        return out

    def score_items(self, batch: dict, it: dict) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: dict, pos: Tensor, mask: Tensor) -> Tensor:
        """y' [B, S] (float32; 0 where ~mask)."""
        it = self.items(batch, pos, mask)
        y = self.score_items(batch, it)
        out = torch.zeros(mask.shape, dtype=y.dtype, device=y.device)
        out[it["b"], it["s"]] = y
        return out


def _mlp(d_in: int, hidden: tuple, dropout: float = 0.0) -> nn.Sequential:
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


class WideDeep(Backbone):
    """Wide: user, video and position biases plus a (video x position) crossed-id weight (hashed into
    ``cross_buckets``) and a (user x position) crossed-id weight. Deep: MLP over [user; video; position
    (; feature)] embeddings. y' = wide + deep."""

    def __init__(self, n_users, n_videos, dim=16, feature_dim=None, hidden=(64, 32), dropout=0.0,
                 cross_buckets: int = 1 << 18):
        super().__init__(n_users, n_videos, dim, feature_dim)
        self.cross_buckets = int(min(cross_buckets, n_videos * (MAX_SLOTS + 1)))
        self.user_bias = nn.Embedding(n_users, 1)
        self.video_bias = nn.Embedding(n_videos, 1)
        self.pos_bias = nn.Embedding(MAX_SLOTS + 1, 1)
        self.vp_cross = nn.Embedding(self.cross_buckets, 1)
        self.up_cross = nn.Embedding(n_users * (MAX_SLOTS + 1), 1)
        for e in (self.user_bias, self.video_bias, self.pos_bias, self.vp_cross, self.up_cross):
            nn.init.zeros_(e.weight)
        self.deep = _mlp(self.n_fields * dim, hidden, dropout)

    def score_items(self, batch, it):
        p, u, v = it["pos_idx"], it["user_idx"], it["video_idx"]
        wide = (self.user_bias(u) + self.video_bias(v) + self.pos_bias(p)
                + self.vp_cross((v * (MAX_SLOTS + 1) + p) % self.cross_buckets)
                + self.up_cross(u * (MAX_SLOTS + 1) + p))[:, 0]
        deep = self.deep(torch.cat(self.fields(it), dim=-1))[:, 0]
        return wide + deep


class DIN(Backbone):
    """Deep Interest Network: an activation unit MLP([q; k; q*k; q-k]) scores each history video k (the
    user's last <= 50 videos, ``hist_video_idx``/``hist_mask``) against the query q = target video
    embedding + slot position embedding; the interest vector is the softmax(masked scores)-weighted sum of
    the history embeddings (zero for an empty history), then MLP([user; video; position; interest
    (; feature)])."""

    def __init__(self, n_users, n_videos, dim=16, feature_dim=None, hidden=(64, 32), att_hidden=16,
                 dropout=0.0):
        super().__init__(n_users, n_videos, dim, feature_dim)
        self.att = nn.Sequential(nn.Linear(4 * dim, att_hidden), nn.ReLU(), nn.Linear(att_hidden, 1))
        self.mlp = _mlp((self.n_fields + 1) * dim, hidden, dropout)

    def score_items(self, batch, it):
        b = it["b"]
        hv = batch["hist_video_idx"].long()
        hm = batch["hist_mask"].bool()
        hist = self.video_emb(hv)  # [B, H, D]
        q = (it["video"] + it["pos"])[:, None, :]  # [T, 1, D]
        k = hist[b]  # [T, H, D]
        m = hm[b]
        qe = q.expand_as(k)
        a = self.att(torch.cat([qe, k, qe * k, qe - k], dim=-1))[..., 0]  # [T, H]
        a = a.masked_fill(~m, float("-inf"))
        w = torch.softmax(a, dim=-1)
        w = torch.nan_to_num(w, nan=0.0)  # rows with no history
        interest = (w[..., None] * k).sum(1)
        return self.mlp(torch.cat(self.fields(it) + [interest], dim=-1))[:, 0]


BACKBONES = {"widedeep": WideDeep, "din": DIN}


def make_backbone(name: str, n_users: int, n_videos: int, feature_dim: int | None = None, **kw) -> Backbone:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[key](n_users, n_videos, feature_dim=feature_dim, **kw)
