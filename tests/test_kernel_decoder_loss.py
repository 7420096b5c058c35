"""Fused decoder + intra-video loss kernels (kernels/decoder_loss.py) vs the frozen reference.

Every case checks the logits, the loss and the gradient of every input (x, y, w_x, w_y, bias, fusion, pos_a,
pos_c) against torch autograd through ``segfast.ops.reference.decode_and_loss``. Output buffers and the per-block
/ per-split partial buffers are NaN-poisoned (``POISON_OUTPUTS``) so that an element the kernels fail to write is
caught.

Tolerance table: error = max |got - want| / max(max |want|, 1e-2) (normalised max error; floor 1 for dbias,
which is a cancelling sum ~0 for the loss alone), per input dtype.
The reference always runs in fp32 on the fp32 upcast of the very same (possibly 16-bit) input values, with the
weights as given (fp32 in most cases). The kernels' 16-bit errors are the GPU path's own (the interpreter rounds
the dot operands to the input dtype exactly as the tensor cores take them, see the module docstring):
the fusion weight W is cast to the input dtype (one rounding, u), the dW kernel rounds g * y to it (u),
``w_y + x W`` is parked in dy in the input dtype and rounded again after scaling by g (2u), dx / dy are stored in
the input dtype (u). u = 2^-8 = 3.9e-3 (bf16), 2^-11 = 4.9e-4 (fp16).

| inputs | where           | logits / loss | gradients | why (worst measured: 24 interpreter cases incl. d = 512) |
|--------|-----------------|---------------|-----------|-----------------------------------------------------------|
| fp32   | CPU interpreter | 5e-5          | 5e-5      | fp32 math, summation order only                           |
| fp32   | GPU (tf32 dots) | 5e-3          | 5e-3      | tl.dot in tf32 (10-bit mantissa)                          |
| fp16   | any             | 2e-3          | 3e-3      | W in fp16, dy rounded twice: 2.1e-4 / 6.3e-4              |
| bf16   | any             | 5e-3          | 2e-2      | W in bf16, dy rounded twice (2u = 7.8e-3, + dot):         |
|        |                 |               |           | 2.0e-3 / 9.9e-3 (1.14e-2 in test_half_inputs)             |
"""
from __future__ import annotations

import re

import pytest
import torch

from segfast.ops import reference as R
from segfast.kernels import decoder_loss as K

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NAMES = ("x", "y", "w_x", "w_y", "bias", "fusion", "pos_a", "pos_c")

TOL = {  # input dtype -> (logits / loss, gradients); see the table above
    torch.float32: (5e-3, 5e-3) if CUDA else (5e-5, 5e-5),
    torch.float16: (2e-3, 3e-3),
    torch.bfloat16: (5e-3, 2e-2),
}


@pytest.fixture(autouse=True)
def _poison():
    old = K.POISON_OUTPUTS
    K.POISON_OUTPUTS = True
    yield
    K.POISON_OUTPUTS = old


def _err(got, want, floor=1e-2):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item() if want.numel() else 0.0


def _check(name, got, want, tol):
    assert got is not None and want is not None, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten poisoned output?)"
    # dbias = sum of dlogits is ~0 for the loss (shift invariance): normalise by its natural scale, 1
    e = _err(got, want, floor=1.0 if name == "dbias" else 1e-2)
    assert e <= tol, f"{name}: normalised max error {e:.3g} > {tol:g}"


