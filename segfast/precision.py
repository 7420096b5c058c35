"""Precision policy of training, evaluation and scoring: ``fp32``, ``bf16`` or ``fp16`` (``--precision``).

- ``fp32``: no autocast (the reference numerics).
- ``bf16`` / ``fp16``: ``torch.autocast(device_type, dtype)`` around the forward (and the loss) only. The
  weights and the optimizer state stay fp32 (master weights), backward and the optimizer step run outside
  autocast. The model's logits are fp32 (the decoder adds its fp32 bias and position terms) and the
  intra-video loss runs in fp32 (the reference upcasts; softmax / log / sigmoid of fp32 inputs stay fp32
  under autocast).
- ``fp16`` needs the ``sdpa`` or ``triton`` backend (:func:`check_backend`: the reference attention's -1e30
  mask value does not fit fp16) and trains with dynamic loss scaling (``torch.amp.GradScaler``); its state goes into the checkpoint
  (``last/state.json``) so that a resumed run continues exactly.
- ``auto`` (the CLI default, or ``None`` in the Python API): bf16 on CUDA, fp32 on CPU.

Where autocast reaches (torch's own per-op policy, nothing segfast decides): matmul / linear / bmm / einsum
run in the low dtype (fp32 accumulation on both CPU and GPU); on CUDA softmax, log_softmax and layer_norm are
upcast to fp32, on CPU autocast leaves softmax in its input dtype, so the reference backend's attention softmax
(``segfast.ops.reference.cross_attention``) runs in bf16 under CPU bf16 autocast; the ``sdpa`` and ``triton``
backends keep fp32 softmax statistics internally. See docs/model.md ("Precision") for measured differences.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["PRECISIONS", "CHOICES", "PrecisionError", "default_precision", "resolve_precision", "check_backend",
           "dtype_of",
           "autocast", "grad_scaler", "scaler_state", "load_scaler_state"]

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto",) + PRECISIONS
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision name that is not known, or that this device cannot run."""


def _device_type(device) -> str:
    try:
        return torch.device(str(device)).type
    except (RuntimeError, TypeError) as e:
        raise PrecisionError(f"device {device!r}: not a torch device ({e})") from None


def default_precision(device) -> str:
    """bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if _device_type(device) == "cuda" else "fp32"


def resolve_precision(precision: Optional[str], device) -> str:
    """``precision`` ("auto" / None / "fp32" / "bf16" / "fp16") checked against ``device``; "auto" and None
    give :func:`default_precision`. An unknown name or a pairing the device cannot run is a PrecisionError."""
    if precision is None or precision == "auto":
        return default_precision(device)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r}: expected one of {', '.join(CHOICES)}")
    kind = _device_type(device)
    if precision == "fp32":
        return precision
    if not torch.amp.autocast_mode.is_autocast_available(kind):
        raise PrecisionError(f"precision {precision}: torch {torch.__version__} has no autocast for device type "
                             f"{kind!r}; use --precision fp32")
    if kind == "cuda" and precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision bf16: {device} does not support bfloat16 (compute capability < 8.0); "
                             "use --precision fp16 or fp32")
    if precision == "fp16" and not _fp16_autocast_ok(kind):
        raise PrecisionError(f"precision fp16: torch {torch.__version__} cannot run fp16 autocast with a "
                             f"GradScaler on {kind}; use --precision bf16 or fp32")
    return precision


def check_backend(precision: str, backend: Optional[str]) -> None:
    """fp16 cannot run the reference attention (backend "torch"): it masks padded keys with -1e30, beyond fp16's
    range (65504), so autocast's fp16 attention logits cannot hold it. A PrecisionError says what to use."""
    if precision == "fp16" and (backend or "torch") == "torch":
        raise PrecisionError("precision fp16 with backend 'torch': the reference attention masks padded keys with "
                             "-1e30, beyond fp16's range; use --backend sdpa (or triton on CUDA), or --precision "
                             "bf16")


_FP16_OK: dict = {}


def _fp16_autocast_ok(kind: str) -> bool:
    """Whether fp16 autocast and a GradScaler work on this device type (probed once, on a tiny Linear)."""
    if kind not in _FP16_OK:
        try:
            lin = torch.nn.Linear(4, 4).to(kind)
            scaler = torch.amp.GradScaler(kind)
            with torch.autocast(kind, dtype=torch.float16):
                loss = lin(torch.ones(2, 4, device=kind)).float().sum()
            scaler.scale(loss).backward()
            _FP16_OK[kind] = True
        except (RuntimeError, NotImplementedError, ValueError):
            _FP16_OK[kind] = False
    return _FP16_OK[kind]


def dtype_of(precision: str) -> torch.dtype:
    """The autocast dtype of a resolved precision (float32 for fp32)."""
    if precision not in _DTYPES:
        raise PrecisionError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return _DTYPES[precision]


def autocast(device, precision: str):
    """The context to run a forward (and loss) in: a no-op for fp32, else ``torch.autocast``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=dtype_of(precision))


def grad_scaler(device, precision: str) -> Optional["torch.amp.GradScaler"]:
    """A dynamic loss scaler for fp16 training; None for fp32 and bf16 (bf16 has fp32's exponent range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(_device_type(device))


def scaler_state(scaler) -> Optional[dict]:
    """The GradScaler's state as JSON-able numbers (scale, growth tracker, factors), or None."""
    if scaler is None:
        return None
    return {k: (float(v) if isinstance(v, float) else int(v) if isinstance(v, int) else v)
            for k, v in scaler.state_dict().items()}


def load_scaler_state(scaler, state: Optional[dict], where: str) -> None:
    """Restore :func:`scaler_state`'s dict into ``scaler`` (a missing state is an error naming ``where``)."""
    if scaler is None:
        return
    if not isinstance(state, dict) or "scale" not in state:
        raise ValueError(f"{where}: an fp16 run's checkpoint without its loss-scaler state (grad_scaler); "
                         "cannot resume exactly")
    scaler.load_state_dict(dict(state))
