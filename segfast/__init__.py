"""segfast: segment-level user interest modelling for short videos, with fused Triton kernels.

The public API (imported lazily, so that ``import segfast`` stays light; see docs/spec.md for the behaviour):

``SegInterestModel(config)``
    The segment interest model (docs/spec.md section 5): hybrid ID + visual representations, the
    user-video cross-attention encoder and the segment decoder with position bias. ``model(batch)`` gives
    logits [B, 40]; ``model.loss(batch)`` (logits, loss); ``model.score(batch)`` eval-mode logits;
    ``model.set_backend("torch" | "sdpa" | "triton")`` picks the ops backend of its hot ops.
``ModelConfig``
    The model's configuration (a dataclass, JSON round-trip with ``to_dict`` / ``from_dict``);
    ``segfast.model.model_preset("small" | "paper-code", **overrides)`` builds one from a preset.
``load_run(run_dir, which="best", device="cpu")``
    A trained run directory -> (model in eval mode, meta).

``Scorer.from_run(run_dir, data_dir, device="cpu")``
    The offline batch scorer (``segfast.scoring``, docs/scoring.md): ``.score(table)`` scores an Arrow table
    or a pandas / polars DataFrame in memory and returns an Arrow table; ``.score_dataset(pairs, out)`` scores
    a Parquet file, directory or hive dataset into resumable Parquet parts (what ``segfast score`` runs).

Constants: ``MAX_SLOTS`` (40 segment slots per video), ``SEGMENT_MS`` (5,000 ms per segment).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
MAX_SLOTS = 40
SEGMENT_MS = 5000

__all__ = ["__version__", "MAX_SLOTS", "SEGMENT_MS", "SegInterestModel", "ModelConfig", "Scorer", "load_run"]

_LAZY = {"SegInterestModel": "segfast.model.model", "ModelConfig": "segfast.model.config",
         "Scorer": "segfast.scoring.api"}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these are imported on first use
    from segfast.model.config import ModelConfig
    from segfast.model.model import SegInterestModel
    from segfast.scoring.api import Scorer


def load_run(run_dir, which: str = "best", device="cpu"):
    """Load a trained run: returns ``(model, meta)``, the model in eval mode on ``device``.

    ``run_dir``: the directory ``segfast train --out`` wrote. ``which``: "best" (the best dev checkpoint,
    else the exported ``model.safetensors``), "last" (the resume state) or "final" (the exported weights).
    ``meta``: {"model_config", "train_config", "data" (fingerprint of the training data), "metrics",
    "state", "weights" (the file loaded), "run_dir"}. Only safetensors and JSON are read (never pickle);
    segfast's own tensor checksum is verified when present. Errors (``segfast.checkpoint.CheckpointError``,
    a ValueError) name the file at fault.
    """
    from segfast.checkpoint import load_run as _load_run

    return _load_run(run_dir, which=which, device=device)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'segfast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
