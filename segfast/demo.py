"""`segfast demo`: synth -> prepare -> train -> evaluate against the baselines, with plots.

Runs on the built-in default synthetic data (SegMM format with planted segment interest, small feature
dim) on CPU in a few minutes. Writes everything under OUT:

    OUT/raw/        the synthetic release (SegMM files + ground_truth.parquet)
    OUT/data/       the prepared dataset
    OUT/run/        the trained run (safetensors + JSON)
    OUT/results.json, OUT/training_curve.png, OUT/interest_vs_truth.png
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from segfast.data.synth import DEFAULT_INTERACTIONS, DEFAULT_USERS, DEFAULT_VIDEOS


# The demo's data (synth's defaults: 30,000 rows, about 17,800 train targets) and 3 epochs of the small
# model fit the 5-minute CPU budget; measured in docs/model.md ("The demo").
DEMO_USERS, DEMO_VIDEOS, DEMO_ROWS = DEFAULT_USERS, DEFAULT_VIDEOS, DEFAULT_INTERACTIONS
DEMO_EPOCHS = 3
DEMO_SEGREC_SEEDS = 3  # docs/segrec.md has the 5-seed, two-backbone comparison


def spearman_vs_truth(logits: np.ndarray, n_segments: np.ndarray, truth: list) -> dict:
    """Mean Spearman correlation between a model's per-slot scores and the planted interest.

    logits: [R, S]; n_segments: [R]; truth: R arrays of the planted per-segment interest (length N).
    Rows with fewer than 3 segments, or with constant scores or truth, are skipped (undefined correlation).
    """
    from scipy.stats import rankdata

    vals = []
    for r in range(len(truth)):
        n = int(n_segments[r])
        t = np.asarray(truth[r], dtype=np.float64)
        if n < 3 or t.shape[0] != n:
            continue
        s = np.asarray(logits[r, :n], dtype=np.float64)
        if np.ptp(s) == 0 or np.ptp(t) == 0:
            continue
        rs, rt = rankdata(s), rankdata(t)
        vals.append(float(np.corrcoef(rs, rt)[0, 1]))
    return {"mean": float(np.mean(vals)) if vals else None, "rows": len(vals)}


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    span = np.ptp(x)
    return (x - x.min()) / span if span > 0 else np.full_like(x, 0.5)


def _truth_lookup(raw_dir: Path):
    import pyarrow.parquet as pq

    gt = pq.read_table(raw_dir / "ground_truth.parquet").to_pydict()
    table: dict = {}
    for u, v, s, x in zip(gt["user_id"], gt["video_id"], gt["segment"], gt["interest"]):
        table.setdefault((u, v), {})[s] = x
    return {k: np.array([d[i] for i in sorted(d)], dtype=np.float32) for k, d in table.items()}


def score_rows(run_dir, data_dir, rows: np.ndarray, batch_size: int = 1024):
    """Logits [len(rows), 40] of a trained run for interaction rows of a prepared dataset (CPU)."""
    import torch

    from segfast.checkpoint import check_compatible, load_run
    from segfast.data.batches import BatchAssembler
    from segfast.data.prepared import load_prepared

    prepared = load_prepared(data_dir)
    model, meta = load_run(run_dir, which="best", device="cpu")
    check_compatible(meta, prepared)
    asm = BatchAssembler(prepared, features=model.config.uses_visual, max_user_tokens=model.config.max_user_tokens)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            out.append(model.score(asm.assemble(rows[i:i + batch_size])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 40), np.float32)


def truth_correlation(run_dir, data_dir, raw_dir, split: str = "test", plot_png=None, n_users: int = 4) -> dict:
    """Mean Spearman of the run's scores on ``split`` rows against the synthetic ground truth; optionally
    plots, for the video with the most users among those rows, each user's predicted interest beside the truth."""
    from segfast.data.prepared import load_prepared

    prepared = load_prepared(data_dir)
    rows = prepared.rows(split)
    inter = prepared.interactions
    uid = prepared.users["user_id"][inter["user_idx"][rows]]
    vid = prepared.videos["video_id"][inter["video_idx"][rows]]
    truth = _truth_lookup(Path(raw_dir))
    keep = np.array([i for i in range(len(rows)) if (int(uid[i]), int(vid[i])) in truth], dtype=np.int64)
    logits = score_rows(run_dir, data_dir, rows[keep])
    nseg = inter["n_segments"][rows[keep]]
    truths = [truth[(int(uid[i]), int(vid[i]))] for i in keep]
    res = spearman_vs_truth(logits, nseg, truths)
    if plot_png is not None and len(keep):
        from segfast import plots

        v_of = vid[keep]
        cand = [v for v in np.unique(v_of) if nseg[v_of == v].max() >= 3]
        best = max(cand or list(np.unique(v_of)), key=lambda v: int((v_of == v).sum()))
        users_of = uid[keep]
        first = {}
        for j in np.flatnonzero(v_of == best):  # one row per distinct user
            first.setdefault(int(users_of[j]), j)
        pick = list(first.values())[:n_users]
        # The intra-video losses fix only the order of the logits within a video (a shift of all of them
        # changes nothing), so the plot shows them min-max scaled over the video's real segments.
        pred = [_minmax(logits[j, :nseg[j]]) for j in pick]
        tr = [truths[j] for j in pick]
        labels = [f"user {int(uid[keep[j]])}" for j in pick]
        leave = [int(inter["target"][rows[keep[j]]]) for j in pick]
        plots.interest_vs_truth(pred, tr, labels, plot_png, title=f"video {int(best)}: predicted interest vs "
                                f"planted truth", leave_slots=leave,
                                pred_label="predicted score (min-max within the video)")
    return res


