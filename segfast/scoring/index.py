"""The prepared dataset as the scorer sees it: id maps, per-user row ranges and visual histories."""
from __future__ import annotations

from typing import Optional

import numpy as np

from segfast.scoring.common import ScoreInputError

__all__ = ["IdIndex", "latest_visual_histories"]


def _hist_options(prepared) -> tuple[int, int, int, int]:
    m = prepared.manifest
    opts = m.get("options") or {}
    return (int(opts.get("hist_len", 50)), int(opts.get("vhist_cap", 100)), int(opts.get("profile_len", 0)),
            int(m.get("seed", 0)))


def latest_visual_histories(prepared) -> tuple[np.ndarray, np.ndarray]:
    """Visual history of every user "as of now" (after all of the user's prepared interactions).

    It is exactly the history prepare would give a new last interaction of the user (docs/internals.md,
    segfast.data.splits): a virtual row number start(u) + count(u), history = the user's last
    min(50, count) rows most recent first, then the profile rows before them; watched segments in slot
    order; a seeded sample of ``vhist_cap`` keyed on (seed, virtual row, candidate index) when longer.
    Returns (flat feature rows int64, offsets int64[n_users + 1]).
    """
    from segfast.data.splits import hash_keys

    hist_cap, cap, prof, seed = _hist_options(prepared)
    it = prepared.interactions
    n_users = prepared.n_users
    user = np.asarray(it["user_idx"], dtype=np.int64)
    count = np.bincount(user, minlength=n_users).astype(np.int64)
    start = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
    vl = np.asarray(it["view_length"], dtype=np.int64)
    foff = np.asarray(prepared.videos["feat_offset"], dtype=np.int64)[np.asarray(it["video_idx"], dtype=np.int64)]
    hl = np.minimum(count, hist_cap)
    nb = np.clip(np.minimum(prof, count - hl), 0, None)
    vrow = start + count
    nv = hl + nb
    owner = np.repeat(np.arange(n_users, dtype=np.int64), nv)
    j = np.arange(owner.shape[0], dtype=np.int64) - np.repeat(np.concatenate(([0], np.cumsum(nv)[:-1])), nv)
    cand = np.where(j < hl[owner], vrow[owner] - 1 - j, start[owner] + nb[owner] - 1 - (j - hl[owner]))
    cvl = vl[cand]
    seg_c = np.repeat(np.arange(cand.shape[0], dtype=np.int64), cvl)
    slot = np.arange(seg_c.shape[0], dtype=np.int64) - np.repeat(np.concatenate(([0], np.cumsum(cvl)[:-1])), cvl)
    feat = foff[cand[seg_c]] + slot
    seg_user = owner[seg_c]
    tot = np.bincount(seg_user, minlength=n_users).astype(np.int64)
    over = tot > cap
    if over.any():
        t_idx = np.arange(seg_user.shape[0], dtype=np.int64) - np.concatenate(([0], np.cumsum(tot)[:-1]))[seg_user]
        sel = over[seg_user]
        idx = np.flatnonzero(sel)
        key = hash_keys(seed, vrow[seg_user[idx]], t_idx[idx]) >> np.uint64(24)  # as splits: 40 bits of hash
        o = np.lexsort((key, seg_user[idx]))
        us = seg_user[idx][o]
        tot_over = np.where(over, tot, 0)
        rank = np.arange(o.shape[0], dtype=np.int64) - np.concatenate(([0], np.cumsum(tot_over)[:-1]))[us]
        keep = ~sel
        keep[idx[o[rank < cap]]] = True
        feat = feat[keep]
    lens = np.minimum(tot, cap)
    offsets = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    return np.ascontiguousarray(feat, dtype=np.int64), offsets


class IdIndex:
    """Id maps, per-user row ranges and histories of the prepared dataset."""

    def __init__(self, prepared, need_features: bool, max_user_tokens: int):
        self.prepared = prepared
        users, videos, it = prepared.users, prepared.videos, prepared.interactions
        for name, tab, key in (("users", users, "user_idx"), ("videos", videos, "video_idx")):
            if not np.array_equal(tab[key], np.arange(tab[key].shape[0])):
                raise ScoreInputError(f"{prepared.path / (name + '.parquet')}: {key} is not 0..n-1 in order")
        self.user_ids = np.asarray(users["user_id"], dtype=np.int64)
        self.video_ids = np.asarray(videos["video_id"], dtype=np.int64)
        for name, ids in (("users", self.user_ids), ("videos", self.video_ids)):
            if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
                raise ScoreInputError(f"{prepared.path / (name + '.parquet')}: ids not sorted and unique")
        self.n_users = self.user_ids.shape[0]
        user = np.asarray(it["user_idx"], dtype=np.int64)
        self.count = np.bincount(user, minlength=self.n_users).astype(np.int64)
        self.ustart = np.concatenate(([0], np.cumsum(self.count)[:-1])).astype(np.int64)
        self.time = np.asarray(it["time_ms"], dtype=np.int64)
        self.nseg = np.asarray(videos["n_segments"], dtype=np.int64)
        self.feat_off = np.asarray(videos["feat_offset"], dtype=np.int64)
        self.need_features = need_features
        self.max_tokens = int(max_user_tokens)
        if need_features:
            self.vhoff = np.asarray(it["vhist_offset"], dtype=np.int64)
            self.vhlen = np.minimum(np.asarray(it["vhist_len"], dtype=np.int64), self.max_tokens)
            self.latest, self.latest_off = latest_visual_histories(prepared)
            self.latest_len = np.minimum(np.diff(self.latest_off), self.max_tokens)
            self.vhist = np.asarray(prepared.vhist)

    @staticmethod
    def _map(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if sorted_ids.shape[0] == 0:
            return np.zeros(ids.shape[0], np.int64), np.zeros(ids.shape[0], bool)
        i = np.searchsorted(sorted_ids, ids)
        ic = np.minimum(i, sorted_ids.shape[0] - 1)
        return ic.astype(np.int64), sorted_ids[ic] == ids

    def map_users(self, ids):
        return self._map(self.user_ids, ids)

    def map_videos(self, ids):
        return self._map(self.video_ids, ids)

    def known(self, uid, vid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user_idx, video_idx, user known, video known, video has features)."""
        u, ku = self.map_users(uid)
        v, kv = self.map_videos(vid)
        hf = np.ones(v.shape[0], bool) if not self.need_features else (self.feat_off[v] >= 0) | ~kv
        return u, v, ku, kv, hf

    def hist_pos(self, u: np.ndarray, t: Optional[np.ndarray]) -> np.ndarray:
        """Number of the user's interactions strictly before t (all of them when t is None)."""
        if t is None:
            return self.count[u].copy()
        p = np.empty(u.shape[0], dtype=np.int64)
        order = np.argsort(u, kind="stable")
        us = u[order]
        brk = np.flatnonzero(us[1:] != us[:-1]) + 1
        for a, b in zip(np.concatenate(([0], brk)), np.concatenate((brk, [us.shape[0]]))):
            if a == b:
                continue
            uu = int(us[a])
            s = self.ustart[uu]
            sel = order[a:b]
            p[sel] = np.searchsorted(self.time[s:s + self.count[uu]], t[sel], side="left")
        return p