def make(B=5, S=40, dx=32, dy=32, hf=2, mods="xy", pos=True, dtype=torch.float32, wdtype=torch.float32,
         noncontig=False, seed=0, target=None, fscale=0.1):
    """Random decoder inputs. ``fscale``: std of the fusion weights (use ~1/head-dim at d = 512, as the model
    initialises them: with 0.1 the bilinear logits reach +-100, the loss saturates and the test would measure
    the conditioning of bpr-max rather than the kernel)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def feat(d):
        if noncontig:  # [B, d, S] transposed: slot stride 1, feature stride S
            return rn(B, d, S).to(dtype).to(DEV).transpose(1, 2)
        return rn(B, S, d).to(dtype).to(DEV)

    x = feat(dx) if "x" in mods else None
    y = feat(dy) if "y" in mods else None
    w_x = (rn(dx, scale=0.3).to(wdtype).to(DEV)) if x is not None else None
    w_y = (rn(dy, scale=0.3).to(wdtype).to(DEV)) if y is not None else None
    bias = rn(()).to(wdtype).to(DEV)
    fusion = rn(hf, dx // hf, dy // hf, scale=fscale).to(wdtype).to(DEV) if (hf and x is not None and y is not None) \
        else None
    pos_a = rn(S, scale=0.05).to(wdtype).to(DEV) if pos else None
    pos_c = rn(S).to(wdtype).to(DEV) if pos else None
    if target is None:
        target = torch.randint(0, S + 1, (B,), generator=g)
    return [x, y, w_x, w_y, bias, fusion, pos_a, pos_c], target.to(DEV)


def _leaves(ins, upcast=False):
    out = []
    for t in ins:
        if t is None:
            out.append(None)
            continue
        t = t.detach()
        if upcast:
            t = t.float()
        out.append(t.requires_grad_())
    return out


def _run(op, leaves, target, kind, grad_logits, loss_weight):
    """(logits, loss, grads of every leaf) of op(*leaves, target, kind) for the objective
    loss * loss_weight + sum(logits * grad_logits)."""
    logits, loss = op(*leaves, target, kind=kind)
    obj = loss * loss_weight
    if grad_logits is not None:
        obj = obj + (logits * grad_logits).sum()
    req = [t for t in leaves if t is not None]
    gs = iter(torch.autograd.grad(obj, req, allow_unused=True))
    grads = [None if t is None else next(gs) for t in leaves]
    return logits.detach(), loss.detach(), grads


def run_kernel(ins, target, kind, grad_logits=None, loss_weight=1.0):
    return _run(K.decode_and_loss, _leaves(ins), target, kind, grad_logits, loss_weight)


def run_reference(ins, target, kind, grad_logits=None, loss_weight=1.0):
    return _run(R.decode_and_loss, _leaves(ins, upcast=True), target, kind, grad_logits, loss_weight)


def compare(ins, target, kind="bpr-max", grad_logits=None, loss_weight=1.0, tol_scale=1.0):
    dtype = (ins[0] if ins[0] is not None else ins[1]).dtype
    tol_f, tol_g = (tol_scale * v for v in TOL[dtype])
    lk, Lk, gk = run_kernel(ins, target, kind, grad_logits, loss_weight)
    lr, Lr, gr = run_reference(ins, target, kind, grad_logits, loss_weight)
    assert lk.dtype == torch.float32 and Lk.dtype == torch.float32 and Lk.dim() == 0
    _check("logits", lk, lr, tol_f)
    _check("loss", Lk.reshape(1), Lr.reshape(1), tol_f)
    for name, inp, a, b in zip(NAMES, ins, gk, gr):
        if inp is None:
            continue
        assert a.dtype == inp.dtype, (name, a.dtype, inp.dtype)
        _check("d" + name, a, b, tol_g)
    return lk, Lk, gk


# ---------------------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("kind", ["bpr-max", "bpr-max-literal", "pairwise"])
def test_full_both_fusion_pos(kind):
    ins, t = make(B=5)
    compare(ins, t, kind)


@pytest.mark.parametrize("mods", ["x", "y"])
def test_single_modality(mods):
    ins, t = make(B=4, dx=48, dy=16, mods=mods)
    compare(ins, t, "bpr-max")


def test_both_without_fusion_and_without_pos():
    ins, t = make(B=4, dx=32, dy=64, hf=0, pos=False)
    compare(ins, t, "pairwise")


def test_no_position_bias_odd_dims():
    # dx != dy, head dims 24 / 40: not multiples of the 32-wide chunks, masked columns
    ins, t = make(B=3, dx=48, dy=80, hf=2, pos=False)
    compare(ins, t, "bpr-max")


def test_batch_of_one():
    ins, t = make(B=1, target=torch.tensor([7]))
    compare(ins, t, "bpr-max")


def test_excluded_rows_and_edge_targets():
    t = torch.tensor([40, 0, 39, 40, 12, 0])  # target == S excluded; 0 and S-1 kept
    ins, t = make(B=6, target=t)
    compare(ins, t, "bpr-max")
    compare(ins, t, "pairwise")


@pytest.mark.parametrize("kind", ["bpr-max", "bpr-max-literal", "pairwise"])
def test_all_rows_excluded(kind):
    ins, t = make(B=3, target=torch.tensor([40, 40, 41]))
    lk, Lk, gk = compare(ins, t, kind)
    assert Lk.item() == 0.0
    for name, a in zip(NAMES, gk):
        if a is not None:
            assert torch.count_nonzero(a) == 0, name


def test_bpr_max_clamped_regime():
    # huge target logits: sum_j w_j sigmoid(p_j - p_y) underflows below 1e-8 -> clamped, zero gradient;
    # huge other logits: the sum reaches 1 - 1e-8 -> clamped at the top too. Rows 2, 3 are ordinary.
    S = 40
    t = torch.tensor([5, 9, 3, 11])
    ins, t = make(B=4, S=S, target=t)
    x, y, w_x, w_y, bias, fusion, pos_a, pos_c = ins
    # per-row extremes through the features of the target slot (row 0) / of every other slot (row 1)
    x = x.clone()
    x[0, 5] = 0
    x[0, 5, 0] = 400.0 / float(w_x[0])  # p_y ~ +400
    x[1] = 0
    x[1, :, 0] = 400.0 / float(w_x[0])
    x[1, 9, 0] = -400.0 / float(w_x[0])  # p_y ~ -400, others ~ +400
    ins[0] = x
    ins[5] = None  # no fusion: keep the extreme logits exactly where we put them
    # features of magnitude ~1e3 make dw_x a cancelling sum: 10x the table's tolerance
    _, Lk, gk = compare(ins, t, "bpr-max", tol_scale=10.0)
    assert torch.isfinite(Lk)
    assert torch.count_nonzero(gk[0][0]) == 0  # clamped below 1e-8: exactly zero gradient
    # 1 - 1e-8 rounds to 1.0 in fp32, so the top "clamp" never cuts the gradient; it is ~0 (rounding noise)
    assert gk[0][1].abs().max() < 1e-6


def test_pairwise_extreme_logits():
    ins, t = make(B=3, target=torch.tensor([1, 2, 3]))
    ins[7] = ins[7] * 200.0  # pos_c spreads logits over +-600: logsigmoid must stay finite
    compare(ins, t, "pairwise")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    ins, t = make(B=4, dtype=dtype)
    compare(ins, t, "bpr-max")


def test_half_weights_too():
    ins, t = make(B=3, dtype=torch.bfloat16, wdtype=torch.bfloat16)
    compare(ins, t, "pairwise")


def test_non_contiguous_inputs():
    ins, t = make(B=4, noncontig=True)
    assert not ins[0].is_contiguous() and not ins[1].is_contiguous()
    compare(ins, t, "bpr-max")


@pytest.mark.parametrize("S", [7, 64])
def test_other_slot_counts(S):
    ins, t = make(B=3, S=S, dx=32, dy=32)
    compare(ins, t, "bpr-max")


def test_deterministic():
    ins, t = make(B=9)
    a = run_kernel(ins, t, "bpr-max")
    b = run_kernel(ins, t, "bpr-max")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for ga, gb in zip(a[2], b[2]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)


def test_grad_through_logits_and_loss():
    ins, t = make(B=4)
    gl = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)).to(DEV)
    compare(ins, t, "bpr-max", grad_logits=gl, loss_weight=0.7)


def test_grad_through_logits_only():
    ins, t = make(B=4)
    gl = torch.randn(4, 40, generator=torch.Generator().manual_seed(4)).to(DEV)
    compare(ins, t, "pairwise", grad_logits=gl, loss_weight=0.0)


def test_segment_decoder_scoring_and_grad():
    ins, _ = make(B=5, noncontig=True)
    with torch.no_grad():
        lk = K.segment_decoder(*ins)
    lr = R.segment_decoder(*[None if v is None else v.float() for v in ins])
    _check("scoring logits", lk, lr, TOL[torch.float32][0])
    # autograd path: backward is the chain kernel
    gl = torch.randn(5, 40, generator=torch.Generator().manual_seed(5)).to(DEV)
    a, b = _leaves(ins), _leaves(ins, upcast=True)
    ga = torch.autograd.grad((K.segment_decoder(*a) * gl).sum(), [v for v in a if v is not None])
    gb = torch.autograd.grad((R.segment_decoder(*b) * gl).sum(), [v for v in b if v is not None])
    for name, u, v in zip([n for n, t in zip(NAMES, ins) if t is not None], ga, gb):
        _check("d" + name, u, v, TOL[torch.float32][1])


def test_no_grad_training_call_and_dispatcher():
    import segfast.ops as ops

    ins, t = make(B=3)
    with torch.no_grad():
        lk, Lk = ops.decode_and_loss(*ins, t, kind="pairwise", backend="triton")
    lr, Lr = R.decode_and_loss(*ins, t, "pairwise")
    _check("logits", lk, lr, TOL[torch.float32][0])
    _check("loss", Lk.reshape(1), Lr.reshape(1), TOL[torch.float32][0])


def test_float64_falls_back_to_reference():
    ins, t = make(B=2)
    ins = [None if v is None else v.double() for v in ins]
    lk, Lk = K.decode_and_loss(*ins, t, kind="bpr-max")
    assert lk.dtype == torch.float64


class _Recorder:
    """Wraps a kernel: records (grid, args, kwargs) of every launch and runs it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def record(monkeypatch):
    recs = {name: _Recorder(getattr(K, name)) for name in ("_decoder_kernel", "_dfusion_kernel")}
    for name, rec in recs.items():
        monkeypatch.setattr(K, name, rec)
    return recs


