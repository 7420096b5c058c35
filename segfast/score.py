"""Offline batch scorer: (user, video[, time]) pairs in a Parquet file -> per-segment interest logits in Parquet parts.

    score(run_dir, data_dir, pairs_path, out_dir) -> manifest dict

See docs/scoring.md for the formats and the policies. In short:

- Input: Parquet with int64 ``user_id``, ``video_id`` and an optional ``time_ms``; read in record batches, never
  whole. A pair's history is the user's prepared interactions strictly before ``time_ms`` (all of them without
  ``time_ms``); its N is ``videos.n_segments`` of the prepared dataset.
- Output: ``part-00000.parquet``, ... (one per ``part_rows`` input rows, input order inside a part) and
  ``manifest.json``; with ``on_unknown="skip"`` also ``rejected.parquet``. Every file is written to a temp
  name and renamed; the manifest is rewritten after each part. A rerun with the same run, data, input and
  options skips the finished parts; a different one is refused unless ``overwrite``.
- Work per batch: pairs are sorted by N within a part and a batch keeps only slots 0..max N (slot N, the
  first padding slot, is the "completed" pseudo-slot that the watch-time expectation needs); the visual
  projection, position embedding and LayerNorm run once per distinct video and per distinct user history in
  the batch. A background thread reads and assembles the next batches while the model runs.
- Sharding: ``world_size`` ranks; rank r scores parts p with p % world_size == r; rank 0 merges the manifest.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from segfast import _io

__all__ = ["score", "score_from_args", "add_arguments", "main", "latest_visual_histories", "PairsFile",
           "ScoreInputError", "UnknownIdsError", "OutDirError", "DEFAULT_PART_ROWS", "OUTPUT_COLUMNS"]

FORMAT = "segfast-scores"
VERSION = 1
MAX_SLOTS = 40
DEFAULT_PART_ROWS = 262_144
DEFAULT_BATCH_BYTES = 1 << 30  # estimated activation memory per batch (host), caps the batch size
READ_ROWS = 65_536
MAX_LISTED_IDS = 20
ON_UNKNOWN = ("error", "skip")
ID_COLUMNS = ("user_id", "video_id")
TIME_COLUMN = "time_ms"
OUTPUT_COLUMNS = ("row", "user_id", "video_id", "time_ms", "n_segments", "scores", "leave_slot", "thumbnail_slot",
                  "expected_watch_segments")
_PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
_RANK_RE = re.compile(r"^manifest\.rank-\d{5}\.json$")
_TMP_RE = re.compile(r"^\.(part-\d{5,}\.parquet|manifest(\.rank-\d{5})?\.json|rejected\.parquet)\.tmp-.*$")


class ScoreInputError(ValueError):
    """Bad scoring input; the message names the file, the row or column, and what was expected."""


class UnknownIdsError(ScoreInputError):
    """Pairs whose user or video the prepared dataset (and so the model) does not know."""


class OutDirError(FileExistsError):
    """An output directory that holds something else than this scoring job's output."""


# ----------------------------------------------------------------------------------------------------
# small file helpers
# ----------------------------------------------------------------------------------------------------

def _sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _atomic_json(path: Path, obj) -> None:
    _io.write_json(path, obj, indent=1)  # temp name, umask-implied mode, rename (segfast._io)


def _atomic_parquet(path: Path, table) -> None:
    _io.write_parquet(path, table, compression="zstd")


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------
# input pairs
# ----------------------------------------------------------------------------------------------------

