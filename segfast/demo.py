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


def truth_correlation(run_dir, data_dir, raw_dir, split: str = "test") -> dict:
    """Mean Spearman of the run's test-row scores against the synthetic ground truth."""
    from segfast.data.prepared import load_prepared

    prepared = load_prepared(data_dir)
    rows = prepared.rows(split)
    inter = prepared.interactions
    uid = prepared.users["user_id"][inter["user_idx"][rows]]
    vid = prepared.videos["video_id"][inter["video_idx"][rows]]
    truth = _truth_lookup(Path(raw_dir))
    keep = [i for i in range(len(rows)) if (int(uid[i]), int(vid[i])) in truth]
    logits = score_rows(run_dir, data_dir, rows[keep])
    nseg = inter["n_segments"][rows[keep]]
    return spearman_vs_truth(logits, nseg, [truth[(int(uid[i]), int(vid[i]))] for i in keep])


def run_demo(out="segfast_demo", seed: int = 0, quick: bool = False, ablations: bool = False,
             modality: str = "both", device: str = "cpu") -> dict:
    from segfast.data.prepared import prepare
    from segfast.data.synth import synth
    from segfast.evaluate import evaluate_run, format_table, run_baselines
    from segfast.model.config import model_preset, train_preset
    from segfast.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw, data = out / "raw", out / "data"
    users, videos, inter = (24, 300, 3600) if quick else (80, 1200, 24000)
    if not (raw / "SegMM_inter.csv").exists():
        print(f"[1/5] synth: {users} users, {videos} videos, {inter} interactions (SegMM format, planted interest)")
        synth("segmm", raw, users=users, videos=videos, interactions=inter, seed=seed, feature_dim=64,
              progress=not quick)
    if not (data / "manifest.json").exists():
        print("[2/5] prepare")
        prepare("segmm", raw, data, seed=seed, feature_dim=64, progress=not quick)
    manifest = json.loads((data / "manifest.json").read_text())
    print(json.dumps(manifest["counts"], indent=1))

    def fit(name: str, **model_over):
        run = out / f"run-{name}"
        mc = model_preset("small", modality=modality, **model_over)
        tc = train_preset("small", seed=seed, device=device, epochs=2 if quick else 12,
                          eval_every=50 if quick else 100, patience=3 if quick else 5)
        train(data, run, mc, tc, progress=not quick, max_steps=30 if quick else None)
        return run

    print("[3/5] train (small preset, both modalities, CPU)")
    runs = {"ours": fit("full")}
    if ablations:
        for abl in ("no-position", "no-attention"):
            print(f"      ablation {abl}")
            runs[f"ours ({abl})"] = fit(abl, ablation=abl)
    print("[4/5] evaluate vs baselines")
    results = run_baselines(data, split="test", seed=seed)
    for name, run in runs.items():
        results[name] = evaluate_run(data, run, split="test", seed=seed)
    corr = truth_correlation(runs["ours"], data, raw)
    table = format_table(results)
    print(table)
    print(f"Spearman(model scores, planted interest) over test rows: {corr['mean']:.3f} ({corr['rows']} rows)")
    print("[5/5] plots")
    from segfast import plots

    plots.training_curve(runs["ours"] / "metrics.jsonl", out / "training_curve.png")
    plots.interest_vs_truth(runs["ours"], data, raw, out / "interest_vs_truth.png")
    summary = {"results": results, "spearman_vs_truth": corr, "seconds": round(time.time() - t0, 1),
               "runs": {k: str(v) for k, v in runs.items()}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out / "results.json")
    print(f"done in {summary['seconds']} s; results in {out / 'results.json'}, plots in {out}")
    return summary
