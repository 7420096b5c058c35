"""Fused cross-attention kernel vs the frozen reference: forward and all six gradients.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), where every
dot is computed in fp32 (fp16/bf16 inputs are upcast on load) except in the fp16 test of the GPU path
(`_INTERPRETER_UPCAST = False`: native fp16 dots, which the interpreter computes right). Both backward paths
(the one-kernel "fused" backward and the dq + dk/dv "split" fallback) run every correctness case. The
GPU-only cases at the end exercise the compiled tensor-core paths and GPU-scale shapes (bench/gpu_check.sh);
registers / spills of every launch at the presets' shapes, compiled for sm_90 and sm_80 without a GPU, are
checked by tests/test_kernels_compiled.py.

Tolerance table: err = max|x - ref| must be <= atol + rtol * max|ref| (per tensor).

    dtype  | output (atol, rtol) | gradients (atol, rtol)
    fp32   | 1e-5, 1e-4          | 1e-5, 1e-4
    fp16   | 2e-3, 4e-3          | 4e-3, 8e-3
    bf16   | 1.6e-2, 3e-2        | 3e-2, 6e-2
"""
from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available() and __name__ != "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # in case this file runs without the repo's conftest

import segfast.kernels._common as common  # noqa: E402
from segfast.kernels import cross_attention as ca  # noqa: E402
from segfast.ops import reference  # noqa: E402
from _fakes import assert_within, attn_leaves

TOL = {
    torch.float32: {"out": (1e-5, 1e-4), "grad": (1e-5, 1e-4)},
    torch.float16: {"out": (2e-3, 4e-3), "grad": (4e-3, 8e-3)},
    torch.bfloat16: {"out": (1.6e-2, 3e-2), "grad": (3e-2, 6e-2)},
}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
NAMES = ("q1", "k1", "v1", "q2", "k2", "v2")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(common, "POISON", True)
    yield


@pytest.fixture(params=["fused", "split"])
def bwd(request, monkeypatch):
    """Both backward paths: the one-kernel backward and the dq + per-source dk/dv kernels (the fallback)."""
    monkeypatch.setattr(ca, "_BACKWARD", request.param)
    return request.param


