"""Task-1 evaluation (SPEC section 7): ranking metrics, watch-time MAE, position baselines, and the glue that
evaluates a trained run on a prepared dataset.

Protocol
--------
Per row, the 40 logits are sorted ascending (lowest interest first, i.e. the likeliest leave slot first) and
rank = 1 + position of the target slot y. HR@K = mean(rank <= K), NDCG@K = mean(1[rank <= K] / log2(rank + 1)).
Rows with y == 40 are excluded. ``strict=True`` ranks only slots 0..N (the N real slots plus the "completed"
pseudo-slot N; when N == 40 there is no pseudo-slot and all 40 slots are candidates).

Tie-breaking
------------
Ties are broken by a seeded random permutation per row: every (row, slot) gets a 64-bit key from a
SplitMix64 hash of (seed, row id, slot), and slots are ordered by (logit, key, slot index). The row id is
``row_ids`` when given (evaluate_run and the baselines pass the prepared interaction row numbers, so the
permutation of a row does not depend on batch size, order, or which other rows are evaluated); without it the
row id is the position in the evaluation order (0, 1, 2, ... continued across ``RankingAccumulator.update``
calls, so chunked evaluation equals one-shot evaluation). The rank is computed without sorting:
rank = 1 + #{candidate j : (p_j, key_j, j) < (p_y, key_y, y)}.

Watch time
----------
Expected leave slot E = sum_{i=0..M} i * q_i with M = min(N, 39) (slot N is the completed pseudo-slot; for
N == 40 there is none and M = 39), q = (1 / softmax(p)) renormalised over slots 0..M. Since
1 / softmax(p)_i = Z * exp(-p_i), the normalised q is softmax(-p) over slots 0..M whatever set of slots the
inner softmax was taken over; it is computed that way (stable). MAE = mean |E - y| over rows with y < 40, in
segments.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from segfast._hash import GOLDEN, splitmix64

S = 40  # slots per video
DEFAULT_KS = (1, 5, 10)
METRIC_ORDER = ("HR@1", "NDCG@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MAE")
TABLE_COLUMNS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MAE")
SPLIT_CODES = {"train": 0, "dev": 1, "test": 2, "profile": 3}
BASELINES = ("Random", "AllPosition", "UserPosition", "ItemPosition")
CHUNK = 65536

_M64 = (1 << 64) - 1
_GOLDEN = GOLDEN
_STREAM_TIES = 0x7469657321  # "ties!"
_STREAM_RANDOM = 0x72616E646F6D  # "random"


# --------------------------------------------------------------------------------------------------------------
# input handling

def _to_numpy(x, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):  # import torch only for torch inputs
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"{name}: expected a torch Tensor or numpy array, got {type(x).__name__}") from e


def _check_inputs(logits, target, n_segments, row_ids=None, is_cold=None):
    """Validate and convert; returns numpy arrays (logits float, ints int64, is_cold bool or None)."""
    p = _to_numpy(logits, "logits")
    if p.ndim != 2 or p.shape[1] != S:
        raise ValueError(f"logits: expected shape [B, {S}], got {list(p.shape)}")
    if not np.issubdtype(p.dtype, np.floating):
        if np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_:
            p = p.astype(np.float64)
        else:
            raise ValueError(f"logits: expected a float array, got dtype {p.dtype}")
    B = p.shape[0]
    if np.isnan(p).any():
        bad = int(np.flatnonzero(np.isnan(p).any(axis=1))[0])
        raise ValueError(f"logits: NaN in row {bad} of the batch")

    def _ints(x, name):
        a = _to_numpy(x, name)
        if a.ndim != 1 or a.shape[0] != B:
            raise ValueError(f"{name}: expected shape [{B}] (one per logits row), got {list(a.shape)}")
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name}: expected an integer array, got dtype {a.dtype}")
        return a.astype(np.int64, copy=False)

    y = _ints(target, "target")
    n = _ints(n_segments, "n_segments")
    if B:
        if n.min() < 1 or n.max() > S:
            i = int(np.flatnonzero((n < 1) | (n > S))[0])
            raise ValueError(f"n_segments: expected values in 1..{S}, got {int(n[i])} in row {i}")
        if y.min() < 0 or (y > n).any():
            i = int(np.flatnonzero((y < 0) | (y > n))[0])
            raise ValueError(f"target: expected 0 <= target <= n_segments, got target {int(y[i])} with "
                             f"n_segments {int(n[i])} in row {i}")
    r = None
    if row_ids is not None:
        r = _ints(row_ids, "row_ids")
        if B and r.min() < 0:
            raise ValueError("row_ids: expected non-negative row numbers")
    c = None
    if is_cold is not None:
        c = _to_numpy(is_cold, "is_cold")
        if c.ndim != 1 or c.shape[0] != B:
            raise ValueError(f"is_cold: expected shape [{B}], got {list(c.shape)}")
        c = c.astype(bool, copy=False)
    return p, y, n, r, c


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed: expected an integer, got {seed!r}")
    return int(seed) & _M64


def _check_ks(ks) -> tuple:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 or k > S for k in ks):
        raise ValueError(f"ks: expected cut-offs in 1..{S}, got {ks}")
    return ks


# --------------------------------------------------------------------------------------------------------------
# seeded hashing

_mix64 = splitmix64  # the one SplitMix64 finaliser (segfast._hash)


def _slot_keys(seed: int, row_ids: np.ndarray, stream: int) -> np.ndarray:
    """uint64 [B, 40]: a pseudo-random key per (seed, stream, row id, slot), independent of batch layout."""
    s = _mix64(np.array([(seed ^ (stream * 0x9E3779B97F4A7C15)) & _M64], dtype=np.uint64))[0]
    base = row_ids.astype(np.uint64)[:, None] * np.uint64(S) + np.arange(S, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        return _mix64(_mix64(base ^ s) + _GOLDEN)


def random_uniform(seed: int, row_ids, stream: int = _STREAM_RANDOM) -> np.ndarray:
    """float64 [B, 40] in [0, 1), a deterministic function of (seed, row id, slot)."""
    r = np.asarray(row_ids, dtype=np.int64)
    k = _slot_keys(_check_seed(seed), r, stream)
    return (k >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------------------------
# ranks and metrics

def _ranks_np(p, y, n, rows, seed, strict):
    """Rank (1-based) of slot y for rows with y < 40; 0 for excluded rows. Inputs validated numpy arrays."""
    B = p.shape[0]
    ranks = np.zeros(B, dtype=np.int64)
    keep = y < S
    if not keep.any():
        return ranks
    idx = np.flatnonzero(keep)
    slots = np.arange(S)
    for a in range(0, idx.size, CHUNK):
        ii = idx[a:a + CHUNK]
        pc, yc = p[ii], y[ii]
        py = np.take_along_axis(pc, yc[:, None], axis=1)
        cand = (slots[None, :] <= np.minimum(n[ii], S - 1)[:, None]) if strict else None
        less = pc < py
        eq = pc == py
        eq[np.arange(ii.size), yc] = False
        if strict:
            less &= cand
            eq &= cand
        rk = 1 + less.sum(axis=1)
        tied = np.flatnonzero(eq.any(axis=1))
        if tied.size:  # keys only where the target ties with another candidate
            kc = _slot_keys(seed, rows[ii[tied]], _STREAM_TIES)
            ky = np.take_along_axis(kc, yc[tied, None], axis=1)
            win = (kc < ky) | ((kc == ky) & (slots[None, :] < yc[tied, None]))
            rk[tied] += (eq[tied] & win).sum(axis=1)
        ranks[ii] = rk
    return ranks


def target_ranks(logits, target, n_segments, seed: int = 0, strict: bool = False, row_ids=None) -> np.ndarray:
    """int64 [B]: 1-based rank of the target slot under the ascending, seeded-tie-break protocol; 0 for rows
    with target == 40 (excluded). ``row_ids`` (default 0..B-1) seeds each row's tie-break permutation."""
    p, y, n, r, _ = _check_inputs(logits, target, n_segments, row_ids)
    if r is None:
        r = np.arange(p.shape[0], dtype=np.int64)
    return _ranks_np(p, y, n, r, _check_seed(seed), bool(strict))


