"""Calibrated interest (issue 16): per-segment keep probabilities fitted after training, and what follows from
them (survival curve, leave distribution, expected watch time, most likely leave segment).

The model is trained with a ranking loss (BPR-max), so its logits only order the slots of one video: the loss
does not change when a constant is added to a row's logits, and sigmoid(logit) is not a probability of
anything. A :class:`Calibrator`, fitted on the dev split of the run's own dataset, maps a slot's logit (with
the slot's position and the video's length) to

    keep_i = P(the user keeps watching past segment i | they reached segment i),

the complement of the hazard. Training labels come from the observed leave slot y of each dev row with N
segments: slots i < y are "kept" (1), slot y is "left" (0) when y < N, slots after y were never reached and
are not used (y == N is a full watch: every slot kept).

From keep (``[R, S]``, NaN on slots >= N), per row:

    S(0) = 1, S(i+1) = S(i) * keep_i            survival: P(still watching at the start of segment i), i <= N
    P(leave at i) = S(i) * (1 - keep_i), i < N;  P(N) = S(N)  (watched to the end)
    expected_watch_segments = sum_i i * P(leave at i)   (the unit of the target y: segments watched)
    most_likely_leave = argmax_i P(leave at i) over 0..N

Forms (``form``; the measurements that chose the default are in docs/model.md, "Calibrated interest"):

- ``"platt"``: one logistic map keep = sigmoid(a x + b) of the feature x;
- ``"platt-groups"``: one map per slot-position group (default groups 0, 1, 2, 3-5, 6-10, 11+), with the
  video length as a covariate: keep = sigmoid(a_g x + b_g + c_g log N);
- ``"isotonic-groups"``: a monotone non-decreasing step function of x per position group (pool adjacent
  violators on quantile-binned x, linear interpolation between the bin means, flat beyond).

and the feature x (``feature``):

- ``"raw"``: the logit p_i;
- ``"relative"``: p_i - max_{j <= M} p_j, the logit relative to the row's best candidate slot (M = min(N, 39),
  the completed pseudo-slot N included), which removes the row constant that BPR-max leaves free;
- ``"hazard"``: logit(1 - h_i) with h_i = e^{-p_i} / sum_{i <= j <= M} e^{-p_j}, the hazard the model's own
  leave distribution softmax(-p) implies (the same distribution as the reciprocal-softmax watch-time
  estimate, docs/spec.md section 7); x = p_i + log sum_{i < j <= M} e^{-p_j}.

Rows with y == 40 (a full watch of a 40-segment video) are excluded from training and evaluation (docs/spec.md
section 2), so for N == 40 the implied hazard of slot 39 is 1 (x = -50 after clipping) and keep_39, S(40) are
about 0: such videos are described given that the user left.

A calibrator belongs to one checkpoint: ``calibration.json`` in the run directory holds one entry per
checkpoint it was fitted for, keyed by the checkpoint's weights digest (the ``segfast_sha256`` tensor digest
in the safetensors metadata, or the file's sha256 when absent). ``best`` and the exported ``model.safetensors``
of a finished run hold the same weights, so one entry serves both. A calibrator of other weights is refused.
JSON only, never pickle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["CALIBRATION_FILE", "FORMAT", "VERSION", "FORMS", "FEATURES", "DEFAULT_GROUPS", "DEFAULT_FORM",
           "DEFAULT_FEATURE", "CalibrationError", "CalibrationMissingError", "Calibrator", "keep_labels", "survival",
           "leave_distribution", "expected_watch_segments", "most_likely_leave", "fit_calibrator", "reliability",
           "checkpoint_digest", "load_calibrator", "save_calibrator", "calibrate_run", "compare_forms",
           "calibrate_from_args"]

CALIBRATION_FILE = "calibration.json"
FORMAT = "segfast-calibration"
VERSION = 1
MAX_SLOTS = 40
FORMS = ("platt", "platt-groups", "isotonic-groups")
FEATURES = ("raw", "relative", "hazard")
DEFAULT_GROUPS = ((0, 1), (1, 2), (2, 3), (3, 6), (6, 11), (11, 40))  # [lo, hi) slot positions
DEFAULT_FORM = "platt-groups"
DEFAULT_FEATURE = "hazard"
_X_CLIP = 50.0  # features are clipped to +-50 (a hazard of 1 on the last slot of a 40-segment video: -inf)
_P_EPS = 1e-6  # isotonic levels are kept in [eps, 1 - eps]
_MIN_GROUP = 50  # observed slots a group needs for its own map (else the pooled map)
_ISO_BINS = 256


class CalibrationError(ValueError):
    """A missing, corrupt or mismatching calibration; the message names the file and what to run."""


class CalibrationMissingError(CalibrationError):
    """The run has no calibration for this checkpoint (no calibration.json, or none for these weights)."""


# --------------------------------------------------------------------------------------------------------------
# input handling

def _np(x, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            return x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - defensive
        raise TypeError(f"{name}: expected a numpy array or torch Tensor, got {type(x).__name__}") from e


def _check_n(n_segments, rows: Optional[int] = None) -> np.ndarray:
    n = _np(n_segments, "n_segments")
    if n.ndim != 1 or (rows is not None and n.shape[0] != rows):
        want = "[R]" if rows is None else f"[{rows}] (one per row)"
        raise ValueError(f"n_segments: expected shape {want}, got {list(n.shape)}")
    if not (np.issubdtype(n.dtype, np.integer) or n.size == 0):
        raise ValueError(f"n_segments: expected integers, got dtype {n.dtype}")
    n = n.astype(np.int64, copy=False)
    if n.size and (n.min() < 1 or n.max() > MAX_SLOTS):
        i = int(np.flatnonzero((n < 1) | (n > MAX_SLOTS))[0])
        raise ValueError(f"n_segments: expected values in 1..{MAX_SLOTS}, got {int(n[i])} in row {i}")
    return n


def _check_logits(logits, n_segments) -> tuple:
    """(float64 logits [R, S], int64 n [R]); every row needs its slots 0..min(N, 39) (the real slots and the
    completed pseudo-slot N), finite there."""
    p = _np(logits, "logits")
    if p.ndim != 2 or p.shape[1] > MAX_SLOTS or p.shape[1] < 1:
        raise ValueError(f"logits: expected shape [R, S] with 1 <= S <= {MAX_SLOTS}, got {list(p.shape)}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"logits: expected a float array, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    n = _check_n(n_segments, p.shape[0])
    if n.size:
        need = np.minimum(n + 1, MAX_SLOTS)
        if need.max() > p.shape[1]:
            i = int(np.flatnonzero(need > p.shape[1])[0])
            raise ValueError(f"logits: row {i} has n_segments {int(n[i])} and needs slots 0..{int(need[i]) - 1} "
                             f"(the real slots and the completed pseudo-slot), got only {p.shape[1]} slots")
        used = np.arange(p.shape[1])[None, :] < need[:, None]
        bad = used & ~np.isfinite(p)
        if bad.any():
            i = int(np.flatnonzero(bad.any(axis=1))[0])
            raise ValueError(f"logits: non-finite value in row {i} (slots 0..{int(need[i]) - 1} must be finite)")
    return p, n


def _check_keep(keep, n) -> tuple:
    k = _np(keep, "keep").astype(np.float64, copy=False)
    if k.ndim != 2 or k.shape[1] > MAX_SLOTS:
        raise ValueError(f"keep: expected shape [R, S] with S <= {MAX_SLOTS}, got {list(k.shape)}")
    n = _check_n(n, k.shape[0])
    if n.size and n.max() > k.shape[1]:
        i = int(np.argmax(n))
        raise ValueError(f"keep: row {i} has n_segments {int(n[i])} but keep has only {k.shape[1]} slots")
    real = np.arange(k.shape[1])[None, :] < n[:, None]
    kr = k[real]
    if kr.size and (np.isnan(kr).any() or kr.min() < 0 or kr.max() > 1):
        raise ValueError("keep: expected probabilities in [0, 1] on every real slot (i < n_segments)")
    return k, n, real


# --------------------------------------------------------------------------------------------------------------
# survival and what follows from it

def survival(keep, n) -> np.ndarray:
    """float64 [R, 41]: S(i) = P(still watching at the start of segment i); S(0) = 1, S(i+1) = S(i) keep_i for
    i < N, NaN for i > N."""
    k, n, real = _check_keep(keep, n)
    R = k.shape[0]
    kk = np.where(real, k, 1.0)
    out = np.ones((R, MAX_SLOTS + 1), dtype=np.float64)
    out[:, 1:k.shape[1] + 1] = np.cumprod(kk, axis=1)
    if k.shape[1] < MAX_SLOTS:
        out[:, k.shape[1] + 1:] = out[:, [k.shape[1]]]
    out[np.arange(MAX_SLOTS + 1)[None, :] > n[:, None]] = np.nan
    return out


def leave_distribution(keep, n, surv: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 [R, 41]: P(leave at i) = S(i) (1 - keep_i) for i < N, P(N) = S(N) (watched to the end), 0 beyond.
    ``surv``: :func:`survival` of the same (keep, n) when the caller has it already (the scorer does)."""
    k, n, real = _check_keep(keep, n)
    S = survival(k, n) if surv is None else surv
    R = k.shape[0]
    kp = np.zeros((R, MAX_SLOTS + 1))
    kp[:, :k.shape[1]] = np.where(real, k, 0.0)
    slots = np.arange(MAX_SLOTS + 1)[None, :]
    P = np.where(slots < n[:, None], np.nan_to_num(S) * (1.0 - kp), 0.0)
    P[np.arange(R), n] = S[np.arange(R), n]
    return P


