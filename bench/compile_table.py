"""Compile table of the Triton kernels as the GPU would build them: registers, spills, shared memory, occupancy.

    .venv/bin/python bench/compile_table.py                    # full set -> csrc_notes/compiled.md
    .venv/bin/python bench/compile_table.py --scope presets --json out.json --no-md   # what the test runs

No GPU needed. Runs the real model and ops with the Triton backend on tensors that live on the ``meta`` device
but report ``cuda`` (``segfast.kernels._aot.capture``), records every kernel launch the wrappers make (the
wrappers take their GPU path: block sizes, warps, grid, dtypes and strides as on an H100 / A100), computes each
launch's specialisation with Triton's own JIT code (signature, constexprs, ``tt.divisibility`` hints, ints
equal to 1 as constexprs), compiles each distinct one for sm_90 and sm_80 with the ptxas bundled in triton, and
reads registers and stack (spill) bytes from the cubin. Occupancy: resident warps per SM on an H100 (sm_90) /
A100 (sm_80).

What is launched (``--scope full``, the default, writes the table; ``presets`` and ``test`` are subsets):
- model: presets small (B 256) and paper-code (B 1024) x modalities id / visual / both x ablations none /
  cross-only / self-only / no-attention / no-position x fp32 / bf16 / fp16 (bf16 / fp16 = torch.autocast,
  emulated: the Linear / matmul family in half precision, LayerNorm / softmax in fp32), a training step
  (``model.loss`` + backward) and scoring (``model.score`` in eval mode, 2 x B pairs).
- decoder ops at the presets' shapes (d 64 / 512, 40 slots, 2 fusion heads), x / y in fp32 / bf16 / fp16,
  with and without position bias: ``decode_and_loss`` + backward through the loss (bpr-max; full scope adds
  bpr-max-literal and pairwise), backward through the logits too (chain kernel), ``segment_decoder`` +
  backward, scoring under no_grad (2 x B and an odd tail batch 2 x B - 3).
- attention op on [B, L, H, D] views: video stream (Lq 40, keys 40 + 100) and user stream (Lq 100, keys
  40 + 100), fwd + bwd and no-grad forward, D 16 (H 4, B 256) and 32 (H 16, B 1024) at the presets' shapes;
  full scope adds D 64 (H 8) and 128 (H 4), which are outside the presets (fp32 there may spill).

``presets`` = full without D 64 / 128 and the extra loss kinds. ``test`` (tests/test_kernels_compiled.py)
= the default config of each preset (ablation none) through the model, the decoder ops in bf16 / fp16
(training, scoring) and the attention op at D 16 / 32: 148 variants (74 per arch), measured 330 s wall cold
(empty triton cache) on the 2-core box shared with 5 other jobs (~130 s of CPU), ~100 s with a warm cache.
Full scope: 520 variants, 488 s wall with a mostly warm cache (capture 148 s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    for _k in ("TRITON_INTERPRET",):
        if os.environ.get(_k, "0").strip().lower() not in ("", "0", "false", "no", "off", "n"):
            sys.exit(f"compile_table: unset {_k} (the interpreter replaces @triton.jit; nothing to compile)")

import torch  # noqa: E402

PRESET_BATCH = {"small": 256, "paper-code": 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SLOTS, USER_TOKENS, FEATURE_DIM = 40, 100, 1024
ATT_SWEEP = {16: (4, 256, True), 32: (16, 1024, True), 64: (8, 1024, False), 128: (4, 1024, False)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scope", default="full", choices=["full", "presets", "test"])
    ap.add_argument("--arch", default="90,80", help="compute capabilities to compile for (90 = H100, 80 = A100)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (at most 2 on the shared box)")
    ap.add_argument("--out", default=str(REPO / "csrc_notes" / "compiled.md"))
    ap.add_argument("--no-md", action="store_true", help="do not write the markdown table")
    ap.add_argument("--json", default=None, help="also write every variant's result as JSON here")
    ap.add_argument("--limit", type=int, default=None, help="compile only the first N variants (debugging)")
    ap.add_argument("--dry-run", action="store_true", help="capture and count the variants, compile nothing")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------------------------
def _meta_batch(B: int, n_users: int, n_videos: int) -> dict:
    m = dict(device="meta")
    return {"row": torch.empty(B, dtype=torch.int64, **m), "user_idx": torch.empty(B, dtype=torch.int64, **m),
            "video_idx": torch.empty(B, dtype=torch.int64, **m), "n_segments": torch.empty(B, dtype=torch.int64, **m),
            "slot_mask": torch.empty(B, SLOTS, dtype=torch.bool, **m),
            "slot_index": torch.empty(B, SLOTS, dtype=torch.int64, **m),
            "target": torch.empty(B, dtype=torch.int64, **m),
            "labels": torch.empty(B, SLOTS, dtype=torch.int8, **m), "is_cold": torch.empty(B, dtype=torch.bool, **m),
            "video_feat": torch.empty(B, SLOTS, FEATURE_DIM, dtype=torch.float16, **m),
            "user_feat": torch.empty(B, USER_TOKENS, FEATURE_DIM, dtype=torch.float16, **m),
            "user_mask": torch.empty(B, USER_TOKENS, dtype=torch.bool, **m)}


def run_models(card, rec, scope, log):
    from segfast.kernels import _aot
    from segfast.model.config import ABLATIONS, MODALITIES, model_preset
    from segfast.model.model import SegInterestModel

    for preset, B in PRESET_BATCH.items():
        for modality in MODALITIES:
            for ablation in (ABLATIONS if scope != "test" else ("none",)):
                torch.manual_seed(0)
                cfg = model_preset(preset, modality=modality, ablation=ablation, backend="triton",
                                   feature_dim=FEATURE_DIM if modality != "id" else None, n_users=64, n_videos=64)
                model = _aot.meta_module(SegInterestModel(cfg))
                for dname, dtype in DTYPES.items():
                    amp = None if dtype == torch.float32 else dtype
                    lab = dict(source="model", preset=preset, modality=modality, ablation=ablation, dtype=dname,
                               at_presets=True)
                    t0 = time.perf_counter()
                    with _aot.capture(card, autocast=amp, recorder=rec):
                        model.train()
                        batch = _meta_batch(B, 64, 64)
                        with rec.context(**lab, phase="train-fwd", batch=B):
                            _, loss = model.loss(batch)
                        with rec.context(**lab, phase="train-bwd", batch=B), _aot.no_autocast():
                            loss.backward()   # outside the autocast region, as a training loop does
                        model.zero_grad(set_to_none=True)
                        model.eval()
                        with rec.context(**lab, phase="score", batch=2 * B):
                            model.score(_meta_batch(2 * B, 64, 64))
                    log(f"  model {preset}/{modality}/{ablation}/{dname}: {time.perf_counter() - t0:.1f} s")


def run_decoder_ops(card, rec, scope, log):
    """The decoder ops at the presets' shapes. ``test`` scope: bf16 / fp16 inputs (the model's autocast runs feed
    the decoder fp32), training and scoring; ``presets`` adds fp32, no position bias, the backward through the
    logits (chain kernel) and an odd tail batch; ``full`` adds the other loss kinds (training)."""
    import segfast.ops as ops
    from segfast.kernels import _aot
    from segfast.model.config import model_preset

    kinds = ("bpr-max",) if scope != "full" else ("bpr-max", "bpr-max-literal", "pairwise")
    dtypes = {k: v for k, v in DTYPES.items() if scope != "test" or k != "fp32"}
    t0 = time.perf_counter()
    for preset, B in PRESET_BATCH.items():
        d = model_preset(preset).d_model
        hf = model_preset(preset).fusion_heads
        for modality in ("id", "visual", "both"):
            for pos in ((True, False) if scope != "test" else (True,)):
                for dname, dtype in dtypes.items():
                    lab = dict(source="decoder-op", preset=preset, modality=modality, dtype=dname, at_presets=True,
                               ablation="none" if pos else "no-position")
                    with _aot.capture(card, recorder=rec):
                        def make(Bn, grad):
                            m = dict(device="cuda")
                            x = torch.empty(Bn, SLOTS, d, dtype=dtype, **m) if modality != "id" else None
                            y = torch.empty(Bn, SLOTS, d, dtype=dtype, **m) if modality != "visual" else None
                            w_x = torch.empty(d, **m) if x is not None else None
                            w_y = torch.empty(d, **m) if y is not None else None
                            fus = torch.empty(hf, d // hf, d // hf, **m) if modality == "both" else None
                            pa = torch.empty(SLOTS, **m) if pos else None
                            pc = torch.empty(SLOTS, **m) if pos else None
                            bias = torch.empty((), **m)
                            for t in (x, y, w_x, w_y, fus, pa, pc, bias):
                                if t is not None:
                                    t.requires_grad_(grad)
                            tgt = torch.empty(Bn, dtype=torch.int64, **m)
                            return (x, y, w_x, w_y, bias, fus, pa, pc), tgt
                        for kind in kinds:
                            args, tgt = make(B, True)
                            with rec.context(**lab, phase=f"train ({kind})", batch=B):
                                logits, loss = ops.decode_and_loss(*args, tgt, kind=kind, backend="triton")
                                loss.backward()
                        if scope != "test":
                            args, tgt = make(B, True)
                            with rec.context(**lab, phase="train, grad of logits too", batch=B):
                                logits, loss = ops.decode_and_loss(*args, tgt, backend="triton")
                                (loss + logits.sum()).backward()
                        for Bn in ((2 * B,) if scope == "test" else (2 * B, 2 * B - 3)):
                            args, _ = make(Bn, False)
                            with rec.context(**lab, phase="score", batch=Bn), torch.no_grad():
                                ops.segment_decoder(*args, backend="triton")
                        if scope != "test":
                            args, _ = make(B, True)
                            with rec.context(**lab, phase="segment_decoder + backward", batch=B):
                                ops.segment_decoder(*args, backend="triton").sum().backward()
    log(f"  decoder ops: {time.perf_counter() - t0:.1f} s")


def run_attention_ops(card, rec, scope, log):
    import segfast.ops as ops
    from segfast.kernels import _aot

    t0 = time.perf_counter()
    for D, (H, B, at_presets) in ATT_SWEEP.items():
        if scope != "full" and not at_presets:
            continue
        for dname, dtype in DTYPES.items():
            for stream, LQ in (("video", SLOTS), ("user", USER_TOKENS)):
                lab = dict(source="attention-op", dtype=dname, stream=stream, head_dim=D, at_presets=at_presets,
                           preset={16: "small", 32: "paper-code"}.get(D, f"D={D}"))
                for phase in ("train", "score"):
                    with _aot.capture(card, recorder=rec):
                        def t(L, grad):
                            x = torch.empty(B, L, H, D, dtype=dtype, device="cuda").transpose(1, 2)
                            return x.detach().requires_grad_(grad) if grad else x
                        grad = phase == "train"
                        q1, k1, v1 = t(LQ, grad), t(SLOTS, grad), t(SLOTS, grad)
                        q2, k2, v2 = t(LQ, grad), t(USER_TOKENS, grad), t(USER_TOKENS, grad)
                        m1 = torch.empty(B, SLOTS, dtype=torch.bool, device="cuda")
                        m2 = torch.empty(B, USER_TOKENS, dtype=torch.bool, device="cuda")
                        with rec.context(**lab, phase=phase, batch=B):
                            if grad:
                                ops.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2, backend="triton").sum().backward()
                            else:
                                with torch.no_grad():
                                    ops.cross_attention(q1, k1, v1, m1, q2, k2, v2, m2, backend="triton")
    log(f"  attention ops: {time.perf_counter() - t0:.1f} s")


def capture_all(card, scope, log):
    from segfast.kernels import _aot
    rec = _aot.Recorder()
    run_models(card, rec, scope, log)
    run_decoder_ops(card, rec, scope, log)
    run_attention_ops(card, rec, scope, log)
    return rec.launches


# ------------------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------------------
def _short_dtype(sig_ty: str) -> str:
    return sig_ty.lstrip("*")


def _variant_dtype(signature: dict) -> str:
    """The variant's data dtype: the half type among its floating pointer arguments, else fp32."""
    floats = {_short_dtype(t) for t in signature.values() if isinstance(t, str) and t.startswith("*")
              and _short_dtype(t) in ("fp32", "bf16", "fp16")}
    half = sorted(floats - {"fp32"})
    return "+".join(half) if half else ("fp32" if floats else "-")


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def group_variants(launches, archs):
    """{key: variant} per arch; a variant keeps every context that produced it."""
    from segfast.kernels import _aot
    variants = {}
    for la in launches:
        for arch in archs:
            job = _aot.specialise(la, arch)
            key = _aot.variant_key(job)
            v = variants.get(key)
            if v is None:
                v = variants[key] = {"job": job, "contexts": [], "shapes": set()}
            v["contexts"].append(la.context)
            first = next((a for a in la.args if isinstance(a, _aot.TensorArg) and _numel(a.shape) > 1), None)
            if first is not None:
                v["shapes"].add(tuple(first.shape))
    return variants


