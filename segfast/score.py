"""Compatibility module: the scorer lives in the package :mod:`segfast.scoring` (docs/scoring.md).

``from segfast.score import score`` and ``python -m segfast.score`` keep working; new code imports
``segfast.scoring`` (or ``segfast.Scorer``)."""
from __future__ import annotations

from segfast.scoring import *  # noqa: F401,F403
from segfast.scoring import __all__ as _all
from segfast.scoring.command import add_arguments, main, score_from_args  # noqa: F401
from segfast.scoring.common import atomic_json as _atomic_json  # noqa: F401 (used by tests/test_atomic_io.py)

__all__ = list(_all) + ["add_arguments", "score_from_args", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
