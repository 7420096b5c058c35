"""The kernels as the GPU would build them: every real launch compiles for sm_90 and sm_80 without spills.

No GPU needed. ``bench/compile_table.py`` (run here in a subprocess without TRITON_INTERPRET, with its ``test``
scope: the presets small and paper-code, every modality, fp32 / bf16 / fp16, training and scoring through the
model, the decoder ops and the attention op at the presets' head dims) records the launches the wrappers make,
specialises them with Triton's own JIT code, compiles each distinct specialisation with the bundled ptxas
and reads registers / stack bytes from the cubin. The full table (every ablation, loss kind and head dims 16 to
128) is ``csrc_notes/compiled.md``, written by the same script without ``--scope``.

Also checked: the specialisation equals what ``JITFunction.run`` itself computes (the real run with a stand-in
driver, stopped at its compile call), and the occupancy arithmetic.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "compile_table.py"


def _env() -> dict:
    # the interpreter replaces @triton.jit: the compile runs in a child process without it
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args, timeout):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("compiled") / "table.json"
    r = _run([str(SCRIPT), "--scope", "test", "--no-md", "--json", str(out)], timeout=1500)
    if r.returncode == 3:  # the script's "cannot compile ahead of time here" (no nvidia backend / ptxas)
        pytest.skip(r.stderr.strip()[-300:])
    assert r.returncode == 0, f"compile_table failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())


def _fmt(rows):
    return "\n".join(f"  sm_{r['arch']} {r['kernel']} {r['dtype']} [{r['variant']}] {r['context']}: "
                     f"{r.get('error') or ('regs %s, stack %s B' % (r.get('regs'), r.get('stack')))}"
                     for r in rows)


@pytest.mark.slow
def test_every_launch_compiles_for_sm90_and_sm80(table):
    rows = table["rows"]
    assert {r["arch"] for r in rows} == {90, 80}
    for arch in (90, 80):
        rr = [r for r in rows if r["arch"] == arch]
        kernels = {(r["module"], r["kernel"]) for r in rr}
        # both kernel modules are exercised, in training and in scoring
        assert {m for m, _ in kernels} >= {"cross_attention", "decoder_loss"}, kernels
        phases = {p for r in rr for p in r["phases"]}
        assert "score" in phases and any(p.startswith("train") for p in phases), phases
        assert {r["dtype"] for r in rr} >= {"fp32", "bf16", "fp16"}
    failed = [r for r in rows if "error" in r]
    assert not failed, "variants that do not compile:\n" + _fmt(failed)
    unfit = [r for r in rows if r["occupancy"]["warps_per_sm"] == 0]
    assert not unfit, "variants that cannot be resident (registers or shared memory):\n" + _fmt(unfit)


@pytest.mark.slow
def test_no_half_precision_variant_spills(table):
    spills = [r for r in table["rows"] if r["dtype"] != "fp32" and r.get("stack", 0) > 0]
    assert not spills, "bf16 / fp16 variants with register spills:\n" + _fmt(spills)


@pytest.mark.slow
def test_no_variant_at_the_presets_shapes_spills(table):
    rows = table["rows"]
    assert all(r["at_presets"] for r in rows)  # the test scope is the presets' shapes only
    spills = [r for r in rows if r.get("stack", 0) > 0]
    assert not spills, "variants at the presets' shapes with register spills:\n" + _fmt(spills)


_FAITHFUL = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "bench")
    import compile_table as C
    import segfast.ops as ops
    from segfast.kernels import _aot
    from segfast.model.config import model_preset
    from segfast.model.model import SegInterestModel

    rec = _aot.Recorder()
    card = _aot.CARDS[90]
    cfg = model_preset("small", modality="both", backend="triton", feature_dim=C.FEATURE_DIM, n_users=8,
                       n_videos=8)
    model = _aot.meta_module(SegInterestModel(cfg))
    with _aot.capture(card, autocast=torch.bfloat16, recorder=rec):
        _, loss = model.loss(C._meta_batch(256, 8, 8))
        loss.backward()
        model.eval()
        model.score(C._meta_batch(511, 8, 8))
    with _aot.capture(card, recorder=rec):   # misaligned views and odd sizes: hints must drop
        x = torch.empty(7, 41, 3, 4, 17, device="cuda", dtype=torch.float16)[1:, ..., 1:]   # [6, 41, 3, 4, 16]
        q, k = x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)                      # [6, 4, 41, 16]
        m = torch.empty(6, 41, dtype=torch.bool, device="cuda")
        ops.cross_attention(q, k, k, m, None, None, None, None, backend="triton")
    launches = rec.launches
    mismatch = []
    for la in launches:
        for arch in (90, 80):
            ours, jit = _aot.specialise(la, arch), _aot.replay_through_jit(la, arch)
            if _aot.variant_key(ours) != _aot.variant_key(jit):
                mismatch.append((la.name, arch))
    # a real (CPU) tensor and its recorded stand-in specialise alike: dtype, alignment of offset views
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl
    be = make_backend(GPUTarget("cuda", 90, 32))
    base = torch.empty(64, dtype=torch.float32)
    standin = []
    for t in (base, base[1:], base[4:], base.view(torch.bfloat16)[3:], torch.zeros(8, dtype=torch.bool),
              torch.zeros(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64)[1:]):
        a = native_specialize_impl(type(be), t, False, True, True)
        b = native_specialize_impl(type(be), _aot.TensorArg.of(t), False, True, True)
        al = t.data_ptr() % 16 == 0   # the CPU allocation is aligned; the stand-in assumes an aligned base
        standin.append([list(a), list(b), al])
    print(json.dumps({"n": len(launches), "names": sorted({la.name for la in launches}), "mismatch": mismatch,
                      "standin": standin}))
""")


