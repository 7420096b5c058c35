"""Figures (matplotlib, Agg backend): the case-study heatmap, training curves, interest vs planted truth.

The two case-study figures (``case_study.png``, the heatmap, and the demo's ``interest_vs_truth.png``) show
the same interaction rows, chosen by :func:`case_rows`, and the same quantity: the calibrated probability
that a user who reached a segment keeps watching past it (``segfast.calibration``, docs/model.md), never the
raw logit (a ranking loss gives logits no probability scale). Segments are numbered from 0 in both, as the
target slot y is: segment i covers seconds [5 i, 5 i + 5), and "the user left in segment y" means the target.

Every figure is written atomically (temp name in the target folder, then rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from segfast import _io

__all__ = ["KEEP_LABEL", "case_rows", "row_keep_probability", "spread_limits", "case_study_heatmap", "case_study",
           "training_curve", "interest_vs_truth"]

# what the case-study figures show (colour bar / axis label)
KEEP_LABEL = "P(keep watching past segment | reached it), calibrated"


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


def spread_limits(values, lo: float = 2.0, hi: float = 98.0, min_span: float = 0.05) -> tuple[float, float]:
    """Colour / axis limits for probabilities that show their spread instead of a fixed [0, 1]: the ``lo`` and
    ``hi`` percentiles of the finite values, widened about their middle to at least ``min_span``, moved inside
    [0, 1]. (0, 1) when nothing is finite."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    if b - a < min_span:
        mid = 0.5 * (a + b)
        a, b = mid - 0.5 * min_span, mid + 0.5 * min_span
    if a < 0.0:
        a, b = 0.0, b - a
    if b > 1.0:
        a, b = max(0.0, a - (b - 1.0)), 1.0
    return a, b


def _check_probabilities(x: np.ndarray, what: str) -> None:
    fin = x[np.isfinite(x)]
    if fin.size and (fin.min() < 0.0 or fin.max() > 1.0):
        raise ValueError(f"{what}: expected probabilities in [0, 1], got values in [{fin.min():.4g}, {fin.max():.4g}]"
                         " (pass calibrated keep probabilities, not logits)")


def _segment_axis(ax, n: int) -> None:
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=8)


_SEGMENT_XLABEL = "segment i (numbered from 0; segment i = seconds 5i to 5i+5)"
_LEAVE_NOTE = "red box: the segment the user left in (the row's target y); >: watched to the end (y = N)"


