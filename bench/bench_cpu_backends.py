"""CPU: eager reference vs SDPA attention, and the encoder's previous projection split (``y[i]``) vs ``unbind``,
for a training step (forward + backward + AdamW) and no-grad scoring of the full model.

    .venv/bin/python bench/bench_cpu_backends.py [--presets small,paper-code] [--modality both] [--reps 9]
                                                 [--csv bench/results/cpu_backends.csv]

Variants (each a full model with the same weights and batch):
    torch/index   backend "torch" (the frozen reference), the previous split y[i]   <- the baseline
    torch/unbind  backend "torch", the encoder's current split (unbind): the model as it runs by default
    sdpa/index    backend "sdpa",  the previous split
    sdpa/unbind   backend "sdpa",  the current split (the model under --backend sdpa)

The previous split is restored only here, by replacing ``EncoderLayer._split`` while a variant runs. The
variants are interleaved (one step of each, repeated ``--reps`` times after two warm-up rounds) so that a busy
machine slows them alike. Reported per variant: the median and the minimum over the rounds of the wall time
and of the process CPU time (time.process_time, both threads; a busy machine disturbs it less), each with its
ratio to torch/index (< 1 = faster). The minimum is the least disturbed step, the better estimate when other
jobs share the cores. Every measured step is appended to the CSV (flushed) as soon as it is taken.

Batches are random but shaped like real ones: N ~ U[1, 40] real slots, visual histories of 1..user_tokens
tokens, float16 features. Sizes default to what finishes in a few minutes on 2 busy cores: ``small`` at 64
pairs per training step and 128 per scoring call, ``paper-code`` at 16 / 32 pairs (short steps, many rounds).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench_train_step import random_batch  # the same synthetic batch as the train-step benchmark

SIZES = {  # (train batch, score batch)
    "small": (64, 128),
    "paper-code": (16, 32),
}
VARIANTS = ("torch/index", "torch/unbind", "sdpa/index", "sdpa/unbind")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,paper-code")
    ap.add_argument("--modality", default="both", choices=["id", "visual", "both"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=9, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--user-tokens", type=int, default=100)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=None, help="override the preset's training batch")
    ap.add_argument("--score-batch", type=int, default=None, help="override the preset's scoring batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--csv", default=None, help="append every measured step to this CSV")
    return ap.parse_args(argv)


def _split_index(self, x, lin, names):
    """The encoder's projection split before unbind (``y[i]`` per part), for the comparison only."""
    if lin is None:
        return {}
    b, l, _ = x.shape
    y = lin(x).view(b, l, len(names), self.h, self.dh).permute(2, 0, 3, 1, 4)
    return {n: y[i] for i, n in enumerate(names)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(args):
    from segfast.model.config import model_preset
    from segfast.model.encoder import EncoderLayer
    from segfast.model.model import SegInterestModel

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; expected some of {VARIANTS}")
    unbind_split = EncoderLayer._split
    n_users, n_videos = 1000, 5000
    M, F = args.user_tokens, args.feature_dim
    commit = _commit()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, "
          f"commit {commit}, modality {args.modality}, user tokens {M}, feature dim {F}", flush=True)
    fh = writer = None
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        new = not os.path.exists(args.csv)
        fh = open(args.csv, "a", newline="")
        writer = csv.DictWriter(fh, fieldnames=["commit", "torch", "threads", "preset", "modality", "mode",
                                                "batch", "variant", "rep", "ms", "cpu_ms"])
        if new:
            writer.writeheader()
            fh.flush()
    summary = []
    try:
        for preset in args.presets.split(","):
            tb, sb = SIZES[preset]
            tb, sb = args.train_batch or tb, args.score_batch or sb
            batch = random_batch(tb, M, F, n_users, n_videos, "cpu", seed=0)
            sbatch = random_batch(sb, M, F, n_users, n_videos, "cpu", seed=1)
            setups = {}
            for v in variants:
                backend, split = v.split("/")
                torch.manual_seed(0)
                cfg = model_preset(preset, modality=args.modality, backend=backend,
                                   max_user_tokens=M).for_data(n_users, n_videos,
                                                               F if args.modality != "id" else None)
                model = SegInterestModel(cfg)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
                setups[v] = (model, opt, _split_index if split == "index" else unbind_split)

            def train_step(v):
                model, opt, split = setups[v]
                EncoderLayer._split = split
                model.train()
                opt.zero_grad(set_to_none=True)
                model.loss(batch)[1].backward()
                opt.step()

            def score_step(v):
                model, _, split = setups[v]
                EncoderLayer._split = split
                model.eval()
                with torch.no_grad():
                    model(sbatch)

            for mode, fn, pairs in (("train", train_step, tb), ("score", score_step, sb)):
                times = {v: [] for v in variants}
                cpu = {v: [] for v in variants}
                for rep in range(-2, args.reps):  # two warm-up rounds
                    for v in variants:
                        t, c = time.perf_counter(), time.process_time()
                        fn(v)
                        ms = (time.perf_counter() - t) * 1e3
                        cpu_ms = (time.process_time() - c) * 1e3
                        if rep < 0:
                            continue
                        times[v].append(ms)
                        cpu[v].append(cpu_ms)
                        if writer:
                            writer.writerow(dict(commit=commit, torch=torch.__version__,
                                                 threads=torch.get_num_threads(), preset=preset,
                                                 modality=args.modality, mode=mode, batch=pairs, variant=v,
                                                 rep=rep, ms=round(ms, 3), cpu_ms=round(cpu_ms, 3)))
                            fh.flush()
                stats = {v: dict(wall_med=statistics.median(times[v]), wall_min=min(times[v]),
                                 cpu_med=statistics.median(cpu[v]), cpu_min=min(cpu[v])) for v in variants}
                b0 = stats[variants[0]]
                for v in variants:
                    row = dict(preset=preset, mode=mode, batch=pairs, variant=v, **stats[v],
                               **{k + "_ratio": stats[v][k] / b0[k] for k in b0})
                    summary.append(row)
                    print(f"{preset:10s} {mode:5s} B={pairs:<4d} {v:13s} "
                          + "  ".join(f"{k} {row[k]:8.1f} ms x{row[k + '_ratio']:.3f}" for k in b0), flush=True)
            del setups
    finally:
        EncoderLayer._split = unbind_split
        if fh:
            fh.close()
    print()
    for what in ("wall", "cpu"):
        print(f"\n{what} time per step, median / min over {args.reps} rounds (ratio to {variants[0]})")
        print("| preset | mode | batch | " + " | ".join(variants) + " |")
        print("|---|---|---|" + "---|" * len(variants))
        for preset in args.presets.split(","):
            for mode in ("train", "score"):
                rows = {r["variant"]: r for r in summary if r["preset"] == preset and r["mode"] == mode}
                if not rows:
                    continue
                cells = [f"{r[what + '_med']:.0f} (x{r[what + '_med_ratio']:.2f}) / {r[what + '_min']:.0f} "
                         f"(x{r[what + '_min_ratio']:.2f})" for r in (rows[v] for v in variants)]
                print(f"| {preset} | {mode} | {rows[variants[0]]['batch']} | " + " | ".join(cells) + " |")
    return summary


if __name__ == "__main__":
    main(parse())