class _CountLaunches:
    """Stands in for a @triton.jit kernel and counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _mask(B, L, n_real, gen):
    """[B, L] bool with the first n_real[b] keys real (SegMM padding layout) or random when n_real is None."""
    if n_real is None:
        return torch.rand(B, L, generator=gen) < 0.7
    ar = torch.arange(L)[None, :]
    return ar < torch.as_tensor(n_real)[:, None]


def _inputs(B, H, LQ, L1, L2, D, dtype=torch.float32, n1=None, n2=None, layout="bhld", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(L):
        if layout == "blhd":  # a [B, L, H, D] buffer seen as [B, H, L, D] (non-contiguous view)
            x = torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(B, H, L, D, generator=gen)
        return x.to(DEV, dtype)

    src1 = (t(LQ), t(L1), t(L1), _mask(B, L1, n1, gen).to(DEV)) if L1 is not None else (None,) * 4
    src2 = (t(LQ), t(L2), t(L2), _mask(B, L2, n2, gen).to(DEV)) if L2 is not None else (None,) * 4
    return (*src1, *src2)


def _leaves(args):
    return attn_leaves(args)


def _close(name, x, ref, dtype, kind):
    assert_within(name, x, ref, *TOL[dtype][kind])


def _check(args, dtype=torch.float32, scale=None, seed=1):
    a_k = _leaves(args)
    a_r = _leaves(args)
    out = ca.cross_attention(*a_k, scale=scale)
    ref = reference.cross_attention(*a_r, scale=scale)
    _close("out", out, ref, dtype, "out")
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(ref.shape, generator=gen).to(DEV, ref.dtype)
    idx = [i for i in (0, 1, 2, 4, 5, 6) if a_k[i] is not None]
    gk = torch.autograd.grad(out, [a_k[i] for i in idx], g)
    gr = torch.autograd.grad(ref, [a_r[i] for i in idx], g)
    names = [NAMES[(0, 1, 2, None, 3, 4, 5)[i]] for i in idx]
    for n, x, r in zip(names, gk, gr):
        _close("d" + n, x, r, dtype, "grad")
    return out, gk


# ------------------------------------------------------------------------------------------- correctness (CPU)
@pytest.mark.parametrize(
    "B,H,LQ,L1,L2,D",
    [
        (2, 2, 40, 40, 100, 16),   # video stream: 40 slots, 40 video + 100 user keys
        (1, 1, 1, 1, 1, 16),       # one pair, Lq = 1, N = 1, M = 1
        (2, 1, 7, 5, 13, 24),      # non-power-of-two head dim
        (1, 2, 9, 40, 1, 64),      # ID modality: M = 1 user key
        (1, 1, 100, 40, 100, 32),  # user stream: Lq = 100 queries
    ],
)
def test_forward_backward_fp32(B, H, LQ, L1, L2, D, bwd):
    _check(_inputs(B, H, LQ, L1, L2, D, seed=B * 100 + LQ))


def test_padding_layout_and_fully_masked_history(bwd):
    # first-N masks as SegMM batches produce; row 1 has no user history at all (mask2 all False)
    B, H, LQ, L1, L2, D = 3, 1, 12, 12, 30, 16
    args = _inputs(B, H, LQ, L1, L2, D, n1=[12, 3, 1], n2=[30, 0, 17], seed=3)
    _check(args)


def test_all_keys_masked_row_gives_zeros(bwd):
    B, H, LQ, L1, L2, D = 3, 2, 5, 6, 9, 16
    args = list(_inputs(B, H, LQ, L1, L2, D, seed=4))
    args[3][1] = False
    args[7][1] = False
    args[3][2] = False  # row 2: source 1 fully masked, source 2 partly real
    out, grads = _check(args)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for gr in grads:
        assert torch.equal(gr[1], torch.zeros_like(gr[1]))


@pytest.mark.parametrize("missing", [1, 2])
def test_one_source_none(missing, bwd):
    L1, L2 = (None, 23) if missing == 1 else (17, None)
    _check(_inputs(2, 2, 11, L1, L2, 24, seed=5 + missing))


def test_multi_tile_paths(monkeypatch, bwd):
    # force 16-wide blocks: several query tiles, several key blocks per source, partial last tiles
    monkeypatch.setattr(ca, "_FORCE_BLOCKS", {"BLOCK_M": 16, "BLOCK_N": 16})
    _check(_inputs(1, 2, 37, 33, 50, 24, n1=[20], n2=[41], seed=7))


def test_strided_views_and_scale(bwd):
    args = _inputs(2, 2, 9, 8, 21, 16, layout="blhd", seed=8)
    assert not args[0].is_contiguous()
    _check(args, scale=0.37)


def test_head_dim_over_64_not_pow2(bwd):
    _check(_inputs(1, 1, 5, 6, 7, 80, seed=9))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, bwd):
    out, _ = _check(_inputs(2, 1, 10, 9, 30, 32, dtype=dtype, n2=[30, 0], seed=10), dtype=dtype)
    assert out.dtype == dtype


def test_deterministic_bitwise(bwd):
    args = _inputs(1, 2, 33, 20, 40, 16, seed=11)
    g = torch.randn(1, 2, 33, 16).to(DEV)
    runs = []
    for _ in range(2):
        a = _leaves(args)
        out = ca.cross_attention(*a)
        grads = torch.autograd.grad(out, [a[i] for i in (0, 1, 2, 4, 5, 6)], g)
        runs.append((out, *grads))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_poison_is_active_and_dispatcher():
    import segfast.ops as ops

    assert common.poison_enabled()
    args = _inputs(1, 1, 3, 4, 5, 16, seed=12)
    out = ops.cross_attention(*args, backend="triton")
    torch.testing.assert_close(out, reference.cross_attention(*args), atol=1e-5, rtol=1e-4)


def test_empty_and_fallback_cases(bwd):
    _check(_inputs(2, 1, 3, 4, 0, 16, seed=15))   # empty (not None) user history: L2 = 0
    _check(_inputs(2, 1, 0, 4, 5, 16, seed=16))   # no queries
    a = list(_inputs(1, 1, 3, 4, 5, 16, seed=17))
    a[4] = a[4].half()                            # mixed dtypes: computed in fp32, output in q1's dtype
    torch.testing.assert_close(ca.cross_attention(*a), reference.cross_attention(*a), atol=1e-5, rtol=1e-4)
    a = _leaves(_inputs(1, 1, 3, 4, 5, 16, dtype=torch.float64, seed=18))  # fp64: reference fallback
    assert torch.autograd.gradcheck(
        lambda q1, k1, v1, q2, k2, v2: ca.cross_attention(q1, k1, v1, a[3], q2, k2, v2, a[7]),
        [a[i] for i in (0, 1, 2, 4, 5, 6)])


def test_bad_arguments():
    with pytest.raises(ValueError):
        ca.cross_attention(None, None, None, None, None, None, None, None)
    q = torch.zeros(1, 1, 2, 16)
    with pytest.raises(ValueError):
        ca.cross_attention(q, q, None, torch.ones(1, 2, dtype=torch.bool), None, None, None, None)


def test_padded_keys_are_never_read(bwd):
    # NaN in every masked key / value: a kernel that loads them (even to multiply by p = 0) returns NaN. The
    # reference gets zeros there (its p = 0 times NaN would be NaN); masked keys get zero gradients either way.
    B, H, LQ, L1, L2, D = 3, 2, 21, 19, 45, 16
    a = list(_inputs(B, H, LQ, L1, L2, D, n1=[19, 4, 0], n2=[45, 13, 2], seed=21))
    a[7][1, 30] = True  # one real key after a gap: not a prefix mask
    ref_args = list(a)
    for kv, m in ((1, 3), (2, 3), (5, 7), (6, 7)):
        pad = ~a[m][:, None, :, None].expand_as(a[kv])
        ref_args[kv] = a[kv].masked_fill(pad, 0.0)
        a[kv] = a[kv].masked_fill(pad, float("nan"))
    a_k, a_r = _leaves(a), _leaves(ref_args)
    out = ca.cross_attention(*a_k)
    ref = reference.cross_attention(*a_r)
    _close("out", out, ref, torch.float32, "out")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(22))
    idx = (0, 1, 2, 4, 5, 6)
    for n, x, r in zip(NAMES, torch.autograd.grad(out, [a_k[i] for i in idx], g),
                       torch.autograd.grad(ref, [a_r[i] for i in idx], g)):
        _close("d" + n, x, r, torch.float32, "grad")


def test_fused_backward_is_the_default_where_it_fits(monkeypatch):
    # half precision at the presets' shapes (Lq 40 / 100, keys 40 + 100, D 16 / 32) takes the one-kernel
    # backward: 1 launch (fp32 operands need ~5x the registers: those shapes run the split kernels)
    fused, dq, dkdv = (_CountLaunches(k) for k in (ca._bwd_fused_kernel, ca._bwd_dq_kernel, ca._bwd_dkdv_kernel))
    monkeypatch.setattr(ca, "_bwd_fused_kernel", fused)
    monkeypatch.setattr(ca, "_bwd_dq_kernel", dq)
    monkeypatch.setattr(ca, "_bwd_dkdv_kernel", dkdv)
    for D in (16, 32):
        assert ca._launch_meta(100, 40, 100, D, arch=90)["fused"] is not None   # H100 / H200
    assert ca._launch_meta(40, 40, 100, 32, fp32=True)["fused"] is None
    _check(_inputs(1, 1, 40, 40, 100, 16, dtype=torch.float16, n1=[33], n2=[71], seed=23), dtype=torch.float16)
    assert (fused.launches, dq.launches, dkdv.launches) == (1, 0, 0)
    # a source with more than 128 keys does not fit one tile: the dq + dk/dv kernels (1 + 2 launches)
    assert ca._launch_meta(8, 4, 200, 16)["fused"] is None
    _check(_inputs(1, 1, 8, 4, 200, 16, n2=[150], seed=24))
    assert (fused.launches, dq.launches, dkdv.launches) == (1, 1, 2)
    monkeypatch.setattr(ca, "_BACKWARD", "fused")
    with pytest.raises(ValueError, match="fused backward needs"):
        _check(_inputs(1, 1, 8, 4, 200, 16, seed=25))


def test_fused_backward_several_query_tiles_per_source(monkeypatch):
    # 16-row query tiles: the fused program loops over 3 query tiles per source (last one partial), keeping the
    # dk / dv accumulators of the source's keys across them
    monkeypatch.setattr(ca, "_BACKWARD", "fused")
    monkeypatch.setattr(ca, "_FORCE_BLOCKS", {"BLOCK_M": 16})
    _check(_inputs(2, 1, 37, 23, 50, 24, n1=[23, 5], n2=[41, 50], seed=26))


@pytest.mark.parametrize("LQ", [40, 100])
def test_fp16_gpu_path_without_upcast_at_paper_shapes(LQ, bwd, monkeypatch):
    # the GPU path (fp16 operands into the dots, p / ds cast to fp16) run in the interpreter, which computes fp16
    # dots right (not bf16): paper-code head dim 32, 40 video + 100 user keys, two (b, h) only
    monkeypatch.setattr(ca, "_INTERPRETER_UPCAST", False)
    assert not ca._upcast(torch.float16)
    args = _inputs(2, 1, LQ, 40, 100, 32, dtype=torch.float16, n1=[40, 27], n2=[100, 58], seed=27 + LQ)
    out, _ = _check(args, dtype=torch.float16)
    assert out.dtype == torch.float16


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,H,LQ,L1,L2,D",
    [
        (64, 16, 40, 40, 100, 32),    # paper-code video stream
        (64, 16, 100, 40, 100, 32),   # paper-code user stream
        (8, 4, 40, 300, 300, 128),    # long sources, D = 128
        (16, 2, 150, 100, 257, 96),   # Lq > one tile, non-pow2 D, odd lengths
    ],
)
def test_gpu_scale(B, H, LQ, L1, L2, D, dtype):
    gen = torch.Generator().manual_seed(0)
    n1 = torch.randint(0, L1 + 1, (B,), generator=gen)
    n2 = torch.randint(0, L2 + 1, (B,), generator=gen)
    n1[0], n2[0] = 0, 0  # one fully masked row
    _check(_inputs(B, H, LQ, L1, L2, D, dtype=dtype, n1=n1, n2=n2, layout="blhd"), dtype=dtype)


@pytest.mark.gpu
def test_gpu_deterministic_large():
    args = _inputs(128, 16, 40, 40, 100, 32, dtype=torch.bfloat16, seed=13)
    g = torch.randn(128, 16, 40, 32, device=DEV, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        a = _leaves(args)
        out = ca.cross_attention(*a)
        runs.append((out, *torch.autograd.grad(out, [a[i] for i in (0, 1, 2, 4, 5, 6)], g)))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_fp32_ieee_option(monkeypatch):
    monkeypatch.setattr(ca, "FP32_DOT_PRECISION", "ieee")
    _check(_inputs(32, 4, 40, 40, 100, 64, seed=14))
