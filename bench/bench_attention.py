"""Fused cross-attention: Triton kernel vs PyTorch SDPA vs eager reference vs torch.compile(reference).

Paper-code shapes (SPEC section 5): B = 1024 pairs, H = 16 heads, D = 512 / 16 = 32;
  video stream: Lq = 40 slot queries over 40 video keys (source 1) + 100 user keys (source 2);
  user stream:  Lq = 100 user queries over the same 40 + 100 keys.
Times the forward (no grad: scoring) and forward + backward (training), reports ms, achieved TFLOP/s and GB/s
by the op's minimal FLOP / byte counts (csrc_notes/cross_attention.md), the fraction of the H100 SXM roofline
(989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32 without TF32, 3.35 TB/s HBM3) and peak extra memory.
Order: triton, sdpa (``segfast.ops`` backend "sdpa", when that backend exists), eager, compile; each row is
appended to the CSV and printed as soon as it is measured (bench/_csvlog.py), so a timeout keeps the rows so far.

    python bench/bench_attention.py --device cuda [--dtype bf16] [--batch 1024] [--heads 16] [--dim 32] [--csv out.csv]
    python bench/bench_attention.py --device cpu            # smoke test: interpreter, tiny shapes, slow
"""
from __future__ import annotations

import argparse
import os
import sys
import time

H100_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}
H100_HBM_TBS = 3.35


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--batch", type=int, default=None, help="pairs (default 1024 on cuda, 2 on cpu)")
    ap.add_argument("--heads", type=int, default=None, help="default 16 on cuda, 2 on cpu")
    ap.add_argument("--dim", type=int, default=32, help="head dim (paper code: 512 / 16 = 32)")
    ap.add_argument("--video-slots", type=int, default=40)
    ap.add_argument("--user-tokens", type=int, default=100)
    ap.add_argument("--impls", default=None, help="comma list of triton,sdpa,eager,compile "
                    "(default all on cuda, triton,sdpa,eager on cpu)")
    ap.add_argument("--streams", default="video,user")
    ap.add_argument("--rep", type=int, default=None, help="timing budget in ms (cuda) / repetitions (cpu)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV (one row at a time, as measured)")
    ap.add_argument("--commit", default="unknown", help="commit recorded in every row (default: git HEAD)")
    return ap.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _csvlog import CsvLog, error_status  # noqa: E402


def op_counts(B, H, LQ, L1, L2, D, elem):
    """Minimal FLOPs and HBM bytes of the op (no re-reads, masks and lse included).

    fwd: 2 matmuls over Lk = L1 + L2 keys -> 4 Lq Lk D FLOPs per (b, h); reads q1, q2, k1, v1, k2, v2,
         writes O (+ fp32 lse): elem D (3 Lq + 2 Lk) + 4 Lq bytes.
    bwd: 5 matmuls (s recompute, dV, dP, dQ, dK) -> 10 Lq Lk D; reads q1, q2, k*, v*, O, dO, lse, writes
         dq1, dq2, dk*, dv*: elem D (6 Lq + 4 Lk) + 8 Lq bytes (lse read, delta round trip not counted).
    Masks: (L1 + L2) bytes per pair each pass.
    """
    BH = B * H
    LK = L1 + L2
    f_fwd = 4.0 * LQ * LK * D * BH
    f_bwd = 10.0 * LQ * LK * D * BH
    b_fwd = BH * (elem * D * (3 * LQ + 2 * LK) + 4 * LQ) + B * LK
    b_bwd = BH * (elem * D * (6 * LQ + 4 * LK) + 8 * LQ) + B * LK
    return {"fwd": (f_fwd, b_fwd), "fwd+bwd": (f_fwd + f_bwd, b_fwd + b_bwd)}


def make_inputs(B, H, LQ, L1, L2, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(L):  # [B, L, H, D] projection output seen as [B, H, L, D], as the model produces it
        return torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2)

    n1 = torch.randint(1, L1 + 1, (B,), generator=g)
    n2 = torch.randint(0, L2 + 1, (B,), generator=g)
    m1 = (torch.arange(L1)[None] < n1[:, None]).to(device)
    m2 = (torch.arange(L2)[None] < n2[:, None]).to(device)
    return [t(LQ), t(L1), t(L1), m1, t(LQ), t(L2), t(L2), m2]