def _expected_slot_np(p, n):
    """float64 [B]: expected leave slot sum_i i q_i over slots 0..min(N, 39), q = softmax(-p) there."""
    E = np.empty(p.shape[0], dtype=np.float64)
    slots = np.arange(S)
    for a in range(0, p.shape[0], CHUNK):
        pc = p[a:a + CHUNK].astype(np.float64)
        m = slots[None, :] <= np.minimum(n[a:a + CHUNK], S - 1)[:, None]
        z = np.where(m, -pc, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        w = np.exp(z)  # exp(-inf) == 0 on excluded slots
        E[a:a + CHUNK] = (w * slots[None, :]).sum(axis=1) / w.sum(axis=1)
    return E


def expected_leave_slot(logits, n_segments) -> np.ndarray:
    """float64 [B]: the model's expected leave slot (SPEC section 7, watch time); see the module docstring."""
    n = _to_numpy(n_segments, "n_segments")
    if n.ndim != 1:
        raise ValueError(f"n_segments: expected shape [B], got {list(n.shape)}")
    p, _, n, _, _ = _check_inputs(logits, np.zeros(n.shape[0], dtype=np.int64), n)
    if np.isinf(p).any():
        raise ValueError("logits: infinite values; the watch-time expectation needs finite logits")
    return _expected_slot_np(p, n)


def watch_time_mae(logits, target, n_segments) -> float:
    """Mean |expected leave slot - y| over rows with y < 40, in segments (None when no row is kept)."""
    p, y, n, _, _ = _check_inputs(logits, target, n_segments)
    keep = y < S
    if not keep.any():
        return None
    if np.isinf(p[keep]).any():
        raise ValueError("logits: infinite values; the watch-time expectation needs finite logits")
    E = _expected_slot_np(p[keep], n[keep])
    return float(np.abs(E - y[keep]).mean())


def _finish(sums: dict, count: int, ks, with_mae: bool) -> dict:
    out = {}
    for k in ks:
        out[f"HR@{k}"] = (sums[f"HR@{k}"] / count) if count else None
        out[f"NDCG@{k}"] = (sums[f"NDCG@{k}"] / count) if count else None
    if with_mae:
        out["MAE"] = (sums["MAE"] / count) if count else None
    ordered = {key: out[key] for key in METRIC_ORDER if key in out}
    ordered.update({key: v for key, v in out.items() if key not in ordered})
    ordered["rows"] = int(count)
    return ordered


def _rank_sums(ranks: np.ndarray, ks) -> dict:
    sums = {}
    for k in ks:
        hit = ranks <= k
        sums[f"HR@{k}"] = float(hit.sum())
        sums[f"NDCG@{k}"] = float((hit / np.log2(ranks + 1.0)).sum())
    return sums


def ranking_metrics(logits, target, n_segments, seed: int = 0, strict: bool = False, ks=DEFAULT_KS,
                    row_ids=None) -> dict:
    """HR@K and NDCG@K (K in ``ks``) plus "rows" (rows kept: target < 40) for one set of rows.

    logits [B, 40] (torch or numpy), target [B] int, n_segments [B] int. ``row_ids`` (optional, default the
    position 0..B-1) seeds each row's tie-break permutation. Metric values are None when no row is kept."""
    ks = _check_ks(ks)
    ranks = target_ranks(logits, target, n_segments, seed=seed, strict=strict, row_ids=row_ids)
    ranks = ranks[ranks > 0]
    return _finish(_rank_sums(ranks, ks), int(ranks.size), ks, with_mae=False)


class RankingAccumulator:
    """Streaming Task-1 evaluation: feed batches with ``update``, read ``result()``.

    ``result()`` -> {"metrics": {HR@K, NDCG@K, MAE, rows}, "cold": same over rows with is_cold (None when
    is_cold was never given)}. Without ``row_ids``, rows are numbered in the order they are fed (continuing
    across updates), so any chunking of the same rows gives the one-shot result."""

    def __init__(self, seed: int = 0, strict: bool = False, ks=DEFAULT_KS):
        self.seed = _check_seed(seed)
        self.strict = bool(strict)
        self.ks = _check_ks(ks)
        self._seen = 0
        self._sums = self._zero()
        self._cold = self._zero()
        self._n = 0
        self._n_cold = 0
        self._has_cold = False

    def _zero(self):
        z = {f"HR@{k}": 0.0 for k in self.ks}
        z.update({f"NDCG@{k}": 0.0 for k in self.ks})
        z["MAE"] = 0.0
        return z

    def update(self, logits, target, n_segments, is_cold=None, row_ids=None) -> None:
        p, y, n, r, c = _check_inputs(logits, target, n_segments, row_ids, is_cold)
        B = p.shape[0]
        if r is None:
            r = np.arange(self._seen, self._seen + B, dtype=np.int64)
        self._seen += B
        keep = y < S
        if not keep.any():
            if c is not None:
                self._has_cold = True
            return
        if np.isinf(p[keep]).any():
            raise ValueError("logits: infinite values; the watch-time MAE needs finite logits")
        ranks = _ranks_np(p, y, n, r, self.seed, self.strict)[keep]
        err = np.abs(_expected_slot_np(p[keep], n[keep]) - y[keep])
        self._add(self._sums, ranks, err)
        self._n += int(ranks.size)
        if c is not None:
            self._has_cold = True
            ck = c[keep]
            if ck.any():
                self._add(self._cold, ranks[ck], err[ck])
                self._n_cold += int(ck.sum())

    def _add(self, sums, ranks, err):
        for key, v in _rank_sums(ranks, self.ks).items():
            sums[key] += v
        sums["MAE"] += float(err.sum())

    @property
    def rows(self) -> int:
        return self._n

    def result(self) -> dict:
        return {"metrics": _finish(self._sums, self._n, self.ks, with_mae=True),
                "cold": _finish(self._cold, self._n_cold, self.ks, with_mae=True) if self._has_cold else None}


# --------------------------------------------------------------------------------------------------------------
# position baselines

def _column(inter: dict, name: str) -> np.ndarray:
    if name not in inter:
        raise ValueError(f"prepared interactions: missing column {name!r} (have {sorted(inter)})")
    return np.asarray(inter[name])


def split_rows(prepared_interactions: dict, split: str) -> np.ndarray:
    """int64 row numbers of the interactions in ``split`` ("train", "dev", "test", "profile")."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split: expected one of {tuple(SPLIT_CODES)}, got {split!r}")
    return np.flatnonzero(_column(prepared_interactions, "split") == SPLIT_CODES[split]).astype(np.int64)


def fit_splits_for(split: str) -> tuple:
    """Split codes whose rows feed the baseline statistics when evaluating ``split``: train+dev for test,
    train only for dev (and for train, in-sample)."""
    if split == "test":
        return (0, 1)
    if split in ("dev", "train"):
        return (0,)
    raise ValueError(f"split: expected 'train', 'dev' or 'test', got {split!r}")


def _hazard_counts(group: np.ndarray, target: np.ndarray, n: np.ndarray, n_groups: int):
    """(leave, at_risk) int64 [G, 40]. A row is at risk at real slot i (i < N) if it reached it (target >= i);
    it leaves at i if target == i < N. A full watch (target == N) is censored at N."""
    last = np.minimum(target, n - 1)
    at = np.bincount(group * S + last, minlength=n_groups * S).reshape(n_groups, S)
    at = np.cumsum(at[:, ::-1], axis=1)[:, ::-1]
    m = target < n
    lv = np.bincount(group[m] * S + target[m], minlength=n_groups * S).reshape(n_groups, S)
    return lv, at


class PositionBaseline:
    """AllPosition / UserPosition / ItemPosition.

    Leave rate (empirical hazard, a Kaplan-Meier estimate with full watches censored at N): for real slot i,
    h_i = #(rows with target == i < N) / #(rows with N > i and target >= i), over the fitting rows (train+dev
    for test; profile rows are never used). A slot nobody reached globally gets h = 0.
    UserPosition / ItemPosition: per user / video, shrunk to the AllPosition hazard with ``prior_strength``
    pseudo-rows: h_g,i = (leave_g,i + a * h_i) / (at_risk_g,i + a); an unseen user/video (or a slot the group
    never reached, when a = 0) falls back to h_i.
    Per-row leave distribution for a row with N segments: P_i = h_i * prod_{j<i}(1 - h_j) for i < N, the
    completed pseudo-slot P_N = prod_{j<N}(1 - h_j) (N < 40); slots > N are impossible.
    Score (logit) = -log P_i (lowest = likeliest leave slot, so ascending sort ranks by decreasing P; its
    softmax(-score) is P itself, so the watch-time MAE of a baseline is |sum_i i P_i - y|); impossible slots
    score IMPOSSIBLE and rank last; P is floored at 1e-300.
    """

    IMPOSSIBLE = 1.0e4

    def __init__(self, kind: str, prior_strength: float = 5.0):
        if kind not in ("AllPosition", "UserPosition", "ItemPosition"):
            raise ValueError(f"kind: expected 'AllPosition', 'UserPosition' or 'ItemPosition', got {kind!r}")
        if not (prior_strength >= 0 and math.isfinite(prior_strength)):
            raise ValueError(f"prior_strength: expected a finite number >= 0, got {prior_strength!r}")
        self.kind = kind
        self.prior_strength = float(prior_strength)
        self.hazard_all = None
        self.hazard_group = None

    def _group_col(self):
        return {"UserPosition": "user_idx", "ItemPosition": "video_idx"}.get(self.kind)

    def fit(self, inter: dict, fit_rows: np.ndarray) -> "PositionBaseline":
        fit_rows = np.asarray(fit_rows, dtype=np.int64)
        y = _column(inter, "target").astype(np.int64)[fit_rows]
        n = _column(inter, "n_segments").astype(np.int64)[fit_rows]
        if fit_rows.size and (n.min() < 1 or n.max() > S or (y < 0).any() or (y > n).any()):
            raise ValueError("prepared interactions: target/n_segments out of range in the fitting rows "
                             "(expected 1 <= n_segments <= 40 and 0 <= target <= n_segments)")
        lv, at = _hazard_counts(np.zeros(fit_rows.size, dtype=np.int64), y, n, 1)
        self.hazard_all = np.divide(lv[0], at[0], out=np.zeros(S), where=at[0] > 0)
        col = self._group_col()
        if col is not None:
            g = _column(inter, col).astype(np.int64)
            if g.size and g.min() < 0:
                raise ValueError(f"prepared interactions: {col} must be non-negative")
            G = int(g.max()) + 1 if g.size else 0
            lv, at = _hazard_counts(g[fit_rows], y, n, G)
            a = self.prior_strength
            num = lv + a * self.hazard_all[None, :]
            den = at + a
            self.hazard_group = np.where(den > 0, num / np.where(den > 0, den, 1.0), self.hazard_all[None, :])
        return self

    def hazards(self, inter: dict, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        col = self._group_col()
        if col is None:
            return np.broadcast_to(self.hazard_all, (rows.size, S))
        g = _column(inter, col).astype(np.int64)[rows]
        H = np.broadcast_to(self.hazard_all, (rows.size, S)).copy()
        seen = g < self.hazard_group.shape[0]
        H[seen] = self.hazard_group[g[seen]]
        return H

    def leave_probabilities(self, inter: dict, rows: np.ndarray) -> np.ndarray:
        """float64 [R, 40]: P(leave at slot i | the row's N), slot N = completed; 0 for slots > N."""
        H = self.hazards(inter, rows)
        n = _column(inter, "n_segments").astype(np.int64)[np.asarray(rows, dtype=np.int64)]
        surv = np.ones_like(H)
        surv[:, 1:] = np.cumprod(1.0 - H[:, :-1], axis=1)
        slots = np.arange(S)[None, :]
        P = np.where(slots < n[:, None], H * surv, 0.0)
        full = n < S
        P[np.flatnonzero(full), n[full]] = surv[np.flatnonzero(full), n[full]]
        return P

    def scores(self, inter: dict, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        P = self.leave_probabilities(inter, rows)
        n = _column(inter, "n_segments").astype(np.int64)[rows]
        sc = -np.log(np.maximum(P, 1e-300))
        sc[np.arange(S)[None, :] > n[:, None]] = self.IMPOSSIBLE
        return sc


def baseline_scores(prepared_interactions: dict, rows: np.ndarray, kind: str, seed: int = 0,
                    prior_strength: float = 5.0, fit_splits: Sequence[int] = (0, 1)) -> np.ndarray:
    """float64 [len(rows), 40] scores of a baseline (lowest = likeliest leave slot) for the given rows.

    kind: "Random" (uniform scores, a function of (seed, row number, slot)), "AllPosition", "UserPosition",
    "ItemPosition" (see PositionBaseline; statistics from the rows whose split code is in ``fit_splits``,
    default train+dev; profile rows, code 3, are never targets). ``prepared_interactions`` is the dict of
    numpy columns of docs/internals.md (target, n_segments, split, user_idx, video_idx)."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise ValueError(f"rows: expected a 1-D integer array of row numbers, got shape {list(rows.shape)} "
                         f"dtype {rows.dtype}")
    rows = rows.astype(np.int64)
    n_total = len(_column(prepared_interactions, "target"))
    if rows.size and (rows.min() < 0 or rows.max() >= n_total):
        raise ValueError(f"rows: row numbers must lie in 0..{n_total - 1}")
    if kind == "Random":
        return random_uniform(seed, rows)
    if kind not in BASELINES:
        raise ValueError(f"kind: expected one of {BASELINES}, got {kind!r}")
    fit_splits = tuple(int(s) for s in fit_splits)
    if 3 in fit_splits:
        raise ValueError("fit_splits: profile rows (split 3) are history only, never targets")
    fit_rows = np.flatnonzero(np.isin(_column(prepared_interactions, "split"), fit_splits))
    model = PositionBaseline(kind, prior_strength).fit(prepared_interactions, fit_rows)
    return model.scores(prepared_interactions, rows)


def evaluate_baselines(prepared_interactions: dict, split: str = "test", seed: int = 0,
                       kinds: Iterable[str] = BASELINES, prior_strength: float = 5.0) -> Dict[str, dict]:
    """The baselines on one split of an interactions dict: {name: {"split","rows","metrics","cold","strict"}}."""
    inter = prepared_interactions
    rows = split_rows(inter, split)
    fit_rows = np.flatnonzero(np.isin(_column(inter, "split"), fit_splits_for(split)))
    y = _column(inter, "target").astype(np.int64)
    n = _column(inter, "n_segments").astype(np.int64)
    cold = np.asarray(inter["is_cold"]).astype(bool) if "is_cold" in inter else None
    if not (y[rows] < S).any():
        raise ValueError(f"split {split!r}: no rows to evaluate (empty split or only target == 40 rows)")
    out = {}
    for kind in kinds:
        if kind not in BASELINES:
            raise ValueError(f"kinds: expected names from {BASELINES}, got {kind!r}")
        model = None if kind == "Random" else PositionBaseline(kind, prior_strength).fit(inter, fit_rows)
        acc, acc_s = RankingAccumulator(seed, strict=False), RankingAccumulator(seed, strict=True)
        for a in range(0, rows.size, 4 * CHUNK):
            r = rows[a:a + 4 * CHUNK]
            sc = random_uniform(seed, r) if model is None else model.scores(inter, r)
            c = None if cold is None else cold[r]
            acc.update(sc, y[r], n[r], is_cold=c, row_ids=r)
            acc_s.update(sc, y[r], n[r], is_cold=c, row_ids=r)
        res = acc.result()
        out[kind] = {"split": split, "rows": res["metrics"]["rows"], "metrics": res["metrics"],
                     "cold": res["cold"], "strict": acc_s.result()["metrics"]}
    return out


def run_baselines(data_dir, split: str = "test", seed: int = 0, prior_strength: float = 5.0) -> Dict[str, dict]:
    """Load a prepared dataset and evaluate Random, AllPosition, UserPosition, ItemPosition on ``split``."""
    from segfast.data.prepared import load_prepared
    prepared = load_prepared(data_dir)
    return evaluate_baselines(prepared.interactions, split=split, seed=seed, prior_strength=prior_strength)


# --------------------------------------------------------------------------------------------------------------
# evaluating a trained run

def _scored_batches(model, prepared, split: str, batch_size: int, device, precision: str,
                    backend: Optional[str] = None, progress: bool = False):
    """Yield (logits float32 CPU tensor [B, 40], cpu columns {row, target, n_segments[, is_cold]}) of ``model``
    over the rows of ``split`` (target < 40), in the loader's order, under ``precision``'s autocast and, when
    given, ``backend`` (restored afterwards, as is the model's train/eval mode)."""
    import torch
    from segfast import ops
    from segfast import precision as sfprec
    from segfast.data.batches import make_loader

    sfprec.check_backend(precision, backend or getattr(getattr(model, "config", None), "backend", None)
                         or ops.get_backend())
    previous = ops.get_backend()
    if backend is not None:
        ops.set_backend(backend)
        if hasattr(model, "set_backend"):  # the model passes its own backend to every op
            model.set_backend(backend)
    was_training = getattr(model, "training", False)
    bar = None
    try:
        if hasattr(model, "eval"):
            model.eval()
        dev = torch.device(device)
        with torch.no_grad():
            mc = getattr(model, "config", None)
            feats = mc.uses_visual if mc is not None else None  # an ID model needs no feature gather
            mut = {"max_user_tokens": mc.max_user_tokens} if mc is not None else {}
            store = None
            if feats and hasattr(model, "set_feature_store"):  # features on the device (segfast.features)
                from segfast.features import FeatureStore
                store = FeatureStore(prepared.features, dev)
                model.set_feature_store(store)
            loader = make_loader(prepared, split, batch_size, shuffle=False, features=feats, exclude_full_40=True,
                                 feature_rows=store is not None and store.resident, **mut)
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(loader), desc=f"score {split}", unit="batch", dynamic_ncols=True)
            for batch in loader:
                cpu = {k: batch[k] for k in ("row", "target", "n_segments", "is_cold") if k in batch}
                if dev.type != "cpu":
                    batch = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                with sfprec.autocast(dev, precision):
                    logits = model.score(batch)
                yield logits.float().cpu(), cpu
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if backend is not None:
            ops.set_backend(previous)
        if was_training and hasattr(model, "train"):
            model.train()


def _check_split_and_batch(split: str, batch_size) -> None:
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split: expected 'train', 'dev' or 'test', got {split!r}")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")


def _split_to_score(data_dir, split: str, prepared=None) -> tuple:
    """(prepared, its interactions, the rows of ``split``); a split without a row to score is an error."""
    if prepared is None:
        from segfast.data.prepared import load_prepared
        prepared = load_prepared(data_dir)
    inter = prepared.interactions
    rows = split_rows(inter, split)
    if rows.size == 0 or not (np.asarray(inter["target"])[rows] < S).any():
        raise ValueError(f"split {split!r}: no rows to evaluate in {data_dir} "
                         f"({rows.size} rows, none with target < {S})")
    return prepared, inter, rows


def split_logits(data_dir, run_dir, split: str = "dev", which: str = "best", batch_size: int = 1024,
                 device="cpu", precision: Optional[str] = None, backend: Optional[str] = None, prepared=None,
                 progress: bool = False) -> dict:
    """The logits of checkpoint ``which`` of ``run_dir`` over the rows of ``split`` with target < 40:
    {"logits" float32 [R, 40], "target", "n_segments", "row" int64 [R], "precision"} (numpy, loader order)."""
    from segfast import precision as sfprec
    from segfast.checkpoint import check_compatible, load_run

    _check_split_and_batch(split, batch_size)
    precision = sfprec.resolve_precision(precision, device)
    prepared, inter, rows = _split_to_score(data_dir, split, prepared)
    model, meta = load_run(run_dir, which=which, device=device)
    check_compatible(meta, prepared)
    parts = {"logits": [], "target": [], "n_segments": [], "row": []}
    for logits, cpu in _scored_batches(model, prepared, split, int(batch_size), device, precision, backend,
                                       progress):
        parts["logits"].append(logits.numpy())
        for k in ("target", "n_segments", "row"):
            parts[k].append(np.asarray(cpu[k]).astype(np.int64))
    out = {k: (np.concatenate(v) if v else np.zeros((0, S) if k == "logits" else 0)) for k, v in parts.items()}
    out["precision"] = precision
    return out


def _calibration_section(cal, fitted_on_the_fly: bool, logits, target, n, item_scores, split: str) -> dict:
    """The "calibration" section of evaluate_run: reliability of the per-slot keep probabilities before
    (sigmoid of the raw logit) and after calibration, on the observed slots, and the watch-time MAEs."""
    from segfast import calibration as C

    labels, obs = C.keep_labels(target, n)
    keep = C.Calibrator.keep_probability(cal, logits, n)
    raw = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))
    before = C.reliability(raw[obs], labels[obs])
    after = C.reliability(keep[obs], labels[obs])
    e_cal = C.expected_watch_segments(keep, n)
    e_rs = _expected_slot_np(np.asarray(logits, dtype=np.float64), n)
    e_item = _expected_slot_np(item_scores, n)
    return {
        "calibrator": {"form": cal.form, "feature": cal.feature, "checkpoint": cal.checkpoint,
                       "fitted_on": cal.fitted_on,
                       "source": "fitted on dev now (not written: run segfast calibrate to store it)"
                       if fitted_on_the_fly else "calibration.json"},
        # evaluated on the rows the calibrator was fitted on (dev): in-sample, optimistic
        "in_sample": (cal.fitted_on or {}).get("split", "dev") == split,
        "slots": before["slots"], "observed_keep_rate": before["observed_keep_rate"], "bins": 15,
        "before": {"ece": before["ece"], "brier": before["brier"], "mean_predicted": before["mean_predicted"]},
        "after": {"ece": after["ece"], "brier": after["brier"], "mean_predicted": after["mean_predicted"]},
        "reliability": {"before": before["bins"], "after": after["bins"]},
        "watch_time_mae": {"calibrated": float(np.abs(e_cal - target).mean()),
                           "reciprocal_softmax": float(np.abs(e_rs - target).mean()),
                           "ItemPosition": float(np.abs(e_item - target).mean())},
    }


