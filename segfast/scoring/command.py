"""The command line of the scorer (``segfast score`` / ``python -m segfast.scoring`` / torchrun)."""
from __future__ import annotations

import json
import sys

__all__ = ["add_arguments", "score_from_args", "main"]


def add_arguments(p) -> None:
    """The ``segfast score`` flags; one definition, shared with thumbnails / edit (``segfast.cli``)."""
    from segfast.cli import add_score_arguments

    add_score_arguments(p)


def score_from_args(a) -> dict:
    """Run the scoring job from parsed arguments, with rank / world from the torchrun environment."""
    from segfast import distributed as dist_
    from segfast.scoring.api import score

    if getattr(a, "engine", "local") == "ray":  # Ray Data actors (segfast.scoring.ray_engine)
        from segfast.scoring.ray_engine import score_from_args as score_ray_from_args

        return score_ray_from_args(a)
    info = dist_.env_info()
    with dist_.process_group(a.device):
        return score(a.run_dir, a.data, a.pairs, a.out, backend=a.backend, batch_size=a.batch_size, device=a.device,
                     part_rows=a.part_rows, overwrite=a.overwrite, progress=not a.quiet, rank=info.rank,
                     world_size=info.world_size, on_unknown=a.on_unknown, which=a.which,
                     prefetch=not a.no_prefetch, keep_columns=getattr(a, "keep_columns", None),
                     precision=getattr(a, "precision", None),
                     feature_memory_bytes=getattr(a, "feature_memory", None),
                     probabilities=getattr(a, "probabilities", False))


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
