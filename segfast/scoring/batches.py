"""Batch assembly: the CPU tensors of one batch of pairs, built in the reader thread.

Feature gathering goes through :class:`HostFeatures` (``gather(rows, mask)`` -> a float tensor of
``rows.shape + (dim,)`` with the masked-out rows zero). That is the seam for a device-resident feature store:
an object with the same ``gather`` (or one that leaves integer rows in the batch for the model to gather)
replaces it without touching the rest of the scorer.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from segfast.scoring.common import MAX_SLOTS
from segfast.scoring.index import IdIndex

__all__ = ["Assembler", "HostFeatures", "pair_bytes"]


def pair_bytes(cfg, feature_dim: Optional[int]) -> int:
    """Rough upper bound of the host memory one pair takes in a batch (activations + gathered features)."""
    d, h, ff, s = cfg.d_model, cfg.n_heads, cfg.d_ff, MAX_SLOTS
    per = 0
    if cfg.uses_id:
        per += 4 * (s * (12 * d + ff) + 2 * s * h * (s + 1))
    if cfg.uses_visual:
        m = cfg.max_user_tokens
        per += 4 * ((s + m) * (12 * d + ff) + 2 * (s + m) * h * (s + m))
        per += (s + m) * int(feature_dim or 0) * 10  # fp16 gather, fp32 copy, normalised copy (no dedupe)
    return max(per, 1)


class HostFeatures:
    """The prepared segment features as a host tensor (the read-only memmap), gathered per batch on the host."""

    resident = False  # True for a store whose rows already live on the scoring device

    def __init__(self, features):
        import torch

        with warnings.catch_warnings():  # read-only memmap; never written
            warnings.simplefilter("ignore", UserWarning)
            self.table = torch.from_numpy(np.asarray(features))
        self.dim = int(self.table.shape[1])

    def gather(self, rows: np.ndarray, mask: np.ndarray):
        """Feature rows ``rows`` (any shape) -> tensor ``rows.shape + (dim,)``; entries where ``mask`` is False
        are zero."""
        import torch

        out = torch.index_select(self.table, 0, torch.from_numpy(np.ascontiguousarray(rows.reshape(-1))))
        pad = np.flatnonzero(~mask.reshape(-1))
        if pad.size:
            out.index_fill_(0, torch.from_numpy(pad), 0)
        return out.view(rows.shape + (self.dim,))


class Assembler:
    """Builds the CPU tensors of one batch of pairs (in the producer thread).

    ``features``: the feature store (default :class:`HostFeatures` over ``prepared.features``) for a model
    that uses the visual modality."""

    def __init__(self, index: IdIndex, prepared, cfg, fast: bool, pin: bool, features=None):
        self.ix = index
        self.cfg = cfg
        self.fast = fast
        self.pin = pin
        self.visual = cfg.uses_visual
        self.features = None
        if self.visual:
            self.features = features if features is not None else HostFeatures(prepared.features)

    def _gather(self, rows: np.ndarray, mask: np.ndarray):
        return self.features.gather(rows, mask)

    def _user_rows(self, u, p):
        """Per pair: (source array selector, offset, length) of its visual history."""
        ix = self.ix
        latest = p >= ix.count[u]
        r = np.minimum(ix.ustart[u] + p, max(ix.vhoff.shape[0] - 1, 0))
        off = np.where(latest, ix.latest_off[u], ix.vhoff[r] if ix.vhoff.size else 0)
        ln = np.where(latest, ix.latest_len[u], ix.vhlen[r] if ix.vhlen.size else 0)
        return latest, off, ln

    def _user_feats(self, latest, off, ln):
        m = max(int(ln.max()) if ln.size else 0, 1)
        ar = np.arange(m, dtype=np.int64)
        mask = ar[None, :] < ln[:, None]
        idx = np.where(mask, off[:, None] + ar[None, :], 0)
        rows = np.zeros(idx.shape, dtype=np.int64)
        for flag, src in ((True, self.ix.latest), (False, self.ix.vhist)):
            sel = latest == flag
            if sel.any() and src.shape[0]:
                rows[sel] = np.where(mask[sel], src[np.minimum(idx[sel], src.shape[0] - 1)], 0)
        return self._gather(rows, mask), mask

    def assemble(self, rows_in, u, v, n, p) -> dict:
        import torch

        b = u.shape[0]
        s = min(MAX_SLOTS, int(n.max()) + 1) if (self.fast and b) else MAX_SLOTS
        slots = np.arange(s, dtype=np.int64)
        slot_mask = slots[None, :] < n[:, None]
        out = {
            "row": torch.from_numpy(rows_in), "user_idx": torch.from_numpy(u), "video_idx": torch.from_numpy(v),
            "n_segments": torch.from_numpy(n), "slot_mask": torch.from_numpy(slot_mask),
            "slot_index": torch.from_numpy(np.broadcast_to(slots, (b, s)).copy()),
            "target": torch.zeros(b, dtype=torch.int64),
        }
        if self.visual:
            ix = self.ix
            latest, off, ln = self._user_rows(u, p)
            if self.fast:
                uv, vinv = np.unique(v, return_inverse=True)
                nv = ix.nseg[uv]
                vmask = slots[None, :] < nv[:, None]
                fo = ix.feat_off[uv]
                frows = np.where(vmask, fo[:, None] + slots[None, :], fo[:, None])
                out["video_feat_u"] = self._gather(frows, vmask)
                out["video_inv"] = torch.from_numpy(vinv.reshape(-1).astype(np.int64))
                ukey = ix.ustart[u] + u + p  # distinct per (user, history position)
                _, first, uinv = np.unique(ukey, return_index=True, return_inverse=True)
                uf, um = self._user_feats(latest[first], off[first], ln[first])
                out["user_feat_u"] = uf
                out["user_mask_u"] = torch.from_numpy(um)
                out["user_inv"] = torch.from_numpy(uinv.reshape(-1).astype(np.int64))
            else:
                fo = ix.feat_off[v]
                frows = np.where(slot_mask, fo[:, None] + slots[None, :], fo[:, None])
                out["video_feat"] = self._gather(frows, slot_mask)
                uf, um = self._user_feats(latest, off, ln)
                out["user_feat"] = uf
                out["user_mask"] = torch.from_numpy(um)
        if self.pin:
            out = {k: t.pin_memory() for k, t in out.items()}
        return out