def evaluate_run(data_dir, run_dir, split: str = "test", batch_size: int = 1024, device="cpu", seed: int = 0,
                 backend: Optional[str] = None, prepared=None, precision: Optional[str] = None,
                 calibration: bool = True, plots=None, keep_logits: bool = False) -> dict:
    """Evaluate the best checkpoint of ``run_dir`` on ``split`` of the prepared dataset at ``data_dir``.

    Returns {"split","rows","metrics":{HR/NDCG, MAE, rows},"cold":{...},"strict":{...},"calibration":{...}}.
    Tie-breaks are seeded by (seed, interaction row number), so the result does not depend on batch_size.
    ``backend`` ("torch"/"triton") sets the segfast.ops default for the duration of the call. ``prepared`` may
    pass an already loaded dataset (data_dir is then ignored). ``precision``: "fp32" / "bf16" / "fp16" autocast
    of the model call (``segfast.precision``); None / "auto" = the device's default (bf16 on CUDA, fp32 on CPU),
    not the precision the run was trained with. The result records it under "precision".

    ``calibration`` (default on): the "calibration" section (segfast.calibration): ECE (15 equal-width bins)
    and Brier score of the per-slot keep probabilities on the observed slots, before (sigmoid of the raw
    logit) and after calibration, the observed keep rate, and the watch-time MAE of the calibrated expectation
    beside the reciprocal-softmax one and ItemPosition's. The run's calibration.json is used when it has one
    for the best checkpoint; otherwise a calibrator is fitted on dev now (the section says so) and nothing is
    written into the run. ``plots``: a directory to write reliability.png into (needs ``calibration``).
    ``keep_logits``: also return the scored rows as ``out["per_row"]`` = {"logits" float32 [R, 40], "target",
    "n_segments", "row" int64 [R]} (numpy, loader order; the arrays of :func:`split_logits`, from this same
    pass, so a caller that needs per-row values does not score the split twice)."""
    from segfast import precision as sfprec
    from segfast.checkpoint import check_compatible, load_run

    _check_split_and_batch(split, batch_size)
    if plots is not None and not calibration:
        raise ValueError("plots: the reliability diagram needs calibration=True")
    _check_seed(seed)
    precision = sfprec.resolve_precision(precision, device)
    prepared, inter, rows = _split_to_score(data_dir, split, prepared)

    model, meta = load_run(run_dir, which="best", device=device)
    check_compatible(meta, prepared)
    acc, acc_s = RankingAccumulator(seed, strict=False), RankingAccumulator(seed, strict=True)
    kept = {"logits": [], "target": [], "n_segments": [], "row": []}
    for logits, cpu in _scored_batches(model, prepared, split, int(batch_size), device, precision, backend):
        args = (logits, cpu["target"], cpu["n_segments"])
        kw = {"is_cold": cpu.get("is_cold"), "row_ids": cpu["row"]}
        acc.update(*args, **kw)
        acc_s.update(*args, **kw)
        if calibration or keep_logits:
            kept["logits"].append(logits.numpy())
            for k in ("target", "n_segments", "row"):
                kept[k].append(np.asarray(cpu[k]).astype(np.int64))
    res = acc.result()
    if res["metrics"]["rows"] == 0:
        raise ValueError(f"split {split!r}: the loader yielded no rows with target < {S}")
    out = {"split": split, "rows": res["metrics"]["rows"], "metrics": res["metrics"], "cold": res["cold"],
           "strict": acc_s.result()["metrics"], "precision": precision}
    ev = {k: np.concatenate(v) for k, v in kept.items()} if kept["logits"] else None
    if keep_logits:
        out["per_row"] = ev
    if calibration:
        from segfast import calibration as C

        try:
            cal, fly = C.load_calibrator(run_dir, "best"), False
        except C.CalibrationMissingError:  # (a corrupt calibration.json is an error, not refitted silently)
            d = split_logits(None, run_dir, "dev", which="best", batch_size=batch_size, device=device,
                             precision=precision, backend=backend, prepared=prepared)
            cal = C.fit_calibrator(d["logits"], d["target"], d["n_segments"],
                                   checkpoint=C.checkpoint_digest(run_dir, "best"))
            cal.fitted_on.update({"split": "dev", "precision": d["precision"]})
            fly = True
        item = PositionBaseline("ItemPosition").fit(inter, np.flatnonzero(np.isin(_column(inter, "split"),
                                                                                    fit_splits_for(split))))
        out["calibration"] = _calibration_section(cal, fly, ev["logits"], ev["target"], ev["n_segments"],
                                                  item.scores(inter, ev["row"]), split)
        if plots is not None:
            from segfast.plots import reliability_diagram

            out["calibration"]["plot"] = str(reliability_diagram(out["calibration"], Path(plots) / "reliability.png",
                                                                 title=f"{Path(run_dir).name}, {split} split"))
    return out


