"""Regenerate the result tables of README.md and docs/*.md that no other script prints.

Every result table in the docs names, on its "Regenerate:" line, the command that produces it (the convention
and its check: tests/test_doc_tables.py). The tables without a benchmark script or a plain `segfast` command
of their own are built here, one function per table, each printing the Markdown table:

    python bench/doc_tables.py demo-steps --work /tmp/doc_tables          # docs/model.md, "The demo"
    python bench/doc_tables.py sample-unseen --work /tmp/doc_tables        # docs/model.md, unseen videos
    python bench/doc_tables.py segrec-demo --work /tmp/doc_tables          # docs/segrec.md, synthetic
    python bench/doc_tables.py precision --work /tmp/doc_tables            # docs/model.md, precision
    python bench/doc_tables.py synth-strength --work /tmp/doc_tables       # docs/synth.md, signal strength
    python bench/doc_tables.py TABLE --cheap-only                          # only the rows that take seconds

Data and runs are kept under --work and reused by the next call (a finished run is not trained again).
Everything goes through segfast's own API (synth, prepare, the `segfast train` command line, evaluate_run,
the baselines, compare_weightings); nothing here re-implements the metrics. Rows are "cheap" (seconds: data
preparation, baselines, the planted-truth ceiling; recomputed by tests/test_doc_tables.py) or "expensive"
(training: minutes to tens of minutes on one CPU thread; printed as "(not run: --cheap-only)" with
--cheap-only). One CPU thread by default, as in the docs' measurements.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "SegMM_inter_sample.csv"

# The demo's training options as `segfast train` flags (segfast/demo.py: run_demo's fit())
DEMO_TRAIN = ["--modality", "both", "--preset", "small", "--batch-size", "128", "--lr", "5e-3", "--epochs", "3",
              "--eval-every", "70", "--patience", "10", "--set", "max_user_tokens=32", "--set", "dropout=0.0",
              "--set", "lr_schedule=cosine", "--set", "warmup_steps=20"]
# The real sample's ID run (docs/model.md, "Why unseen videos get an unknown embedding")
SAMPLE_TRAIN = ["--modality", "id", "--batch-size", "128", "--lr", "3e-3", "--epochs", "8",
                "--set", "lr_schedule=cosine"]
SEEDS = 5
NOT_RUN = "(not run: --cheap-only)"


class Ctx:
    def __init__(self, work: Path, sample: Path, threads: int, cheap_only: bool, seeds: int = SEEDS,
                 max_steps: Optional[int] = None):
        self.work, self.sample, self.threads, self.cheap_only, self.seeds = work, sample, threads, cheap_only, seeds
        self.max_steps = max_steps

    # ---- data (cheap) --------------------------------------------------------------------------------------
    def demo_data(self) -> tuple[Path, Path]:
        """The demo's data: synth's defaults (100 users, 1,500 videos, 30,000 rows, feature_dim 64, seed 0)."""
        from segfast.data.prepared import prepare
        from segfast.data.synth import synth

        raw, data = self.work / "demo" / "raw", self.work / "demo" / "data"
        if not (raw / "synth.json").exists():
            synth("segmm", raw, seed=0, feature_dim=64, progress=False)
        if not (data / "manifest.json").exists():
            prepare("segmm", raw, data, seed=0, feature_dim=64, progress=False)
        return raw, data

    def synth_data(self, name: str, users: int, videos: int, interactions: int) -> Path:
        from segfast.data.prepared import prepare
        from segfast.data.synth import synth

        raw, data = self.work / name / "raw", self.work / name / "data"
        if not (raw / "synth.json").exists():
            synth("segmm", raw, users=users, videos=videos, interactions=interactions, seed=0, feature_dim=64,
                  progress=False)
        if not (data / "manifest.json").exists():
            prepare("segmm", raw, data, seed=0, feature_dim=64, progress=False)
        return data

    def sample_data(self) -> Path:
        """`segfast prepare --source segmm-sample --input SAMPLE` (seed 0)."""
        from segfast.data.prepared import prepare

        if not self.sample.is_file():
            raise SystemExit(f"the SegMM sample is not at {self.sample} (--sample PATH or SEGFAST_SEGMM_SAMPLE)")
        data = self.work / "sample-data"
        if not (data / "manifest.json").exists():
            prepare("segmm-sample", self.sample, data, seed=0, progress=False)
        return data

    # ---- training (expensive) ------------------------------------------------------------------------------
    def train(self, data: Path, out: Path, options: List[str], seed: int) -> Path:
        """`segfast train --data DATA --out OUT OPTIONS --seed SEED` through the real command line (a finished
        run of the same config is returned at once)."""
        from segfast.cli import main

        argv = ["train", "--data", str(data), "--out", str(out), *options, "--seed", str(seed), "--device", "cpu",
                "--threads", str(self.threads), "--quiet", "--json"]
        if self.max_steps is not None:  # a quick look: the run stays unfinished and a later call resumes it
            argv += ["--max-steps", str(self.max_steps)]
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        if rc != 0:
            raise SystemExit(f"segfast {' '.join(argv)} failed with exit code {rc}")
        return out

    def evaluate(self, data: Path, run: Path) -> dict:
        from segfast.evaluate import evaluate_run

        return evaluate_run(data, run, split="test", seed=0)


# --------------------------------------------------------------------------------------------------------------
# table helpers

def fmt(x: Optional[float], digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def mean_std(values: List[float], digits: int = 4) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else fmt(float(v[0]), digits)


def markdown(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def bayes_ceiling(raw: Path, data: Path, split: str = "test", seed: int = 0) -> dict:
    """HR@K / NDCG@K of ranking the slots by the planted leave probabilities of synth's ground truth:
    slot i < N is left with h_i prod_{j<i} (1 - h_j) (h = 1 - interest), the completed pseudo-slot N with
    prod_{j<N} (1 - h_j), padding never; the likeliest leave slot gets the lowest score. Ranked by
    segfast.evaluate.ranking_metrics with the prepared row numbers as tie-break ids (evaluate_run's)."""
    from segfast.data.prepared import load_prepared
    from segfast.demo import _truth_lookup
    from segfast.evaluate import S, ranking_metrics

    prepared = load_prepared(data)
    inter = prepared.interactions
    rows = prepared.rows(split)
    uid = prepared.users["user_id"][inter["user_idx"][rows]]
    vid = prepared.videos["video_id"][inter["video_idx"][rows]]
    truth = _truth_lookup(Path(raw))
    n = np.asarray(inter["n_segments"][rows], dtype=np.int64)
    y = np.asarray(inter["target"][rows], dtype=np.int64)
    logp = np.full((rows.size, S), -np.inf)
    for r in range(rows.size):
        t = truth[(int(uid[r]), int(vid[r]))]
        if t.shape[0] != n[r]:
            raise ValueError(f"row {int(rows[r])}: {t.shape[0]} planted segments, {int(n[r])} prepared")
        h = 1.0 - t.astype(np.float64)
        stay = np.concatenate([[0.0], np.cumsum(np.log1p(-np.minimum(h, 1 - 1e-12)))])  # log prod_{j<i}(1-h_j)
        m = min(int(n[r]), S)
        logp[r, :m] = np.log(np.maximum(h[:m], 1e-300)) + stay[:m]
        if n[r] < S:
            logp[r, n[r]] = stay[n[r]]
    scores = np.where(np.isfinite(logp), -logp, 1e6)  # padding: never left, ranked last
    return ranking_metrics(scores, y, n, seed=seed, row_ids=rows)


# --------------------------------------------------------------------------------------------------------------
# the tables

TABLES: Dict[str, Callable[[Ctx], str]] = {}


def table(name: str):
    def deco(fn):
        TABLES[name] = fn
        return fn
    return deco


@table("demo-steps")
def demo_steps(ctx: Ctx) -> str:
    """docs/model.md "The demo": the steps to the demo's model on the demo's data (seed 0, test split)."""
    from segfast.evaluate import run_baselines

    raw, data = ctx.demo_data()
    rows = []
    base = run_baselines(data, split="test", seed=0)["ItemPosition"]["metrics"]
    rows.append(["ItemPosition (best baseline)", fmt(base["HR@1"]), fmt(base["NDCG@5"])])

    def over(opts: Dict[str, str]) -> List[str]:
        out = list(DEMO_TRAIN)
        for k, v in opts.items():
            if k in ("--lr", "--epochs"):
                out[out.index(k) + 1] = v
            else:
                out += ["--set", f"{k}={v}"]
        return out

    runs = [  # label, options over the demo's (the demo: dropout 0, lr 5e-3, 3 epochs, rescale, vd 0.1)
        ("no rescale, dropout 0.1, lr 5e-3 cosine, 3 epochs", {"feature_rescale": "false", "dropout": "0.1"}),
        ("rescale, dropout 0.1, lr 3e-3 cosine, 2 epochs", {"dropout": "0.1", "--lr": "3e-3", "--epochs": "2"}),
        ("rescale, dropout 0.1, lr 5e-3 cosine, 2 epochs", {"dropout": "0.1", "--epochs": "2"}),
        ("rescale, dropout 0.1, lr 1e-2 cosine, 2 epochs", {"dropout": "0.1", "--lr": "1e-2", "--epochs": "2"}),
        ("rescale, dropout 0.1, lr 5e-3 cosine, 3 epochs", {"dropout": "0.1"}),
        ("rescale, dropout 0, lr 5e-3 cosine, 3 epochs, no unknown-video embedding", {"video_id_dropout": "0"}),
        ("**the demo: the same with `video_id_dropout=0.1`**", {}),
    ]
    for i, (label, opts) in enumerate(runs):
        if ctx.cheap_only:
            rows.append([label, NOT_RUN, NOT_RUN])
            continue
        run = ctx.train(data, ctx.work / "demo" / f"step-{i}", over(opts), seed=0)
        m = ctx.evaluate(data, run)["metrics"]
        bold = label.startswith("**")
        cell = (lambda s: f"**{s}**") if bold else (lambda s: s)
        rows.append([label, cell(fmt(m["HR@1"])), cell(fmt(m["NDCG@5"]))])
    ceil = bayes_ceiling(raw, data)
    rows.append(["Bayes ranking by the planted hazards (the ceiling)", fmt(ceil["HR@1"]), fmt(ceil["NDCG@5"])])
    return markdown(["run", "test HR@1", "test NDCG@5"], rows)


@table("synth-strength")
def synth_strength(ctx: Ctx) -> str:
    """docs/synth.md "How strong the signal is": a larger synthetic SegMM set (300 users, 3,000 videos, 90,000
    rows, feature_dim 64, seed 0), test split: the planted-truth ceiling and the baselines (all cheap), then
    the shares of first-segment leaves and full watches over all prepared rows, and the real sample's when
    --sample exists."""
    from segfast.data.prepared import load_prepared
    from segfast.evaluate import run_baselines

    data = ctx.synth_data("strength", users=300, videos=3000, interactions=90_000)
    raw = data.parent / "raw"
    ceil = bayes_ceiling(raw, data)
    base = run_baselines(data, split="test", seed=0)
    rows = [["Bayes ranking by the planted leave probabilities", fmt(ceil["HR@1"]), fmt(ceil["HR@5"])]]
    for name in ("UserPosition", "ItemPosition", "AllPosition", "Random"):
        m = base[name]["metrics"]
        rows.append([name, fmt(m["HR@1"]), fmt(m["HR@5"])])
    out = markdown([f"ranking ({ceil['rows']:,} test rows with y < 40)", "test HR@1", "test HR@5"], rows)

    def shares(d: Path) -> str:
        it = load_prepared(d).interactions
        y, n = np.asarray(it["target"]), np.asarray(it["n_segments"])
        return f"{100 * (y == 0).mean():.0f}% leaves in the first segment, {100 * (y == n).mean():.0f}% full watches"

    out += f"\n\nsynthetic rows: {shares(data)}"
    if ctx.sample.is_file():
        out += f"\nthe real sample: {shares(ctx.sample_data())}"
    return out


@table("sample-unseen")
def sample_unseen(ctx: Ctx) -> str:
    """docs/model.md "Why unseen videos get an unknown embedding": the real sample, ID, 5 training seeds per
    variant, test split. Runs in WORK/E/sample-vd<rate>/seed-<k>: the layout of `segfast experiment --out
    WORK/E/sample-vd<rate>`, whose finished runs are reused here (and these by it)."""
    from segfast.evaluate import run_baselines

    data = ctx.sample_data()
    rows = []
    variants = [("random init embedding per video (the literal model, `video_id_dropout=0`)", "0"),
                ("shared embedding, `video_id_dropout=0.1`", "0.1")]
    for label, rate in variants:
        if ctx.cheap_only:
            rows.append([label] + [NOT_RUN] * 4)
            continue
        res = [ctx.evaluate(data, ctx.train(data, ctx.work / "E" / f"sample-vd{rate}" / f"seed-{k}",
                                            SAMPLE_TRAIN + ["--set", f"video_id_dropout={rate}"], seed=k))
               for k in range(ctx.seeds)]
        rows.append([label] + [mean_std([r[sec][m] for r in res]) for sec in ("metrics", "cold")
                               for m in ("HR@1", "NDCG@5")])
    base = run_baselines(data, split="test", seed=0)
    for name in ("UserPosition", "ItemPosition"):
        b = base[name]
        rows.append([name + " (baseline)"] + [fmt(b[sec][m]) for sec in ("metrics", "cold") for m in ("HR@1", "NDCG@5")])
    return markdown(["unseen-video handling", "test HR@1", "test NDCG@5", "cold HR@1", "cold NDCG@5"], rows)


@table("segrec-demo")
def segrec_demo(ctx: Ctx) -> str:
    """docs/segrec.md, synthetic: SegRec on the demo's data with the demo's Task-1 run (seed 0), WideDeep and
    DIN, Video / SegSum / Interest, seeds 0..4, dim 16, batch 512, lr 2e-3, at most 5 epochs, patience 1."""
    from segfast.segrec import compare_weightings

    _, data = ctx.demo_data()
    if ctx.cheap_only:
        return markdown(["backbone", "weighting", "AUC", "F1", "LogLoss", "p (AUC vs Video, ttest_rel)"],
                        [["-", "-", NOT_RUN, NOT_RUN, NOT_RUN, ""]])
    run = ctx.train(data, ctx.work / "demo" / "step-6", DEMO_TRAIN, seed=0)  # the demo's run (demo-steps' last)
    return _segrec_rows([compare_weightings(data, run, b, ["segsum", "interest"], seeds=ctx.seeds, epochs=5,
                                            batch_size=512, lr=2e-3, patience=1, progress=False)
                         for b in ("widedeep", "din")], "p (AUC vs Video, ttest_rel)")


@table("precision")
def precision_tables(ctx: Ctx) -> str:
    """docs/model.md "Precision": the demo's settings trained in fp32 and in bf16 (seed 0, one thread), each
    evaluated in both (test split); then the fp32 run's scores of the test pairs in every precision / backend
    against fp32 with the reference backend (tests/test_precision.py's score_diff). Two tables."""
    import importlib.util
    import time

    import pyarrow as pa

    import segfast
    from segfast.data.prepared import load_prepared
    from segfast.evaluate import evaluate_run

    _, data = ctx.demo_data()
    if ctx.cheap_only:
        return "(precision: every row needs training; nothing to print with --cheap-only)"
    rows, runs = [], {}
    for p in ("fp32", "bf16"):
        run = ctx.work / "demo" / f"precision-{p}"
        fresh = not (run / "metrics.json").exists()
        t0 = time.perf_counter()
        runs[p] = ctx.train(data, run, DEMO_TRAIN + ["--precision", p], seed=0)
        wall = f"{time.perf_counter() - t0:.0f}" if fresh else "(reused run)"
        for i, q in enumerate(("fp32", "bf16")):
            m = evaluate_run(data, runs[p], split="test", seed=0, precision=q)["metrics"]
            rows.append([p, q, fmt(m["HR@1"]), fmt(m["NDCG@5"]), wall if i == 0 else ""])
    first = markdown(["trained in", "evaluated in", "test HR@1", "test NDCG@5", "train wall (s)"], rows)

    spec = importlib.util.spec_from_file_location(
        "test_precision", Path(__file__).resolve().parents[1] / "tests" / "test_precision.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)  # score_diff: the comparison the tests hold bf16 to
    prep = load_prepared(data)
    it, test = prep.interactions, prep.rows("test")
    pairs = pa.table({"user_id": prep.users["user_id"][it["user_idx"][test]],
                      "video_id": prep.videos["video_id"][it["video_idx"][test]], "time_ms": it["time_ms"][test]})
    out, ref = [], None
    for q, backend in (("fp32", "torch"), ("fp32", "sdpa"), ("bf16", "torch"), ("bf16", "sdpa"), ("fp16", "sdpa")):
        scorer = segfast.Scorer.from_run(runs["fp32"], data, device="cpu", backend=backend, precision=q)
        t0 = time.perf_counter()
        got = scorer.score(pairs)
        rate = len(pairs) / (time.perf_counter() - t0)
        ref = got if ref is None else ref
        d = tp.score_diff(ref, got)
        label = f"{q}, {backend}" + (" (reference)" if ref is got else "")
        out.append([label, f"{d['max_abs']:.3g}", f"{d['mean_abs']:.4f}", f"{d['spearman']:.4f}",
                    f"{100 * d['same_leave_slot']:.2f}%", f"{rate:.0f}"])
    second = markdown(["scoring", "max abs diff", "mean abs diff", "mean within-pair Spearman", "same leave slot",
                       "pairs/s (1 thread)"], out)
    return first + "\n\n" + second


def _segrec_rows(cmps: List[dict], p_header: str) -> str:
    names = {"widedeep": "WideDeep", "din": "DIN", "video": "Video", "segsum": "SegSum", "segadjust": "SegAdjust",
             "interest": "Interest", "itemposition": "ItemPosition"}
    rows = []
    for cmp in cmps:
        for w, r in cmp["results"].items():
            m = r["metrics"]
            cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in ("AUC", "F1", "LogLoss")]
            t = (r.get("ttest_vs_video") or {}).get("AUC") or {}
            p = t.get("p") if isinstance(t, dict) else None
            rows.append([names[cmp["backbone"]], names[w], *cells, "" if p is None else f"{p:.2g}"])
    return markdown(["backbone", "weighting", "AUC", "F1", "LogLoss", p_header], rows)


# --------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=sorted(TABLES), help="which docs table to regenerate")
    ap.add_argument("--work", default="/tmp/doc_tables", help="data and runs, kept and reused")
    ap.add_argument("--sample", default=os.environ.get("SEGFAST_SEGMM_SAMPLE", str(DEFAULT_SAMPLE)),
                    help="the public SegMM sample CSV (default: $SEGFAST_SEGMM_SAMPLE or ../shared/data/...)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="training seeds 0..N-1 of the multi-seed tables")
    ap.add_argument("--cheap-only", action="store_true", help="only the rows that take seconds (no training)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop every training run after this many steps (a quick look at the pipeline, not the "
                         "docs' numbers; a later call without it resumes the runs)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    ctx = Ctx(Path(a.work), Path(a.sample), a.threads, a.cheap_only, a.seeds, a.max_steps)
    ctx.work.mkdir(parents=True, exist_ok=True)
    print(TABLES[a.table](ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
