"""Offline batch scoring: (user, video[, time]) pairs -> per-segment interest logits (docs/scoring.md).

    Scorer.from_run(run_dir, data_dir, device=..., backend=..., batch_size=...)
        .score(table)                    in memory: Arrow table / pandas / polars -> Arrow table
        .score_dataset(pairs, out, ...)  Parquet file / directory / hive dataset -> resumable output directory
    score(run_dir, data_dir, pairs, out, ...)  the two in one call (what ``segfast score`` runs)

Modules, one concern each: ``common`` (constants, errors, file helpers), ``pairs`` (input), ``index`` (id maps
and histories of the prepared dataset), ``batches`` (unique batches of integer indices; the feature store is
``segfast.features``), ``forward`` (the model call: the forward is the model's), ``validate`` (the validation
pass and rejected rows), ``job`` (reader thread + model loop),
``outdir`` (output directory, identity, resume, layout migration), ``runner`` (the dataset job), ``gpu``
(GPU monitor), ``api`` (``Scorer``, ``score``), ``command`` (the command line), ``ray_engine`` (Ray Data:
``ScoreBatches`` for ``map_batches``, ``score_ray`` = ``segfast score --engine ray``; lazily exported).
"""
from __future__ import annotations

from segfast.scoring.api import Scorer, resolve_device, score
from segfast.scoring.common import (DEFAULT_BATCH_BYTES, DEFAULT_PART_ROWS, FORMAT, MANIFEST, MAX_SLOTS, ON_UNKNOWN,
                                    OUTPUT_COLUMNS, REJECTED_DIR, VERSION, OutDirError, ScoreInputError,
                                    UnknownIdsError)
from segfast.scoring.index import latest_visual_histories
from segfast.scoring.pairs import PairsFile, ParquetPairs, TablePairs

__all__ = ["Scorer", "score", "resolve_device", "latest_visual_histories", "ParquetPairs", "TablePairs", "PairsFile",
           "ScoreInputError", "UnknownIdsError", "OutDirError", "DEFAULT_PART_ROWS", "DEFAULT_BATCH_BYTES",
           "OUTPUT_COLUMNS", "ON_UNKNOWN", "FORMAT", "VERSION", "MANIFEST", "REJECTED_DIR", "MAX_SLOTS"]


def __getattr__(name):  # the Ray engine, loaded on first use (it needs the optional extra segfast[ray] to run)
    if name in ("ScoreBatches", "score_ray"):
        from segfast.scoring import ray_engine

        return getattr(ray_engine, name)
    raise AttributeError(f"module 'segfast.scoring' has no attribute {name!r}")
