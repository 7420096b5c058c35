"""The feature store: the prepared segment features held on the scoring / training device, gathered there.

``FeatureStore(prepared.features, device)`` uploads the feature memmap once, in chunks of ``chunk_rows`` rows (host
memory stays bounded by one chunk), into a device table of ``rows + 1`` rows; the last row (``pad_row``) is zeros,
so a batch marks padding by pointing at it and ``gather`` needs no mask. Batches then carry integer row indices
only (docs/internals.md, "Batch contract"), and the model gathers them on the device with :meth:`gather`.

Dtype: float32 on CPU (the model upcasts to float32 anyway, and CPU half matmuls are slow); on CUDA the stored
dtype when it is a half type (float16 -> float16 is lossless), bfloat16 for a float32 memmap. ``dtype=`` overrides.

Memory budget: when the table does not fit ``memory_bytes`` (default: half of the free CUDA memory, or a quarter
of the host RAM capped at 8 GiB on CPU), the store falls back to host gathering (``path == "host"``): the
assembler gathers the rows from the memmap in its reader thread, converted to the same dtype (so scores are
identical to the resident path), into pinned memory on CUDA, and the transfer is asynchronous
(``non_blocking``) while the device runs the previous batch (the reader's queue is the double buffer).
``describe()`` says which path was taken; the scoring manifest records it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np

__all__ = ["FeatureStore", "default_memory_budget", "parse_bytes"]

CHUNK_ROWS = 65_536


def parse_bytes(text: str) -> int:
    """"8G", "512M", "100K", "1234" (bytes; powers of 1024) -> int; the ``--feature-memory`` flag's type."""
    import argparse

    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        val = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count such as 8G, 512M or 1048576") from None
    if not val >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count >= 0")
    return int(val * mult)


def _host_ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 << 30


def default_memory_budget(device) -> int:
    """Bytes a resident table may take on ``device`` when no budget is given."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free // 2)
    return int(min(8 << 30, _host_ram_bytes() // 4))


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"feature store dtype {dtype!r}: expected one of {sorted(names)}")
    return names[str(dtype)]


class FeatureStore:
    """Segment features ``[rows, dim]`` (a numpy array or the prepared memmap) for gathering on ``device``.

    ``memory_bytes``: the budget for the resident table (None = :func:`default_memory_budget`; 0 forces the host
    path). ``dtype``: the table's dtype (None = float32 on CPU, the stored half type / bfloat16 on CUDA)."""

    def __init__(self, features, device="cpu", *, dtype=None, memory_bytes: Optional[int] = None,
                 chunk_rows: int = CHUNK_ROWS):
        import torch

        if features is None:
            raise ValueError("FeatureStore needs a feature table (the prepared dataset is ID-only)")
        arr = features if isinstance(features, np.ndarray) else np.asarray(features)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"features: expected a 2-D float array [rows, dim], got {arr.dtype} {arr.shape}")
        if memory_bytes is not None and (isinstance(memory_bytes, bool) or int(memory_bytes) < 0):
            raise ValueError(f"memory_bytes={memory_bytes!r}: expected a byte count >= 0 or None")
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r}: expected >= 1")
        self.device = torch.device(device)
        dt = _torch_dtype(dtype)
        if dt is None:
            if self.device.type == "cuda":
                dt = torch.float16 if arr.dtype == np.float16 else torch.bfloat16
            else:
                dt = torch.float32
        self.dtype = dt
        self.rows, self.dim = int(arr.shape[0]), int(arr.shape[1])
        self.pad_row = self.rows  # the all-zero row: padding points here
        self.nbytes = (self.rows + 1) * self.dim * torch.empty((), dtype=dt).element_size()
        self.budget = int(default_memory_budget(self.device) if memory_bytes is None else memory_bytes)
        self.resident = self.nbytes <= self.budget
        self.path = "resident" if self.resident else "host"
        self.pin = self.device.type == "cuda"
        with warnings.catch_warnings():  # a read-only memmap: torch warns, nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.host = torch.from_numpy(arr)
        self.table = None
        if self.resident:
            self.table = torch.empty((self.rows + 1, self.dim), dtype=dt, device=self.device)
            self.table[self.rows].zero_()
            for a in range(0, self.rows, int(chunk_rows)):  # one chunk in host memory at a time
                b = min(a + int(chunk_rows), self.rows)
                chunk = torch.from_numpy(np.ascontiguousarray(arr[a:b]))
                self.table[a:b].copy_(chunk.to(dt) if self.device.type == "cpu" else chunk.to(self.device))

    def finite_rows(self) -> np.ndarray:
        """[rows + 1] bool: True where a feature row has no NaN / inf (the padding row is finite). One chunked pass
        over the memmap on the first call (training checks its batches' rows against it)."""
        if getattr(self, "_finite", None) is None:
            ok = np.ones(self.rows + 1, dtype=bool)
            arr = self.host.numpy()
            for a in range(0, self.rows, CHUNK_ROWS):
                b = min(a + CHUNK_ROWS, self.rows)
                ok[a:b] = np.isfinite(arr[a:b]).all(axis=1)
            self._finite = ok
        return self._finite

    def describe(self) -> dict:
        """What the scoring manifest records."""
        return {"path": self.path, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "rows": self.rows, "dim": self.dim, "table_bytes": int(self.nbytes), "budget_bytes": self.budget}

    def __repr__(self) -> str:
        return (f"FeatureStore({self.path}, {self.rows} x {self.dim} {self.describe()['dtype']} on {self.device}, "
                f"{self.nbytes / 2**20:.1f} MiB of a {self.budget / 2**20:.1f} MiB budget)")

    def _check(self, rows) -> None:
        if rows.numel() and rows.device.type == "cpu":  # free on the host; a device check would sync
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi > self.pad_row:
                raise IndexError(f"feature rows in [{lo}, {hi}], the store has rows 0..{self.rows - 1} and the "
                                 f"padding row {self.pad_row}")

    def gather(self, rows):
        """Feature rows ``rows`` (int64 tensor of any shape; ``pad_row`` = zeros) -> ``rows.shape + (dim,)`` in
        the store's dtype on its device. Resident: one ``index_select`` on the device; host path: gathered from
        the memmap (see :meth:`host_gather`) and copied over."""
        import torch

        if rows.dtype != torch.int64:
            raise TypeError(f"feature rows must be int64, got {rows.dtype}")
        if self.resident:
            self._check(rows)
            flat = rows.reshape(-1).to(self.device, non_blocking=True)
            return torch.index_select(self.table, 0, flat).view(tuple(rows.shape) + (self.dim,))
        out = self.host_gather(rows.cpu())
        return out.to(self.device, non_blocking=self.pin)

    def host_gather(self, rows):
        """The host path's gather (CPU tensor in, CPU tensor out, pinned when the device is CUDA): the rows of
        the memmap converted to the store's dtype, zeros at ``pad_row``."""
        import torch

        self._check(rows)
        flat = rows.reshape(-1)
        pad = flat == self.pad_row
        any_pad = bool(pad.any())
        src = torch.where(pad, 0, flat) if any_pad else flat
        out = torch.index_select(self.host, 0, src)
        if out.dtype != self.dtype:
            out = out.to(self.dtype)
        if any_pad:
            out.masked_fill_(pad[:, None], 0)
        out = out.view(tuple(rows.shape) + (self.dim,))
        return out.pin_memory() if self.pin else out