def _fmt_const(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def describe(v) -> dict:
    job, ctxs = v["job"], v["contexts"]
    names = list(job["signature"])
    consts = {names[k[0]]: val for k, val in job["constexprs"].items() if len(k) == 1}
    # ints specialised to 1 show up as constexprs too; keep only declared constexprs in the variant text
    from segfast.kernels import _aot
    fn = _aot._jit_function(job["module"], job["name"])
    declared = {p.name for p in fn.params if p.is_constexpr}
    variant = " ".join(f"{k}={_fmt_const(val)}" for k, val in consts.items() if k in declared)
    ones = [k for k in consts if k not in declared]
    phases = sorted({c.get("phase", "?") for c in ctxs})
    presets = sorted({str(c.get("preset")) for c in ctxs if c.get("preset")})
    sources = sorted({c.get("source", "?") for c in ctxs})
    mods = sorted({c["modality"] for c in ctxs if "modality" in c})
    abls = sorted({c["ablation"] for c in ctxs if "ablation" in c})
    streams = sorted({c["stream"] for c in ctxs if "stream" in c})
    batches = sorted({c["batch"] for c in ctxs if "batch" in c})
    shapes = sorted(v["shapes"])
    parts = [", ".join(presets)]
    if mods:
        parts.append("/".join(mods))
    if abls and abls != ["none"]:
        parts.append("abl " + "/".join(abls))
    if streams:
        parts.append("stream " + "/".join(streams))
    parts.append("B " + "/".join(map(str, batches)))
    parts.append("first arg " + " ".join("x".join(map(str, s)) for s in shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if ones:
        parts.append("=1: " + ",".join(ones))
    return {"kernel": job["name"], "module": job["module"].rsplit(".", 1)[-1], "arch": job["arch"],
            "dtype": _variant_dtype(job["signature"]), "variant": variant, "phases": phases,
            "sources": sources, "context": "; ".join(p for p in parts if p),
            "at_presets": any(c.get("at_presets") for c in ctxs), "num_warps_req": job["options"]["num_warps"],
            "num_stages": job["options"]["num_stages"], "n_launch_contexts": len(ctxs)}


# ------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _dirty_kernels() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout
        return any(line[3:].endswith(".py") and not line[3:].endswith("_aot.py") for line in out.splitlines())
    except Exception:  # noqa: BLE001
        return False


def summarise(rows):
    s = {}
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        rr = [r for r in rows if r["arch"] == arch]
        s[arch] = {"variants": len(rr),
                   "failures": sum(1 for r in rr if "error" in r or r["occupancy"]["warps_per_sm"] == 0),
                   "spilling": sum(1 for r in rr if r.get("stack", 0) > 0),
                   "spilling_half": sum(1 for r in rr if r.get("stack", 0) > 0 and r["dtype"] != "fp32"),
                   "spilling_presets": sum(1 for r in rr if r.get("stack", 0) > 0 and r["at_presets"])}
    return s


def write_md(path, rows, summary, meta):
    import triton
    from segfast.kernels import _aot
    lines = ["# Compiled kernels: registers, spills, shared memory, occupancy", "",
             "Generated by `.venv/bin/python bench/compile_table.py` (do not edit by hand; rerun after every kernel "
             "change). No GPU: the real wrappers' launches are recorded at the shapes below, specialised with "
             "Triton's own JIT code (signature, `tt.divisibility` hints, ints equal to 1 as constexprs) and compiled "
             "with the ptxas bundled in triton; registers and stack (spill) bytes from the cubin "
             "(`cuobjdump --dump-resource-usage`), shared memory from the compiled metadata. Occupancy = resident "
             "warps per SM (H100: 65536 registers, 228 KB shared, 64 warps, 32 blocks per SM; A100: 164 KB shared; "
             "registers allocated per warp in units of 256, 1 KB shared reserved per block).", "",
             f"- commit `{meta['commit']}`{' + uncommitted kernel changes' if meta['dirty'] else ''}, "
             f"triton {triton.__version__}, torch {torch.__version__}, {meta['date']}",
             f"- scope `{meta['scope']}`: {meta['launches']} recorded launches -> {meta['variants']} distinct "
             f"(kernel, specialisation, arch) variants; capture {meta['capture_s']:.0f} s, compile "
             f"{meta['compile_s']:.0f} s over {meta['jobs']} processes, total wall {meta['wall_s']:.0f} s", ""]
    lines.append("## Summary")
    lines.append("")
    for arch, s in summary.items():
        lines.append(f"- **sm_{arch}** ({_aot.CARDS[arch].name}): {s['variants']} variants, {s['failures']} "
                     f"failures, {s['spilling']} spilling ({s['spilling_half']} bf16/fp16, "
                     f"{s['spilling_presets']} at the presets' shapes)")
    lines += ["", "Per kernel and dtype (all variants of the scope): registers min-max, largest spill, lowest "
              "occupancy.", "", "| arch | kernel | dtype | variants | regs | max spill B | min warps/SM |",
              "|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["module"], r["kernel"], r["dtype"]), []).append(r)
    for (arch, _, kernel, dtype), rr in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1:])):
        ok = [r for r in rr if "error" not in r]
        if ok:
            regs = f"{min(r['regs'] for r in ok)}-{max(r['regs'] for r in ok)}"
            spill = max(r["stack"] for r in ok)
            occ = min(r["occupancy"]["warps_per_sm"] for r in ok)
        else:
            regs, spill, occ = "-", "-", "-"
        fail = len(rr) - len(ok)
        lines.append(f"| sm_{arch} | {kernel} | {dtype} | {len(rr)}{f' ({fail} FAILED)' if fail else ''} | {regs} "
                     f"| {f'**{spill}**' if spill not in ('-', 0) else spill} | {occ} |")
    lines.append("")
    lines.append("Context column: presets (or head dim), modalities, ablations other than none, attention stream, "
                 "batch sizes, shape of the first tensor argument, and the int arguments the JIT turned into "
                 "constexprs because they equal 1 (`=1:`). `preset` = produced by a run at the presets' shapes "
                 "(these must not spill in any dtype; bf16 / fp16 must never spill).")
    for arch in summary:
        lines += ["", f"## sm_{arch} ({_aot.CARDS[arch].name}, {_aot.CARDS[arch].sms} SMs)", "",
                  "| kernel | mode | variant (constexprs) | dtype | context | preset | warps | regs | spill B "
                  "| smem KB | warps/SM (limit) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["arch"] == arch),
                        key=lambda r: (r["module"], r["kernel"], r["dtype"], r["variant"], r["context"])):
            if "error" in r:
                res = f"FAILED: {r['error'][:200].replace('|', '/')} | | | |"
                warps = r["num_warps_req"]
            else:
                occ = r["occupancy"]
                spill = f"**{r['stack']}**" if r["stack"] else "0"
                res = (f"{r['regs']} | {spill} | {r['shared'] / 1024:.1f} | {occ['warps_per_sm']} "
                       f"({occ['limit']})")
                warps = r["num_warps"]
            lines.append(f"| {r['kernel']} | {', '.join(r['phases'])} | {r['variant']} | {r['dtype']} | "
                         f"{r['context']} | {'yes' if r['at_presets'] else 'no'} | {warps} | {res} |")
    lines.append("")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def _capture_for(arch: int, scope: str):
    """(number of launches, {key: variant}) for one card; runs in a worker process."""
    from segfast.kernels import _aot
    launches = capture_all(_aot.CARDS[arch], scope, log=lambda m: None)
    return len(launches), group_variants(launches, [arch])


def main(argv=None):
    args = parse(argv)
    from segfast.kernels import _aot
    ok, why = _aot.aot_available()
    if not ok:
        print(f"compile_table: cannot compile ahead of time here: {why}", file=sys.stderr)
        return 3
    t_start = time.perf_counter()
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    log = lambda m: print(m, flush=True)  # noqa: E731
    variants = {}
    n_launch = 0
    t0 = time.perf_counter()
    import multiprocessing as mp
    n_proc = max(1, min(args.jobs, 2))
    with ProcessPoolExecutor(max_workers=n_proc, mp_context=mp.get_context("spawn")) as ex:
        # the wrappers may size grids by the card's SM count: capture once per card (one process each)
        log(f"capture for {', '.join(f'sm_{a}' for a in archs)} ({args.scope} scope) ...")
        for arch, (n, found) in zip(archs, ex.map(_capture_for, archs, [args.scope] * len(archs))):
            n_launch += n
            variants.update(found)
        capture_s = time.perf_counter() - t0
        log(f"{n_launch} launches -> {len(variants)} variants ({capture_s:.1f} s)")
        items = list(variants.values())
        if args.dry_run:
            from collections import Counter
            for (name, arch), n in sorted(Counter((v["job"]["name"], v["job"]["arch"]) for v in items).items()):
                log(f"  sm_{arch} {name}: {n}")
            return 0
        if args.limit:
            items = items[:args.limit]
        jobs = [v["job"] for v in items]
        t1 = time.perf_counter()
        results = []
        for i, r in enumerate(ex.map(_aot.compile_variant, jobs)):
            results.append(r)
            if (i + 1) % 25 == 0:
                log(f"  compiled {i + 1}/{len(jobs)} ({time.perf_counter() - t1:.0f} s)")
    compile_s = time.perf_counter() - t1
    rows = []
    for v, r in zip(items, results):
        d = describe(v)
        d.update({k: val for k, val in r.items() if k != "key"})
        rows.append(d)
    summary = summarise(rows)
    wall = time.perf_counter() - t_start
    meta = {"commit": _commit(), "dirty": _dirty_kernels(), "scope": args.scope, "launches": n_launch,
            "variants": len(rows), "capture_s": capture_s, "compile_s": compile_s, "wall_s": wall,
            "jobs": min(args.jobs, 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "host": platform.node()}
    for arch, s in summary.items():
        log(f"sm_{arch}: {s['variants']} variants, {s['failures']} failures, {s['spilling']} spilling "
            f"({s['spilling_half']} bf16/fp16, {s['spilling_presets']} at the presets' shapes)")
    log(f"wall {wall:.0f} s (capture {capture_s:.0f} s, compile {compile_s:.0f} s)")
    if args.json:
        tmp = f"{args.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"meta": meta, "summary": {str(k): v for k, v in summary.items()}, "rows": rows}, f,
                      indent=1, default=str)
        os.replace(tmp, args.json)
    if not args.no_md:
        write_md(args.out, rows, summary, meta)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