@pytest.mark.slow
def test_specialisation_is_the_jits_own():
    """For real launches (model small/both, bf16 autocast, training + scoring; an attention call on misaligned
    views), ``specialise`` gives exactly what ``JITFunction.run`` builds for sm_90 and sm_80."""
    pytest.importorskip("triton.backends.nvidia")
    r = _run(["-c", _FAITHFUL], timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] >= 5 and len(res["names"]) >= 3, res
    assert not res["mismatch"], res["mismatch"]
    for a, b, aligned in res["standin"]:
        assert a[0] == b[0], (a, b)                 # pointer type
        if aligned:
            assert a[1] == b[1], (a, b)             # divisibility hint
    hints = [b[1] for _, b, _ in res["standin"]]
    assert hints[:3] == ["D", "", "D"], hints      # offsets 0, 4 B, 16 B


def test_occupancy_arithmetic():
    from segfast.kernels._aot import CARDS, occupancy
    h100, a100 = CARDS[90], CARDS[80]
    # 187 registers x 4 warps: 6144 registers per warp -> 10 warps by registers -> 2 blocks of 4 = 8 warps
    assert occupancy(h100, 187, 10240, 4) == {"warps_per_sm": 8, "blocks_per_sm": 2, "limit": "registers"}
    # 128 registers: 4096 per warp -> 16 warps -> 4 blocks of 4
    assert occupancy(h100, 128, 0, 4)["warps_per_sm"] == 16
    # 32 registers, 4 warps: 64 warps by registers, 16 blocks by warps
    assert occupancy(h100, 32, 0, 4) == {"warps_per_sm": 64, "blocks_per_sm": 16, "limit": "registers"}
    # shared memory bound: 100 KB per block + 1 KB reserved -> 2 blocks on an H100, 1 on an A100
    assert occupancy(h100, 64, 100 * 1024, 4) == {"warps_per_sm": 8, "blocks_per_sm": 2, "limit": "shared"}
    assert occupancy(a100, 64, 100 * 1024, 4)["blocks_per_sm"] == 1
    # too much shared memory for one block on an A100 (163 KB) but not on an H100 (227 KB)
    assert occupancy(a100, 64, 200 * 1024, 4)["warps_per_sm"] == 0
    assert occupancy(h100, 64, 200 * 1024, 4)["warps_per_sm"] == 4
    # more than 255 registers cannot be
    assert occupancy(h100, 256, 0, 4)["warps_per_sm"] == 0
