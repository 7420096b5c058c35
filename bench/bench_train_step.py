"""Full model: one training step (forward + backward + AdamW) and no-grad scoring, per preset and modality,
for the Triton backend, the SDPA backend (PyTorch fused attention), the eager reference (backend "torch") and
torch.compile of the reference, in that order (the paper-code triton rows come first, so that a time limit
cuts the compile rows, not the kernel's). Each row is appended to the CSV and printed as soon as it is measured.

    python bench/bench_train_step.py --device cuda [--presets small,paper-code] [--modalities id,both]
                                     [--impls triton,sdpa,eager,compile] [--amp bf16] [--csv out.csv]
    python bench/bench_train_step.py --device cpu     # smoke test: interpreter, tiny model
    python bench/bench_train_step.py --device cpu --model preset --impls sdpa,eager --batch 256   # CPU timing

Batches are random but shaped like real ones (N ~ U[1, 40], visual histories of 1..100 tokens, float16
features of dim 1024 as stored by `prepare`). Reports ms per step, pairs/s, peak GPU memory and the speed-up
against eager in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--presets", default="small,paper-code")
    ap.add_argument("--modalities", default="id,both")
    ap.add_argument("--impls", default=None, help="comma list of triton,sdpa,eager,compile, measured in this "
                    "order (default: all on cuda, triton,sdpa,eager on cpu; sdpa is skipped while segfast.ops "
                    "lacks it)")
    ap.add_argument("--model", default=None, choices=["tiny", "preset"],
                    help="preset = the presets' real sizes; tiny = d_model 32, 2 heads, 1 layer, 8 user tokens, "
                         "features of dim 16 (default: preset on cuda, tiny on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="training pairs per step (default 1024; 4 with tiny)")
    ap.add_argument("--score-batch", type=int, default=None,
                    help="scoring pairs per call (default 4096; 8 with tiny)")
    ap.add_argument("--user-tokens", type=int, default=100)
    ap.add_argument("--feature-dim", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on cpu")
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype on cuda")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on cuda, 1 on cpu)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV (one row at a time, as measured)")
    ap.add_argument("--commit", default="unknown", help="commit recorded in every row (default: git HEAD)")
    return ap.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _csvlog import CsvLog, error_status  # noqa: E402

COLUMNS = ["preset", "modality", "impl", "mode", "amp", "model", "batch", "steps", "ms", "pairs_per_s", "peak_MiB"]


def random_batch(B, M, F, n_users, n_videos, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = 40
    n = torch.randint(1, S + 1, (B,), generator=g)
    slot = torch.arange(S)
    slot_mask = slot[None, :] < n[:, None]
    target = torch.minimum((torch.rand(B, generator=g) * (n + 1).float()).long(), n).clamp(max=S - 1)
    labels = torch.where(slot[None] < target[:, None], 1, torch.where(slot[None] == target[:, None], 0, -1))
    m = torch.randint(1, M + 1, (B,), generator=g)
    user_mask = torch.arange(M)[None, :] < m[:, None]
    vf = (torch.rand(B, S, F, generator=g) * slot_mask[..., None]).half()
    uf = (torch.rand(B, M, F, generator=g) * user_mask[..., None]).half()
    b = {"row": torch.arange(B), "user_idx": torch.randint(0, n_users, (B,), generator=g),
         "video_idx": torch.randint(0, n_videos, (B,), generator=g), "n_segments": n,
         "slot_mask": slot_mask, "slot_index": slot.expand(B, S).contiguous(), "target": target,
         "labels": labels.to(torch.int8), "is_cold": torch.zeros(B, dtype=torch.bool),
         "video_feat": vf, "user_feat": uf, "user_mask": user_mask}
    return {k: v.to(device) for k, v in b.items()}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps, device):
    fn()  # warm-up (compiles kernels / graphs)
    fn()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    ms = (time.perf_counter() - t) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return ms, peak


def main(args):
    from segfast import ops
    from segfast.model.config import model_preset
    from segfast.model.model import SegInterestModel

    dev = args.device
    cpu = dev == "cpu"
    if not cpu and not torch.cuda.is_available():
        sys.exit("bench_train_step: no CUDA device (use --device cpu)")
    if cpu and args.threads:
        torch.set_num_threads(args.threads)
    tiny = (args.model or ("tiny" if cpu else "preset")) == "tiny"
    B = args.batch or (4 if tiny else 1024)
    SB = args.score_batch or (8 if tiny else 4096)
    M = 8 if tiny else args.user_tokens
    F = 16 if tiny else args.feature_dim
    steps = args.steps or (1 if cpu else 10)
    amp = None if (cpu or args.amp == "none") else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    impls = (args.impls or ("triton,sdpa,eager" if cpu else "triton,sdpa,eager,compile")).split(",")
    for impl in impls:
        if impl not in ("triton", "sdpa", "eager", "compile"):
            sys.exit(f"bench_train_step: unknown impl {impl!r}; expected triton, sdpa, eager or compile")
    log = CsvLog(args.csv, COLUMNS, device=dev, commit=args.commit)
    n_users, n_videos = 2400, 50000
    over = dict(d_model=32, n_heads=2, n_layers=1, d_ff=32) if tiny else {}
    # implementation-major: every triton row, then every sdpa row, ..., torch.compile's (slow cold compiles) last
    cases = [(impl, preset, modality) for impl in impls for preset in args.presets.split(",")
             for modality in args.modalities.split(",")]
    batches = None
    for impl, preset, modality in cases:
        common = dict(preset=preset, modality=modality, impl=impl, amp=args.amp if not cpu else "none",
                      model="tiny" if tiny else "preset", steps=steps)
        if impl == "sdpa" and "sdpa" not in getattr(ops, "BACKENDS", ()):
            for mode in ("train", "score"):
                log.row(**common, mode=mode, status="skipped: segfast.ops has no 'sdpa' backend yet")
            continue
        backend = {"triton": "triton", "sdpa": "sdpa"}.get(impl, "torch")
        torch.manual_seed(0)
        try:
            cfg = model_preset(preset, modality=modality, max_user_tokens=M,
                               **over).for_data(n_users, n_videos, F if modality != "id" else None)
            model = SegInterestModel(cfg).to(dev)
            model.set_backend(backend)
        except Exception as e:  # noqa: BLE001 - e.g. an unknown preset: report and go on
            log.row(**common, mode="build", status=error_status(e))
            continue
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        if batches is None:  # made once (at B 4096 the features alone take seconds to draw on the CPU)
            batches = (random_batch(B, M, F, n_users, n_videos, dev), random_batch(SB, M, F, n_users, n_videos, dev,
                                                                                   seed=1))
        batch, sbatch = batches
        loss_fn = (lambda b: model.loss(b)[1])
        score_fn = model.forward
        if impl == "compile":
            loss_fn = torch.compile(loss_fn)
            score_fn = torch.compile(model.forward)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                loss = loss_fn(batch)
            loss.backward()
            opt.step()

        def score_step():
            with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                score_fn(sbatch)

        for mode, fn, pairs in (("train", train_step, B), ("score", score_step, SB)):
            model.train(mode == "train")
            try:
                ms, peak = _time(fn, steps, dev)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. a compile failure)
                log.row(**common, mode=mode, batch=pairs, status=error_status(e))
                continue
            log.row(**common, mode=mode, batch=pairs, ms=round(ms, 3),
                    pairs_per_s=round(pairs / ms * 1e3, 1), peak_MiB="" if peak != peak else round(peak, 1))
        del model, opt
        if not cpu:
            torch.cuda.empty_cache()
    return log.rows


if __name__ == "__main__":
    main(ARGS)
