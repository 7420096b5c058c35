"""The model call of a scoring batch: the seam where "one forward owned by the model" will go.

``forward(model, batch, fast)`` returns logits [B, S] for a batch assembled by
:class:`segfast.scoring.batches.Assembler` and already on the model's device. ``fast=True`` runs the
per-distinct-video / per-distinct-user path below (it calls the model's submodules, so it is only taken when
:func:`fast_capable` finds them); ``fast=False`` is ``model.score`` on full 40-slot batches (the reference).
"""
from __future__ import annotations

from segfast.scoring.common import MAX_SLOTS

__all__ = ["fast_capable", "forward"]


def fast_capable(model) -> bool:
    need = ["config", "decoder"]
    if not all(hasattr(model, a) for a in need):
        return False
    cfg = model.config
    ok = True
    if cfg.uses_visual:
        enc = getattr(model, "visual", None)
        ok &= enc is not None and all(hasattr(enc, a) for a in ("rep", "encoder")) and \
            all(hasattr(enc.rep, a) for a in ("proj", "finish"))
    if cfg.uses_id:
        enc = getattr(model, "id", None)
        ok &= enc is not None and all(hasattr(enc, a) for a in ("rep", "encoder"))
    dec = model.decoder
    ok &= all(hasattr(dec, a) for a in ("w_x", "w_y", "bias", "fusion", "pos_a", "pos_c", "backend"))
    return bool(ok)



def forward(model, batch: dict, fast: bool):
    """Logits [B, S] for an assembled batch already on the model's device."""
    import torch

    import segfast.ops as ops

    if not fast:
        return model.score(batch)
    cfg = model.config
    slot_mask = batch["slot_mask"]
    b, s = slot_mask.shape
    if cfg.ablation == "no-position":  # the full 40-slot permutation of the model, cut to S slots
        full = torch.arange(MAX_SLOTS, device=slot_mask.device).expand(b, MAX_SLOTS)
        pos_index = model._pos_index({"slot_index": full, "row": batch["row"]})[:, :s]
    else:
        pos_index = batch["slot_index"]
    x = y = None
    if cfg.uses_visual:
        rep = model.visual.rep
        vu = rep.embed(batch["video_feat_u"])
        uu = rep.embed(batch["user_feat_u"])
        um = batch["user_mask_u"][batch["user_inv"]]
        if cfg.ablation == "no-position":
            v, uu = rep.finish(vu[batch["video_inv"]], uu, pos_index, slot_mask)
        else:  # position embedding + LayerNorm once per distinct video and user history
            vmask = torch.zeros((vu.shape[0], s), dtype=torch.bool, device=slot_mask.device)
            vmask[batch["video_inv"]] = slot_mask.bool()  # a video's N is the same in every pair
            vu, uu = rep.finish(vu, uu, pos_index[:1].expand(vu.shape[0], s), vmask)
            v = vu[batch["video_inv"]]
        u = uu[batch["user_inv"]]
        x = model.visual.encoder(v, u, slot_mask, um)
    if cfg.uses_id:
        v, u, um = model.id.rep(batch, pos_index)
        y = model.id.encoder(v, u, slot_mask, um)
    dec = model.decoder
    pa = None if dec.pos_a is None else dec.pos_a[:s]
    pc = None if dec.pos_c is None else dec.pos_c[:s]
    return ops.segment_decoder(x, y, dec.w_x, dec.w_y, dec.bias, dec.fusion, pa, pc, backend=dec.backend)

