"""The kernels' interpreter detection agrees with Triton's own for every spelling of TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = r"""
import torch
from segfast.kernels._common import interpreting
from segfast.kernels import decoder_loss, cross_attention
from triton import knobs
assert interpreting() == bool(knobs.runtime.interpret), (interpreting(), knobs.runtime.interpret)
if interpreting():
    torch.manual_seed(0)
    x, y = torch.randn(3, 40, 16), torch.randn(3, 40, 16)
    wx, wy, b = torch.randn(16), torch.randn(16), torch.zeros(())
    logits = decoder_loss.segment_decoder(x, y, wx, wy, b, None, None, None)
    assert torch.allclose(logits, x @ wx + y @ wy, atol=1e-4)
    q = torch.randn(1, 2, 16, 16)
    m = torch.ones(1, 16, dtype=torch.bool)
    cross_attention.cross_attention(q, q, q, m, None, None, None, None)
print("ok", interpreting())
"""


@pytest.mark.parametrize("value,expect", [("1", True), ("true", True), ("True", True), ("on", True),
                                          ("0", False), ("false", False)])
def test_interpreter_detection_matches_triton(value, expect):
    env = dict(os.environ, TRITON_INTERPRET=value)
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(expect)]
