"""Functional ops of the segment interest model, with one switch between the PyTorch reference, PyTorch's
fused attention and the Triton kernels. The model calls only these; a user's own model variant gets the fast
path by doing the same.

    segfast.ops.set_backend("triton")        # process default
    segfast.ops.cross_attention(..., backend="torch")   # per call

Backends: "torch" (the frozen reference, ``segfast.ops.reference``), "sdpa" (cross_attention through
``torch.nn.functional.scaled_dot_product_attention``, ``segfast.ops.sdpa``; the decoder ops are the reference's)
and "triton" (the fused kernels of ``segfast.kernels``).
"""
from __future__ import annotations

from typing import Optional

from . import reference

BACKENDS = ("torch", "sdpa", "triton")
_default = "torch"


def set_backend(name: str) -> None:
    """Set the process default backend: "torch" (reference), "sdpa" (PyTorch fused attention for
    cross_attention, reference decoder) or "triton" (fused kernels)."""
    global _default
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _default = name


def get_backend() -> str:
    return _default


def _resolve(backend: Optional[str]) -> str:
    b = _default if backend is None else backend
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {b!r}; expected one of {BACKENDS}")
    return b


def cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=None, backend: Optional[str] = None):
    b = _resolve(backend)
    if b == "triton":
        from segfast.kernels import cross_attention as _k
        return _k.cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=scale)
    if b == "sdpa":
        from . import sdpa as _s
        return _s.cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=scale)
    return reference.cross_attention(q1, k1, v1, mask1, q2, k2, v2, mask2, scale=scale)


def segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, backend: Optional[str] = None,
                    offset=None, log_exposure=None):
    """Decoder logits [B, S]; ``offset`` [B, S] / ``log_exposure`` [S]: the position prior
    (``reference.apply_prior``), applied after the decoder in every backend."""
    if _resolve(backend) == "triton":
        from segfast.kernels import decoder_loss as _k
        return _k.segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, offset, log_exposure)
    return reference.segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, offset, log_exposure)


apply_prior = reference.apply_prior


def intra_video_loss(logits, target, kind="bpr-max", labels=None, slot_mask=None, backend: Optional[str] = None):
    # The loss alone is cheap; the fused kernel is decode_and_loss.
    return reference.intra_video_loss(logits, target, kind, labels, slot_mask)


def decode_and_loss(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind="bpr-max",
                    labels=None, slot_mask=None, backend: Optional[str] = None, offset=None, log_exposure=None):
    """(logits [B, S], loss []): the decoder, the optional position prior (``offset`` / ``log_exposure``,
    ``reference.apply_prior``), then the intra-video loss on the prior-adjusted logits."""
    b = _resolve(backend)
    if b == "triton" and kind in ("bpr-max", "bpr-max-literal", "pairwise"):
        from segfast.kernels import decoder_loss as _k
        if offset is None or log_exposure is None:  # the prior (one of them) inside the fused kernel
            return _k.decode_and_loss(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind=kind,
                                      offset=offset, log_exposure=log_exposure)
        # both priors at once (no model option does that): the decoder kernel, the rest in torch
        logits = reference.apply_prior(_k.segment_decoder(x, y, w_x, w_y, bias, fusion, pos_a, pos_c),
                                       offset, log_exposure)
        return logits, reference.intra_video_loss(logits, target, kind, labels, slot_mask)
    return reference.decode_and_loss(x, y, w_x, w_y, bias, fusion, pos_a, pos_c, target, kind, labels, slot_mask,
                                     offset, log_exposure)


__all__ = ["set_backend", "get_backend", "cross_attention", "segment_decoder", "intra_video_loss",
           "decode_and_loss", "apply_prior", "reference", "BACKENDS"]