class PairsFile:
    """A validated, streamed Parquet file of (user_id, video_id[, time_ms]) pairs."""

    def __init__(self, path, read_rows: int = READ_ROWS):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.read_rows = int(read_rows)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file (expected a Parquet file of user_id, video_id pairs)")
        if not self.path.is_file():
            raise ScoreInputError(f"{self.path}: not a file (expected a Parquet file of user_id, video_id pairs)")
        try:
            self.pf = pq.ParquetFile(self.path)
            schema = self.pf.schema_arrow
        except Exception as e:  # ArrowInvalid, OSError, ... for a bad magic number or a corrupt footer
            raise ScoreInputError(f"{self.path}: not a readable Parquet file (corrupt or truncated footer?): {e}") \
                from None
        names = list(schema.names)
        missing = [c for c in ID_COLUMNS if c not in names]
        if missing:
            raise ScoreInputError(f"{self.path}: missing column(s) {missing}; the file has {names}, expected int64 "
                                  "columns user_id and video_id (and optionally time_ms)")
        self.has_time = TIME_COLUMN in names
        self.columns = list(ID_COLUMNS) + ([TIME_COLUMN] if self.has_time else [])
        self.types = {}
        for c in self.columns:
            t = schema.field(c).type
            if not pa.types.is_integer(t):
                raise ScoreInputError(f"{self.path}: column {c!r} has type {t}, expected an integer type (int64); "
                                      f"first row: {self._first_value(c)!r}")
            self.types[c] = t
        md = self.pf.metadata
        self.rows = int(md.num_rows)
        rg = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
        self.rg_start = np.concatenate(([0], np.cumsum(rg))).astype(np.int64)

    def _first_value(self, col):
        try:
            for b in self.pf.iter_batches(batch_size=1, columns=[col]):
                return b.column(0)[0].as_py() if b.num_rows else None
        except Exception:  # noqa: BLE001 - only for the message
            return None
        return None

    def _convert(self, arr, col: str, row0: int) -> np.ndarray:
        import pyarrow as pa

        if arr.null_count:
            i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise ScoreInputError(f"{self.path}: column {col!r} is null at row {row0 + i}; expected an int64 value")
        a = arr.to_numpy(zero_copy_only=False)
        if pa.types.is_uint64(arr.type):
            bad = np.flatnonzero(a > np.iinfo(np.int64).max)
            if bad.size:
                i = int(bad[0])
                raise ScoreInputError(f"{self.path}: column {col!r} at row {row0 + i} holds {int(a[i])}, which does "
                                      "not fit int64")
        return a.astype(np.int64, copy=False)

    def _batches(self, row_groups, base: int):
        try:
            pos = base
            for b in self.pf.iter_batches(batch_size=self.read_rows, row_groups=row_groups, columns=self.columns,
                                          use_threads=False):
                yield pos, b
                pos += b.num_rows
        except ScoreInputError:
            raise
        except Exception as e:  # corrupt pages, decompression errors
            raise ScoreInputError(f"{self.path}: cannot read the data near row {pos}: {e}") from None

    def read(self, start: int, end: int) -> dict:
        """Rows [start, end) as int64 numpy columns (validated)."""
        out = {c: [] for c in self.columns}
        if end <= start:
            return {c: np.zeros(0, np.int64) for c in self.columns}
        g0 = int(np.searchsorted(self.rg_start, start, side="right") - 1)
        g1 = int(np.searchsorted(self.rg_start, end, side="left"))
        for b0, b in self._batches(list(range(g0, g1)), int(self.rg_start[g0])):
            b1 = b0 + b.num_rows
            if b1 <= start:
                continue
            if b0 >= end:
                break
            lo, hi = max(start - b0, 0), min(end, b1) - b0
            for i, c in enumerate(self.columns):
                out[c].append(self._convert(b.column(i).slice(lo, hi - lo), c, b0 + lo))
        res = {c: (np.concatenate(v) if v else np.zeros(0, np.int64)) for c, v in out.items()}
        if res["user_id"].shape[0] != end - start:
            raise ScoreInputError(f"{self.path}: read {res['user_id'].shape[0]} rows for [{start}, {end}), the footer "
                                  f"says {self.rows} rows in all (corrupt file?)")
        return res

    def chunks(self):
        """(first row, columns) over the whole file, in record batches."""
        n = 0
        for b0, b in self._batches(None, 0):
            yield b0, {c: self._convert(b.column(i), c, b0) for i, c in enumerate(self.columns)}
            n = b0 + b.num_rows
        if n != self.rows:
            raise ScoreInputError(f"{self.path}: read {n} rows, the footer says {self.rows} (corrupt file?)")


# ----------------------------------------------------------------------------------------------------
# the prepared dataset as the scorer sees it
# ----------------------------------------------------------------------------------------------------

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


class _Index:
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


# ----------------------------------------------------------------------------------------------------
# batches and the model
# ----------------------------------------------------------------------------------------------------

def _fast_capable(model) -> bool:
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


def _pair_bytes(cfg, feature_dim: Optional[int]) -> int:
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


class _Assembler:
    """Builds the CPU tensors of one batch of pairs (in the producer thread)."""

    def __init__(self, index: _Index, prepared, cfg, fast: bool, pin: bool):
        import torch

        self.ix = index
        self.cfg = cfg
        self.fast = fast
        self.pin = pin
        self.visual = cfg.uses_visual
        if self.visual:
            with warnings.catch_warnings():  # read-only memmap; never written
                warnings.simplefilter("ignore", UserWarning)
                self.feat_t = torch.from_numpy(np.asarray(prepared.features))
            self.dim = int(self.feat_t.shape[1])

    def _gather(self, rows: np.ndarray, mask: np.ndarray):
        import torch

        out = torch.index_select(self.feat_t, 0, torch.from_numpy(np.ascontiguousarray(rows.reshape(-1))))
        pad = np.flatnonzero(~mask.reshape(-1))
        if pad.size:
            out.index_fill_(0, torch.from_numpy(pad), 0)
        return out.view(rows.shape + (self.dim,))

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


