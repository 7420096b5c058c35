"""segfast: segment-level user interest modelling for short videos, with fused Triton kernels."""
__version__ = "0.1.0"
MAX_SLOTS = 40
SEGMENT_MS = 5000
