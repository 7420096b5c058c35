"""The model call of a scoring batch.

The model owns its forward: a batch assembled by :class:`segfast.scoring.batches.Assembler` (a unique batch when
the scorer's ``fast`` is on, see docs/internals.md "Batch contract") goes to ``model.score`` as it is. A model
takes the fast path when it sets ``accepts_unique_batches = True`` (``SegInterestModel`` does; so does any
variant that subclasses it or implements the contract); for any other model the scorer sends per-row 40-slot
batches.
"""
from __future__ import annotations

__all__ = ["accepts_unique", "forward"]


def accepts_unique(model) -> bool:
    """Whether ``model`` declares the unique-batch contract (``accepts_unique_batches = True``)."""
    return getattr(model, "accepts_unique_batches", False) is True


def forward(model, batch: dict):
    """Logits [B, S] for an assembled batch already on the model's device (S = the batch's slots)."""
    return model.score(batch)