def timer(device, rep):
    if device == "cuda":
        import triton.testing

        def run(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
    else:
        def run(fn):
            fn()
            t0 = time.perf_counter()
            for _ in range(rep):
                fn()
            return (time.perf_counter() - t0) * 1e3 / rep
    return run


def _sig(x, n=4):
    return "" if x != x else float(f"{x:.{n}g}")  # NaN (no such number on this device) -> empty cell


def peak_mb(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


COLUMNS = ["impl", "stream", "mode", "dtype", "B", "H", "Lq", "L1", "L2", "D", "ms", "tflops", "gbps",
           "h100_roofline_ms", "frac_roofline", "peak_mb", "max_err_fwd"]


def implementations(impls):
    """name -> callable with the signature of reference.cross_attention, in the order asked for."""
    from segfast import ops
    from segfast.ops import reference

    fns = {}
    for impl in impls:
        if impl == "triton":
            from segfast.kernels import cross_attention as ca
            fns[impl] = ca.cross_attention
        elif impl == "sdpa":  # PyTorch fused attention through segfast.ops, once that backend exists
            if "sdpa" in getattr(ops, "BACKENDS", ()):
                fns[impl] = lambda *a, **k: ops.cross_attention(*a, **k, backend="sdpa")
            else:
                fns[impl] = None
        elif impl == "eager":
            fns[impl] = reference.cross_attention
        elif impl == "compile":
            fns[impl] = torch.compile(reference.cross_attention, dynamic=False)
        else:
            raise SystemExit(f"bench_attention: unknown impl {impl!r}; expected triton, sdpa, eager or compile")
    return fns


def main(args):
    from segfast.ops import reference

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_attention: no CUDA device (use --device cpu for the interpreter smoke test)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    B = args.batch or (1024 if device == "cuda" else 2)
    H = args.heads or (16 if device == "cuda" else 2)
    D = args.dim
    rep = args.rep or (100 if device == "cuda" else 1)
    impls = (args.impls or ("triton,sdpa,eager,compile" if device == "cuda" else "triton,sdpa,eager")).split(",")
    peak_tf = H100_TFLOPS[args.dtype]
    log = CsvLog(args.csv, COLUMNS, device=device, commit=args.commit)
    print(f"(roofline: H100 SXM, {peak_tf} TFLOP/s, {H100_HBM_TBS} TB/s)", flush=True)
    fns = implementations(impls)
    run = timer(device, rep)
    cases = {}
    for stream in args.streams.split(","):
        LQ = args.video_slots if stream == "video" else args.user_tokens
        L1, L2 = args.video_slots, args.user_tokens
        inputs = make_inputs(B, H, LQ, L1, L2, D, dtype, device)
        cases[stream] = (inputs, op_counts(B, H, LQ, L1, L2, D, elem), reference.cross_attention(*inputs),
                         dict(stream=stream, dtype=args.dtype, B=B, H=H, Lq=LQ, L1=L1, L2=L2, D=D))
    # implementation-major: every triton row first, torch.compile's (slow cold compiles) last
    for impl in impls:
        for stream, (inputs, counts, ref_out, shape) in cases.items():
            f = fns[impl]
            if f is None:
                log.row(impl=impl, **shape, status="skipped: segfast.ops has no 'sdpa' backend yet")
                continue
            leaves = [x.detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
            gout = torch.randn_like(ref_out)

            def fwd():
                with torch.no_grad():
                    return f(*inputs)

            def fwdbwd():
                out = f(*leaves)
                out.backward(gout)
                for x in leaves:
                    if x.is_floating_point():
                        x.grad = None

            try:
                err = (fwd().float() - ref_out.float()).abs().max().item()
            except Exception as e:  # e.g. torch.compile without a toolchain: report, keep going
                log.row(impl=impl, **shape, status=error_status(e))
                continue
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                try:
                    ms = run(fn)
                    flops, nbytes = counts[mode]
                    roof_ms = max(flops / (peak_tf * 1e12), nbytes / (H100_HBM_TBS * 1e12)) * 1e3
                    log.row(impl=impl, mode=mode, **shape, ms=_sig(ms), tflops=_sig(flops / ms / 1e9),
                            gbps=_sig(nbytes / ms / 1e6), h100_roofline_ms=_sig(roof_ms),
                            frac_roofline=_sig(roof_ms / ms), peak_mb=_sig(peak_mb(fn, device)),
                            max_err_fwd=f"{err:.2e}")
                except Exception as e:  # noqa: BLE001
                    log.row(impl=impl, mode=mode, **shape, status=error_status(e))
    return log.rows


if __name__ == "__main__":
    main(ARGS)
