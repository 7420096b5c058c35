"""Figures (matplotlib, Agg backend): the case-study heatmap, training curves, interest vs planted truth.

Every figure is written atomically (temp name in the target folder, then rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from segfast import _io

__all__ = ["case_study_heatmap", "case_study", "training_curve", "interest_vs_truth"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png) -> str:
    plt = _plt()
    out = Path(out_png)
    try:  # temp name, umask-implied mode, rename (segfast._io)
        _io.write_with(out, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return str(out)


def case_study_heatmap(scores, leave_slots: Sequence[int], user_labels: Sequence[str], out_png,
                       title: str = "", n_segments: Optional[int] = None) -> str:
    """Heatmap of per-segment interest (rows = users, columns = segments) with each user's actual leave
    segment marked by a black box (a full watch, leave slot == N, is marked with a triangle after the last
    segment). ``scores`` [U, N]: interest in [0, 1] (pass sigmoid(logits)); NaN cells are drawn blank."""
    plt = _plt()
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"scores: expected a non-empty [users, segments] array, got shape {list(s.shape)}")
    u, n = s.shape
    n_segments = n if n_segments is None else int(n_segments)
    leave = np.asarray(leave_slots, dtype=np.int64).reshape(-1)
    if leave.shape[0] != u or len(user_labels) != u:
        raise ValueError(f"{u} users in scores, {leave.shape[0]} leave slots, {len(user_labels)} labels")
    if leave.size and (leave.min() < 0 or leave.max() > n_segments):
        raise ValueError(f"leave_slots must be in [0, {n_segments}] (N = completed)")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n + 2.5), max(2.0, 0.45 * u + 1.2)))
    im = ax.imshow(np.ma.masked_invalid(s), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    for r, k in enumerate(leave):
        if k < n:
            ax.add_patch(plt.Rectangle((k - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        else:
            ax.plot([n - 0.5], [r], marker=">", color="red", markersize=9, clip_on=False)
    ax.set_yticks(range(u))
    ax.set_yticklabels([str(x) for x in user_labels])
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=8)
    ax.set_xlabel("segment (5 s each); red box = the segment the user left in, > = watched to the end")
    ax.set_ylabel("user")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label="predicted interest sigmoid(p)")
    return _save(fig, out_png)


def case_study(run_dir, data_dir, out_png, video: Optional[int] = None, max_users: int = 8, split: str = "test",
               device="cpu") -> dict:
    """Pick a video (``video`` = raw video id, or the one with the most distinct users in ``split`` rows,
    ties: the smaller id) and draw the heatmap of its rows in ``split`` (at most ``max_users`` users, the
    first ones by user id), scored by the run's model. Returns {"video_id", "users", "out"}."""
    import torch

    from segfast.checkpoint import check_compatible, load_run
    from segfast.data.batches import BatchAssembler
    from segfast.data.prepared import load_prepared

    p = load_prepared(data_dir)
    model, meta = load_run(run_dir, "best", device=device)
    check_compatible(meta, p)
    it = p.interactions
    rows = p.rows(split)
    if rows.size == 0:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    vids = np.asarray(it["video_idx"], dtype=np.int64)
    users = np.asarray(it["user_idx"], dtype=np.int64)
    if video is None:
        pairs = np.unique(np.stack([vids[rows], users[rows]], 1), axis=0)
        cnt = np.bincount(pairs[:, 0], minlength=p.n_videos)
        v = int(np.argmax(cnt))  # smallest video_idx = smallest raw id among the ties
    else:
        hit = np.flatnonzero(np.asarray(p.videos["video_id"]) == int(video))
        if hit.size == 0:
            raise ValueError(f"video {video} is not in the prepared dataset {data_dir}")
        v = int(hit[0])
    sel = rows[vids[rows] == v]
    if sel.size == 0:
        raise ValueError(f"video {int(p.videos['video_id'][v])} has no rows in split {split!r}")
    # one row per user (their last one in time = the largest row number), users by id, at most max_users
    last = {}
    for r in sel:
        last[int(users[r])] = int(r)
    chosen = np.array([last[u] for u in sorted(last)][:max_users], dtype=np.int64)
    mc = meta["model_config"]
    asm = BatchAssembler(p, features=mc.uses_visual, max_user_tokens=mc.max_user_tokens)
    with torch.no_grad():
        logits = model(asm.assemble(chosen)).float().cpu().numpy()
    n = int(it["n_segments"][chosen].max())
    nrow = np.asarray(it["n_segments"], dtype=np.int64)[chosen]
    interest = 1.0 / (1.0 + np.exp(-logits[:, :n].astype(np.float64)))
    interest[np.arange(n)[None, :] >= nrow[:, None]] = np.nan
    target = np.asarray(it["target"], dtype=np.int64)[chosen]
    leave = np.minimum(target, n)
    uid = np.asarray(p.users["user_id"])[users[chosen]]
    vid = int(p.videos["video_id"][v])
    out = case_study_heatmap(interest, leave, [f"user {x}" for x in uid], out_png,
                             title=f"video {vid}: predicted interest of {len(chosen)} users", n_segments=n)
    return {"video_id": vid, "users": [int(x) for x in uid], "out": out}


