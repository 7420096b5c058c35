"""Benchmark of the fused decoder + intra-video loss (kernels/decoder_loss.py).

Times, per implementation (triton kernel, eager reference, torch.compile(reference)):
  * train: forward + backward of decode_and_loss (grads of x, y and every weight);
  * score: forward-only segment_decoder under no_grad (offline scoring).
Rows are appended to the CSV and printed one at a time, as measured (bench/_csvlog.py). Reports ms, effective GB/s and TFLOP/s against the essential traffic / work (csrc_notes/decoder_loss.md),
the fraction of the H100 roofline (3.35 TB/s HBM3, 989 TFLOP/s dense bf16), and peak memory.

GPU, paper-code shapes:   python bench/bench_decoder.py --device cuda --dtype bf16 --csv bench/results/decoder.csv
CPU smoke (interpreter):  python bench/bench_decoder.py --device cpu --batch 2 --dim 32 --reps 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _csvlog import CsvLog, error_status  # noqa: E402

HBM_BPS = 3.35e12      # H100 SXM HBM3
PEAK_FLOPS = 989e12    # H100 SXM dense bf16 tensor core


COLUMNS = ["impl", "mode", "dtype", "tune", "B", "S", "d", "Hf", "kind", "ms", "GBps", "TFLOPs", "frac_hbm",
           "frac_flops", "roofline_ms", "frac_roofline", "peak_MiB"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=40)
    ap.add_argument("--dim", type=int, default=512, help="dx = dy")
    ap.add_argument("--heads", type=int, default=2, help="fusion heads Hf")
    ap.add_argument("--kind", default="bpr-max", choices=["bpr-max", "pairwise"])
    ap.add_argument("--impls", default=None, help="comma list of triton,eager,compile (default: all on cuda, "
                                                   "triton,eager on cpu)")
    ap.add_argument("--modes", default="train,score")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on cuda, 1 on cpu)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV (one row at a time, as measured)")
    ap.add_argument("--commit", default="unknown", help="commit recorded in every row (default: git HEAD)")
    ap.add_argument("--tune", default="", help="kernel config overrides (decoder_loss.TUNE; an unknown key raises), e.g. BLOCK_B=4,BK=64,n_splits=16")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from segfast.ops import reference as R
    from segfast.kernels import decoder_loss as K

    for kv in filter(None, args.tune.split(",")):
        k, v = kv.split("=")
        K.TUNE[k] = int(v)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for the interpreter smoke run")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    impls = (args.impls or ("triton,eager,compile" if dev.type == "cuda" else "triton,eager")).split(",")
    modes = args.modes.split(",")
    reps = args.reps or (50 if dev.type == "cuda" else 1)
    B, S, d, hf = args.batch, args.slots, args.dim, args.heads

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, S, d, generator=g).to(dev, dtype)
    y = torch.randn(B, S, d, generator=g).to(dev, dtype)
    w_x = (0.05 * torch.randn(d, generator=g)).to(dev)
    w_y = (0.05 * torch.randn(d, generator=g)).to(dev)
    bias = torch.zeros((), device=dev)
    fusion = (0.02 * torch.randn(hf, d // hf, d // hf, generator=g)).to(dev)
    pos_a = torch.ones(S, device=dev)
    pos_c = torch.ones(S, device=dev)
    target = torch.randint(0, S + 1, (B,), generator=g).to(dev)
    params = [x, y, w_x, w_y, bias, fusion, pos_a, pos_c]

    # essential work and traffic (csrc_notes/decoder_loss.md)
    esz = x.element_size()
    gemm = 2.0 * B * S * d * (d // hf)                      # one bilinear GEMM over all pairs
    lin = 2.0 * B * S * 2 * d
    feats = B * S * 2 * d * esz                             # x and y once
    wbytes = (hf * (d // hf) ** 2 + 2 * d + 2 * S) * 4
    work = {
        "train": (3 * gemm + 3 * lin, 2 * feats + B * S * 4 + 2 * wbytes),  # read x,y; write dx,dy, logits
        "score": (gemm + lin, feats + B * S * 4 + wbytes),
    }

    def leaves():
        return [t.detach().requires_grad_() for t in params]

    def make_train(fn):
        def step():
            ls = leaves()
            logits, loss = fn(*ls, target, args.kind)
            return torch.autograd.grad(loss, ls)
        return step

    def make_score(fn):
        def step():
            with torch.no_grad():
                return fn(*params)
        return step

    fns = {}
    if "triton" in impls:
        fns["triton"] = (make_train(lambda *a: K.decode_and_loss(*a[:-1], kind=a[-1])),
                         make_score(K.segment_decoder))
    if "eager" in impls:
        fns["eager"] = (make_train(R.decode_and_loss), make_score(R.segment_decoder))
    if "compile" in impls:
        c_dl = torch.compile(R.decode_and_loss)
        c_sd = torch.compile(R.segment_decoder)
        fns["compile"] = (make_train(c_dl), make_score(c_sd))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timeit(step):
        step()  # warm-up / compile
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                step()
            end.record()
            sync()
            ms = start.elapsed_time(end) / reps
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            ms = (time.perf_counter() - t0) * 1e3 / reps
            peak = float("nan")
        return ms, peak

    log = CsvLog(args.csv, COLUMNS, device=dev.type, commit=args.commit)
    sig = lambda v: "" if v != v else float(f"{v:.4g}")  # noqa: E731
    for name, (train, score) in fns.items():  # triton, eager, compile (no SDPA: the decoder has no attention)
        for mode, step in (("train", train), ("score", score)):
            if mode not in modes:
                continue
            shape = dict(impl=name, mode=mode, dtype=args.dtype, tune=args.tune, B=B, S=S, d=d, Hf=hf, kind=args.kind)
            try:
                ms, peak = timeit(step)
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a toolchain: report, go on
                log.row(**shape, status=error_status(e))
                continue
            flops, nbytes = work[mode]
            t_roof = max(flops / PEAK_FLOPS, nbytes / HBM_BPS) * 1e3
            log.row(**shape, ms=sig(ms), GBps=sig(nbytes / ms / 1e6), TFLOPs=sig(flops / ms / 1e9),
                    frac_hbm=sig(nbytes / (ms * 1e-3) / HBM_BPS), frac_flops=sig(flops / (ms * 1e-3) / PEAK_FLOPS),
                    roofline_ms=sig(t_roof), frac_roofline=sig(t_roof / ms), peak_MiB=sig(peak))
    return log.rows


if __name__ == "__main__":
    main()
