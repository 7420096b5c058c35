"""SegInterestModel: representation -> cross-attention encoder -> segment decoder, per SPEC section 5.

The three replaceable ops (cross_attention, segment_decoder, decode_and_loss) are called only through
``segfast.ops`` with ``backend=config.backend``.

``no-position`` ablation (exactly): the slot index fed to the ID slot feature (Linear(1 -> d/2)) and to
the slot position-embedding lookup is replaced by a per-row permutation of 0..39 (all 40 slots, padding
included, so a real slot may get an index >= N), and the decoder has no position bias (a, c absent).
In training mode the permutation is drawn from torch's global RNG (seeded, checkpointed); in eval mode
it is a fixed hash of (batch["row"], slot), so scores are deterministic. The user-token position
embedding (visual history order) is kept; the features and the masks are not moved.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from segfast.model.config import ModelConfig
from segfast.model.decoder import SegmentDecoder
from segfast.model.encoder import Encoder
from segfast.model.representation import IDRepresentation, VisualRepresentation

__all__ = ["SegInterestModel", "batch_to"]

_INDEX_KEYS = ("row", "user_idx", "video_idx", "n_segments", "slot_index", "target")


def batch_to(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch with every tensor on ``device``."""
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for k, v in batch.items()}


def _mix64(x: Tensor) -> Tensor:
    """A splitmix64-style integer hash on int64 (wrapping arithmetic; same on CPU and CUDA)."""
    x = x * -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64
    x = x ^ (x >> 29)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ (x >> 32)
    return x


class _ModalityEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.rep = IDRepresentation(cfg) if kind == "id" else VisualRepresentation(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, batch: dict, pos_index: Tensor, slot_mask: Tensor) -> Tensor:
        v, u, umask = self.rep(batch, pos_index)
        return self.encoder(v, u, slot_mask, umask)


class SegInterestModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate(require_data=True)
        self.config = config
        self.visual = _ModalityEncoder(config, "visual") if config.uses_visual else None
        self.id = _ModalityEncoder(config, "id") if config.uses_id else None
        self.decoder = SegmentDecoder(config)

    # ---------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.decoder.bias.device

    def set_seen_videos(self, seen) -> None:
        """Mark which videos have training rows ([n_videos] bool); the others use the unknown-video embedding
        of the ID representation (no effect without the ID modality)."""
        if self.id is None:
            return
        seen = torch.as_tensor(seen, dtype=torch.bool)
        buf = self.id.rep.video_seen
        if seen.shape != buf.shape:
            raise ValueError(f"set_seen_videos: expected {tuple(buf.shape)} flags (one per video), got {tuple(seen.shape)}")
        buf.copy_(seen.to(buf.device))

    def set_backend(self, name: str) -> None:
        """Switch the ops backend ("torch", "sdpa" or "triton", segfast.ops.BACKENDS) of this model."""
        from segfast.ops import BACKENDS
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        self.config.backend = name
        self.decoder.backend = name
        for enc in (self.visual, self.id):
            if enc is not None:
                enc.encoder.set_backend(name)

    def _check_batch(self, batch: dict) -> None:
        cfg = self.config
        need = ["slot_mask", "slot_index", "target"]
        if cfg.uses_id:
            need += ["user_idx", "video_idx"]
        if cfg.uses_visual:
            need += ["video_feat", "user_feat", "user_mask"]
        missing = [k for k in need if k not in batch]
        if missing:
            extra = " (the batch has no features: load it with features=True)" if cfg.uses_visual and \
                "video_feat" in missing else ""
            raise KeyError(f"batch lacks {missing} needed by a {cfg.modality!r} model{extra}")
        sm = batch["slot_mask"]
        if sm.dim() != 2 or sm.shape[1] != cfg.max_slots:
            raise ValueError(f"batch['slot_mask'] has shape {tuple(sm.shape)}, expected [B, {cfg.max_slots}]")
        if cfg.uses_id:  # range checks where they are free (CPU tensors, before any transfer)
            for key, n in (("user_idx", cfg.n_users), ("video_idx", cfg.n_videos)):
                t = batch[key]
                if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                    raise IndexError(f"batch[{key!r}] has values in [{int(t.min())}, {int(t.max())}], "
                                     f"the model knows {n} (ids from a different dataset?)")

    def _pos_index(self, batch: dict) -> Tensor:
        si = batch["slot_index"].long()
        if self.config.ablation != "no-position":
            return si
        b, s = si.shape
        if self.training:
            keys = torch.rand((b, s), device=si.device)
        else:
            row = batch.get("row")
            row = torch.zeros(b, dtype=torch.long, device=si.device) if row is None else row.long()
            keys = _mix64(row[:, None] * s + torch.arange(s, device=si.device)[None, :] + 1)
        return torch.argsort(keys, dim=1, stable=True)

    def _encode(self, batch: dict) -> tuple[Optional[Tensor], Optional[Tensor], dict]:
        self._check_batch(batch)
        batch = batch_to(batch, self.device)
        slot_mask = batch["slot_mask"].bool()
        pos_index = self._pos_index(batch)
        x = self.visual(batch, pos_index, slot_mask) if self.visual is not None else None
        y = self.id(batch, pos_index, slot_mask) if self.id is not None else None
        return x, y, batch

    # ---------------------------------------------------------------- API
    def forward(self, batch: dict) -> Tensor:
        """Interest logits [B, 40] (float32; padding slots included)."""
        x, y, _ = self._encode(batch)
        return self.decoder(x, y)

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(logits [B, 40], loss []) with the configured intra-video loss; rows with target 40 excluded."""
        x, y, b = self._encode(batch)
        kind = self.config.loss
        labels = b.get("labels") if kind == "bce" else None
        smask = b["slot_mask"] if kind == "bce" else None
        if kind == "bce" and labels is None:
            raise KeyError("the bce loss needs batch['labels']")
        return self.decoder.decode_and_loss(x, y, b["target"].long(), kind, labels=labels, slot_mask=smask)

    @torch.no_grad()
    def score(self, batch: dict) -> Tensor:
        """forward() under no_grad (the caller picks train/eval mode; use model.eval() for scoring)."""
        return self.forward(batch)