def _forward(model, batch: dict, fast: bool):
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


# ----------------------------------------------------------------------------------------------------
# GPU monitoring (nvidia-ml-py)
# ----------------------------------------------------------------------------------------------------

class _GpuMonitor:
    def __init__(self, device, interval: float = 0.25):
        self.samples = []
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        self.device = device
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            self.nvml = pynvml
            idx = torch.device(device).index
            idx = torch.cuda.current_device() if idx is None else idx
            h = None
            try:
                uuid = str(torch.cuda.get_device_properties(idx).uuid)
                h = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
            except Exception:  # noqa: BLE001 - fall back to the index
                h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.handle = h
            name = pynvml.nvmlDeviceGetName(h)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as e:  # noqa: BLE001 - no pynvml, no driver, ...
            self.error = f"{type(e).__name__}: {e}"
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval):
        nv = self.nvml
        while not self._stop.wait(interval):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(self.handle).used
                util = nv.nvmlDeviceGetUtilizationRates(self.handle).gpu
                try:
                    power = nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
                except Exception:  # noqa: BLE001
                    power = float("nan")
                self.samples.append((mem, util, power))
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"
                return

    def stop(self) -> dict:
        import torch

        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        out = {"torch_max_allocated_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)}
        if self.error and not self.samples:
            out.update(nvml=False, nvml_error=self.error)
            return out
        a = np.array(self.samples, dtype=np.float64).reshape(-1, 3)
        out.update(nvml=True, name=self.name, samples=int(a.shape[0]))
        if a.shape[0]:
            out.update(mem_used_max_mib=round(float(a[:, 0].max()) / 2**20, 1),
                       util_mean_pct=round(float(a[:, 1].mean()), 1), util_max_pct=float(a[:, 1].max()),
                       power_mean_w=round(float(np.nanmean(a[:, 2])), 1) if np.isfinite(a[:, 2]).any() else None,
                       power_max_w=round(float(np.nanmax(a[:, 2])), 1) if np.isfinite(a[:, 2]).any() else None)
        return out


# ----------------------------------------------------------------------------------------------------
# output directory, identity, manifest
# ----------------------------------------------------------------------------------------------------

def _run_fingerprint(meta: dict) -> str:
    """sha256 of the model config and the weights' tensor digest (stored in the safetensors metadata)."""
    from safetensors import safe_open

    mc = meta["model_config"]
    cfg = mc.to_dict() if hasattr(mc, "to_dict") else dict(mc)
    cfg.pop("backend", None)  # an execution choice, not part of the weights
    with safe_open(str(meta["weights"]), framework="pt", device="cpu") as f:
        digest = (f.metadata() or {}).get("segfast_sha256")
    if digest is None:
        digest = _sha256_file(Path(meta["weights"]))
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(digest.encode())
    return h.hexdigest()


def _data_fingerprint(prepared) -> dict:
    from segfast.checkpoint import data_fingerprint

    fp = dict(data_fingerprint(prepared))
    h = hashlib.sha256()
    for name in ("users.parquet", "videos.parquet", "interactions.parquet", "vhist.npy"):
        f = Path(prepared.path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(_sha256_file(f).encode())
    fp["files_sha256"] = h.hexdigest()
    feats = (prepared.manifest.get("features") or {})
    fp["features"] = None if not feats else {k: feats.get(k) for k in ("dim", "dtype", "rows")}
    return fp


def _identity_diff(a: dict, b: dict) -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out += [f"{k}.{x}" for x in _identity_diff(a[k], b[k])]
            else:
                out.append(k)
    return out


def _is_ours(name: str) -> bool:
    return bool(name in ("manifest.json", "rejected.parquet") or _PART_RE.match(name) or _RANK_RE.match(name)
                or _TMP_RE.match(name))


def _check_part(out: Path, rec: dict) -> bool:
    """A finished part is present with the right row count and checksum."""
    import pyarrow.parquet as pq

    f = out / rec.get("file", "")
    if not f.is_file():
        return False
    try:
        if pq.ParquetFile(f).metadata.num_rows != rec.get("rows"):
            return False
    except Exception:  # noqa: BLE001 - unreadable: redo it
        return False
    return rec.get("sha256") is None or _sha256_file(f) == rec["sha256"]


def _setup_out_dir(out: Path, identity: dict, overwrite: bool) -> dict:
    """(rank 0) Validate or clear ``out``; return the parts already finished there, by part number."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in out.iterdir()]
    ours = [n for n in names if _is_ours(n)]
    foreign = sorted(n for n in names if not _is_ours(n))
    man_path = out / "manifest.json"
    prev = _read_json(man_path) if man_path.is_file() else None
    same = isinstance(prev, dict) and prev.get("format") == FORMAT and prev.get("identity") == identity
    if not same:
        if prev is None and not names:
            return {}
        if foreign and prev is None:
            raise OutDirError(f"{out}: not empty and not a segfast score output (holds {foreign[:5]}); choose an "
                              "empty or new directory")
        if not overwrite:
            if isinstance(prev, dict) and prev.get("format") == FORMAT:
                diff = _identity_diff(prev.get("identity") or {}, identity)
                raise OutDirError(f"{out}: holds scores of a different run or input (differs in {diff}); pass "
                                  "overwrite=True (--overwrite) to replace them, or choose another directory")
            raise OutDirError(f"{out}: holds files of an unidentified scoring job ({sorted(ours)[:5]}); pass "
                              "overwrite=True (--overwrite) to replace them")
        for n in ours:
            (out / n).unlink(missing_ok=True)
        return {}
    for n in names:  # temp files of a killed run
        if _TMP_RE.match(n):
            (out / n).unlink(missing_ok=True)
    recs = {}
    sources = [prev] + [_read_json(out / n) for n in sorted(names) if _RANK_RE.match(n)]
    for src in sources:
        if not isinstance(src, dict) or src.get("identity") != identity:
            continue
        for rec in src.get("parts", []):
            p = rec.get("part")
            if isinstance(p, int) and p not in recs and _check_part(out, rec):
                recs[p] = rec
    for n in names:
        if _RANK_RE.match(n):
            (out / n).unlink(missing_ok=True)
    return recs


def _part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------

def _scan(pairs: PairsFile, index: _Index, on_unknown: str, data_dir, write_rejected: Optional[Path]):
    """Validate every row (types, nulls) and find the pairs with unknown ids; with on_unknown="skip" and
    ``write_rejected``, stream them to rejected.parquet. Returns (rejected count, summary dict)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_bad = 0
    first_row = None
    listed = {"user_id": [], "video_id": [], "video_id_no_features": []}
    seen = {k: set() for k in listed}
    writer = tmp = None
    schema = pa.schema([("row", pa.int64()), ("user_id", pa.int64()), ("video_id", pa.int64())]
                       + ([("time_ms", pa.int64())] if pairs.has_time else []) + [("reason", pa.string())])
    try:
        if write_rejected is not None:
            tmp = write_rejected.with_name(f".{write_rejected.name}.tmp-{os.getpid()}")
            writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        for r0, cols in pairs.chunks():
            _, _, ku, kv, hf = index.known(cols["user_id"], cols["video_id"])
            bad = ~(ku & kv & hf)
            if not bad.any():
                continue
            nb = int(bad.sum())
            if first_row is None:
                first_row = r0 + int(np.flatnonzero(bad)[0])
            n_bad += nb
            for key, m in (("user_id", ~ku), ("video_id", ~kv), ("video_id_no_features", kv & ~hf)):
                col = cols["video_id" if key.startswith("video") else "user_id"]
                if m.any() and len(seen[key]) <= MAX_LISTED_IDS:
                    for x in np.unique(col[m])[:MAX_LISTED_IDS + 1].tolist():
                        if len(seen[key]) > MAX_LISTED_IDS:
                            break
                        if x not in seen[key]:
                            seen[key].add(x)
                            listed[key].append(x)
            if writer is not None:
                reason = np.where(~ku & ~kv, "unknown_user_and_video",
                                  np.where(~ku, "unknown_user", np.where(~kv, "unknown_video",
                                                                         "video_without_features")))[bad]
                arrays = [pa.array(r0 + np.flatnonzero(bad)), pa.array(cols["user_id"][bad]),
                          pa.array(cols["video_id"][bad])]
                if pairs.has_time:
                    arrays.append(pa.array(cols["time_ms"][bad]))
                arrays.append(pa.array(reason.astype(str)))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if writer is not None:
            writer.close()
            writer = None
            os.chmod(tmp, _io.file_mode())
            os.replace(tmp, write_rejected)
    except BaseException:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    summary = {"pairs": n_bad, "first_row": first_row}
    for k, v in listed.items():
        if v:
            summary[k] = v[:MAX_LISTED_IDS] + (["..."] if len(v) > MAX_LISTED_IDS else [])
    if n_bad and on_unknown == "error":
        parts = []
        if listed["user_id"]:
            parts.append(f"user_id {summary['user_id']}")
        if listed["video_id"]:
            parts.append(f"video_id {summary['video_id']}")
        if listed["video_id_no_features"]:
            parts.append(f"video_id without segment features {summary['video_id_no_features']}")
        raise UnknownIdsError(
            f"{pairs.path}: {n_bad} pair(s) (first at row {first_row}) have ids the prepared dataset {data_dir} "
            f"does not know: {'; '.join(parts)}. The model has no ID embedding for an unseen user or video and no "
            "segment features for an unseen video, so it cannot score them. Pass on_unknown='skip' "
            "(--on-unknown skip) to leave them out and list them in rejected.parquet.")
    return n_bad, summary


class _Job:
    """One rank's scoring of its pending parts."""

    def __init__(self, model, index, pairs, assembler, fast, device, batch_size, part_rows, progress, rank):
        self.model, self.ix, self.pairs, self.asm = model, index, pairs, assembler
        self.fast, self.device, self.batch_size, self.part_rows = fast, device, batch_size, part_rows
        self.progress, self.rank = progress, rank
        self.t_produce = 0.0

    # ---------------- producer side
    def _part_inputs(self, p: int) -> dict:
        s = p * self.part_rows
        e = min(s + self.part_rows, self.pairs.rows)
        cols = self.pairs.read(s, e)
        uid, vid = cols["user_id"], cols["video_id"]
        u, v, ku, kv, hf = self.ix.known(uid, vid)
        keep = np.flatnonzero(ku & kv & hf)
        t = cols.get(TIME_COLUMN)
        ctx = {"part": p, "start": s, "end": e, "row": s + keep, "user_id": uid[keep], "video_id": vid[keep],
               "time_ms": None if t is None else t[keep], "u": u[keep], "v": v[keep]}
        ctx["n"] = self.ix.nseg[ctx["v"]]
        ctx["p"] = self.ix.hist_pos(ctx["u"], ctx["time_ms"])
        k = keep.shape[0]
        ctx["rejected"] = (e - s) - k
        ctx["offsets"] = np.concatenate(([0], np.cumsum(ctx["n"]))).astype(np.int64)
        ctx["values"] = np.empty(int(ctx["offsets"][-1]), dtype=np.float32)
        ctx["leave"] = np.empty(k, np.int8)
        ctx["thumb"] = np.empty(k, np.int8)
        ctx["expect"] = np.empty(k, np.float32)
        return ctx

    def produce(self, parts, stop: threading.Event):
        for p in parts:
            t0 = time.perf_counter()
            ctx = self._part_inputs(p)
            order = np.argsort(ctx["n"], kind="stable")  # bucket by segment count
            self.t_produce += time.perf_counter() - t0
            for a in range(0, order.shape[0], self.batch_size):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                sel = order[a:a + self.batch_size]
                batch = self.asm.assemble(ctx["row"][sel], ctx["u"][sel], ctx["v"][sel], ctx["n"][sel],
                                          ctx["p"][sel])
                self.t_produce += time.perf_counter() - t0
                yield ("batch", ctx, sel, batch)
            yield ("end", ctx, None, None)

    # ---------------- consumer side
    def _fill(self, ctx, sel, logits: np.ndarray) -> None:
        from segfast.evaluate import expected_leave_slot

        n = ctx["n"][sel]
        b, s = logits.shape
        slots = np.arange(s)
        real = slots[None, :] < n[:, None]
        dst = ctx["offsets"][sel][:, None] + slots[None, :]
        ctx["values"][dst[real]] = logits[real]
        ctx["leave"][sel] = np.where(real, logits, np.inf).argmin(axis=1)
        ctx["thumb"][sel] = np.where(real, logits, -np.inf).argmax(axis=1)
        full = np.zeros((b, MAX_SLOTS), dtype=np.float32)
        full[:, :s] = logits
        ctx["expect"][sel] = expected_leave_slot(full, n)

    def _table(self, ctx):
        import pyarrow as pa

        cols = [("row", pa.array(ctx["row"], pa.int64())), ("user_id", pa.array(ctx["user_id"], pa.int64())),
                ("video_id", pa.array(ctx["video_id"], pa.int64()))]
        if ctx["time_ms"] is not None:
            cols.append(("time_ms", pa.array(ctx["time_ms"], pa.int64())))
        scores = pa.ListArray.from_arrays(pa.array(ctx["offsets"].astype(np.int32)),
                                          pa.array(ctx["values"], pa.float32()))
        cols += [("n_segments", pa.array(ctx["n"].astype(np.int8), pa.int8())), ("scores", scores),
                 ("leave_slot", pa.array(ctx["leave"], pa.int8())),
                 ("thumbnail_slot", pa.array(ctx["thumb"], pa.int8())),
                 ("expected_watch_segments", pa.array(ctx["expect"], pa.float32()))]
        return pa.table({k: v for k, v in cols})

    def run(self, parts, out: Path, on_part: Callable, prefetch: bool = True) -> dict:
        import torch
        from tqdm.auto import tqdm

        total = sum(min((p + 1) * self.part_rows, self.pairs.rows) - p * self.part_rows for p in parts)
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=3)
        gen = self.produce(parts, stop)
        thread = None
        if prefetch:
            def worker():
                try:
                    for item in gen:
                        while not stop.is_set():
                            try:
                                q.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                    q.put(None)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    q.put(e)

            thread = threading.Thread(target=worker, name="segfast-score-reader", daemon=True)
            thread.start()

            def items():
                while True:
                    item = q.get()
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            it = items()
        else:
            it = gen
        cuda = str(self.device).startswith("cuda")
        t = {"wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
        scored = 0
        t_start = time.perf_counter()
        bar = tqdm(total=total, unit="pairs", unit_scale=True, disable=not self.progress, smoothing=0.1,
                   desc="score" if self.rank == 0 else f"score[{self.rank}]", position=self.rank)
        try:
            with torch.inference_mode():
                while True:
                    t0 = time.perf_counter()
                    try:
                        kind, ctx, sel, batch = next(it)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    t["wait_s"] += t1 - t0
                    if kind == "batch":
                        dev = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.items()}
                        logits = _forward(self.model, dev, self.fast).float().cpu().numpy()
                        t2 = time.perf_counter()
                        t["compute_s"] += t2 - t1
                        self._fill(ctx, sel, logits)
                        t["write_s"] += time.perf_counter() - t2
                        scored += sel.shape[0]
                        bar.update(sel.shape[0])
                    else:
                        name = _part_name(ctx["part"])
                        _atomic_parquet(out / name, self._table(ctx))
                        rec = {"part": ctx["part"], "file": name, "input_rows": [ctx["start"], ctx["end"]],
                               "rows": int(ctx["row"].shape[0]), "rejected": int(ctx["rejected"]),
                               "sha256": _sha256_file(out / name), "rank": self.rank}
                        on_part(rec)
                        bar.update(ctx["rejected"])
                        t["write_s"] += time.perf_counter() - t1
        finally:
            stop.set()
            bar.close()
            if thread is not None:
                while thread.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    thread.join(timeout=0.05)
        wall = time.perf_counter() - t_start
        t = {k: round(v, 3) for k, v in t.items()}
        return {"rank": self.rank, "pairs_scored": scored, "parts": len(parts), "wall_s": round(wall, 3),
                "pairs_per_s": round(scored / wall, 1) if wall > 0 else None,
                "data_s": round(self.t_produce, 3), **t}


def _resolve_device(device) -> str:
    d = str(device)
    if d == "auto":  # the CLI's default: CUDA when available
        import torch

        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {d!r}: CUDA is not available on this machine")
        return d
    raise ValueError(f"device {d!r}: expected 'cpu' or 'cuda[:n]'")


def score(run_dir, data_dir, pairs_path, out_dir, backend: Optional[str] = None, batch_size: Optional[int] = None,
          device: str = "cpu", part_rows: int = DEFAULT_PART_ROWS, overwrite: bool = False, progress: bool = True,
          rank: int = 0, world_size: int = 1, *, on_unknown: str = "error", which: str = "best",
          fast: bool = True, prefetch: bool = True, max_batch_bytes: int = DEFAULT_BATCH_BYTES,
          on_part: Optional[Callable[[dict], None]] = None) -> dict:
    """Score every (user_id, video_id[, time_ms]) pair of ``pairs_path`` with the model of ``run_dir`` over the
    prepared dataset ``data_dir``; write Parquet parts and ``manifest.json`` into ``out_dir``; return the manifest.

    ``backend``: ops backend ("torch" / "triton"); None = "torch" on CPU, the run's configured backend on GPU.
    ``batch_size``: pairs per model call; None = 1024 on CPU (cache-friendly: faster than 4096 there),
    8192 on GPU; capped so that the estimated batch memory stays under ``max_batch_bytes``. ``part_rows``: input rows per output part (the unit of resumption and sharding).
    ``on_unknown``: "error" (default: refuse the whole input, naming the unknown ids) or "skip" (leave those pairs
    out and list them in rejected.parquet). ``rank``/``world_size``: this process's shard (torchrun); with
    world_size > 1 a process group is used (started from the torchrun environment if none is running).
    ``fast=False`` scores full 40-slot batches through ``model.score`` (the reference path, slower).
    ``on_part(record)`` is called after each part is written and recorded.
    """
    import torch

    from segfast import distributed as dist_
    from segfast.checkpoint import check_compatible, load_run
    from segfast.data.prepared import load_prepared

    t_begin = time.perf_counter()
    if batch_size is None:
        batch_size = 1024 if str(device) == "cpu" else 8192
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"on_unknown={on_unknown!r}: expected one of {ON_UNKNOWN}")
    for name, val in (("batch_size", batch_size), ("part_rows", part_rows), ("world_size", world_size),
                      ("max_batch_bytes", max_batch_bytes)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}={val!r}: expected a positive integer")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: expected 0 <= rank < world_size={world_size}")
    from segfast.ops import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    info = dist_.DistInfo(int(rank), int(world_size), dist_.env_info().local_rank if world_size > 1 else 0,
                          dist_.env_info().local_world_size if world_size > 1 else 1)
    device = _resolve_device(dist_.device_for(device, info) if world_size > 1 else device)
    out = Path(out_dir)
    started_pg = False
    if world_size > 1 and not dist_.is_initialized():
        started_pg = dist_.init(device, info=info)
    try:
        # ---- inputs (every rank: cheap, and every rank must fail the same way)
        pairs = PairsFile(pairs_path)
        prepared = load_prepared(data_dir)
        model, meta = load_run(run_dir, which=which, device=device)
        check_compatible(meta, prepared)
        cfg = model.config
        if backend is None:
            backend = "torch" if device == "cpu" else cfg.backend
        model.set_backend(backend)
        fast = bool(fast) and _fast_capable(model)
        index = _Index(prepared, cfg.uses_visual, cfg.max_user_tokens)
        identity = {
            "run": {"fingerprint": _run_fingerprint(meta), "which": which},
            "data": _data_fingerprint(prepared),
            "input": {"sha256": _sha256_file(pairs.path), "rows": pairs.rows, "has_time": pairs.has_time},
            "part_rows": int(part_rows), "on_unknown": on_unknown,
        }
        rej_path = out / "rejected.parquet"
        n_parts = -(-pairs.rows // part_rows)
        eff_batch = int(max(1, min(batch_size, max_batch_bytes // _pair_bytes(cfg, prepared.feature_dim))))

        # ---- validation pass, output directory (rank 0), then every rank agrees it went well
        try:
            if rank == 0:
                done = _setup_out_dir(out, identity, overwrite)  # refuse a foreign out_dir before any work
                n_rej, rej_summary = _scan(pairs, index, on_unknown, data_dir,
                                           rej_path if on_unknown == "skip" else None)
                base = {
                    "format": FORMAT, "version": VERSION, "identity": identity,
                    "run_dir": str(Path(run_dir).resolve()), "weights": meta["weights"],
                    "data_dir": str(Path(data_dir).resolve()), "input": str(pairs.path.resolve()),
                    "input_sha256": identity["input"]["sha256"], "rows": pairs.rows, "part_rows": int(part_rows),
                    "n_parts": n_parts, "columns": [c for c in OUTPUT_COLUMNS if c != "time_ms" or pairs.has_time],
                    "on_unknown": on_unknown,
                    "rejected": {"file": rej_path.name if on_unknown == "skip" else None, "rows": n_rej,
                                 "summary": rej_summary},
                    "created": _now(),
                }
                man = dict(base, parts=[done[p] for p in sorted(done)], complete=len(done) == n_parts)
                _atomic_json(out / "manifest.json", man)
            else:
                _scan(pairs, index, on_unknown, data_dir, None)
        except BaseException:
            dist_.all_ok(False)
            raise
        if not dist_.all_ok(True):
            raise RuntimeError(f"rank {rank}: another rank failed to set up {out} (see its error)")

        man0 = _read_json(out / "manifest.json")
        if not isinstance(man0, dict) or man0.get("identity") != identity:
            raise OutDirError(f"{out / 'manifest.json'}: missing or from another job after setup (is another "
                              "scoring job writing into the same directory?)")
        done = {rec["part"] for rec in man0["parts"]}
        mine = [p for p in range(n_parts) if p % world_size == rank and p not in done]

        # ---- score this rank's pending parts
        my_records = []
        own_file = out / ("manifest.json" if rank == 0 else f"manifest.rank-{rank:05d}.json")

        def record(rec):
            rec = dict(rec, batch_size=eff_batch, backend=backend, device=device, finished=_now())
            my_records.append(rec)
            if rank == 0:
                cur = dict(man0, parts=sorted(man0["parts"] + my_records, key=lambda r: r["part"]))
                cur["complete"] = len(cur["parts"]) == n_parts
                _atomic_json(own_file, cur)
            else:
                _atomic_json(own_file, {"format": FORMAT, "identity": identity, "rank": rank, "parts": my_records})
            if on_part is not None:
                on_part(rec)

        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        monitor = _GpuMonitor(device) if str(device).startswith("cuda") else None
        asm = _Assembler(index, prepared, cfg, fast, pin=str(device).startswith("cuda"))
        job = _Job(model, index, pairs, asm, fast, device, eff_batch, int(part_rows), progress, rank)
        try:
            timing = job.run(mine, out, record, prefetch=prefetch)
            timing["setup_s"] = round(time.perf_counter() - t_begin - timing["wall_s"], 3)
            gpu = monitor.stop() if monitor is not None else None
            if rank != 0:
                _atomic_json(own_file, {"format": FORMAT, "identity": identity, "rank": rank, "parts": my_records,
                                        "timing": timing, "gpu": gpu, "done": True})
        except BaseException:
            if monitor is not None:
                monitor.stop()
            dist_.all_ok(False)
            raise
        if not dist_.all_ok(True):
            raise RuntimeError(f"rank {rank}: another rank failed while scoring (see its error); rerun to resume")

        # ---- rank 0 merges
        if rank == 0:
            parts = {r["part"]: r for r in man0["parts"]}
            parts.update({r["part"]: r for r in my_records})
            ranks = [dict(timing, gpu=gpu)]
            for r in range(1, world_size):
                f = out / f"manifest.rank-{r:05d}.json"
                js = _read_json(f)
                if not isinstance(js, dict) or js.get("identity") != identity:
                    raise OutDirError(f"{f}: missing or unreadable after the final barrier")
                parts.update({rec["part"]: rec for rec in js["parts"]})
                ranks.append(dict(js.get("timing") or {}, gpu=js.get("gpu")))
            scored = sum(x.get("pairs_scored", 0) for x in ranks)
            wall = max((x.get("wall_s", 0.0) for x in ranks), default=0.0)
            final = dict(man0, parts=[parts[p] for p in sorted(parts)])
            final.update({
                "complete": len(parts) == n_parts,
                "rows_scored": int(sum(r["rows"] for r in parts.values())),
                "rows_rejected": int(sum(r["rejected"] for r in parts.values())),
                "backend": backend, "device": device, "batch_size": int(batch_size),
                "effective_batch_size": eff_batch, "fast_path": fast, "world_size": int(world_size),
                "timing": {"this_run_pairs": scored, "wall_s": round(time.perf_counter() - t_begin, 3),
                           "scoring_wall_s": wall,
                           "pairs_per_s": round(scored / wall, 1) if wall > 0 else None,
                           "data_s": round(sum(x.get("data_s", 0.0) for x in ranks), 3),
                           "compute_s": round(sum(x.get("compute_s", 0.0) for x in ranks), 3),
                           "wait_s": round(sum(x.get("wait_s", 0.0) for x in ranks), 3),
                           "write_s": round(sum(x.get("write_s", 0.0) for x in ranks), 3),
                           "ranks": ranks},
                "gpu": gpu if world_size == 1 else [x.get("gpu") for x in ranks],
                "updated": _now(),
            })
            _atomic_json(out / "manifest.json", final)
            for r in range(1, world_size):
                (out / f"manifest.rank-{r:05d}.json").unlink(missing_ok=True)
        dist_.barrier()
        result = _read_json(out / "manifest.json")
        return result
    finally:
        if started_pg:
            dist_.destroy()


# ----------------------------------------------------------------------------------------------------
# command line (``segfast score`` / ``python -m segfast.score`` / torchrun)
# ----------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """The ``segfast score`` flags; one definition, shared with thumbnails / edit (``segfast.cli``)."""
    from segfast.cli import add_score_arguments

    add_score_arguments(p)


def score_from_args(a) -> dict:
    """Run :func:`score` from parsed arguments, with rank / world from the torchrun environment."""
    from segfast import distributed as dist_

    info = dist_.env_info()
    with dist_.process_group(a.device):
        return score(a.run_dir, a.data, a.pairs, a.out, backend=a.backend, batch_size=a.batch_size, device=a.device,
                     part_rows=a.part_rows, overwrite=a.overwrite, progress=not a.quiet, rank=info.rank,
                     world_size=info.world_size, on_unknown=a.on_unknown, which=a.which,
                     prefetch=not a.no_prefetch)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="segfast score", description="score (user, video) pairs with a trained run")
    add_arguments(p)
    a = p.parse_args(argv)
    from segfast.cli import UsageError, apply_runtime

    try:
        apply_runtime(a)
    except UsageError as e:
        print(f"segfast score: error: {e}", file=sys.stderr)
        return 2
    try:
        man = score_from_args(a)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"segfast score: error: {e}", file=sys.stderr)
        return 2
    from segfast import distributed as dist_

    if dist_.env_info().rank == 0:
        print(json.dumps({k: man.get(k) for k in ("rows", "rows_scored", "rows_rejected", "n_parts", "complete",
                                                  "timing")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