def case_study_heatmap(keep, leave_slots: Sequence[int], user_labels: Sequence[str], out_png, title: str = "",
                       n_segments: Optional[int] = None, row_segments: Optional[Sequence[int]] = None,
                       label: str = KEEP_LABEL, limits: Optional[tuple] = None, annotate: bool = True) -> str:
    """Heatmap of per-segment keep probabilities (rows = users' views, columns = segments 0..N-1), each row's
    leave slot (its target y) boxed in red, a full watch (y = the row's N) marked with ">" after the row's last
    segment.

    ``keep`` [U, N]: probabilities in [0, 1] (the calibrated keep probabilities, ``Calibrator.keep_probability``);
    NaN cells (slots past a row's N) are drawn blank. ``row_segments`` [U]: each row's N (default: its count of
    finite cells). The colour scale is ``limits`` or :func:`spread_limits` of the shown values, so that their
    spread is visible, with a colour bar labelled ``label``; with ``annotate`` every cell shows its value."""
    plt = _plt()
    s = np.asarray(keep, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"keep: expected a non-empty [users, segments] array, got shape {list(s.shape)}")
    _check_probabilities(s, "keep")
    u, n = s.shape
    n_segments = n if n_segments is None else int(n_segments)
    if n_segments != n:
        raise ValueError(f"n_segments={n_segments} but keep has {n} columns")
    rown = (np.isfinite(s).sum(axis=1) if row_segments is None
            else np.asarray(row_segments, dtype=np.int64).reshape(-1))
    leave = np.asarray(leave_slots, dtype=np.int64).reshape(-1)
    if leave.shape[0] != u or len(user_labels) != u or rown.shape[0] != u:
        raise ValueError(f"{u} users in keep, {leave.shape[0]} leave slots, {len(user_labels)} labels, "
                         f"{rown.shape[0]} row lengths: need equal")
    if rown.size and (rown.min() < 1 or rown.max() > n):
        raise ValueError(f"row_segments must be in [1, {n}]")
    if leave.size and (leave.min() < 0 or (leave > rown).any()):
        raise ValueError(f"leave_slots must be in [0, N] of their row (N = watched to the end); got {leave.tolist()} "
                         f"for N = {rown.tolist()}")
    vmin, vmax = spread_limits(s) if limits is None else (float(limits[0]), float(limits[1]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * n + 3.0), max(2.2, 0.45 * u + 1.6)))
    im = ax.imshow(np.ma.masked_invalid(s), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    if annotate:
        mid = 0.5 * (vmin + vmax)
        for r in range(u):
            for i in range(n):
                if np.isfinite(s[r, i]):
                    ax.text(i, r, f"{s[r, i]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if s[r, i] < mid else "black")
    for r, k in enumerate(leave):
        if k < rown[r]:
            ax.add_patch(plt.Rectangle((k - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        else:
            ax.plot([rown[r] - 0.5], [r], marker=">", color="red", markersize=9, clip_on=False)
    ax.set_yticks(range(u))
    ax.set_yticklabels([str(x) for x in user_labels])
    _segment_axis(ax, n)
    ax.set_xlabel(f"{_SEGMENT_XLABEL}\n{_LEAVE_NOTE}", fontsize=8)
    ax.set_ylabel("user")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, out_png)


def case_rows(prepared, split: str = "test", video: Optional[int] = None, max_users: int = 8,
              min_segments: int = 3) -> dict:
    """The interaction rows both case-study figures show (``case_study.png`` and the demo's
    ``interest_vs_truth.png``), so that they show the same views in the same order.

    Video: ``video`` (a raw video id), else the one with the most distinct users among the ``split`` rows,
    counting only videos of at least ``min_segments`` segments when there are any (ties: the smallest raw id).
    Rows: each user's last view of that video in ``split`` (the largest time_ms; ties: the later row; a user may
    have viewed it several times, and each view has its own history and leave slot), users by raw id, the first
    ``max_users``.

    Returns {"video_idx", "video_id", "rows" int64 [U], "user_ids" int64 [U], "n_segments" int64 [U] (each
    row's N), "target" int64 [U] (the leave slot y; y = N: watched to the end)}."""
    if int(max_users) < 1:
        raise ValueError(f"max_users={max_users}: expected >= 1")
    p = prepared
    it = p.interactions
    rows = p.rows(split)
    if rows.size == 0:
        raise ValueError(f"{p.path}: split {split!r} is empty")
    vids = np.asarray(it["video_idx"], dtype=np.int64)
    users = np.asarray(it["user_idx"], dtype=np.int64)
    nseg = np.asarray(it["n_segments"], dtype=np.int64)
    raw_vid = np.asarray(p.videos["video_id"], dtype=np.int64)
    raw_uid = np.asarray(p.users["user_id"], dtype=np.int64)
    if video is None:
        pairs = np.unique(np.stack([vids[rows], users[rows]], 1), axis=0)
        cnt = np.bincount(pairs[:, 0], minlength=p.n_videos)
        nmax = np.zeros(p.n_videos, dtype=np.int64)
        np.maximum.at(nmax, vids[rows], nseg[rows])
        ok = (cnt > 0) & (nmax >= int(min_segments))
        if not ok.any():
            ok = cnt > 0
        cand = np.flatnonzero(ok & (cnt == cnt[ok].max()))
        v = int(cand[np.argmin(raw_vid[cand])])
    else:
        hit = np.flatnonzero(raw_vid == int(video))
        if hit.size == 0:
            raise ValueError(f"video {video} is not in the prepared dataset {p.path}")
        v = int(hit[0])
    sel = rows[vids[rows] == v]
    if sel.size == 0:
        raise ValueError(f"video {int(raw_vid[v])} has no rows in split {split!r}")
    t = np.asarray(it["time_ms"], dtype=np.int64)[sel]
    u = raw_uid[users[sel]]
    o = np.lexsort((sel, t, u))  # by user id, then time, then row
    sel, u = sel[o], u[o]
    last = np.ones(sel.size, dtype=bool)
    last[:-1] = u[1:] != u[:-1]
    chosen = sel[last][:int(max_users)]
    return {"video_idx": v, "video_id": int(raw_vid[v]), "rows": chosen, "user_ids": raw_uid[users[chosen]],
            "n_segments": nseg[chosen], "target": np.asarray(it["target"], dtype=np.int64)[chosen]}


def row_keep_probability(run_dir, data, rows, which: str = "best", device="cpu", calibrator=None,
                         batch_size: int = 1024) -> dict:
    """Score interaction ``rows`` of a prepared dataset (``data``: its directory or a loaded Prepared) with the
    run's ``which`` checkpoint and map the logits through the run's calibrator (``calibrator``, else
    ``segfast.calibration.load_calibrator(run_dir, which)``, which names ``segfast calibrate`` when the run has
    none). Returns {"logits" float32 [R, 40], "keep" float64 [R, 40] (NaN past each row's N), "n_segments" [R],
    "calibration" (which calibrator: segfast.apps.calibration_info)}."""
    import torch

    from segfast.apps import calibration_info
    from segfast.calibration import load_calibrator
    from segfast.checkpoint import check_compatible, load_run
    from segfast.data.batches import BatchAssembler
    from segfast.data.prepared import load_prepared

    p = load_prepared(data) if isinstance(data, (str, Path)) else data
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cal = load_calibrator(run_dir, which) if calibrator is None else calibrator
    model, meta = load_run(run_dir, which, device=device)
    check_compatible(meta, p)
    mc = meta["model_config"]
    asm = BatchAssembler(p, features=mc.uses_visual, max_user_tokens=mc.max_user_tokens)
    out = []
    with torch.no_grad():
        for i in range(0, rows.size, int(batch_size)):
            out.append(model.score(asm.assemble(rows[i:i + int(batch_size)])).float().cpu().numpy())
    logits = np.concatenate(out) if out else np.zeros((0, 40), np.float32)
    n = np.asarray(p.interactions["n_segments"], dtype=np.int64)[rows]
    keep = np.asarray(cal.keep_probability(logits, n), dtype=np.float64)
    return {"logits": logits, "keep": keep, "n_segments": n, "calibration": calibration_info(cal, run_dir, which)}


def _json_matrix(x: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in r] for r in np.asarray(x, np.float64)]


def case_study(run_dir, data_dir, out_png, video: Optional[int] = None, max_users: int = 8, split: str = "test",
               device="cpu", which: str = "best", calibrator=None, title_note: str = "") -> dict:
    """The paper-style heatmap of one video: the rows :func:`case_rows` picks (``video`` = a raw video id, or
    the one with the most distinct users in ``split``), each row's calibrated keep probability per segment
    (:func:`row_keep_probability`) on a colour scale fitted to the shown values, each row's leave slot boxed.
    ``title_note`` is appended to the title (the demo: which other figure shows the same rows).

    Returns {"video_id", "users", "rows", "leave_slots", "n_segments", "keep_probability" (the plotted [U, N]
    matrix, None past a row's N), "limits" (the colour scale), "calibration", "out"}."""
    from segfast.data.prepared import load_prepared

    p = load_prepared(data_dir)
    sel = case_rows(p, split, video=video, max_users=max_users)
    k = row_keep_probability(run_dir, p, sel["rows"], which=which, device=device, calibrator=calibrator)
    n = int(sel["n_segments"].max())
    keep = k["keep"][:, :n]
    lim = spread_limits(keep)
    uid = sel["user_ids"]
    out = case_study_heatmap(keep, sel["target"], [f"user {x}" for x in uid], out_png, n_segments=n,
                             row_segments=sel["n_segments"], limits=lim,
                             title=f"video {sel['video_id']}, {split} split: each user's last view"
                                   + (f" ({title_note})" if title_note else ""))
    return {"video_id": sel["video_id"], "users": [int(x) for x in uid], "rows": [int(x) for x in sel["rows"]],
            "leave_slots": [int(x) for x in sel["target"]], "n_segments": [int(x) for x in sel["n_segments"]],
            "keep_probability": _json_matrix(keep), "limits": [round(lim[0], 6), round(lim[1], 6)],
            "calibration": k["calibration"], "out": out}


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
                      pred_label: str = "calibrated P(keep | reached)",
                      truth_label: str = "planted P(keep | reached) = 1 - hazard",
                      ylabel: str = KEEP_LABEL, limits: Optional[tuple] = None) -> str:
    """One small panel per view (user, video): the predicted keep probability (line) beside the planted truth
    (bars; synth's ground_truth.parquet ``interest`` = 1 - the leave hazard, the same quantity), segments
    numbered from 0 as in :func:`case_study_heatmap`, the leave slot y boxed in red (a full watch, y = N: ">"
    after the last segment). All panels share one y scale: ``limits`` or the range of the shown values (so
    their spread is visible). ``pred_interest`` / ``true_interest``: sequences of 1-D probability arrays of
    equal length per panel."""
    plt = _plt()
    k = len(pred_interest)
    if k == 0 or len(true_interest) != k or len(labels) != k:
        raise ValueError(f"{k} predictions, {len(true_interest)} truths, {len(labels)} labels: need equal, > 0")
    if leave_slots is not None and len(leave_slots) != k:
        raise ValueError(f"{k} panels but {len(leave_slots)} leave slots")
    pr_all = [np.asarray(x, dtype=np.float64).reshape(-1) for x in pred_interest]
    tr_all = [np.asarray(x, dtype=np.float64).reshape(-1) for x in true_interest]
    for j, (pr, tr) in enumerate(zip(pr_all, tr_all)):
        if pr.shape != tr.shape or pr.size == 0:
            raise ValueError(f"panel {j}: prediction has {pr.shape[0]} segments, truth {tr.shape[0]}: need equal, > 0")
        _check_probabilities(pr, f"panel {j} prediction")
        _check_probabilities(tr, f"panel {j} truth")
        if leave_slots is not None and leave_slots[j] is not None and not 0 <= int(leave_slots[j]) <= pr.size:
            raise ValueError(f"panel {j}: leave slot {leave_slots[j]} outside [0, N = {pr.size}]")
    if limits is None:
        lo, hi = spread_limits(np.concatenate(pr_all + tr_all), lo=0.0, hi=100.0, min_span=0.1)
        pad = 0.05 * (hi - lo)
        limits = (max(0.0, lo - pad), min(1.0, hi + pad))
    width = max(x.size for x in pr_all)
    fig, axes = plt.subplots(k, 1, figsize=(max(6.0, 0.5 * width + 3.0), 1.6 * k + 0.9), squeeze=False,
                             sharex=True)
    for j in range(k):
        pr, tr = pr_all[j], tr_all[j]
        ax = axes[j, 0]
        x = np.arange(pr.shape[0])
        ax.bar(x, tr, color="lightgray")
        ax.plot(x, pr, "o-", color="tab:blue")
        y = None if leave_slots is None or leave_slots[j] is None else int(leave_slots[j])
        if y is not None and y < pr.size:
            ax.add_patch(plt.Rectangle((y - 0.5, limits[0]), 1, limits[1] - limits[0], fill=False, edgecolor="red",
                                       linewidth=2.0))
        elif y is not None:
            ax.plot([pr.size - 0.5], [0.5 * (limits[0] + limits[1])], marker=">", color="red", markersize=9,
                    clip_on=False, linestyle="none")
        ax.set_ylim(*limits)
        ax.set_xlim(-0.6, width - 0.4)
        ax.text(0.005, 0.97, str(labels[j]) + ("" if y is None else f", y = {y}"), transform=ax.transAxes,
                fontsize=8, va="top", ha="left", bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="lightgray", label=truth_label),
               Line2D([], [], marker="o", color="tab:blue", label=pred_label)]
    if leave_slots is not None:
        handles += [Patch(fill=False, edgecolor="red", linewidth=2.0, label="the segment the user left in (y)"),
                    Line2D([], [], marker=">", color="red", linestyle="none", label="watched to the end (y = N)")]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=2,
                      frameon=False)
    if title:
        axes[0, 0].set_title(title, fontsize=9, pad=40)
    _segment_axis(axes[-1, 0], width)
    axes[-1, 0].set_xlabel(_SEGMENT_XLABEL, fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    return _save(fig, out_png)


def reliability_diagram(section: dict, out_png, title: str = "") -> str:
    """The reliability diagram of per-slot keep probabilities (``evaluate --plots``; the demo): the observed
    keep rate against the mean predicted probability in each of the equal-width bins, before calibration
    (sigmoid of the raw logit) and after (the run's calibrator), with the diagonal of perfect calibration; below,
    the number of observed slots per bin. ``section``: the "calibration" section of ``evaluate_run``."""
    try:
        rel = section["reliability"]
        if "before" not in section or "after" not in section:
            raise KeyError("before/after")
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