@pytest.mark.parametrize("S", [2, 23])
@pytest.mark.parametrize("kind", ["bpr-max", "pairwise"])
def test_slot_count_edges(S, kind):
    # S = 2: one other slot per row; 23: not a power of two (padded to 32 slots in the tile)
    ins, t = make(B=3, S=S, dx=32, dy=32, target=torch.tensor([0, S - 1, S]))
    compare(ins, t, kind)


@pytest.mark.parametrize("mods,hf,pos", [("x", 0, False), ("y", 0, False), ("xy", 0, True), ("xy", 4, False)])
def test_modalities_and_ablations_with_grad_logits(mods, hf, pos):
    # x only / y only / no fusion / 4 fusion heads, with and without the position bias, through the chain path
    ins, t = make(B=4, dx=64, dy=32, hf=hf, mods=mods, pos=pos, seed=7)
    gl = torch.randn(4, 40, generator=torch.Generator().manual_seed(8)).to(DEV)
    compare(ins, t, "bpr-max-literal", grad_logits=gl, loss_weight=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_chain_and_scoring(dtype):
    ins, t = make(B=5, dtype=dtype, seed=2)
    gl = torch.randn(5, 40, generator=torch.Generator().manual_seed(9)).to(DEV)
    compare(ins, t, "pairwise", grad_logits=gl, loss_weight=0.0)
    with torch.no_grad():
        lk = K.segment_decoder(*ins)
    lr = R.segment_decoder(*[None if v is None else v.float() for v in ins])
    _check("scoring logits", lk, lr, TOL[dtype][0])


def test_scoring_is_one_program_per_block_without_partials(record):
    ins, _ = make(B=7)
    with torch.no_grad():
        K.segment_decoder(*ins)
    assert not record["_dfusion_kernel"].calls
    (grid, args, kw), = record["_decoder_kernel"].calls
    n_blocks = -(-7 // kw["BLOCK_B"])
    assert grid == (n_blocks,) and n_blocks > 1
    assert not kw["GRADS"] and kw["LOSS"] == 0
    # DWX_P, DWY_P, DB_P, DPC_P, LOSS_P are the 1-element dummies: nothing per program is allocated
    assert all(a.numel() == 1 for a in args[15:20])


def test_training_launches_and_dfusion_splits(record):
    # the dW kernel runs split-K over the pairs (several splits at this size in the interpreter config) and the
    # main kernel is launched once, one program per block
    ins, t = make(B=9)
    compare(ins, t, "bpr-max")
    (grid, _, kw), = record["_decoder_kernel"].calls
    assert grid == (-(-9 // kw["BLOCK_B"]),) and kw["GRADS"] and kw["LOSS"] == 1
    (grid_w, args_w, kw_w), = record["_dfusion_kernel"].calls
    n_splits = args_w[3].shape[0]
    assert n_splits > 1 and grid_w == (n_splits * 2 * (16 // kw_w["BKW"] or 1) * (16 // kw_w["BNW"] or 1),)


def test_fp16_gpu_path_without_upcast_at_paper_shapes(record, monkeypatch):
    """The fp16 GPU path (native fp16 tl.dot operands, fp32 accumulation) in the interpreter, whose fp16 dots
    are exact-product / fp32-accumulate like the tensor cores: paper-code shapes (S=40, d=512, Hf=2), every
    output, training, chain and scoring paths."""
    monkeypatch.setattr(K, "INTERPRET_NATIVE_FP16", True)
    ins, t = make(B=3, S=40, dx=512, dy=512, hf=2, dtype=torch.float16, seed=11, target=torch.tensor([3, 40, 39]),
                   fscale=1 / 256)
    compare(ins, t, "bpr-max")
    gl = torch.randn(3, 40, generator=torch.Generator().manual_seed(12)).to(DEV)
    compare(ins, t, "pairwise", grad_logits=gl, loss_weight=0.3)
    with torch.no_grad():
        lk = K.segment_decoder(*ins)
    _check("scoring logits", lk, R.segment_decoder(*[None if v is None else v.float() for v in ins]),
           TOL[torch.float16][0])
    calls = record["_decoder_kernel"].calls + record["_dfusion_kernel"].calls
    assert calls and all(kw["UPCAST"] is False for _, _, kw in calls)
    assert all(a.dtype == torch.float16 for _, args, _ in record["_decoder_kernel"].calls for a in (args[0], args[5]))


def test_bf16_is_upcast_in_the_interpreter_only_after_rounding(record):
    ins, t = make(B=2, dtype=torch.bfloat16)
    compare(ins, t, "bpr-max")
    (_, args, kw), = record["_decoder_kernel"].calls
    # W travels in the input dtype (cast once on the host); the interpreter upcasts the rounded operands
    assert args[5].dtype == torch.bfloat16 and kw["UPCAST"] is (not CUDA)


def test_deterministic_all_outputs():
    ins, t = make(B=11, dtype=torch.bfloat16, seed=5)
    gl = torch.randn(11, 40, generator=torch.Generator().manual_seed(6)).to(DEV)
    for kwargs in (dict(), dict(grad_logits=gl)):
        a = run_kernel(ins, t, "bpr-max", **kwargs)
        b = run_kernel(ins, t, "bpr-max", **kwargs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for ga, gb in zip(a[2], b[2]):
            assert (ga is None and gb is None) or torch.equal(ga, gb)


def test_empty_batch():
    ins, t = make(B=0, target=torch.zeros(0, dtype=torch.long))
    lk, Lk, gk = run_kernel(ins, t, "bpr-max")
    assert lk.shape == (0, 40) and Lk.item() == 0.0
    for name, a in zip(NAMES, gk):
        assert a is not None and torch.count_nonzero(a) == 0, name


def test_unknown_tune_key_is_an_error(monkeypatch):
    monkeypatch.setattr(K, "TUNE", {"max_programs": 64})  # a v1 key
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)
    with pytest.raises(ValueError, match="unknown key"):
        K._config(40, 256, 256, torch.bfloat16, torch.device("cpu"), on_gpu=True)


def test_bad_inputs_raise_clear_errors():
    ins, t = make(B=3)
    with pytest.raises(ValueError, match="target must be"):
        K.decode_and_loss(*ins, t[:2], kind="bpr-max")
    with pytest.raises(ValueError, match="fused kernel supports"):
        K.decode_and_loss(*ins, t, kind="bce")
    bad = list(ins)
    bad[0] = bad[0].to(torch.int32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        K.segment_decoder(*bad)


# ---------------------------------------------------------------------------------------------------- GPU scale
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bpr-max", "bpr-max-literal", "pairwise"])
def test_gpu_paper_code_shapes(dtype, kind):
    ins, t = make(B=1024, S=40, dx=512, dy=512, hf=2, dtype=dtype, fscale=1 / 256)
    compare(ins, t, kind)


@pytest.mark.gpu
def test_gpu_paper_code_grad_logits_and_determinism():
    ins, t = make(B=1024, S=40, dx=512, dy=512, hf=2, dtype=torch.bfloat16, fscale=1 / 256)
    gl = torch.randn(1024, 40, device=DEV)
    compare(ins, t, "bpr-max", grad_logits=gl)
    a, b = run_kernel(ins, t, "bpr-max"), run_kernel(ins, t, "bpr-max")
    for ga, gb in zip(a[2], b[2]):
        assert torch.equal(ga, gb)


# The sm_90 / sm_80 compile check of these kernels (registers, no spills, JIT-faithful specialisation of the real
# launches at the presets' shapes) lives in tests/test_kernels_compiled.py (bench/compile_table.py).


# ---------------------------------------------------------------------------------------------------- GPU-path hazards
# The interpreter runs a program as one thread, so it cannot show a thread reading what another thread of the same
# program wrote. This check reads the kernels' TTIR as the JIT builds it for sm_90 (no GPU needed).
def _ttir_hazards(ttir: str) -> list:
    """Read-after-write hazards between threads of one program through global memory, from the kernel's TTIR:
    for every load and store of a pointer argument that is both loaded and stored, a store textually before a
    load needs a gpu.barrier between them; a store after a load (or in a loop around both) must use the very
    same pointer value as the load (each element read, then written back by data dependency) and that pointer
    must vary with every loop around both (so no iteration reads what another wrote)."""
    lines = ttir.splitlines()
    m = re.search(r"tt\.func public @\w+\((.*?)\)\s*(attributes|\{)", ttir, re.S)
    args = set(re.findall(r"(%\w+): !tt\.ptr", m.group(1)))
    defs, loops_at = {}, []
    stack, depth = [], 0
    tok = re.compile(r"%[\w.$-]+")
    for i, line in enumerate(lines):
        s = line.strip()
        fm = re.match(r"(?:(%[\w.$-]+)(?::\d+)? = )?scf\.for (%[\w.$-]+) = ", s)
        if fm:
            iv = f"{fm.group(2)}@{i + 1}"
            defs.setdefault(fm.group(2), []).append((i, "iv", iv))
            if "iter_args" in s:
                for name in re.findall(r"(%[\w.$-]+) = ", s.split("iter_args", 1)[1]):
                    defs.setdefault(name, []).append((i, "iter", iv))
            if fm.group(1):
                defs.setdefault(fm.group(1), []).append((i, "iter", iv))
        loops_at.append(tuple(x[0] for x in stack))
        if fm:
            stack.append((f"{fm.group(2)}@{i + 1}", depth))
        dm = re.match(r"(%[\w.$-]+)(?::\d+)? = ([\w.]+) (.*)$", s)
        if dm and not fm:
            defs.setdefault(dm.group(1), []).append((i, dm.group(2), dm.group(3)))
        depth += s.count("{") - s.count("}")
        while stack and depth <= stack[-1][1]:
            stack.pop()

    def norm(t):
        return t.split("#")[0]

    def lookup(v, at):
        """The definition of v visible at line ``at``: the nearest one before it (names repeat across regions)."""
        best = None
        for d in defs.get(v, []):
            if d[0] <= at:
                best = d
        return best

    def root(v, at, depth=0):
        v = norm(v)
        if v in args:
            return v
        d = lookup(v, at)
        if d is None or depth > 200:
            return None
        line, op, rest = d
        if op in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans"):
            return root(tok.findall(rest)[0], line, depth + 1)
        return None

    memo = {}

    def deps(v, at):
        v = norm(v)
        d = lookup(v, at)
        key = (v, d[0] if d else None)
        if key in memo:
            return memo[key]
        memo[key] = set()
        out = set()
        if d is not None and d[1] in ("iv", "iter"):
            out.add(d[2])
        elif d is not None:
            for t in tok.findall(d[2]):
                out |= deps(t, d[0])
        memo[key] = out
        return out

    acc = []  # (line, kind, root, ptr)
    barriers = [i for i, l in enumerate(lines) if "gpu.barrier" in l]
    problems = []
    for i, line in enumerate(lines):
        s = line.strip()
        lm = re.search(r"= tt\.load (%[\w.$#-]+)", s)
        sm = re.match(r"tt\.store (%[\w.$#-]+)", s)
        if lm or sm:
            ptr = norm((lm or sm).group(1))
            r = root(ptr, i)
            if r is None:
                problems.append(f"line {i + 1}: pointer {ptr} of unknown provenance")
                continue
            acc.append((i, "load" if lm else "store", r, ptr, deps(ptr, i)))
    for li, lk, lr, lp, ldeps in acc:
        if lk != "load":
            continue
        for si, sk, sr, sp, _ in acc:
            if sk != "store" or sr != lr:
                continue
            common = [iv for iv in loops_at[li] if iv in loops_at[si]]
            if si < li and not common:
                if not any(si < b < li for b in barriers):
                    problems.append(f"{lr}: stored at line {si + 1}, loaded at line {li + 1} without a barrier")
            else:
                if sp != lp:
                    problems.append(f"{lr}: load at line {li + 1} and store at line {si + 1} use different "
                                    f"pointers inside loop(s) {common}")
                elif not set(common) <= ldeps:
                    problems.append(f"{lr}: pointer {lp} (line {li + 1}) does not vary with loop(s) "
                                    f"{sorted(set(common) - ldeps)}: an iteration reads another's write")
    return problems


def _decoder_ttirs() -> dict:
    """(child process without TRITON_INTERPRET) TTIR of every kernel launch the wrapper makes at paper-code shapes
    (bf16 training / chain / scoring, fp32 training), specialised as the JIT would for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    K._on_gpu = lambda device: True
    K._num_sms = lambda device: 132
    launches = []

    class Rec:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.fn, a, k))

    K._decoder_kernel, K._dfusion_kernel = Rec(K._decoder_kernel), Rec(K._dfusion_kernel)
    out = {}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    for dt in (torch.bfloat16, torch.float32):
        ins, t = make(B=8, S=40, dx=512, dy=512, hf=2, dtype=dt)
        ins = [None if v is None else v.cpu() for v in ins]
        for mode in ("train", "chain", "score"):
            if dt == torch.float32 and mode != "train":
                continue
            launches.clear()
            if mode == "train":
                K._launch(*ins, target=t.cpu(), loss=1, grads=True)
            elif mode == "chain":
                K._launch(*ins, G=torch.randn(8, 40), compute_logits=False, grads=True)
            else:
                K._launch(*ins)
            for fn, a, k in launches:
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                bound, spec, opts = binder(*a, **dict(k))
                options, signature, constexprs, attrs = fn._pack_args(backend, dict(k), bound, spec, opts)
                cc = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
                out[f"{fn.fn.__name__} {str(dt)[6:]} {mode}"] = cc.asm["ttir"]
    return out


@pytest.mark.slow
def test_no_thread_reads_another_threads_write_on_the_gpu_path():
    """Every pointer argument both loaded and stored by a kernel: a store before a load has a gpu.barrier
    between them, a store after a load writes the element it read (same pointer, varying with every enclosing
    loop). v1 fails this (its per-program partials dw_x / dw_y / dW, read-modify-written across the persistent
    loop); v2 must pass, and the check must flag v2 with its barrier removed."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_kernel_decoder_loss as T; "
            "print(json.dumps(T._decoder_ttirs()))")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0 and "ptxas" in r.stderr.lower():
        pytest.skip(f"no usable ptxas: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    irs = json.loads(r.stdout.strip().splitlines()[-1])
    assert {n.split()[0] for n in irs} == {"_decoder_kernel", "_dfusion_kernel"}, sorted(irs)
    for name, ir in irs.items():
        assert _ttir_hazards(ir) == [], (name, _ttir_hazards(ir))
    train = irs["_decoder_kernel bfloat16 train"]
    assert "gpu.barrier" in train
    assert any("without a barrier" in p for p in _ttir_hazards(train.replace("gpu.barrier", "// removed")))