# --------------------------------------------------------------------------------------------------------------
# reporting

def format_table(results: Dict[str, dict], section: str = "metrics", digits: int = 4) -> str:
    """A Markdown table, methods x metrics, from {name: result} (results of evaluate_run / run_baselines, or
    bare metric dicts). ``section``: "metrics", "strict" or "cold". Missing values print as "-"."""
    if not isinstance(results, dict) or not results:
        raise ValueError("results: expected a non-empty dict {method name: result}")
    rows = []
    for name, res in results.items():
        if not isinstance(res, dict):
            raise ValueError(f"results[{name!r}]: expected a dict, got {type(res).__name__}")
        m = res.get(section) if section in res else (res if "HR@1" in res else None)
        rows.append((str(name), m or {}))
    cols = [c for c in TABLE_COLUMNS if any(c in m for _, m in rows)] + ["rows"]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        return f"{float(v):.{digits}f}"

    table = [["method"] + cols] + [[name] + [fmt(m.get(c)) for c in cols] for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols) + 1)]
    lines = []
    for j, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]])
                         + "|")
    return "\n".join(lines)


__all__ = ["ranking_metrics", "target_ranks", "watch_time_mae", "expected_leave_slot", "RankingAccumulator",
           "random_uniform", "split_rows", "fit_splits_for", "PositionBaseline", "baseline_scores",
           "evaluate_baselines", "run_baselines", "evaluate_run", "split_logits", "format_table", "BASELINES"]
