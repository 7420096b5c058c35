"""SegRec (SPEC section 8): video-level recommendation with segment weights, trained with BCE and Adam.

prediction = sigmoid(sum_i w_i y'_i), y' [B, 40] from a backbone (``segfast.segrec.backbones``), w over the N
real slots (0 on padding). Weightings:

- ``video``: no segments: one item per row at the "video" position (40); prediction = sigmoid(y'_video).
  This is the plain video-level backbone.
- ``segsum``: w_i = 1 on the real slots (a sum, not a mean, as in the paper).
- ``segadjust``: w = softmax over the real slots of one learned 40-vector (initialised to 0 = uniform).
- ``interest``: w = softmax over the real slots of the frozen Task-1 model's logits (computed once for all
  train/dev/test rows under no_grad, eval mode, and cached in memory, or in a temp memmap when large).
- ``itemposition``: w_i proportional to 1 - h_i over the real slots, where h is the ItemPosition baseline's
  per-video leave hazard (``segfast.evaluate.PositionBaseline``, fitted on the train split only, shrunk to
  the AllPosition hazard for rare/unseen videos); 1 - h_i is the baseline's interest estimate for slot i.

Training: Adam (lr 1e-3), BCE on the effective-view label (``segfast.segrec.labels``), one dev AUC evaluation
per epoch, early stopping with ``patience`` epochs, the best-dev-AUC weights are restored and reported on
test. Seeds: seed s fixes the backbone initialisation and the batch order, identically for every weighting
(the backbone is built first from ``torch.manual_seed(s)``), so runs of two weightings with the same seed are
paired; the t-test against Video is therefore the paired ``scipy.stats.ttest_rel`` over seeds (two-sided).

Metrics: AUC (Mann-Whitney with average ranks for ties), F1 of (p >= 0.5), LogLoss with p clipped to
[1e-7, 1 - 1e-7].
"""
from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from segfast import MAX_SLOTS
from segfast.segrec.backbones import VIDEO_POS, Backbone, make_backbone
from segfast.segrec.labels import effective_view_labels

__all__ = ["WEIGHTINGS", "auc", "f1_score", "log_loss", "binary_metrics", "masked_softmax", "SegRec",
           "interest_weights", "itemposition_weights", "run_segrec", "compare_weightings", "format_results"]

WEIGHTINGS = ("video", "segsum", "segadjust", "interest", "itemposition")
LOGLOSS_EPS = 1e-7


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------

