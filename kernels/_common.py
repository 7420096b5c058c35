"""Small helpers shared by the Triton kernels of ``segfast.kernels``.

Stable API (other kernel modules import these; change only by adding):

- ``interpreting()``: True when Triton runs in the CPU interpreter (``TRITON_INTERPRET`` set to any truthy
  value: Triton itself treats "1", "true", "yes", "on" alike, so must we).
- ``pow2_block(n, lo=16, hi=None)``: next power of two >= n, clamped to [lo, hi]; every ``tl.dot`` dim >= 16.
- ``poison_enabled()`` / ``new_output(...)`` / ``new_like(...)``: output allocation; when poisoning is on
  (tests), outputs start as NaN so any element a kernel forgets to write fails the comparison.
- ``check_device(*tensors)``: raise a clear error for CPU tensors when the interpreter is off.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Tests set this to True (or export SEGFAST_POISON=1): every kernel output then starts as NaN.
POISON = False


def interpreting() -> bool:
    """Triton's own reading of TRITON_INTERPRET (``triton.knobs``), so that we never disagree with it."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def poison_enabled() -> bool:
    return POISON or os.environ.get("SEGFAST_POISON", "0") == "1"


def pow2_block(n: int, lo: int = 16, hi: Optional[int] = None) -> int:
    """Next power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    b = 1 << max(int(n) - 1, 0).bit_length()
    b = max(b, lo)
    if hi is not None:
        b = min(b, hi)
    return b


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or torch.full(nan) when poisoning is on."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_like(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch.empty_like (keeps a dense tensor's stride order, e.g. a [B, L, H, D] buffer seen as
    [B, H, L, D]), NaN-filled when poisoning is on."""
    out = torch.empty_like(t, dtype=dtype)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def check_device(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"segfast Triton kernels need CUDA tensors (got {t.device}); use backend='torch' on CPU, "
                "or export TRITON_INTERPRET=1 before importing triton to run them in the interpreter")


__all__ = ["POISON", "interpreting", "poison_enabled", "pow2_block", "new_output", "new_like", "check_device"]