def training_curve(metrics_jsonl, out_png, metric: str = "NDCG@5") -> str:
    """Train loss and the dev ``metric`` against the step, from a run's metrics.jsonl."""
    plt = _plt()
    steps, loss, dev, lsteps = [], [], [], []
    path = Path(metrics_jsonl)
    with open(path) as f:
        for k, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {k}: invalid JSON ({e})") from None
            if "step" not in rec:
                raise ValueError(f"{path}: line {k}: no 'step' field")
            if rec.get("train_loss") is not None:
                lsteps.append(rec["step"])
                loss.append(rec["train_loss"])
            d = (rec.get("dev") or {}).get(metric)
            if d is not None:
                steps.append(rec["step"])
                dev.append(d)
    if not steps and not lsteps:
        raise ValueError(f"{path}: no evaluation lines")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lsteps, loss, "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, dev, "s-", color="tab:orange", label=f"dev {metric}")
    ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    ax.set_title("training curve")
    return _save(fig, out_png)


def interest_vs_truth(pred_interest, true_interest, labels: Sequence[str], out_png, title: str = "",
                      leave_slots: Optional[Sequence[int]] = None,
                      pred_label: str = "predicted sigmoid(p)") -> str:
    """One small panel per (user, video): predicted interest sigmoid(p) (line) beside the planted truth
    (bars; synth's ground_truth.parquet ``interest``), optionally with the actual leave segment marked.
    ``pred_interest`` / ``true_interest``: sequences of 1-D arrays of equal length per panel."""
    plt = _plt()
    k = len(pred_interest)
    if k == 0 or len(true_interest) != k or len(labels) != k:
        raise ValueError(f"{k} predictions, {len(true_interest)} truths, {len(labels)} labels: need equal, > 0")
    fig, axes = plt.subplots(k, 1, figsize=(7, 1.9 * k), squeeze=False)
    for j in range(k):
        pr = np.asarray(pred_interest[j], dtype=np.float64)
        tr = np.asarray(true_interest[j], dtype=np.float64)
        if pr.shape != tr.shape:
            raise ValueError(f"panel {j}: prediction has {pr.shape[0]} segments, truth {tr.shape[0]}")
        ax = axes[j, 0]
        x = np.arange(pr.shape[0])
        ax.bar(x, tr, color="lightgray", label="planted interest")
        ax.plot(x, pr, "o-", color="tab:blue", label=pred_label)
        if leave_slots is not None and leave_slots[j] is not None and leave_slots[j] < pr.shape[0]:
            ax.axvline(leave_slots[j], color="red", linestyle="--", label="left here")
        ax.set_ylim(0, 1)
        ax.set_ylabel(str(labels[j]), fontsize=8)
        if j == 0:
            ax.legend(fontsize=7, loc="lower left")
            if title:
                ax.set_title(title)
    axes[-1, 0].set_xlabel("segment")
    return _save(fig, out_png)


def reliability_diagram(section: dict, out_png, title: str = "") -> str:
    """The reliability diagram of per-slot keep probabilities (``evaluate --plots``; the demo): the observed
    keep rate against the mean predicted probability in each of the equal-width bins, before calibration
    (sigmoid of the raw logit) and after (the run's calibrator), with the diagonal of perfect calibration; below,
    the number of observed slots per bin. ``section``: the "calibration" section of ``evaluate_run``."""
    try:
        rel, before, after = section["reliability"], section["before"], section["after"]
        tables = {"before": rel["before"], "after": rel["after"]}
    except (KeyError, TypeError):
        raise ValueError("section: expected the 'calibration' section of evaluate_run (with 'reliability', "
                         "'before' and 'after')") from None
    if not tables["before"] or len(tables["before"]) != len(tables["after"]):
        raise ValueError("section: expected the same non-empty list of bins before and after")
    plt = _plt()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    styles = {"before": ("tab:red", "s", "before: sigmoid(raw logit)"), "after": ("tab:blue", "o", "after: calibrated")}
    nb = len(tables["before"])
    width = 1.0 / nb
    for j, key in enumerate(("before", "after")):
        color, marker, label = styles[key]
        bins = [b for b in tables[key] if b.get("count")]
        m = section[key]
        ece, brier = m.get("ece"), m.get("brier")
        lab = label + ("" if ece is None else f" (ECE {ece:.3f}, Brier {brier:.3f})")
        ax.plot([b["mean_predicted"] for b in bins], [b["observed_keep_rate"] for b in bins], marker=marker,
                color=color, linewidth=1.2, markersize=4, label=lab)
        lo = np.array([b["lo"] for b in tables[key]])
        cnt = np.array([b["count"] for b in tables[key]], dtype=np.float64)
        axh.bar(lo + width * (0.25 + 0.5 * j), cnt, width=0.45 * width, color=color, alpha=0.8, label=key)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("observed keep rate (slots kept / slots reached)", fontsize=8)
    rate = section.get("observed_keep_rate")
    extra = f"; {section.get('slots')} observed slots" + ("" if rate is None else f", keep rate {rate:.3f}")
    ax.set_title((title + "\n" if title else "") + f"reliability of P(keep watching past segment | reached it){extra}",
                 fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    axh.set_yscale("log")
    axh.set_ylabel("slots per bin", fontsize=8)
    axh.set_xlabel(f"predicted keep probability ({nb} equal-width bins)", fontsize=8)
    axh.legend(fontsize=7, loc="upper left")
    return _save(fig, out_png)