def _binary_inputs(y_true, y_score):
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(np.int64), s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values get the mean of their ranks."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], ss.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(y_true, y_score) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie); NaN when one class is absent."""
    y, s = _binary_inputs(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def f1_score(y_true, y_prob, threshold: float = 0.5) -> float:
    """F1 of the positive class with prediction p >= threshold; 0 when there is no positive at all."""
    y, p = _binary_inputs(y_true, y_prob)
    pred = p >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    den = 2 * tp + fp + fn
    return 0.0 if den == 0 else 2.0 * tp / den


def log_loss(y_true, y_prob, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy with p clipped to [eps, 1 - eps]."""
    y, p = _binary_inputs(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1.0 - p)))


def binary_metrics(y_true, y_prob) -> dict:
    return {"AUC": auc(y_true, y_prob), "F1": f1_score(y_true, y_prob), "LogLoss": log_loss(y_true, y_prob)}


# ----------------------------------------------------------------------------------------------------
# segment weights
# ----------------------------------------------------------------------------------------------------

def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the True slots of ``mask`` [B, S]; exactly 0 on the others (a row with no True slot
    gets all zeros)."""
    x = logits.float().masked_fill(~mask, float("-inf"))
    w = torch.softmax(x, dim=-1)
    return torch.nan_to_num(w, nan=0.0) * mask


def _row_store(n_rows: int, max_mem_bytes: int = 1 << 28):
    """float32 [n_rows, 40] in memory, or in a temp memmap when larger than ``max_mem_bytes``."""
    nbytes = n_rows * MAX_SLOTS * 4
    if nbytes <= max_mem_bytes:
        return np.zeros((n_rows, MAX_SLOTS), dtype=np.float32), None
    tmp = tempfile.TemporaryDirectory(prefix="segrec-weights-")
    mm = np.lib.format.open_memmap(Path(tmp.name) / "w.npy", mode="w+", dtype=np.float32,
                                   shape=(n_rows, MAX_SLOTS))
    return mm, tmp


def interest_weights(model, assembler, rows: np.ndarray, batch_size: int = 1024, device="cpu",
                     progress: bool = False):
    """(weights float32 [len(rows), 40], keepalive) = masked softmax of the frozen model's logits for each
    row; ``keepalive`` holds the temp directory of a memmap (None when in memory)."""
    from tqdm.auto import tqdm

    from segfast.model.model import batch_to

    rows = np.asarray(rows, dtype=np.int64)
    out, keep = _row_store(rows.shape[0])
    model.eval()
    with torch.no_grad():
        for a in tqdm(range(0, rows.shape[0], batch_size), desc="interest weights", disable=not progress):
            batch = assembler.assemble(rows[a:a + batch_size])
            logits = model(batch_to(batch, device)).float().cpu()
            if not torch.isfinite(logits).all():
                raise ValueError(f"the Task-1 model gave non-finite logits for interaction rows "
                                 f"{rows[a]}..{rows[min(a + batch_size, rows.shape[0]) - 1]}")
            out[a:a + batch_size] = masked_softmax(logits, batch["slot_mask"]).numpy()
    return out, keep


def itemposition_weights(interactions: dict, rows: np.ndarray, fit_rows: np.ndarray,
                         prior_strength: float = 5.0) -> np.ndarray:
    """float32 [len(rows), 40]: (1 - h_i) of the ItemPosition hazard normalised over the real slots."""
    from segfast.evaluate import PositionBaseline

    rows = np.asarray(rows, dtype=np.int64)
    pb = PositionBaseline("ItemPosition", prior_strength).fit(interactions, np.asarray(fit_rows, np.int64))
    h = pb.hazards(interactions, rows)
    n = np.asarray(interactions["n_segments"], dtype=np.int64)[rows]
    keep = np.clip(1.0 - h, 1e-6, 1.0) * (np.arange(MAX_SLOTS)[None, :] < n[:, None])
    return (keep / keep.sum(1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------

class SegRec(nn.Module):
    """sigmoid(sum_i w_i y'_i) over a backbone; ``forward`` returns the logit [B]."""

    def __init__(self, backbone: Backbone, weighting: str):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        self.backbone = backbone
        self.weighting = weighting
        self.adjust = nn.Parameter(torch.zeros(MAX_SLOTS)) if weighting == "segadjust" else None

    def weights(self, batch: dict, pre: Optional[Tensor] = None) -> Tensor:
        mask = batch["slot_mask"].bool()
        if self.weighting == "segsum":
            return mask.float()
        if self.weighting == "segadjust":
            return masked_softmax(self.adjust[None, :].expand(mask.shape[0], -1), mask)
        if self.weighting in ("interest", "itemposition"):
            if pre is None:
                raise ValueError(f"weighting {self.weighting!r} needs precomputed weights")
            return pre * mask
        raise ValueError("the video weighting has no segment weights")

    def forward(self, batch: dict, pre: Optional[Tensor] = None) -> Tensor:
        if self.weighting == "video":
            b = batch["user_idx"].shape[0]
            dev = batch["user_idx"].device
            pos = torch.full((b, 1), VIDEO_POS, dtype=torch.long, device=dev)
            return self.backbone(batch, pos, torch.ones((b, 1), dtype=torch.bool, device=dev))[:, 0]
        mask = batch["slot_mask"].bool()
        y = self.backbone(batch, batch["slot_index"].long(), mask)
        return (self.weights(batch, pre) * y).sum(1)


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------

class _Data:
    """Everything shared between the runs of one dataset: labels, rows, assembler, cached weights."""

    def __init__(self, data_dir, interest_run=None, device="cpu", features: bool = False, progress=False):
        from segfast.data.batches import BatchAssembler
        from segfast.data.prepared import load_prepared

        self.prepared = load_prepared(data_dir)
        p = self.prepared
        self.labels, self.labeler = effective_view_labels(p.interactions, p.rows("train"))
        self.rows = {s: p.rows(s) for s in ("train", "dev", "test")}
        for s, r in self.rows.items():
            if r.size == 0:
                raise ValueError(f"{data_dir}: split {s!r} is empty; SegRec needs train, dev and test rows")
        self.all_rows = np.concatenate([self.rows[s] for s in ("train", "dev", "test")])
        self.pos_of = np.full(len(p), -1, dtype=np.int64)
        self.pos_of[self.all_rows] = np.arange(self.all_rows.shape[0])
        self.features = features
        self.assembler = BatchAssembler(p, features=features)
        self.interest_run = interest_run
        self.device = device
        self.progress = progress
        self._pre: dict = {}
        self._keep = []

    def precomputed(self, weighting: str):
        if weighting not in ("interest", "itemposition"):
            return None
        if weighting not in self._pre:
            if weighting == "interest":
                if self.interest_run is None:
                    raise ValueError("weighting 'interest' needs interest_run (a trained Task-1 run directory)")
                from segfast.checkpoint import check_compatible, load_run
                from segfast.data.batches import BatchAssembler

                model, meta = load_run(self.interest_run, "best", device=self.device)
                check_compatible(meta, self.prepared)
                mc = meta["model_config"]
                asm = BatchAssembler(self.prepared, features=mc.uses_visual, max_user_tokens=mc.max_user_tokens)
                w, keep = interest_weights(model, asm, self.all_rows, device=self.device, progress=self.progress)
                self._keep.append(keep)
                del model
            else:
                w = itemposition_weights(self.prepared.interactions, self.all_rows, self.rows["train"])
            self._pre[weighting] = w
        return self._pre[weighting]

    def batch(self, rows: np.ndarray, weighting: str, device):
        from segfast.model.model import batch_to

        b = batch_to(self.assembler.assemble(rows), device)
        pre = self.precomputed(weighting)
        pre_t = None if pre is None else torch.from_numpy(np.asarray(pre[self.pos_of[rows]])).to(device)
        y = torch.from_numpy(self.labels[rows].astype(np.float32)).to(device)
        return b, pre_t, y


def _predict(model: SegRec, data: _Data, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for a in range(0, rows.shape[0], batch_size):
            b, pre, _ = data.batch(rows[a:a + batch_size], model.weighting, device)
            out.append(torch.sigmoid(model(b, pre)).double().cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0)


def _train_one(data: _Data, backbone: str, weighting: str, seed: int, epochs: int, batch_size: int,
               lr: float, patience: int, device, dim: int, progress: bool) -> dict:
    torch.manual_seed(seed)
    fd = data.prepared.feature_dim if data.features else None
    bb = make_backbone(backbone, data.prepared.n_users, data.prepared.n_videos, feature_dim=fd, dim=dim)
    model = SegRec(bb, weighting).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lossf = nn.BCEWithLogitsLoss()
    train_rows = data.rows["train"]
    best = (-math.inf, None, -1)
    losses, bad = [], 0
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = train_rows[np.random.default_rng([seed, ep]).permutation(train_rows.shape[0])]
        tot, cnt = 0.0, 0
        for a in range(0, perm.shape[0], batch_size):
            b, pre, y = data.batch(perm[a:a + batch_size], weighting, device)
            loss = lossf(model(b, pre), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"SegRec {backbone}/{weighting} seed {seed}: non-finite loss at epoch {ep}")
            tot += lv * y.shape[0]
            cnt += y.shape[0]
        losses.append(tot / cnt)
        dev_auc = auc(data.labels[data.rows["dev"]], _predict(model, data, data.rows["dev"], 4 * batch_size, device))
        if progress:
            print(f"  {backbone}/{weighting} seed {seed} epoch {ep}: train loss {losses[-1]:.4f} "
                  f"dev AUC {dev_auc:.4f}", file=sys.stderr, flush=True)  # logs: stderr (stdout is for results)
        if dev_auc > best[0]:
            best, bad = (dev_auc, copy.deepcopy(model.state_dict()), ep), 0
        else:
            bad += 1
            if bad >= patience:
                break
    if best[1] is not None:
        model.load_state_dict(best[1])
    test_p = _predict(model, data, data.rows["test"], 4 * batch_size, device)
    res = binary_metrics(data.labels[data.rows["test"]], test_p)
    return {"test": res, "dev_auc": best[0], "best_epoch": best[2], "epochs_run": len(losses),
            "train_loss": losses, "seconds": time.perf_counter() - t0}


def _summary(per_seed: list) -> dict:
    out = {}
    for k in ("AUC", "F1", "LogLoss"):
        v = np.array([r["test"][k] for r in per_seed], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                  "values": [float(x) for x in v]}
    return out


def _ttest(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired two-sided t-test of a vs b (same seeds)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        return {"t": float("nan"), "p": float("nan"), "mean_diff": float((a - b).mean()) if a.size else float("nan"),
                "test": "ttest_rel"}
    r = ttest_rel(a, b)
    return {"t": float(r.statistic), "p": float(r.pvalue), "mean_diff": float((a - b).mean()), "test": "ttest_rel"}


def _seed_list(seeds) -> list:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: expected >= 1, got {seeds}")
        return list(range(seeds))
    s = [int(x) for x in seeds]
    if not s:
        raise ValueError("seeds: empty")
    return s


def _run(data: _Data, backbone, weighting, seeds, epochs, batch_size, lr, patience, device, dim, progress):
    per = [_train_one(data, backbone, weighting, s, epochs, batch_size, lr, patience, device, dim, progress)
           for s in seeds]
    return {"backbone": backbone, "weights": weighting, "seeds": list(seeds), "metrics": _summary(per),
            "runs": per, "label": {"positive_rate_test": float(data.labels[data.rows["test"]].mean()),
                                   **data.labeler.to_dict()}}


def run_segrec(data_dir, interest_run, backbone: str, weights: str, seeds=5, epochs: int = 10,
               batch_size: int = 512, device="cpu", progress: bool = True, *, lr: float = 1e-3,
               patience: int = 2, dim: int = 16, features: bool = False, _data: Optional[_Data] = None) -> dict:
    """Train SegRec with one backbone and one weighting over ``seeds`` (an int n = seeds 0..n-1, or a list);
    select on dev AUC, report test AUC / F1 / LogLoss (mean, std with ddof=1, values). Unless ``weights`` is
    "video", also trains the Video weighting with the same seeds and adds ``ttest_vs_video`` (paired t-test
    over seeds for each metric). ``features``: give the backbone the segment features (needs a dataset with
    features)."""
    if weights not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weights!r}; expected one of {WEIGHTINGS}")
    seeds = _seed_list(seeds)
    data = _data or _Data(data_dir, interest_run, device=device, features=features, progress=progress)
    res = _run(data, backbone, weights, seeds, epochs, batch_size, lr, patience, device, dim, progress)
    if weights != "video":
        vid = _run(data, backbone, "video", seeds, epochs, batch_size, lr, patience, device, dim, progress)
        res["ttest_vs_video"] = {k: _ttest(res["metrics"][k]["values"], vid["metrics"][k]["values"])
                                 for k in ("AUC", "F1", "LogLoss")}
        res["video_metrics"] = vid["metrics"]
    return res


def compare_weightings(data_dir, interest_run, backbone: str, weightings: Iterable[str] = WEIGHTINGS, seeds=5,
                       epochs: int = 10, batch_size: int = 512, device="cpu", progress: bool = True, *,
                       lr: float = 1e-3, patience: int = 2, dim: int = 16, features: bool = False) -> dict:
    """Run several weightings (Video always included) on the same data and seeds; returns
    {"backbone", "seeds", "results": {weighting: run_segrec-style dict with "ttest_vs_video" for the
    non-video ones}}."""
    weightings = list(dict.fromkeys(["video"] + list(weightings)))
    for w in weightings:
        if w not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {w!r}; expected one of {WEIGHTINGS}")
    seeds = _seed_list(seeds)
    data = _Data(data_dir, interest_run, device=device, features=features, progress=progress)
    results = {}
    for w in weightings:
        results[w] = _run(data, backbone, w, seeds, epochs, batch_size, lr, patience, device, dim, progress)
    vid = results["video"]["metrics"]
    for w in weightings:
        if w != "video":
            results[w]["ttest_vs_video"] = {k: _ttest(results[w]["metrics"][k]["values"], vid[k]["values"])
                                            for k in ("AUC", "F1", "LogLoss")}
    return {"backbone": backbone, "seeds": seeds, "results": results}


def format_results(cmp: dict, digits: int = 4) -> str:
    """A text table of a compare_weightings result."""
    lines = [f"backbone {cmp['backbone']}, seeds {cmp['seeds']}",
             f"{'weighting':<14}{'AUC':>18}{'F1':>18}{'LogLoss':>18}{'p(AUC vs video)':>18}"]
    for w, r in cmp["results"].items():
        m = r["metrics"]
        cells = [f"{m[k]['mean']:.{digits}f}±{m[k]['std']:.{digits}f}" for k in ("AUC", "F1", "LogLoss")]
        p = r.get("ttest_vs_video", {}).get("AUC", {}).get("p")
        lines.append(f"{w:<14}" + "".join(f"{c:>18}" for c in cells) + f"{'' if p is None else f'{p:.3g}':>18}")
    return "\n".join(lines)
