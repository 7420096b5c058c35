"""Triton kernels of segfast, installed as ``segfast.kernels``. Imported only by ``segfast.ops``."""
