"""`segfast demo`: synth -> prepare -> train -> evaluate against the baselines, with plots.

Runs on the built-in default synthetic data (SegMM format with planted segment interest, small feature
dim) on CPU in a few minutes. Writes everything under OUT:

    OUT/raw/        the synthetic release (SegMM files + ground_truth.parquet)
    OUT/data/       the prepared dataset
    OUT/run-full/   the trained run (safetensors + JSON, calibration.json fitted on dev at the end of training)
    OUT/results.json, OUT/training_curve.png, OUT/reliability.png (predicted vs observed keep rate on test,
    before / after calibration), OUT/case_study.png and OUT/interest_vs_truth.png (the same test rows, chosen
    by segfast.plots.case_rows: the calibrated keep probability per segment, as a heatmap and beside the
    planted truth)
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


def truth_correlation(run_dir, data_dir, raw_dir, split: str = "test", plot_png=None, max_users: int = 8) -> dict:
    """Mean Spearman of the run's scores on ``split`` rows against the synthetic ground truth, and (when the run
    has a calibrator) the mean absolute difference between the calibrated keep probabilities and the planted
    ones (synth's ``interest`` = 1 - hazard, the same quantity) over the real slots of those rows, beside the
    same for sigmoid(logit). With ``plot_png``: :func:`interest_vs_truth_plot` (its result under "plot")."""
    from segfast.calibration import CALIBRATION_FILE, load_calibrator
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
    if len(keep) and (Path(run_dir) / CALIBRATION_FILE).exists():
        kp = load_calibrator(run_dir, "best").keep_probability(logits, nseg)
        real = np.arange(logits.shape[1])[None, :] < np.asarray(nseg)[:, None]
        tr = np.zeros(logits.shape)
        for j, t in enumerate(truths):
            tr[j, :t.shape[0]] = t
        with np.errstate(over="ignore"):
            sig = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        res["keep_mae_vs_truth"] = {"calibrated": float(np.abs(kp - tr)[real].mean()),
                                    "sigmoid_logit": float(np.abs(sig - tr)[real].mean()),
                                    "planted_mean": float(tr[real].mean()), "slots": int(real.sum())}
    if plot_png is not None and len(keep):
        res["plot"] = interest_vs_truth_plot(run_dir, prepared, truth, plot_png, split=split, max_users=max_users)
    return res


def interest_vs_truth_plot(run_dir, data, truth, out_png, split: str = "test", max_users: int = 8) -> dict:
    """``interest_vs_truth.png``: the rows segfast.plots.case_rows picks (the same as case_study.png, in the same
    order), each row's calibrated keep probability per segment beside the planted one (``truth``: {(user_id,
    video_id): planted interest per segment}, or synth's raw directory). Returns {"video_id", "users", "rows",
    "leave_slots", "keep_probability", "calibration", "out"}."""
    from segfast import plots
    from segfast.data.prepared import load_prepared

    p = load_prepared(data) if isinstance(data, (str, Path)) else data
    if not isinstance(truth, dict):
        truth = _truth_lookup(Path(truth))
    sel = plots.case_rows(p, split, max_users=max_users)
    k = plots.row_keep_probability(run_dir, p, sel["rows"])
    pred, tr = [], []
    for j, (u, n) in enumerate(zip(sel["user_ids"], sel["n_segments"])):
        t = truth.get((int(u), sel["video_id"]))
        if t is None or t.shape[0] != n:
            raise ValueError(f"no planted interest of {int(n)} segments for user {int(u)}, video {sel['video_id']} "
                             "in the ground truth")
        pred.append(k["keep"][j, :n])
        tr.append(t)
    out = plots.interest_vs_truth(pred, tr, [f"user {int(u)}" for u in sel["user_ids"]], out_png,
                                  title=f"video {sel['video_id']}, {split} split: each user's last view (same rows as "
                                        "case_study.png)", leave_slots=[int(x) for x in sel["target"]])
    return {"video_id": sel["video_id"], "users": [int(x) for x in sel["user_ids"]],
            "rows": [int(x) for x in sel["rows"]], "leave_slots": [int(x) for x in sel["target"]],
            "keep_probability": [[round(float(v), 6) for v in x] for x in pred], "calibration": k["calibration"],
            "out": out}


def _calibration_lines(cal: dict) -> list:
    """The demo's summary lines of evaluate_run's "calibration" section."""
    b, a, w = cal["before"], cal["after"], cal["watch_time_mae"]
    return [f"Calibration on test ({cal['slots']} observed slots, observed keep rate {cal['observed_keep_rate']:.3f}; "
            f"{cal['calibrator']['form']} on the {cal['calibrator']['feature']} logit):",
            f"  ECE   {b['ece']:.4f} (sigmoid of the raw logit) -> {a['ece']:.4f} (calibrated)",
            f"  Brier {b['brier']:.4f} -> {a['brier']:.4f}",
            f"  watch-time MAE (segments): calibrated {w['calibrated']:.3f}, reciprocal-softmax "
            f"{w['reciprocal_softmax']:.3f}, ItemPosition {w['ItemPosition']:.3f}"]


def _segrec_summary(cmp: dict) -> dict:
    """The JSON-friendly part of compare_weightings' result: metrics and the t-test per weighting."""
    return {w: {"metrics": r["metrics"], **({"ttest_vs_video": r["ttest_vs_video"]} if "ttest_vs_video" in r else {})}
            for w, r in cmp["results"].items()}


