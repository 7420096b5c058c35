"""The Python API: ``Scorer`` (a loaded run over its prepared dataset) and ``score`` (the one-call job).

    scorer = Scorer.from_run("run/", "data/", device="cpu")   # precision=None: bf16 on CUDA, fp32 on CPU
    table = scorer.score(pairs_table)             # pyarrow Table / pandas / polars -> Arrow table
    manifest = scorer.score_dataset("pairs/", "scores/")   # exactly what `segfast score` runs
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from segfast.scoring.common import DEFAULT_BATCH_BYTES, DEFAULT_PART_ROWS, ON_UNKNOWN
from segfast.scoring.runner import check_positive, run_dataset

__all__ = ["Scorer", "score", "resolve_device"]


def resolve_device(device) -> str:
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
    raise ValueError(f"device {d!r}: expected 'auto', 'cpu' or 'cuda[:n]'")


class Scorer:
    """A trained run loaded for scoring over the prepared dataset it was trained on.

    Build it with :meth:`from_run`. :meth:`score` scores an in-memory table; :meth:`score_dataset` scores a
    Parquet input into a resumable output directory (the ``segfast score`` job). Both give the same numbers
    for the same pairs, batch size and part size (batches are formed within a part in the same way)."""

    def __init__(self, model, meta: dict, prepared, *, run_dir, data_dir, device: str, backend: str,
                 batch_size: int, which: str = "best", fast: bool = True,
                 max_batch_bytes: int = DEFAULT_BATCH_BYTES, precision: str = "fp32",
                 feature_memory_bytes: Optional[int] = None, calibrator=None):
        from segfast.features import FeatureStore
        from segfast.scoring.batches import pair_bytes
        from segfast.scoring.index import IdIndex

        self.model, self.meta, self.prepared = model, meta, prepared
        self.run_dir, self.data_dir, self.which = Path(run_dir), Path(data_dir), which
        self.device, self.backend = device, backend
        self.precision = precision  # autocast of every model call (segfast.precision)
        # probabilities=True: the run's calibrator (segfast.calibration) adds the calibrated columns
        self.calibrator = calibrator
        self.config = model.config
        self.batch_size = int(batch_size)
        # the fast path (unique batches, docs/internals.md "Batch contract") for a model that declares it
        self.fast = bool(fast) and getattr(model, "accepts_unique_batches", False) is True
        self.index = IdIndex(prepared, self.config.uses_visual, self.config.max_user_tokens)
        self.effective_batch_size = int(max(1, min(self.batch_size,
                                                   max_batch_bytes // pair_bytes(self.config,
                                                                                 prepared.feature_dim))))
        # the feature store: uploaded once to the device (or the host path when over feature_memory_bytes),
        # shared by every batch assembler of this scorer; the model gathers from it
        self.features = None
        if self.config.uses_visual:
            self.features = FeatureStore(prepared.features, device, memory_bytes=feature_memory_bytes)
            model.set_feature_store(self.features)

    @classmethod
    def from_run(cls, run_dir, data_dir, device: str = "cpu", backend: Optional[str] = None,
                 batch_size: Optional[int] = None, *, which: str = "best", fast: bool = True,
                 max_batch_bytes: int = DEFAULT_BATCH_BYTES, precision: Optional[str] = None,
                 feature_memory_bytes: Optional[int] = None, probabilities: bool = False) -> "Scorer":
        """Load ``run_dir`` (``which``: "best" / "last" / "final") onto ``device`` ("cpu", "cuda[:n]", "auto")
        over the prepared dataset ``data_dir`` (checked against the run's data fingerprint).

        ``backend``: ops backend ("torch" / "sdpa" / "triton"); None = "torch" on CPU, the run's own on GPU.
        ``batch_size``: pairs per model call; None = 1024 on CPU, 8192 on GPU; capped so that the estimated
        batch memory stays under ``max_batch_bytes``. ``fast=False`` scores full 40-slot batches through
        ``model.score`` (the reference path). ``precision``: "fp32" / "bf16" / "fp16" autocast of the model call;
        None / "auto" = the device's default (bf16 on CUDA, fp32 on CPU), not the run's training precision.
        It is part of an output directory's identity (a resume with another precision is refused).
        ``feature_memory_bytes``: budget for the device-resident feature table (segfast.features; None = half the
        free CUDA memory / a quarter of the RAM up to 8 GiB on CPU); over it, features are gathered on the host
        (same scores; the manifest's ``feature_store.path`` says which). ``probabilities``: add the calibrated
        columns ``keep_probability``, ``survival``, ``calibrated_watch_segments`` and ``most_likely_leave``
        (docs/scoring.md) with the run's calibrator for checkpoint ``which`` (RUN/calibration.json; a run
        without one is refused, naming ``segfast calibrate``)."""
        from segfast.checkpoint import check_compatible, load_run
        from segfast.data.prepared import load_prepared
        from segfast.ops import BACKENDS
        from segfast.precision import check_backend, resolve_precision

        device = resolve_device(device)
        precision = resolve_precision(precision, device)
        if batch_size is None:
            batch_size = 1024 if device == "cpu" else 8192
        check_positive(batch_size=batch_size, max_batch_bytes=max_batch_bytes)
        calibrator = None
        if probabilities:  # before loading anything heavy: a run without a calibrator is refused at once
            from segfast.calibration import load_calibrator

            calibrator = load_calibrator(run_dir, which)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
        prepared = load_prepared(data_dir)
        model, meta = load_run(run_dir, which=which, device=device)
        check_compatible(meta, prepared)
        if backend is None:
            backend = "torch" if device == "cpu" else model.config.backend
        model.set_backend(backend)
        check_backend(precision, backend)
        return cls(model, meta, prepared, run_dir=run_dir, data_dir=data_dir, device=device, backend=backend,
                   batch_size=batch_size, which=which, fast=fast, max_batch_bytes=max_batch_bytes,
                   precision=precision, feature_memory_bytes=feature_memory_bytes, calibrator=calibrator)

    def assembler(self):
        """A batch assembler for this scorer (one per job: it runs in that job's reader thread)."""
        from segfast.scoring.batches import Assembler

        return Assembler(self.index, self.prepared, self.config, self.fast,
                         pin=str(self.device).startswith("cuda"), features=self.features)

    def score(self, data, *, keep_columns=None, on_unknown: str = "error", part_rows: int = DEFAULT_PART_ROWS,
              prefetch: bool = True, progress: bool = False):
        """Score the pairs of ``data`` (a pyarrow Table or RecordBatch, a pandas or polars DataFrame, or a dict
        of columns with int ``user_id``, ``video_id`` and optionally ``time_ms``) and return a pyarrow Table with
        the columns of the CLI's parts (``row`` = the row in ``data``), rows in input order, plus
        ``keep_columns`` (names or "a,b"). ``on_unknown``: "error" raises ``UnknownIdsError`` naming the
        unknown ids; "skip" leaves those rows out."""
        import pyarrow as pa

        from segfast.scoring.job import Job, part_table
        from segfast.scoring.pairs import TablePairs, as_arrow_table
        from segfast.scoring.validate import scan

        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown={on_unknown!r}: expected one of {ON_UNKNOWN}")
        check_positive(part_rows=part_rows)
        src = TablePairs(as_arrow_table(data), keep_columns=keep_columns)
        scan(src, self.index, on_unknown, self.data_dir, None)
        job = Job(self.model, self.index, src, self.assembler(), self.fast, self.device,
                  self.effective_batch_size, int(part_rows), progress, 0, precision=self.precision,
                  calibrator=self.calibrator)
        tables: list = []
        job.run(list(range(-(-src.rows // part_rows))), lambda ctx, t: tables.append(t), prefetch=prefetch)
        if not tables:  # no rows: an empty table with the output schema
            tables.append(part_table(job._part_inputs(0)))
        return pa.concat_tables(tables)

    def score_dataset(self, pairs, out, *, part_rows: int = DEFAULT_PART_ROWS, overwrite: bool = False,
                      progress: bool = True, rank: int = 0, world_size: int = 1, on_unknown: str = "error",
                      keep_columns=None, prefetch: bool = True,
                      on_part: Optional[Callable[[dict], None]] = None) -> dict:
        """Score a Parquet input (file, directory of files, hive dataset) into the output directory ``out``
        (``part-NNNNN.parquet`` + ``_manifest.json`` [+ ``_rejected/``]), resumably; return the manifest.
        This is what ``segfast score`` runs (docs/scoring.md)."""
        return run_dataset(self, pairs, out, part_rows=part_rows, overwrite=overwrite, progress=progress,
                           rank=rank, world_size=world_size, on_unknown=on_unknown, prefetch=prefetch,
                           on_part=on_part, keep_columns=keep_columns)


def score(run_dir, data_dir, pairs_path, out_dir, backend: Optional[str] = None, batch_size: Optional[int] = None,
          device: str = "cpu", part_rows: int = DEFAULT_PART_ROWS, overwrite: bool = False, progress: bool = True,
          rank: int = 0, world_size: int = 1, *, on_unknown: str = "error", which: str = "best",
          fast: bool = True, prefetch: bool = True, max_batch_bytes: int = DEFAULT_BATCH_BYTES,
          on_part: Optional[Callable[[dict], None]] = None, keep_columns=None,
          precision: Optional[str] = None, feature_memory_bytes: Optional[int] = None,
          probabilities: bool = False) -> dict:
    """``Scorer.from_run(run_dir, data_dir, ...).score_dataset(pairs_path, out_dir, ...)``: score every
    (user_id, video_id[, time_ms]) pair of ``pairs_path`` and return the manifest.

    ``part_rows``: input rows per output part (the unit of resumption and sharding). ``on_unknown``: "error"
    (default: refuse the whole input, naming the unknown ids) or "skip" (leave those pairs out and list them in
    ``_rejected/``). ``rank``/``world_size``: this process's shard (torchrun); with world_size > 1 a process
    group is used (started from the torchrun environment if none is running). ``keep_columns``: extra input
    columns carried through to the parts. ``on_part(record)`` is called after each part is written and
    recorded. The other options are :meth:`Scorer.from_run`'s."""
    from segfast import distributed as dist_

    t_begin = time.perf_counter()
    check_positive(world_size=world_size)
    if world_size > 1:
        info = dist_.env_info()
        info = dist_.DistInfo(int(rank), int(world_size), info.local_rank, info.local_world_size)
        device = dist_.device_for(device, info)
    scorer = Scorer.from_run(run_dir, data_dir, device=device, backend=backend, batch_size=batch_size,
                             which=which, fast=fast, max_batch_bytes=max_batch_bytes, precision=precision,
                             feature_memory_bytes=feature_memory_bytes, probabilities=probabilities)
    return run_dataset(scorer, pairs_path, out_dir, part_rows=part_rows, overwrite=overwrite, progress=progress,
                       rank=rank, world_size=world_size, on_unknown=on_unknown, prefetch=prefetch,
                       on_part=on_part, keep_columns=keep_columns, t_begin=t_begin)
