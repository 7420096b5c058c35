"""The one SplitMix64 of segfast (NumPy): the finaliser that turns counters into well-mixed 64-bit keys.

Used for the seeded split keys and history samples of ``segfast.data.splits`` and for the seeded tie-breaks
and random scores of ``segfast.evaluate``; results must never change between versions (they decide which
row lands in which split), which ``tests/test_atomic_io.py`` pins against published SplitMix64 outputs.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GOLDEN", "M1", "M2", "splitmix64"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # the SplitMix64 increment (2**64 / golden ratio)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(z) -> np.ndarray:
    """SplitMix64's finaliser ("mix") on uint64 values, wrapping arithmetic; the input is not modified.

    The full generator's k-th output from state s is ``splitmix64(s + k * GOLDEN)`` (k = 1, 2, ...)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> _S30)
        z = z * M1
        z = z ^ (z >> _S27)
        z = z * M2
        return z ^ (z >> _S31)