def _segrec_summary(cmp: dict) -> dict:
    """The JSON-friendly part of compare_weightings' result: metrics and the t-test per weighting."""
    return {w: {"metrics": r["metrics"], **({"ttest_vs_video": r["ttest_vs_video"]} if "ttest_vs_video" in r else {})}
            for w, r in cmp["results"].items()}


def run_demo(out="segfast_demo", seed: int = 0, quick: bool = False, ablations: bool = False,
             modality: str = "both", device: str = "cpu", threads: int = 1) -> dict:
    """The demo end to end; returns the summary also written to OUT/results.json."""
    import torch

    from segfast.data.prepared import prepare
    from segfast.data.synth import synth
    from segfast.evaluate import evaluate_run, format_table, run_baselines
    from segfast.model.config import model_preset, train_preset
    from segfast.train import train

    if threads:
        torch.set_num_threads(threads)  # small models on 2 busy cores: one thread is faster than two
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw, data = out / "raw", out / "data"
    users, videos, inter = (24, 300, 3600) if quick else (DEMO_USERS, DEMO_VIDEOS, DEMO_ROWS)
    if not (raw / "SegMM_inter.csv").exists():
        print(f"[1/6] synth: {users} users, {videos} videos, {inter} interactions (SegMM format, planted interest)")
        synth("segmm", raw, users=users, videos=videos, interactions=inter, seed=seed, feature_dim=64,
              progress=False)
    if not (data / "manifest.json").exists():
        print("[2/6] prepare")
        prepare("segmm", raw, data, seed=seed, feature_dim=64, progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    c = manifest["counts"]
    print(f"      {c['rows_kept']} rows kept of {c['rows_read']}, {c['users']} users, {c['videos']} videos, "
          f"{c['segments']} segments; splits {c['splits']}")

    def fit(name: str, **model_over):
        run = out / f"run-{name}"
        # dropout 0: 3 epochs of a 64-wide model underfit rather than overfit (docs/model.md, "The demo")
        mc = model_preset("small", modality=modality, max_user_tokens=32, **{"dropout": 0.0, **model_over})
        # cosine decay with warm-up; early stopping is kept but the schedule normally runs to its end
        tc = train_preset("small", seed=seed, device=device, epochs=1 if quick else DEMO_EPOCHS, batch_size=128,
                          lr=5e-3, lr_schedule="cosine", warmup_steps=20, eval_every=15 if quick else 70,
                          patience=2 if quick else 10)
        train(data, run, mc, tc, progress=not quick, max_steps=20 if quick else None)
        return run

    print(f"[3/6] train (small preset, {modality}, {device})")
    runs = {"ours": fit("full")}
    if ablations:
        for abl in ("no-position", "no-attention"):
            print(f"      ablation {abl}")
            runs[f"ours ({abl})"] = fit(abl, ablation=abl)
    print("[4/6] evaluate on the test split vs the baselines")
    results = run_baselines(data, split="test", seed=seed)
    for name, run in runs.items():
        results[name] = evaluate_run(data, run, split="test", seed=seed)
    corr = truth_correlation(runs["ours"], data, raw, plot_png=out / "interest_vs_truth.png")
    print(format_table(results))
    if corr["mean"] is not None:
        print(f"Spearman(model scores, planted interest), mean over {corr['rows']} test rows: {corr['mean']:.3f}")
    print("[5/6] SegRec (Task 2): WideDeep with Video / SegSum / interest weights from the run above")
    from segfast.segrec import compare_weightings, format_results

    segrec = compare_weightings(data, runs["ours"], "widedeep", ["segsum", "interest"],
                                seeds=1 if quick else DEMO_SEGREC_SEEDS, epochs=1 if quick else 5, batch_size=512,
                                lr=2e-3, patience=1, progress=False)
    print(format_results(segrec))
    print("[6/6] plots")
    from segfast import plots

    plots.training_curve(runs["ours"] / "metrics.jsonl", out / "training_curve.png")
    plots.case_study(runs["ours"], data, out / "case_study.png")
    summary = {"results": results, "spearman_vs_truth": corr, "segrec": _segrec_summary(segrec), "seconds": round(time.time() - t0, 1),
               "runs": {k: str(v) for k, v in runs.items()}}
    from segfast import _io

    _io.write_json(out / "results.json", summary, indent=2, default=str)
    print(f"done in {summary['seconds']} s: {out / 'results.json'}, {out / 'training_curve.png'}, "
          f"{out / 'interest_vs_truth.png'}, {out / 'case_study.png'}")
    return summary
