"""Position-prior tables of the model's ``prior`` option (docs/model.md, "Position priors").

Every table is computed from the TRAINING split only (split code 0 of the prepared interactions; dev, test and
profile rows never feed it), so a prior never sees an evaluation row.

- ``hazard_global`` float [40]: the per-slot empirical leave hazard h_i, exactly the AllPosition estimator of
  :class:`segfast.evaluate.PositionBaseline` (Kaplan-Meier, full watches censored at N, a slot nobody reached
  gets 0).
- ``hazard_user`` float [n_users, 40]: the UserPosition estimator, shrunk toward ``hazard_global`` with
  ``prior_strength`` pseudo-rows; a user without training rows gets the global row.
- ``exposure`` float [40]: e_i = P(slot i reached | N > i), Laplace-smoothed: (#(target >= i and N > i) + 1) /
  (#(N > i) + 2) over the training rows; a slot no training video has (no row with N > i) gets 1.0 (neutral).

:func:`leave_log_prob` turns a row's hazards and N into the additive offset's raw value
-log(max(P_i, 1e-12)) (the model's convention: a LOW logit is a likely leave slot).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from segfast.evaluate import PositionBaseline, S, SPLIT_CODES, _column, _hazard_counts

__all__ = ["single_row_video_share", "PRIORS", "compute_priors", "hazard_tables", "exposure_table", "leave_log_prob", "P_FLOOR"]

PRIORS = ("none", "global", "user", "exposure")  # ModelConfig.prior
P_FLOOR = 1e-12  # leave probabilities and exposures are floored here before the log


def _train_rows(inter: dict) -> np.ndarray:
    rows = np.flatnonzero(_column(inter, "split") == SPLIT_CODES["train"]).astype(np.int64)
    if rows.size == 0:
        raise ValueError("position prior: the prepared data has no training rows (split code 0)")
    return rows


def single_row_video_share(inter: dict) -> float:
    """The share of training rows (split 0) whose video has exactly one training row (0.0 without training
    rows): what ``video_id_dropout="auto"`` is decided on (segfast.model.config.auto_video_id_dropout)."""
    rows = np.flatnonzero(_column(inter, "split") == SPLIT_CODES["train"])
    if rows.size == 0:
        return 0.0
    v = _column(inter, "video_idx").astype(np.int64)[rows]
    counts = np.bincount(v)
    return float((counts[v] == 1).mean())


def hazard_tables(inter: dict, n_users: int, prior_strength: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(hazard_global [40], hazard_user [n_users, 40]) float64 from the training rows of ``inter`` (the
    AllPosition / UserPosition estimators of PositionBaseline, fitted on split 0 only)."""
    rows = _train_rows(inter)
    base = PositionBaseline("UserPosition", prior_strength).fit(inter, rows)
    hu = base.hazard_group
    if hu.shape[0] > n_users:
        raise ValueError(f"position prior: user_idx reaches {hu.shape[0] - 1}, the model has {n_users} users")
    full = np.broadcast_to(base.hazard_all, (n_users, S)).copy()  # users after the last one seen: global
    full[:hu.shape[0]] = hu
    return base.hazard_all.copy(), full


def exposure_table(inter: dict) -> np.ndarray:
    """float64 [40]: e_i = P(target >= i | N > i) over the training rows, Laplace-smoothed:
    (#reached + 1) / (#(N > i) + 2), the posterior mean under a uniform prior (1.0 where no row has N > i).

    Never 0: with the raw rate a slot that long training videos have but no training row reached gets e = 0,
    a log-exposure of log(1e-12) = -27.6, and the logsigmoid form's loss saturates there: on the synthetic
    KuaiRand data every gradient was exactly 0 from the first step (docs/model.md, "Position priors")."""
    rows = _train_rows(inter)
    y = _column(inter, "target").astype(np.int64)[rows]
    n = _column(inter, "n_segments").astype(np.int64)[rows]
    if n.min() < 1 or n.max() > S or (y < 0).any() or (y > n).any():
        raise ValueError("prepared interactions: target/n_segments out of range in the training rows "
                         "(expected 1 <= n_segments <= 40 and 0 <= target <= n_segments)")
    # reached[i] = #(N > i and target >= i): a row counts for slots 0..min(target, N-1)
    _, reached = _hazard_counts(np.zeros(rows.size, dtype=np.int64), y, n, 1)
    has = np.bincount(n - 1, minlength=S)[::-1].cumsum()[::-1]  # #(N > i) = #(N - 1 >= i)
    return np.divide(reached[0] + 1.0, has + 2.0, out=np.ones(S), where=has > 0)


def compute_priors(inter: dict, prior: str, n_users: int, prior_strength: float = 5.0) -> np.ndarray:
    """The table the model's ``prior`` option keeps (``SegInterestModel.install_prior``): float32 [1, 40]
    (global hazards), [n_users, 40] (user hazards) or [40] (exposure)."""
    if prior == "global":  # (n_users is not needed: one row)
        return PositionBaseline("AllPosition").fit(inter, _train_rows(inter)).hazard_all[None, :].astype(np.float32)
    if prior == "user":
        if n_users < 1:
            raise ValueError("position prior 'user': the model has no users (n_users = 0)")
        return hazard_tables(inter, int(n_users), prior_strength)[1].astype(np.float32)
    if prior == "exposure":
        return exposure_table(inter).astype(np.float32)
    raise ValueError(f"prior: expected one of {PRIORS[1:]}, got {prior!r}")


def leave_log_prob(hazards: Tensor, n_segments: Tensor, s: int = S) -> Tensor:
    """float32 [B, s]: -log(max(P_i, 1e-12)) for the rows' hazards [B, 40] and N [B] (slots 0..s-1).

    P_i = h_i prod_{j<i}(1 - h_j) for i < N, P_N = prod_{j<N}(1 - h_j) (the completed pseudo-slot, N < 40),
    P_i = 0 for i > N (so those slots get -log(1e-12) = 27.6: ranked last, as PositionBaseline's impossible
    slots). Computed in float64 (as PositionBaseline) and rounded once."""
    h = hazards.to(torch.float64)
    b = h.shape[0]
    surv = torch.ones_like(h)
    surv[:, 1:] = torch.cumprod(1.0 - h[:, :-1], dim=1)
    slots = torch.arange(S, device=h.device)[None, :]
    n = n_segments.to(h.device).long()[:, None]
    P = torch.where(slots < n, h * surv, torch.where(slots == n, surv, torch.zeros((), dtype=h.dtype,
                                                                                       device=h.device)))
    out = -torch.log(P.clamp_min(P_FLOOR))
    return out[:, :s].to(torch.float32).reshape(b, s)