def expected_watch_segments(keep, n) -> np.ndarray:
    """float64 [R]: sum_i i P(leave at i), segments watched (the unit of the target y and of the watch-time
    MAE in segfast.evaluate)."""
    P = leave_distribution(keep, n)
    return P @ np.arange(MAX_SLOTS + 1, dtype=np.float64)


def most_likely_leave(keep, n) -> np.ndarray:
    """int64 [R]: argmax of the leave distribution over 0..N (N: watched to the end); the first on ties."""
    return leave_distribution(keep, n).argmax(axis=1).astype(np.int64)


def keep_labels(target, n_segments) -> tuple:
    """(labels float64 [R, 40], observed bool [R, 40]) from the observed leave slots: slot i < y kept (1), slot
    y left (0) when y < N, slots after y (and >= N) not observed."""
    n = _check_n(n_segments)
    y = _np(target, "target")
    if y.ndim != 1 or y.shape[0] != n.shape[0]:
        raise ValueError(f"target: expected shape [{n.shape[0]}] (one per row), got {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise ValueError(f"target: expected integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and (y.min() < 0 or (y > n).any()):
        i = int(np.flatnonzero((y < 0) | (y > n))[0])
        raise ValueError(f"target: expected 0 <= target <= n_segments, got {int(y[i])} with n_segments "
                         f"{int(n[i])} in row {i}")
    slots = np.arange(MAX_SLOTS)[None, :]
    observed = (slots <= y[:, None]) & (slots < n[:, None])
    labels = (slots < y[:, None]).astype(np.float64)
    return labels, observed


# --------------------------------------------------------------------------------------------------------------
# features

def _features(p: np.ndarray, n: np.ndarray, feature: str) -> np.ndarray:
    """float64 [R, S] feature x per slot (checked logits); only slots < N are meaningful."""
    R, S = p.shape
    M = np.minimum(n, MAX_SLOTS - 1)
    cand = np.arange(S)[None, :] <= M[:, None]
    if feature == "raw":
        x = p.copy()
    elif feature == "relative":
        mx = np.where(cand, p, -np.inf).max(axis=1, keepdims=True) if R else np.zeros((0, 1))
        x = p - mx
    elif feature == "hazard":
        z = np.where(cand, -p, -np.inf)
        c = z.max(axis=1, keepdims=True) if R else np.zeros((0, 1))
        w = np.exp(z - c)  # 0 on non-candidates
        tail = np.cumsum(w[:, ::-1], axis=1)[:, ::-1] - w  # sum over j > i
        with np.errstate(divide="ignore"):
            x = p + np.log(tail) + c
    else:
        raise ValueError(f"feature: expected one of {FEATURES}, got {feature!r}")
    return np.clip(np.nan_to_num(x, nan=0.0, neginf=-_X_CLIP, posinf=_X_CLIP), -_X_CLIP, _X_CLIP)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _group_of(slots: np.ndarray, groups) -> np.ndarray:
    g = np.full(slots.shape, -1, dtype=np.int64)
    for k, (lo, hi) in enumerate(groups):
        g[(slots >= lo) & (slots < hi)] = k
    return g


def _check_groups(groups) -> tuple:
    try:
        gs = tuple((int(lo), int(hi)) for lo, hi in groups)
    except Exception:
        raise ValueError(f"groups: expected a list of [lo, hi) slot ranges, got {groups!r}") from None
    if not gs or gs[0][0] != 0 or gs[-1][1] != MAX_SLOTS or any(a[1] != b[0] for a, b in zip(gs, gs[1:])) \
            or any(lo >= hi for lo, hi in gs):
        raise ValueError(f"groups: expected contiguous [lo, hi) ranges covering slots 0..{MAX_SLOTS - 1}, "
                         f"got {[list(g) for g in gs]}")
    return gs


# --------------------------------------------------------------------------------------------------------------
# fitting primitives

def _logistic_fit(X: np.ndarray, t: np.ndarray, ridge: float = 1e-4, iters: int = 50) -> np.ndarray:
    """Weights of a logistic regression of labels t on the design X (Newton / IRLS with a small ridge, the
    intercept column included in the penalty at 1/100 strength)."""
    d = X.shape[1]
    w = np.zeros(d)
    lam = ridge * max(X.shape[0], 1) * np.ones(d)
    lam[-1] *= 0.01
    for _ in range(iters):
        z = X @ w
        q = _sigmoid(z)
        g = X.T @ (q - t) + lam * w
        h = (X * (q * (1 - q))[:, None]).T @ X + np.diag(lam)
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(h, g, rcond=None)[0]
        w = w - step
        if np.abs(step).max() < 1e-9:
            break
    return w


def _pava(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of y (pool adjacent violators)."""
    vals, wts, lens = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, l2 = vals.pop(), wts.pop(), lens.pop()
            v1, w1, l1 = vals.pop(), wts.pop(), lens.pop()
            ww = w1 + w2
            vals.append((v1 * w1 + v2 * w2) / ww if ww > 0 else 0.5 * (v1 + v2))
            wts.append(ww)
            lens.append(l1 + l2)
    return np.repeat(np.asarray(vals), lens)


def _isotonic_fit(x: np.ndarray, t: np.ndarray, bins: int = _ISO_BINS) -> tuple:
    """(knots x, levels) of a monotone non-decreasing fit of t on x, on quantile bins of x."""
    order = np.argsort(x, kind="stable")
    xs, ts = x[order], t[order]
    edges = np.unique(np.quantile(xs, np.linspace(0, 1, bins + 1))[1:-1]) if xs.size else np.zeros(0)
    idx = np.searchsorted(edges, xs, side="right")
    cnt = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    sx = np.bincount(idx, weights=xs, minlength=edges.size + 1)
    st = np.bincount(idx, weights=ts, minlength=edges.size + 1)
    keep = cnt > 0
    cnt, sx, st = cnt[keep], sx[keep], st[keep]
    kx = sx / cnt
    lv = _pava(st / cnt, cnt)
    lv = np.clip(lv, _P_EPS, 1 - _P_EPS)
    return kx, lv


# --------------------------------------------------------------------------------------------------------------
# the calibrator

class Calibrator:
    """A fitted map from logits to per-slot keep probabilities. Build it with :func:`fit_calibrator` or
    :meth:`from_dict`; ``keep_probability(logits, n_segments)`` applies it."""

    def __init__(self, form: str, feature: str, groups, params: list, checkpoint: Optional[dict] = None,
                 fitted_on: Optional[dict] = None):
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if feature not in FEATURES:
            raise ValueError(f"feature: expected one of {FEATURES}, got {feature!r}")
        self.form, self.feature = form, feature
        self.groups = ((0, MAX_SLOTS),) if form == "platt" else _check_groups(groups)
        if not isinstance(params, (list, tuple)) or len(params) != len(self.groups):
            raise ValueError(f"params: expected one entry per group ({len(self.groups)}), got "
                             f"{len(params) if isinstance(params, (list, tuple)) else type(params).__name__}")
        self.params = [self._check_param(p, k) for k, p in enumerate(params)]
        self.checkpoint = checkpoint
        self.fitted_on = fitted_on or {}

    def _check_param(self, p, k):
        where = f"params[{k}]"
        if self.form == "isotonic-groups":
            if not isinstance(p, dict) or "x" not in p or "p" not in p:
                raise ValueError(f"{where}: expected {{'x': [...], 'p': [...]}} (isotonic knots)")
            x = np.asarray(p["x"], dtype=np.float64)
            y = np.asarray(p["p"], dtype=np.float64)
            if x.ndim != 1 or x.shape != y.shape or x.size < 1 or not np.isfinite(x).all() \
                    or not np.isfinite(y).all() or (np.diff(x) < 0).any() or (np.diff(y) < -1e-12).any() \
                    or y.min() < 0 or y.max() > 1:
                raise ValueError(f"{where}: expected equal-length finite knots, x increasing, p non-decreasing "
                                 "in [0, 1]")
            return {"x": x, "p": y}
        w = np.asarray(p, dtype=np.float64) if isinstance(p, (list, tuple)) else None
        if w is None or w.shape != (3,) or not np.isfinite(w).all():
            raise ValueError(f"{where}: expected [a, b, c] (keep = sigmoid(a x + b + c log N)), finite, got {p!r}")
        return w

    # ---------------- applying
    def keep_probability(self, logits, n_segments) -> np.ndarray:
        """float64 [R, S]: P(keep watching past slot i | reached it) for i < N, NaN for slots >= N.
        ``logits`` [R, S <= 40] (numpy or torch; each row needs slots 0..min(N, 39)), ``n_segments`` [R]."""
        p, n = _check_logits(logits, n_segments)
        R, S = p.shape
        x = _features(p, n, self.feature)
        g = _group_of(np.arange(S), self.groups)  # the group of each slot position
        real = np.arange(S)[None, :] < n[:, None]
        if self.form == "isotonic-groups":
            out = np.full((R, S), np.nan)
            for k, par in enumerate(self.params):
                m = real & (g == k)[None, :]
                if m.any():
                    out[m] = np.interp(x[m], par["x"], par["p"])
            return out
        w = np.stack(self.params)[g]  # [S, 3]: a, b, c of each slot's group, all rows at once
        z = w[None, :, 0] * x + w[None, :, 1] + w[None, :, 2] * np.log(n.astype(np.float64))[:, None]
        return np.where(real, _sigmoid(z), np.nan)

    # ---------------- serialising
    def to_dict(self) -> dict:
        params = [{"x": p["x"].tolist(), "p": p["p"].tolist()} if isinstance(p, dict) else p.tolist()
                  for p in self.params]
        return {"format": FORMAT, "version": VERSION, "form": self.form, "feature": self.feature,
                "groups": [list(g) for g in self.groups], "params": params, "checkpoint": self.checkpoint,
                "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, d, where: str = "calibration") -> "Calibrator":
        if not isinstance(d, dict):
            raise CalibrationError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CalibrationError(f"{where}: not a segfast calibration (format {d.get('format')!r}, expected "
                                   f"{FORMAT!r})")
        if d.get("version") != VERSION:
            raise CalibrationError(f"{where}: calibration version {d.get('version')!r} is not supported (this "
                                   f"segfast reads version {VERSION}); refit it with segfast calibrate")
        ck = d.get("checkpoint")
        if ck is not None and (not isinstance(ck, dict) or not isinstance(ck.get("digest"), str)):
            raise CalibrationError(f"{where}: 'checkpoint' must be null or an object with a 'digest' string")
        try:
            return cls(d.get("form"), d.get("feature"), d.get("groups") or [], d.get("params"), checkpoint=ck,
                       fitted_on=d.get("fitted_on") if isinstance(d.get("fitted_on"), dict) else None)
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{where}: {e}") from None

    def describe(self) -> str:
        return f"{self.form} on the {self.feature} logit" + ("" if self.form == "platt" else
                                                               f", {len(self.groups)} position groups")

    def __repr__(self) -> str:
        dg = (self.checkpoint or {}).get("digest")
        return f"Calibrator({self.describe()}, checkpoint={dg[:12] if dg else None})"


def _observed(logits, target, n_segments) -> tuple:
    """(x-ready logits [R, S], n [R], labels, observed mask) with the labels cut to S slots."""
    p, n = _check_logits(logits, n_segments)
    labels, obs = keep_labels(target, n)
    S = p.shape[1]
    if obs[:, S:].any():
        raise ValueError(f"logits: {S} slots do not cover every observed slot (a target beyond slot {S - 1})")
    return p, n, labels[:, :S], obs[:, :S]


def fit_calibrator(logits, target, n_segments, form: str = DEFAULT_FORM, feature: str = DEFAULT_FEATURE,
                   groups: Sequence = DEFAULT_GROUPS, checkpoint: Optional[dict] = None,
                   max_slots_fit: int = 4_000_000, seed: int = 0) -> Calibrator:
    """Fit a :class:`Calibrator` on rows with observed leave slots (dev rows): slots i < y are kept (label
    1), slot y is left (0) when y < N, later slots are not used. ``form`` / ``feature`` / ``groups``: see the
    module docstring. At most ``max_slots_fit`` observed slots are used (a seeded subsample beyond)."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if feature not in FEATURES:
        raise ValueError(f"feature: expected one of {FEATURES}, got {feature!r}")
    groups = ((0, MAX_SLOTS),) if form == "platt" else _check_groups(groups)
    p, n, labels, obs = _observed(logits, target, n_segments)
    if not obs.any():
        raise ValueError("fit_calibrator: no observed slots (no rows, or every row has n_segments 0)")
    x = _features(p, n, feature)
    R, S = p.shape
    rr, ss = np.nonzero(obs)
    if rr.size > max_slots_fit:
        pick = np.sort(np.random.default_rng(seed).choice(rr.size, max_slots_fit, replace=False))
        rr, ss = rr[pick], ss[pick]
    xv, tv = x[rr, ss], labels[rr, ss]
    lv = np.log(n[rr].astype(np.float64))
    gv = _group_of(ss, groups)

    def platt(m, with_n):
        cols = [xv[m], lv[m], np.ones(int(m.sum()))] if with_n else [xv[m], np.ones(int(m.sum()))]
        w = _logistic_fit(np.stack(cols, axis=1), tv[m])
        return np.array([w[0], w[-1], w[1] if with_n else 0.0])

    params = []
    if form == "platt":
        params.append(platt(np.ones(xv.size, bool), False))
    elif form == "platt-groups":
        pooled = platt(np.ones(xv.size, bool), True)
        for k in range(len(groups)):
            m = gv == k
            ok = m.sum() >= _MIN_GROUP and 0 < tv[m].sum() < m.sum()
            params.append(platt(m, True) if ok else pooled.copy())
    else:
        pooled = _isotonic_fit(xv, tv)
        for k in range(len(groups)):
            m = gv == k
            kx, lvl = _isotonic_fit(xv[m], tv[m]) if m.sum() >= _MIN_GROUP else pooled
            params.append({"x": kx.tolist(), "p": lvl.tolist()})
    fitted_on = {"rows": int(R), "observed_slots": int(obs.sum()), "slots_used": int(rr.size),
                 "keep_rate": float(labels[obs].mean())}
    return Calibrator(form, feature, groups, [q.tolist() if isinstance(q, np.ndarray) else q for q in params],
                      checkpoint=checkpoint, fitted_on=fitted_on)


# --------------------------------------------------------------------------------------------------------------
# reliability

def reliability(pred, labels, bins: int = 15) -> dict:
    """ECE (``bins`` equal-width bins on [0, 1]), Brier score, and the per-bin table of predicted keep
    probabilities ``pred`` against 0/1 ``labels`` (flat arrays of observed slots)."""
    pr = np.asarray(pred, dtype=np.float64).ravel()
    lb = np.asarray(labels, dtype=np.float64).ravel()
    if pr.shape != lb.shape:
        raise ValueError(f"pred and labels: expected the same length, got {pr.size} and {lb.size}")
    if pr.size == 0:
        return {"ece": None, "brier": None, "slots": 0, "observed_keep_rate": None, "mean_predicted": None,
                "bins": []}
    if np.isnan(pr).any():
        raise ValueError("pred: NaN among the observed slots")
    b = np.minimum((pr * bins).astype(np.int64), bins - 1)
    cnt = np.bincount(b, minlength=bins)
    sp = np.bincount(b, weights=pr, minlength=bins)
    sl = np.bincount(b, weights=lb, minlength=bins)
    nz = cnt > 0
    ece = float(np.abs(sp[nz] - sl[nz]).sum() / pr.size)
    table = [{"lo": k / bins, "hi": (k + 1) / bins, "count": int(cnt[k]),
              "mean_predicted": float(sp[k] / cnt[k]) if cnt[k] else None,
              "observed_keep_rate": float(sl[k] / cnt[k]) if cnt[k] else None} for k in range(bins)]
    return {"ece": ece, "brier": float(((pr - lb) ** 2).mean()), "slots": int(pr.size),
            "observed_keep_rate": float(lb.mean()), "mean_predicted": float(pr.mean()), "bins": table}


# --------------------------------------------------------------------------------------------------------------
# run directories

def _weights_file(run_dir: Path, which: str) -> Path:
    from segfast.checkpoint import CheckpointError, state_dir

    if which not in ("best", "last", "final"):
        raise ValueError(f"which: expected 'best', 'last' or 'final', got {which!r}")
    if which != "final":
        d = state_dir(run_dir, which)
        if d is not None:
            return d / "model.safetensors"
    f = run_dir / "model.safetensors"
    if which in ("best", "final") and f.is_file():
        return f
    raise CheckpointError(f"{run_dir / which}: missing (no {which} checkpoint in this run)")


def checkpoint_digest(run_dir, which: str = "best") -> dict:
    """{"which", "digest", "weights"}: the weights digest of checkpoint ``which`` of ``run_dir`` (the
    safetensors ``segfast_sha256`` tensor digest, else the file's sha256)."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    f = _weights_file(run_dir, which)
    try:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            digest = (h.metadata() or {}).get("segfast_sha256")
    except Exception as e:  # noqa: BLE001 - a corrupt header
        from segfast.checkpoint import CheckpointError

        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    if digest is None:
        from segfast._fingerprint import sha256_file

        digest = "file:" + sha256_file(f)
    return {"which": which, "digest": digest, "weights": str(f.relative_to(run_dir))}


def _hint(run_dir, which: str) -> str:
    w = "" if which == "best" else f" --which {which}"
    return f"segfast calibrate --run-dir {run_dir} --data D{w}"


def _read_file(path: Path) -> list:
    """The entries of a calibration file (validated); CalibrationError naming the file when corrupt."""
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: unreadable calibration file ({e}); refit it with segfast calibrate "
                               f"--run-dir {path.parent} --data D") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT + "-file" or not isinstance(doc.get("entries"), list):
        raise CalibrationError(f"{path}: not a segfast calibration file (expected format {FORMAT + '-file'!r} with "
                               f"a list of entries); refit it with segfast calibrate --run-dir {path.parent} --data D")
    return [Calibrator.from_dict(e, where=f"{path} entry {k}") for k, e in enumerate(doc["entries"])]


def load_calibrator(run_dir, which: str = "best") -> Calibrator:
    """The calibrator of checkpoint ``which`` of ``run_dir`` (from RUN/calibration.json). A missing file, a
    corrupt one or one fitted for other weights is a :class:`CalibrationError` naming what to run."""
    run_dir = Path(run_dir)
    path = run_dir / CALIBRATION_FILE
    ck = checkpoint_digest(run_dir, which)
    if not path.is_file():
        raise CalibrationMissingError(f"{path}: missing (this run has no calibration); run `{_hint(run_dir, which)}` "
                               "(D: the prepared dataset the run was trained on)")
    entries = _read_file(path)
    for c in entries:
        if (c.checkpoint or {}).get("digest") == ck["digest"]:
            return c
    fitted = ", ".join(f"{(c.checkpoint or {}).get('which')} ({str((c.checkpoint or {}).get('digest'))[:12]})"
                       for c in entries) or "none"
    raise CalibrationMissingError(f"{path}: no calibration for the {which} checkpoint of this run (weights digest "
                           f"{ck['digest'][:12]}; the file holds: {fitted}, fitted for other weights); run "
                           f"`{_hint(run_dir, which)}`")


def save_calibrator(run_dir, cal: Calibrator) -> Path:
    """Add (or replace, same weights digest) ``cal`` in RUN/calibration.json, atomically; the entries of the
    run's other current checkpoints are kept (when the file is readable), those of weights no checkpoint of the
    run holds any more (a best/ replaced by further training) are dropped."""
    from segfast import _io

    run_dir = Path(run_dir)
    if not cal.checkpoint or not isinstance(cal.checkpoint.get("digest"), str):
        raise ValueError("save_calibrator: the calibrator names no checkpoint (fit it with checkpoint="
                         "checkpoint_digest(run_dir, which))")
    path = run_dir / CALIBRATION_FILE
    entries = []
    if path.is_file():
        try:
            current = set()
            for which in ("best", "last", "final"):
                try:
                    current.add(checkpoint_digest(run_dir, which)["digest"])
                except Exception:  # noqa: BLE001 - a checkpoint this run does not have
                    pass
            current.discard(cal.checkpoint["digest"])
            entries = [c for c in _read_file(path) if (c.checkpoint or {}).get("digest") in current]
        except CalibrationError:
            entries = []  # a corrupt file is replaced
    entries.append(cal)
    _io.write_json(path, {"format": FORMAT + "-file", "version": VERSION,
                          "entries": [c.to_dict() for c in entries]})
    return path


def calibrate_run(run_dir, data_dir, which: str = "best", device="cpu", batch_size: int = 1024,
                  progress: bool = False, form: str = DEFAULT_FORM, feature: str = DEFAULT_FEATURE,
                  precision: Optional[str] = None, prepared=None, write: bool = True) -> Calibrator:
    """Score the dev split of ``data_dir`` with checkpoint ``which`` of ``run_dir``, fit a calibrator on it and
    (``write``) store it in RUN/calibration.json atomically. Returns the calibrator."""
    from segfast.evaluate import split_logits

    run_dir = Path(run_dir)
    ck = checkpoint_digest(run_dir, which)
    out = split_logits(data_dir, run_dir, "dev", which=which, batch_size=batch_size, device=device,
                       precision=precision, prepared=prepared, progress=progress)
    cal = fit_calibrator(out["logits"], out["target"], out["n_segments"], form=form, feature=feature,
                         checkpoint=ck)
    cal.fitted_on.update({"split": "dev", "precision": out["precision"]})
    if write:
        save_calibrator(run_dir, cal)
    return cal


def compare_forms(dev: dict, test: dict, forms: Sequence = FORMS, features: Sequence = FEATURES) -> list:
    """Every ``form`` x ``feature`` fitted on ``dev`` and measured on ``test`` (each a dict with "logits",
    "target", "n_segments"): [{"form", "feature", "ece", "brier", "log_loss", "watch_time_mae"}], plus a first
    entry for sigmoid(raw logit) (form "none"). The measurement behind the default form (docs/model.md)."""
    labels, obs = keep_labels(test["target"], test["n_segments"])
    L = np.asarray(test["logits"], dtype=np.float64)
    y = np.asarray(test["target"], dtype=np.int64)
    n = np.asarray(test["n_segments"], dtype=np.int64)

    def row(form, feature, keep):
        r = reliability(keep[obs], labels[obs])
        pk = np.clip(keep[obs], 1e-6, 1 - 1e-6)
        ll = float(-np.mean(labels[obs] * np.log(pk) + (1 - labels[obs]) * np.log(1 - pk)))
        k = np.where(np.arange(keep.shape[1])[None, :] < n[:, None], keep, np.nan)
        mae = float(np.abs(expected_watch_segments(k, n) - y).mean())
        return {"form": form, "feature": feature, "ece": r["ece"], "brier": r["brier"], "log_loss": ll,
                "watch_time_mae": mae}

    out = [row("none", "sigmoid(raw)", _sigmoid(L))]
    for form in forms:
        for feature in features:
            cal = fit_calibrator(dev["logits"], dev["target"], dev["n_segments"], form=form, feature=feature)
            out.append(row(form, feature, cal.keep_probability(L, n)))
    return out


def calibrate_from_args(a) -> dict:
    """``segfast calibrate``: fit on dev, write RUN/calibration.json (under the run directory's lock, so never
    beside a training session writing the same run), report the dev fit."""
    from segfast._lock import output_lock

    if getattr(a, "compare", False):  # measure every form, write nothing
        from segfast.data.prepared import load_prepared
        from segfast.evaluate import split_logits

        prepared = load_prepared(a.data)
        kw = dict(which=a.which, batch_size=a.batch_size, device=a.device, prepared=prepared,
                  precision=getattr(a, "precision", None), progress=not a.quiet)
        rows = compare_forms(split_logits(None, a.run_dir, "dev", **kw), split_logits(None, a.run_dir, "test", **kw))
        return {"run_dir": str(a.run_dir), "which": a.which, "fitted_on": "dev", "measured_on": "test",
                "default": {"form": DEFAULT_FORM, "feature": DEFAULT_FEATURE}, "forms": rows}
    with output_lock(a.run_dir, "calibrate"):
        cal = calibrate_run(a.run_dir, a.data, which=a.which, device=a.device, batch_size=a.batch_size,
                            progress=not a.quiet, precision=getattr(a, "precision", None))
    return {"run_dir": str(a.run_dir), "file": str(Path(a.run_dir) / CALIBRATION_FILE), "which": a.which,
            "checkpoint": cal.checkpoint, "form": cal.form, "feature": cal.feature, "fitted_on": cal.fitted_on}
