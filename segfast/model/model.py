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

import segfast.ops as ops
from segfast.model.config import ModelConfig
from segfast.model.decoder import SegmentDecoder
from segfast.model.encoder import Encoder
from segfast.model.representation import IDRepresentation, VisualRepresentation

__all__ = ["SegInterestModel", "batch_to", "expand_unique"]

_INDEX_KEYS = ("row", "user_idx", "video_idx", "n_segments", "slot_index", "target")


def batch_to(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch with every tensor on ``device``."""
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for k, v in batch.items()}


_UNIQUE = {"video_feat_u": "video_inv", "video_feat_rows_u": "video_inv", "user_feat_u": "user_inv",
           "user_feat_rows_u": "user_inv", "user_mask_u": "user_inv"}


def expand_unique(batch: dict) -> dict:
    """A unique batch (docs/internals.md) as the equivalent per-row batch: every per-distinct entry expanded by
    its inverse index (the reference the unique forward is tested against)."""
    out = {k: v for k, v in batch.items() if k not in _UNIQUE and k not in
           ("video_inv", "user_inv", "video_idx_u", "user_idx_u")}
    for key, inv in _UNIQUE.items():
        if key in batch:
            out[key[:-2]] = batch[key][batch[inv].long()]
    for key, inv in (("user_idx_u", "user_inv"), ("video_idx_u", "video_inv")):  # a batch without the per-row ids
        if key[:-2] not in out and key in batch:
            out[key[:-2]] = batch[key][batch[inv].long()]
    return out


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
        # "auto" is resolved from the training data by segfast train (ModelConfig.for_prepared); a model built
        # from a hand-made config without that statistic gets the low rate (auto_video_id_dropout(None))
        self.config = config = config.resolved()
        self.visual = _ModalityEncoder(config, "visual") if config.uses_visual else None
        self.id = _ModalityEncoder(config, "id") if config.uses_id else None
        self.decoder = SegmentDecoder(config)
        self.feature_store = None  # a segfast.features.FeatureStore (not a parameter, not saved)

    # batches of unique videos / users plus inverse indices (docs/internals.md, "Batch contract") go through
    # _encode_unique; the scorer sends them to any model that sets this
    accepts_unique_batches = True

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

    def set_feature_store(self, store) -> None:
        """Attach the feature store that batches of feature row indices (``video_feat_rows``...) are gathered
        from (a :class:`segfast.features.FeatureStore` on this model's device; None detaches)."""
        if store is not None and self.config.uses_visual and store.dim != self.config.feature_dim:
            raise ValueError(f"feature store of dimension {store.dim}, the model expects {self.config.feature_dim}")
        self.feature_store = store

    def _check_batch(self, batch: dict, unique: bool = False) -> None:
        cfg = self.config
        sfx = "_u" if unique else ""
        need = ["slot_mask", "slot_index"] + (["video_inv", "user_inv"] if unique else ["target"])
        if cfg.prior == "user" and not ("user_idx" in batch or (unique and "user_idx_u" in batch)):
            need.append("user_idx")  # the per-user prior's table row
        if cfg.uses_id:
            need += ["user_idx", "video_idx"] + (["user_idx_u", "video_idx_u"] if unique else [])
        if cfg.uses_visual:
            for key in ("video_feat", "user_feat"):
                if key + sfx not in batch and key + "_rows" + sfx not in batch:
                    need.append(key + sfx)
            need.append("user_mask" + sfx)
        missing = [k for k in need if k not in batch]
        if missing:
            extra = " (the batch has no features: load it with features=True)" if cfg.uses_visual and \
                "video_feat" + sfx in missing else ""
            raise KeyError(f"batch lacks {missing} needed by a {cfg.modality!r} model{extra}")
        sm = batch["slot_mask"]
        if unique:  # the scorer trims the slots to the batch's longest video + 1
            if sm.dim() != 2 or not 1 <= sm.shape[1] <= cfg.max_slots:
                raise ValueError(f"batch['slot_mask'] has shape {tuple(sm.shape)}, expected [B, S <= {cfg.max_slots}]")
        elif sm.dim() != 2 or sm.shape[1] != cfg.max_slots:
            raise ValueError(f"batch['slot_mask'] has shape {tuple(sm.shape)}, expected [B, {cfg.max_slots}]")
        if cfg.uses_visual and any(k.endswith("_rows" + sfx) for k in batch) and self.feature_store is None:
            raise ValueError("the batch carries feature row indices but the model has no feature store "
                             "(model.set_feature_store(FeatureStore(prepared.features, device)))")
        checks = [("user_idx", cfg.n_users), ("video_idx", cfg.n_videos)] if cfg.uses_id else []
        if cfg.prior == "user" and not cfg.uses_id:
            checks = [(k, cfg.n_users) for k in ("user_idx", "user_idx_u") if k in batch]
        if checks:  # range checks where they are free (CPU tensors, before any transfer)
            for key, n in checks:
                t = batch[key]
                if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                    raise IndexError(f"batch[{key!r}] has values in [{int(t.min())}, {int(t.max())}], "
                                     f"the model knows {n} (ids from a different dataset?)")

    def _pos_index(self, batch: dict) -> Tensor:
        si = batch["slot_index"].long()
        if self.config.ablation != "no-position":
            return si
        b, s = si.shape
        full = self.config.max_slots  # a permutation of all 40 slots, cut to the batch's S (scorer batches)
        if self.training:
            keys = torch.rand((b, full), device=si.device)
        else:
            row = batch.get("row")
            row = torch.zeros(b, dtype=torch.long, device=si.device) if row is None else row.long()
            keys = _mix64(row[:, None] * full + torch.arange(full, device=si.device)[None, :] + 1)
        return torch.argsort(keys, dim=1, stable=True)[:, :s]

    def _features(self, batch: dict, key: str) -> Tensor:
        """batch[key] (features), or the store's gather of batch[key + "_rows"] (key may end in "_u")."""
        if key in batch:
            return batch[key]
        base, sfx = (key[:-2], "_u") if key.endswith("_u") else (key, "")
        return self.feature_store.gather(batch[base + "_rows" + sfx])

    def _encode_unique(self, batch: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The encoder outputs of a unique batch: representation (and position embedding) once per distinct
        video and per distinct user history, expanded by ``video_inv`` / ``user_inv``."""
        cfg = self.config
        slot_mask = batch["slot_mask"].bool()
        b, s = slot_mask.shape
        vinv, uinv = batch["video_inv"].long(), batch["user_inv"].long()
        pos_index = self._pos_index(batch)
        per_row_pos = cfg.ablation == "no-position"  # the slot permutation is per pair, not per video
        nvu = None
        x = y = None
        if cfg.uses_visual:
            vf = self._features(batch, "video_feat_u")
            nvu = vf.shape[0]
        elif cfg.uses_id:
            nvu = batch["video_idx_u"].shape[0]
        vmask = torch.zeros((nvu, s), dtype=torch.bool, device=slot_mask.device)
        vmask[vinv] = slot_mask  # a video's N is the same in every pair
        vpos = pos_index[:1].expand(nvu, s)
        if cfg.uses_visual:
            rep = self.visual.rep
            vu = rep.embed(vf)
            uu = rep.finish.finish_u(rep.embed(self._features(batch, "user_feat_u")))
            if per_row_pos:
                v = rep.finish.finish_v(vu[vinv], pos_index, slot_mask)
            else:
                v = rep.finish.finish_v(vu, vpos, vmask)[vinv]
            x = self.visual.encoder(v, uu[uinv], slot_mask, batch["user_mask_u"].bool()[uinv])
        if cfg.uses_id:
            rep = self.id.rep
            if per_row_pos:
                v = rep.video_tokens(batch["video_idx"], pos_index, slot_mask)
            else:
                v = rep.video_tokens(batch["video_idx_u"], vpos, vmask)[vinv]
            u = rep.user_tokens(batch["user_idx_u"])[uinv]
            y = self.id.encoder(v, u, slot_mask, torch.ones((b, 1), dtype=torch.bool, device=v.device))
        return x, y

    def _encode(self, batch: dict) -> tuple[Optional[Tensor], Optional[Tensor], dict]:
        self._check_batch(batch)
        batch = batch_to(batch, self.device)
        if self.config.uses_visual:
            for key in ("video_feat", "user_feat"):
                if key not in batch:
                    batch[key] = self._features(batch, key)
        slot_mask = batch["slot_mask"].bool()
        pos_index = self._pos_index(batch)
        x = self.visual(batch, pos_index, slot_mask) if self.visual is not None else None
        y = self.id(batch, pos_index, slot_mask) if self.id is not None else None
        return x, y, batch

    def install_prior(self, table) -> None:
        """Install the position prior's table (``segfast.priors.compute_priors`` of the training split);
        ``segfast train`` does it for a new run, a loaded run has it in its weights."""
        self.decoder.install_prior(table)

    def _prior_terms(self, batch: dict, s: int) -> dict:
        """ops keyword arguments of the position prior for ``batch`` (already on the device): {} without one."""
        if self.config.prior == "none":
            return {}
        n = batch["slot_mask"].sum(1)  # slot_mask = slot < N (both batch kinds), also for trimmed S
        user = batch.get("user_idx")
        if user is None and "user_idx_u" in batch:
            user = batch["user_idx_u"][batch["user_inv"].long()]
        return self.decoder.prior_terms(user, n, s)

    # ---------------------------------------------------------------- API
    def forward(self, batch: dict) -> Tensor:
        """Interest logits [B, 40] (float32; padding slots included); [B, S] for a unique batch with S slots.

        ``batch``: a per-row batch (segfast.data.batches) or a unique batch (``video_inv`` / ``user_inv``,
        docs/internals.md "Batch contract"); visual features as tensors or as row indices into the attached
        feature store. Unique batches are for eval mode (dropout would be shared by duplicates)."""
        if "video_inv" in batch:
            if self.training:
                raise ValueError("a unique batch (video_inv / user_inv) is for inference: call model.eval() "
                                 "first, or train on per-row batches (expand_unique gives one)")
            self._check_batch(batch, unique=True)
            batch = batch_to(batch, self.device)
            x, y = self._encode_unique(batch)
            s = batch["slot_mask"].shape[1]
            dec = self.decoder
            pa = None if dec.pos_a is None else dec.pos_a[:s]
            pc = None if dec.pos_c is None else dec.pos_c[:s]
            return ops.segment_decoder(x, y, dec.w_x, dec.w_y, dec.bias, dec.fusion, pa, pc, backend=dec.backend,
                                       **self._prior_terms(batch, s))
        x, y, b = self._encode(batch)
        return self.decoder(x, y, **self._prior_terms(b, b["slot_mask"].shape[1]))

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(logits [B, 40], loss []) with the configured intra-video loss; rows with target 40 excluded."""
        x, y, b = self._encode(batch)
        kind = self.config.loss
        labels = b.get("labels") if kind == "bce" else None
        smask = b["slot_mask"] if kind == "bce" else None
        if kind == "bce" and labels is None:
            raise KeyError("the bce loss needs batch['labels']")
        return self.decoder.decode_and_loss(x, y, b["target"].long(), kind, labels=labels, slot_mask=smask,
                                            **self._prior_terms(b, b["slot_mask"].shape[1]))

    @torch.no_grad()
    def score(self, batch: dict) -> Tensor:
        """forward() under no_grad (the caller picks train/eval mode; use model.eval() for scoring)."""
        return self.forward(batch)