def run_demo(out="segfast_demo", seed: int = 0, quick: bool = False, ablations: bool = False,
             modality: str = "both", device: str = "cpu", threads: int = 1, progress: bool = True) -> dict:
    """The demo end to end; returns the summary also written to OUT/results.json. ``progress``: the training
    progress bar (stderr; never with ``quick``)."""
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
        train(data, run, mc, tc, progress=progress and not quick, max_steps=20 if quick else None)
        from segfast.calibration import CALIBRATION_FILE, calibrate_run

        if not (run / CALIBRATION_FILE).exists():  # segfast train fits it at the end of a finished run
            calibrate_run(run, data, device=device)
        return run

    print(f"[3/6] train (small preset, {modality}, {device})")
    runs = {"ours": fit("full")}
    if ablations:
        for abl in ("no-position", "no-attention"):
            print(f"      ablation {abl}")
            runs[f"ours ({abl})"] = fit(abl, ablation=abl)
    print("[4/6] evaluate on the test split vs the baselines")
    results = run_baselines(data, split="test", seed=seed)
    for name, run in runs.items():  # "ours" also writes OUT/reliability.png
        results[name] = evaluate_run(data, run, split="test", seed=seed, device=device,
                                     plots=out if name == "ours" else None)
    corr = truth_correlation(runs["ours"], data, raw, plot_png=out / "interest_vs_truth.png")
    print(format_table(results))
    if corr["mean"] is not None:
        print(f"Spearman(model scores, planted interest), mean over {corr['rows']} test rows: {corr['mean']:.3f}")
    for line in _calibration_lines(results["ours"]["calibration"]):
        print(line)
    if "keep_mae_vs_truth" in corr:
        m = corr["keep_mae_vs_truth"]
        print(f"  |P(keep) - planted P(keep)| over {m['slots']} test slots: calibrated {m['calibrated']:.3f}, "
              f"sigmoid(logit) {m['sigmoid_logit']:.3f}")
    print("[5/6] SegRec (Task 2): WideDeep with Video / SegSum / interest weights from the run above")
    from segfast.segrec import compare_weightings, format_results

    segrec = compare_weightings(data, runs["ours"], "widedeep", ["segsum", "interest"],
                                seeds=1 if quick else DEMO_SEGREC_SEEDS, epochs=1 if quick else 5, batch_size=512,
                                lr=2e-3, patience=1, progress=False)
    print(format_results(segrec))
    print("[6/6] plots")
    from segfast import plots

    plots.training_curve(runs["ours"] / "metrics.jsonl", out / "training_curve.png")
    case = plots.case_study(runs["ours"], data, out / "case_study.png", device=device,
                            title_note="same rows as interest_vs_truth.png")
    ivt = corr.get("plot") or {}
    if ivt and ivt["rows"] != case["rows"]:  # both come from plots.case_rows
        raise AssertionError(f"case_study.png rows {case['rows']} != interest_vs_truth.png rows {ivt['rows']}")
    lo, hi = case["limits"]
    print(f"      case_study.png: video {case['video_id']}, {len(case['users'])} users, calibrated keep probability "
          f"colour scale {lo:.2f}..{hi:.2f}")
    cal = results["ours"]["calibration"]
    summary = {"results": results, "spearman_vs_truth": corr, "segrec": _segrec_summary(segrec),
               "calibration": {k: cal[k] for k in ("calibrator", "slots", "observed_keep_rate", "before", "after",
                                                   "watch_time_mae")},
               "plots": {"case_study": case, "interest_vs_truth": ivt,
                         "reliability": cal.get("plot")},
               "seconds": round(time.time() - t0, 1), "runs": {k: str(v) for k, v in runs.items()}}
    from segfast import _io

    _io.write_json(out / "results.json", summary, indent=2, default=str)
    print(f"done in {summary['seconds']} s: {out / 'results.json'}, {out / 'training_curve.png'}, "
          f"{out / 'reliability.png'}, {out / 'interest_vs_truth.png'}, {out / 'case_study.png'}")
    return summary
