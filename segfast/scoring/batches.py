"""Batch assembly: the CPU tensors of one batch of pairs, built in the reader thread.

The batches follow the contract of docs/internals.md ("Batch contract"): with ``fast`` a unique batch (distinct
videos and user histories plus inverse indices: the model does the per-distinct work once), else a per-row
batch of 40 slots (``model.score``'s reference path). Visual features travel as integer row indices into the
:class:`segfast.features.FeatureStore` (``*_rows`` keys, padding = ``store.pad_row``) that the model gathers on
its device; when the store fell back to host gathering (``store.path == "host"``) this thread gathers them
(``store.host_gather``, pinned on CUDA) and the batch carries the feature tensors instead.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from segfast.data.batches import history_rows
from segfast.scoring.common import MAX_SLOTS
from segfast.scoring.index import IdIndex

__all__ = ["Assembler", "dedupe", "pair_bytes"]


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


def dedupe(keys: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inverse) of ``keys`` (ints in [0, len(scratch))): ``keys[first]`` are the distinct keys in order of
    their last occurrence's representative, ``keys[first][inverse] == keys``. O(len(keys)) with no sort, through
    ``scratch`` (any int64 array of that size, owned by one thread; its contents do not matter)."""
    b = keys.shape[0]
    ar = np.arange(b, dtype=np.int64)
    scratch[keys] = ar  # the last pair with each key wins
    rep = scratch[keys]
    first = np.flatnonzero(rep == ar)
    pos = np.empty(b, dtype=np.int64)
    pos[first] = np.arange(first.shape[0], dtype=np.int64)
    return first, pos[rep]


class Assembler:
    """Builds the CPU tensors of one batch of pairs (in the producer thread).

    ``features``: the :class:`segfast.features.FeatureStore` of a model that uses the visual modality."""

    def __init__(self, index: IdIndex, prepared, cfg, fast: bool, pin: bool, features=None):
        self.ix = index
        self.cfg = cfg
        self.fast = fast
        self.pin = pin
        self.visual = cfg.uses_visual
        self.features = features
        if self.visual and features is None:
            raise ValueError("a visual model's batches need a feature store (segfast.features.FeatureStore)")
        self.pad = features.pad_row if self.visual else 0
        self.host = self.visual and not features.resident
        self._vscratch = np.empty(index.nseg.shape[0], dtype=np.int64)  # dedupe scratch (this thread only)

    def _feats(self, out: dict, base: str, sfx: str, rows: np.ndarray) -> None:
        """``base_rows + sfx``: row indices (resident store: the model gathers them); on the host path
        ``base + sfx``: the gathered features."""
        import torch

        t = torch.from_numpy(rows)
        if self.host:
            out[base + sfx] = self.features.host_gather(t)
        else:
            out[base + "_rows" + sfx] = t

    def _user_rows(self, u, p):
        """Per pair: (source array selector, offset, length) of its visual history."""
        ix = self.ix
        latest = p >= ix.count[u]
        r = np.minimum(ix.ustart[u] + p, max(ix.vhoff.shape[0] - 1, 0))
        off = np.where(latest, ix.latest_off[u], ix.vhoff[r] if ix.vhoff.size else 0)
        ln = np.where(latest, ix.latest_len[u], ix.vhlen[r] if ix.vhlen.size else 0)
        return latest, off, ln

    def _user_feat_rows(self, latest, off, ln):
        """([n, M] feature rows with pad_row after each history, [n, M] mask)."""
        m = max(int(ln.max()) if ln.size else 0, 1)
        mask = np.arange(m, dtype=np.int64)[None, :] < ln[:, None]
        if latest.all() or not latest.any():  # one source (the common case: scoring "as of now")
            src = self.ix.latest if latest.all() else self.ix.vhist
            return history_rows(src, off, ln, m, self.pad), mask
        # mixed: every row from the per-interaction histories (the "latest" rows as full garbage windows at 0),
        # then the few "latest" rows overwritten from their own source
        rows = history_rows(self.ix.vhist, np.where(latest, 0, off), np.where(latest, m, ln), m, self.pad)
        li = np.flatnonzero(latest)
        rows[li] = history_rows(self.ix.latest, off[li], ln[li], m, self.pad)
        return rows, mask

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
        }
        if self.fast:
            vfirst, vinv = dedupe(v, self._vscratch)
            uv = v[vfirst]
            out["video_inv"] = torch.from_numpy(vinv)
            out["video_idx_u"] = torch.from_numpy(uv)
            if self.visual:  # distinct per (user, history position)
                latest, off, ln = self._user_rows(u, p)
                _, first, uinv = np.unique(self.ix.ustart[u] + u + p, return_index=True, return_inverse=True)
                uinv = uinv.reshape(-1).astype(np.int64, copy=False)
            else:  # ID only: a user's token is one embedding + LayerNorm, cheaper than deduping on the host
                first = uinv = np.arange(b, dtype=np.int64)
            out["user_inv"] = torch.from_numpy(uinv)
            out["user_idx_u"] = torch.from_numpy(u[first])
            if self.visual:
                fo = self.ix.feat_off[uv]
                vmask = slots[None, :] < self.ix.nseg[uv][:, None]
                self._feats(out, "video_feat", "_u", np.where(vmask, fo[:, None] + slots[None, :], self.pad))
                ur, um = self._user_feat_rows(latest[first], off[first], ln[first])
                self._feats(out, "user_feat", "_u", ur)
                out["user_mask_u"] = torch.from_numpy(um)
        else:
            out["target"] = torch.zeros(b, dtype=torch.int64)
            if self.visual:
                fo = self.ix.feat_off[v]
                self._feats(out, "video_feat", "", np.where(slot_mask, fo[:, None] + slots[None, :], self.pad))
                ur, um = self._user_feat_rows(*self._user_rows(u, p))
                self._feats(out, "user_feat", "", ur)
                out["user_mask"] = torch.from_numpy(um)
        if self.pin:
            out = {k: (t if t.is_pinned() else t.pin_memory()) for k, t in out.items()}
        return out
