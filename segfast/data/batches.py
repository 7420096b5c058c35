"""Batch assembly (docs/internals.md section 3) and a DataLoader over a prepared dataset.

Choices fixed here (docs/internals.md style):

- ``user_feat`` holds a row's visual history in stored order (history videos most recent first, then
  profile) truncated to the first ``max_user_tokens`` entries; M = max length in the batch (>= 1).
- ``feature_dtype=None`` keeps the stored dtype (float16 by default), which is what makes visual batches
  fast; float32 costs one extra conversion pass.
- ``feature_rows=True``: the host touches no feature bytes. A visual batch carries ``video_feat_rows`` [B, 40]
  and ``user_feat_rows`` [B, M] (int64 rows of ``prepared.features``; padding = ``len(features)``, the zero
  row of :class:`segfast.features.FeatureStore`) instead of ``video_feat`` / ``user_feat``; the model gathers
  them from its attached store on the device (docs/internals.md, "Batch contract").
- The loader's sampler runs in the main process and yields whole row arrays; each worker assembles
  whole batches (``batch_size=None``). The row order is a function of (seed, epoch) only; call
  ``loader.set_epoch(e)`` before each epoch (the order stays at epoch 0 otherwise, like
  DistributedSampler).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segfast import MAX_SLOTS
from segfast.data.prepared import Prepared, load_prepared

__all__ = ["BatchAssembler", "BatchSampler", "RowBatchDataset", "SegLoader", "history_rows", "make_loader"]

HIST_SLOTS = 50
_SLOTS = np.arange(MAX_SLOTS, dtype=np.int64)
_HSLOTS = np.arange(HIST_SLOTS, dtype=np.int64)


class BatchAssembler:
    """Turns arrays of interaction row numbers into batch dicts of torch tensors."""

    def __init__(self, prepared: Prepared | str | Path, features: bool | None = None,
                 max_user_tokens: int = 100, feature_dtype: torch.dtype | None = torch.float32,
                 feature_rows: bool = False):
        if not isinstance(prepared, Prepared):
            prepared = load_prepared(prepared)
        self.prepared = prepared
        if features is None:
            features = prepared.features is not None
        if features and prepared.features is None:
            raise ValueError(f"{prepared.path}: features requested but the dataset is ID-only")
        if max_user_tokens < 1:
            raise ValueError(f"max_user_tokens must be >= 1, got {max_user_tokens}")
        self.features = bool(features)
        self.max_user_tokens = int(max_user_tokens)
        self.feature_dtype = feature_dtype
        self.feature_rows = bool(feature_rows) and self.features
        self._init_arrays()

    def _init_arrays(self) -> None:
        it = self.prepared.interactions
        self.n_rows = int(it["user_idx"].shape[0])
        i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
        self._user = i64(it["user_idx"])
        self._video = i64(it["video_idx"])
        self._nseg = i64(it["n_segments"])
        self._target = i64(it["target"])
        self._cold = np.ascontiguousarray(it["is_cold"], dtype=np.bool_)
        self._hl = i64(it["hist_len"])
        if self.features:
            self._feat = np.asarray(self.prepared.features)  # plain ndarray view of the memmap
            with warnings.catch_warnings():  # read-only memmap: torch warns, we never write to it
                warnings.simplefilter("ignore", UserWarning)
                self._feat_t = torch.from_numpy(self._feat)
            self._pool = _BufferPool()
            self._vhist = np.asarray(self.prepared.vhist)
            self._foff = i64(self.prepared.videos["feat_offset"])[self._video]  # per row
            self._vhoff = i64(it["vhist_offset"])
            self._vhlen = np.minimum(i64(it["vhist_len"]), self.max_user_tokens)

    # workers under spawn/forkserver: pickle the prepared dataset by path and rebuild the arrays
    def __getstate__(self):
        return {"prepared": self.prepared, "features": self.features, "max_user_tokens": self.max_user_tokens,
                "feature_dtype": self.feature_dtype, "feature_rows": self.feature_rows}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_arrays()

    def assemble(self, rows) -> dict:
        rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row numbers must be in [0, {self.n_rows}), got range "
                             f"[{rows.min()}, {rows.max()}]")
        b = rows.shape[0]
        n = self._nseg[rows]
        y = self._target[rows]
        slot_mask = _SLOTS[None, :] < n[:, None]
        labels = (_SLOTS[None, :] < y[:, None]).view(np.int8)  # 1 before the leave slot, -1 after ...
        labels *= 2
        labels -= 1
        k = np.flatnonzero(y < n)
        labels[k, y[k]] = 0  # ... and 0 at it (a real slot)
        hl = self._hl[rows]
        hmask = _HSLOTS[None, :] < hl[:, None]
        hvid = history_rows(self._video, rows - hl, hl, HIST_SLOTS, 0)  # the row's previous hl rows
        batch = {
            "row": torch.from_numpy(rows),
            "user_idx": torch.from_numpy(self._user[rows]),
            "video_idx": torch.from_numpy(self._video[rows]),
            "n_segments": torch.from_numpy(n),
            "slot_mask": torch.from_numpy(slot_mask),
            "slot_index": torch.from_numpy(np.broadcast_to(_SLOTS, (b, MAX_SLOTS)).copy()),
            "target": torch.from_numpy(y),
            "labels": torch.from_numpy(labels),
            "is_cold": torch.from_numpy(self._cold[rows]),
            "hist_video_idx": torch.from_numpy(hvid),
            "hist_mask": torch.from_numpy(hmask),
        }
        if self.feature_rows:
            batch.update(self._feature_rows(rows, n, slot_mask))
        elif self.features:
            batch.update(self._assemble_features(rows, n, slot_mask))
        return batch

    def _feature_rows(self, rows, n, slot_mask) -> dict:
        """Integer feature rows only (pad = the store's zero row ``len(features)``): no feature bytes read."""
        pad = self._feat.shape[0]
        ln = self._vhlen[rows]
        m = max(int(ln.max()) if rows.shape[0] else 0, 1)
        umask = np.arange(m, dtype=np.int64)[None, :] < ln[:, None]
        frows = self._foff[rows][:, None] + _SLOTS[None, :]
        np.copyto(frows, pad, where=~slot_mask)
        urows = history_rows(self._vhist, self._vhoff[rows], ln, m, pad)
        return {"video_feat_rows": torch.from_numpy(frows), "user_feat_rows": torch.from_numpy(urows),
                "user_mask": torch.from_numpy(umask)}

    def _gather(self, frows: np.ndarray, mask: np.ndarray, slot: int) -> torch.Tensor:
        """features[frows] with zeros where ~mask (frows valid everywhere), shape frows.shape + (F,)."""
        f = self._feat_t
        dim = f.shape[1]
        flat = frows.reshape(-1)
        out = self._pool.get(slot, (flat.shape[0], dim), f.dtype)
        torch.index_select(f, 0, torch.from_numpy(flat), out=out)
        pad = np.flatnonzero(~mask.reshape(-1))
        if pad.size:
            out.index_fill_(0, torch.from_numpy(pad), 0)
        if self.feature_dtype is not None and out.dtype != self.feature_dtype:
            conv = self._pool.get(slot + 1, out.shape, self.feature_dtype)
            conv.copy_(out)
            out = conv
        return out.view(frows.shape + (dim,))

    def _assemble_features(self, rows, n, slot_mask) -> dict:
        b = rows.shape[0]
        dim = self._feat.shape[1]
        ln = self._vhlen[rows]
        m = max(int(ln.max()) if b else 0, 1)
        ar = np.arange(m, dtype=np.int64)
        umask = ar[None, :] < ln[:, None]
        if self._feat.shape[0] == 0:  # no segments at all: nothing to gather
            dt = self.feature_dtype or torch.float16
            return {"video_feat": torch.zeros((b, MAX_SLOTS, dim), dtype=dt),
                    "user_feat": torch.zeros((b, m, dim), dtype=dt), "user_mask": torch.from_numpy(umask)}
        foff = self._foff[rows]
        frows = np.where(slot_mask, foff[:, None] + _SLOTS[None, :], foff[:, None])
        video_feat = self._gather(frows, slot_mask, 0)
        vidx = np.where(umask, self._vhoff[rows][:, None] + ar[None, :], 0)
        if self._vhist.shape[0] == 0:
            urows = np.zeros_like(vidx)
        else:
            urows = np.where(umask, self._vhist[np.minimum(vidx, self._vhist.shape[0] - 1)], 0)
        user_feat = self._gather(urows, umask, 2)
        return {"video_feat": video_feat, "user_feat": user_feat, "user_mask": torch.from_numpy(umask)}


def history_rows(src: np.ndarray, off: np.ndarray, ln: np.ndarray, m: int, pad: int) -> np.ndarray:
    """[n, m] int64: row i = ``src[off[i]:off[i] + ln[i]]`` followed by ``pad`` (ln[i] <= m).

    One fancy index over a sliding-window view of ``src`` (a copy of m contiguous entries per row), about 4x
    faster than gathering n x m computed indices; the few rows whose window would run past the end of ``src``
    take the element-wise path."""
    n = off.shape[0]
    ar = np.arange(m, dtype=np.int64)
    tail = off + m > src.shape[0]
    if src.shape[0] >= m and not tail.all():
        out = np.lib.stride_tricks.sliding_window_view(src, m)[np.where(tail, 0, off)]
        if out.dtype != np.int64:
            out = out.astype(np.int64)
    else:
        out = np.empty((n, m), dtype=np.int64)
        tail = np.ones(n, dtype=bool)
    if tail.any() and src.shape[0]:
        idx = np.minimum(off[tail][:, None] + ar[None, :], src.shape[0] - 1)
        out[tail] = src[idx]
    short = np.flatnonzero(ln < m)  # pad only the rows shorter than m (usually few: histories are capped)
    if short.size == n:
        np.copyto(out, pad, where=ar[None, :] >= ln[:, None])
    elif short.size:
        sub = out[short]
        np.copyto(sub, pad, where=ar[None, :] >= ln[short][:, None])
        out[short] = sub
    return out


class _BufferPool:
    """Recycles large output buffers once every tensor viewing them is gone.

    Fresh multi-megabyte allocations are served by mmap and page-faulted on first write, which costs
    more than the gather itself; a buffer is reused only when nothing but the pool refers to it, so a
    batch the caller keeps is never overwritten.
    """

    def __init__(self, per_slot: int = 3):
        self.per_slot = per_slot
        self.bufs: dict[int, list] = {}

    def get(self, slot: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        lst = self.bufs.setdefault(slot, [])
        chosen = None
        for i in range(len(lst)):
            # references: the list, and getrefcount's argument
            if sys.getrefcount(lst[i]) == 2 and lst[i].nbytes >= nbytes:
                chosen = lst[i]
                break
        if chosen is None:
            if len(lst) >= self.per_slot:
                return torch.empty(shape, dtype=dtype)
            chosen = np.empty(int(nbytes * 1.25) + 64, dtype=np.uint8)
            lst.append(chosen)
        return torch.from_numpy(chosen[:nbytes]).view(dtype).view(shape)


class BatchSampler(Sampler):
    """Yields int64 arrays of row numbers; order depends only on (seed, epoch)."""

    def __init__(self, rows: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.rows.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        rows = self.rows
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            rows = rows[rng.permutation(rows.shape[0])]
        for i in range(len(self)):
            yield rows[i * self.batch_size:(i + 1) * self.batch_size]


class RowBatchDataset(Dataset):
    """Map-style dataset whose index is an array of row numbers and whose item is a batch dict."""

    def __init__(self, assembler: BatchAssembler):
        self.assembler = assembler

    def __getitem__(self, rows) -> dict:
        return self.assembler.assemble(rows)


class SegLoader(DataLoader):
    """A DataLoader of batch dicts with ``set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def make_loader(prepared_or_dir, split, batch_size: int, shuffle: bool = False, seed: int = 0,
                features: bool | None = None, num_workers: int = 0, drop_last: bool = False,
                exclude_full_40: bool = False, *, feature_dtype: torch.dtype | None = torch.float32,
                max_user_tokens: int = 100, feature_rows: bool = False, **loader_kwargs) -> SegLoader:
    """DataLoader over the rows of ``split`` whose items are batch dicts (docs/internals.md section 3).

    ``exclude_full_40`` drops rows with target == 40 (full watches of 40-segment videos), which are
    excluded from loss and evaluation anyway. ``feature_rows``: batches of feature row indices (for a model
    with an attached feature store) instead of gathered features.
    """
    prepared = prepared_or_dir if isinstance(prepared_or_dir, Prepared) else load_prepared(prepared_or_dir)
    rows = prepared.rows(split)
    if exclude_full_40:
        rows = rows[prepared.interactions["target"][rows] < MAX_SLOTS]
    asm = BatchAssembler(prepared, features=features, max_user_tokens=max_user_tokens,
                         feature_dtype=feature_dtype, feature_rows=feature_rows)
    sampler = BatchSampler(rows, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return SegLoader(RowBatchDataset(asm), batch_size=None, sampler=sampler, num_workers=num_workers,
                     **loader_kwargs)
