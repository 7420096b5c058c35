"""Several training seeds of one configuration, evaluated like ``segfast evaluate``, against the position
baselines, with paired bootstrap confidence intervals (``segfast experiment``; docs/model.md, "Several seeds").

Layout of an experiment directory E
-----------------------------------
- ``E/seed-<k>``: the run trained with ``TrainConfig.seed = k`` (k = seed_start .. seed_start + N - 1), otherwise
  the configuration ``segfast train`` builds from the same options (``segfast.train.configs_from_args``), so a
  run made by ``segfast train --out E/seed-<k> --seed k`` with the same options is reused as it is; an
  unfinished one is resumed; a run of another configuration is refused with train's error.
- ``E/experiment.json`` (the whole result), ``E/experiment.md`` (Markdown tables, headed by the command that
  regenerates them), ``E/experiment.png`` (per-seed points and the baselines), ``E/experiment.npz`` (the per-row
  values, for ``segfast experiment-compare``). All written atomically (``segfast._io``).
- Nothing else: an E holding anything but these (and segfast's own hidden lock files and temporaries) is refused.

Evaluation
----------
Each seed's best checkpoint is evaluated on ``split`` by :func:`segfast.evaluate.evaluate_run` itself (batch
size 1024, tie-breaks seeded by (0, interaction row number), no calibration section), so its metrics are
``segfast evaluate``'s. The per-row values come from the logits of that same pass (``keep_logits``): HR@K and NDCG@K (K in ``DEFAULT_KS``) from :func:`~segfast.evaluate.target_ranks` and the
watch-time absolute error |E - y| from :func:`~segfast.evaluate.expected_leave_slot`, on rows with target < 40;
their means are the evaluated metrics (checked per seed: "per_row_max_dev", a warning on stderr above 1e-9).
The baselines (Random, AllPosition, UserPosition, ItemPosition; fitted on train+dev for test, as
``segfast baselines`` does) get per-row values on the same rows.

Statistics
----------
Per metric: mean, standard deviation (ddof=1; None for one seed), min, max and the per-seed values. Against each
baseline, the paired bootstrap over evaluation rows: the per-row difference d_r = (mean over seeds of the
model's value on row r) - (the baseline's value on row r); a resample draws R row positions with replacement
and its statistic is the mean of d over them (= seed-averaged model metric - baseline metric on the resample);
reported: the point difference (mean of d over all rows) and the 2.5 / 97.5 percentiles (numpy's linear
interpolation) of the statistic over the resamples. The cold subset is resampled within the cold rows.
Draws: resample b takes R doubles u from ``numpy.random.default_rng(bootstrap_seed)`` (resamples in order, each
R consecutive doubles), row position = min(floor(u * R), R - 1); the cold subset uses its own generator with the
same seed. All metrics and baselines share the resamples. For MAE lower is better: a negative difference
favours the model.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from segfast import _io
from segfast.evaluate import (BASELINES, DEFAULT_KS, S, TABLE_COLUMNS, PositionBaseline, evaluate_baselines,
                              expected_leave_slot, fit_splits_for, random_uniform, split_rows, target_ranks)

__all__ = ["run_experiment", "experiment_from_args", "compare_experiments", "paired_bootstrap", "bootstrap_stats",
           "per_row_values", "evaluate_rows", "baseline_rows", "format_markdown", "format_compare",
           "check_experiment_dir", "ExperimentError", "KIND", "EVAL_BATCH_SIZE", "TIE_SEED"]

KIND = "segfast-experiment"
FORMAT_VERSION = 1
EVAL_BATCH_SIZE = 1024  # segfast evaluate's default
TIE_SEED = 0  # segfast evaluate's / baselines' default tie-break seed (also the Random baseline's seed)
OWN_FILES = ("experiment.json", "experiment.md", "experiment.png", "experiment.npz")
PLOT_METRICS = ("HR@1", "NDCG@5")
_SEED_DIR = re.compile(r"^seed-(0|[1-9][0-9]*)$")
_HIDDEN_OK = re.compile(r"^\.(seed-(0|[1-9][0-9]*)|experiment\.(json|md|png|npz))\.")  # locks, temporaries


class ExperimentError(ValueError):
    """Bad experiment input or directory; the message says what was expected."""


def metric_names(ks=DEFAULT_KS) -> tuple:
    """The per-row metrics kept: HR@K, NDCG@K (K in ks; NDCG@1 == HR@1 is left out) and MAE, in table order."""
    names = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks if k > 1] + ["MAE"]
    return tuple([c for c in TABLE_COLUMNS if c in names] + [c for c in names if c not in TABLE_COLUMNS])


METRICS = metric_names()


# --------------------------------------------------------------------------------------------------------------
# per-row values

def per_row_values(ranks: np.ndarray, abs_err: np.ndarray, ks=DEFAULT_KS) -> Dict[str, np.ndarray]:
    """{metric: float64 [R]} from 1-based ranks and watch-time absolute errors of R rows (all kept rows)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size and ranks.min() < 1:
        raise ExperimentError("ranks: expected 1-based ranks of kept rows (target < 40)")
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = hit.astype(np.float64)
        if k > 1:
            out[f"NDCG@{k}"] = hit / np.log2(ranks + 1.0)
    out["MAE"] = np.asarray(abs_err, dtype=np.float64)
    return {m: out[m] for m in metric_names(ks)}


def _rows_values(scores, y, n, rows, seed: int = TIE_SEED) -> Dict[str, np.ndarray]:
    ranks = target_ranks(scores, y, n, seed=seed, row_ids=rows)
    err = np.abs(expected_leave_slot(scores, n) - y)
    return per_row_values(ranks, err)


def eval_rows(prepared, split: str) -> np.ndarray:
    """int64 ascending row numbers evaluated on ``split``: its rows with target < 40."""
    inter = prepared.interactions
    rows = split_rows(inter, split)
    rows = rows[np.asarray(inter["target"])[rows] < S]
    if rows.size == 0:
        raise ExperimentError(f"split {split!r}: no rows to evaluate (empty split or only target == {S} rows)")
    return rows


def evaluate_rows(prepared, run_dir, split: str = "test", device="cpu", backend: Optional[str] = None,
                  precision: Optional[str] = None, seed: int = TIE_SEED,
                  batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Evaluate the best checkpoint of ``run_dir`` with :func:`segfast.evaluate.evaluate_run` (the metrics of
    ``segfast evaluate``, without its calibration section) and keep per-row values computed from the logits of
    that same scoring pass (``keep_logits``). Returns {"result": evaluate_run's dict, "rows": int64 [R]
    ascending, "values": {metric: [R]}, "per_row_max_dev": max |mean of the per-row values - evaluate_run's
    metric| (0 up to float rounding: the per-row formulas against the accumulator's)}."""
    from segfast.evaluate import evaluate_run

    result = evaluate_run(None, run_dir, split=split, batch_size=batch_size, device=device, seed=seed,
                          backend=backend, prepared=prepared, precision=precision, calibration=False,
                          keep_logits=True)
    lg = result.pop("per_row")
    order = np.argsort(lg["row"], kind="stable")
    rows = np.asarray(lg["row"], dtype=np.int64)[order]
    values = _rows_values(np.asarray(lg["logits"])[order], np.asarray(lg["target"], dtype=np.int64)[order],
                          np.asarray(lg["n_segments"], dtype=np.int64)[order], rows, seed)
    dev = max(abs(float(values[m].mean()) - result["metrics"][m]) for m in values)
    return {"result": result, "rows": rows, "values": values, "per_row_max_dev": dev}


def baseline_rows(prepared, rows: np.ndarray, split: str = "test", seed: int = TIE_SEED,
                  prior_strength: float = 5.0) -> Dict[str, Dict[str, np.ndarray]]:
    """{baseline: {metric: [R]}} on ``rows`` (evaluation rows of ``split``), fitted as ``segfast baselines``."""
    inter = prepared.interactions
    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(inter["target"]).astype(np.int64)[rows]
    n = np.asarray(inter["n_segments"]).astype(np.int64)[rows]
    fit = np.flatnonzero(np.isin(np.asarray(inter["split"]), fit_splits_for(split)))
    out = {}
    for kind in BASELINES:
        if kind == "Random":
            sc = random_uniform(seed, rows)
        else:
            sc = PositionBaseline(kind, prior_strength).fit(inter, fit).scores(inter, rows)
        out[kind] = _rows_values(sc, y, n, rows, seed)
    return out


# --------------------------------------------------------------------------------------------------------------
# statistics

def _summary(per_seed: Sequence[Optional[float]]) -> dict:
    v = [float(x) for x in per_seed if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "values": list(per_seed)}
    a = np.asarray(v)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "values": [float(x) for x in v]}


def bootstrap_stats(diff: np.ndarray, n_resamples: int, seed: int, chunk_elems: int = 1 << 22) -> np.ndarray:
    """float64 [n_resamples, K]: the mean of ``diff`` ([K, R] or [R]) over each resample of the R row positions
    (draws as in the module docstring), computed in chunks of resamples as count-weighted sums."""
    d = np.atleast_2d(np.asarray(diff, dtype=np.float64))
    R = d.shape[1]
    if R == 0:
        raise ExperimentError("bootstrap: no rows to resample")
    if not isinstance(n_resamples, (int, np.integer)) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ExperimentError(f"bootstrap: expected a positive number of resamples, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    c = max(1, min(int(n_resamples), chunk_elems // R))
    out = np.empty((int(n_resamples), d.shape[0]))
    for a in range(0, int(n_resamples), c):
        m = min(c, int(n_resamples) - a)
        idx = np.minimum((rng.random((m, R)) * R).astype(np.int64), R - 1)
        counts = np.bincount((idx + (np.arange(m, dtype=np.int64) * R)[:, None]).ravel(), minlength=m * R)
        out[a:a + m] = (counts.reshape(m, R).astype(np.float64) @ d.T) / R
    return out


def paired_bootstrap(model_rows, baseline_rows_, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of mean(model) - mean(baseline) over rows. ``model_rows``: [R] or [seeds, R] (averaged
    over seeds first); ``baseline_rows_``: [R]. Returns {"diff", "lo", "hi", "rows", "resamples"}."""
    m = np.asarray(model_rows, dtype=np.float64)
    if m.ndim == 2:
        m = m.mean(axis=0)
    b = np.asarray(baseline_rows_, dtype=np.float64)
    if m.ndim != 1 or b.shape != m.shape:
        raise ExperimentError(f"paired bootstrap: expected per-row values of the same rows, got shapes "
                              f"{list(m.shape)} and {list(b.shape)}")
    d = m - b
    st = bootstrap_stats(d, n_resamples, seed)[:, 0]
    lo, hi = np.percentile(st, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "rows": int(d.size),
            "resamples": int(n_resamples)}


def _differences(model_avg: Dict[str, np.ndarray], others: Dict[str, Dict[str, np.ndarray]], mask,
                 n_resamples: int, seed: int) -> Optional[Dict[str, dict]]:
    """{other: {metric: {"diff","lo","hi"}}} of model - other on the rows selected by mask (shared resamples)."""
    if mask is not None and not mask.any():
        return None
    keys = [(o, met) for o in others for met in METRICS]
    D = np.stack([model_avg[met] - others[o][met] for o, met in keys])
    if mask is not None:
        D = D[:, mask]
    st = bootstrap_stats(D, n_resamples, seed)
    lo, hi = np.percentile(st, [2.5, 97.5], axis=0)
    point = D.mean(axis=1)
    out: Dict[str, dict] = {o: {} for o in others}
    for i, (o, met) in enumerate(keys):
        out[o][met] = {"diff": float(point[i]), "lo": float(lo[i]), "hi": float(hi[i])}
    return out


# --------------------------------------------------------------------------------------------------------------
# the experiment directory

def check_experiment_dir(out) -> None:
    """Refuse an E that holds anything but seed-<k> run directories and segfast's experiment.* files (plus its
    hidden lock files and temporaries), or whose experiment.json segfast did not write."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ExperimentError(f"--out {out}: exists and is not a directory; segfast experiment writes a "
                              "directory of seed-<k> runs and experiment.* files")
    foreign = []
    for p in sorted(out.iterdir()):
        name = p.name
        if _SEED_DIR.match(name):
            if not p.is_dir() or p.is_symlink():
                foreign.append(name)
        elif name in OWN_FILES:
            if not p.is_file() or p.is_symlink():
                foreign.append(name)
        elif not _HIDDEN_OK.match(name):
            foreign.append(name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExperimentError(f"--out {out}: holds {shown}, which segfast experiment did not write; it holds "
                              "only seed-<k> run directories and experiment.json/.md/.png/.npz: choose a new or "
                              "an experiment directory")
    js = out / "experiment.json"
    if js.is_file():
        import json
        try:
            doc = json.loads(js.read_text())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise ExperimentError(f"--out {out}: its experiment.json is not a segfast experiment result "
                                  f"(no \"kind\": \"{KIND}\"); segfast never overwrites what it did not write")


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    h = r.stdout.strip()
    return h if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", h) else None


def _git_dirty() -> Optional[bool]:
    """Whether the checkout's segfast/ differs from its HEAD (None when unknown)."""
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                            "segfast"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _fmt(v, digits=4, sign=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def run_experiment(data_dir, out_dir, model_config, train_config, seeds: int, seed_start: int = 0,
                   split: str = "test", n_bootstrap: int = 2000, bootstrap_seed: int = 0,
                   label: Optional[str] = None, progress: bool = True, max_steps: Optional[int] = None,
                   precision: Optional[str] = None, backend: Optional[str] = None,
                   command: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> dict:
    """Train (or reuse / resume) ``seeds`` runs E/seed-<k>, evaluate them and the baselines on ``split``, write
    E/experiment.{json,md,png,npz} and return the result (see the module docstring).

    ``model_config`` / ``train_config``: the configuration of every run; ``train_config.seed`` is replaced by k.
    ``backend``: the ops backend of the evaluation (None: the run's own). ``command``: the command line that
    regenerates the result (recorded, and named above every Markdown table); ``argv``: the exact arguments."""
    from segfast.checkpoint import data_fingerprint
    from segfast.data.prepared import load_prepared
    from segfast.train import train

    for name, v, lo in (("seeds", seeds, 1), ("seed_start", seed_start, 0), ("n_bootstrap", n_bootstrap, 1),
                        ("bootstrap_seed", bootstrap_seed, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ExperimentError(f"{name}: expected an integer >= {lo}, got {v!r}")
    if split not in ("train", "dev", "test"):
        raise ExperimentError(f"split: expected 'train', 'dev' or 'test', got {split!r}")
    from segfast import distributed as sfdist
    if sfdist.env_info().distributed:
        raise ExperimentError("segfast experiment runs in one process, not under torchrun (WORLD_SIZE > 1): train "
                              "the seeds with `torchrun ... -m segfast train --out E/seed-<k> --seed k [options]`, "
                              "then run segfast experiment with the same options in one process to reuse them")
    if label is not None and (not isinstance(label, str) or not label.strip() or "|" in label or "\n" in label):
        raise ExperimentError(f"label: expected a non-empty name without '|' or newlines (it names a Markdown "
                              f"table row), got {label!r}")
    out = Path(out_dir)
    check_experiment_dir(out)
    prepared = load_prepared(data_dir)
    rows = eval_rows(prepared, split)
    inter = prepared.interactions
    cold = (np.asarray(inter["is_cold"]).astype(bool)[rows] if "is_cold" in inter
            else np.zeros(rows.size, dtype=bool))
    data = data_fingerprint(prepared)
    label = label or "model"
    device = str(train_config.device)

    seed_list = list(range(int(seed_start), int(seed_start) + int(seeds)))
    per_seed, values = [], []
    out.mkdir(parents=True, exist_ok=True)
    from segfast._lock import output_lock
    for i, k in enumerate(seed_list):
        rd = out / f"seed-{k}"
        tc = dataclasses.replace(train_config, seed=k)
        status = "new"
        if (rd / "config.json").is_file():
            status = "resumed"
            try:
                import json
                if json.loads((rd / "metrics.json").read_text()).get("finished"):
                    status = "reused"
            except (OSError, ValueError, AttributeError):
                pass
        doing = {"new": "training a new run", "resumed": "resuming the run",
                 "reused": "a finished run, reused if its configuration matches"}[status]
        _log(progress, f"segfast experiment: seed {k} ({i + 1}/{len(seed_list)}): {rd}: {doing}")
        t0 = time.perf_counter()
        with output_lock(rd, "train"):
            summary = train(data_dir, rd, model_config, tc, progress=progress, max_steps=max_steps,
                            precision=precision)
        t1 = time.perf_counter()
        ev = evaluate_rows(prepared, rd, split=split, device=device, backend=backend, precision=precision)
        t2 = time.perf_counter()
        if not np.array_equal(ev["rows"], rows):
            raise ExperimentError(f"{rd}: the evaluated rows differ from split {split!r}'s rows with target < {S}")
        values.append(ev["values"])
        if ev["per_row_max_dev"] > 1e-9:
            _log(True, f"segfast experiment: warning: seed {k}: the per-row values average to within "
                       f"{ev['per_row_max_dev']:.2e} of segfast evaluate's metrics (the per-row formulas disagree "
                       "with the accumulator's); the CIs use the per-row values, the tables the metrics")
        res = ev["result"]
        per_seed.append({"seed": k, "run_dir": str(rd), "status": status, "stopped": summary.get("stopped"),
                         "step": summary.get("step"), "best_step": summary.get("best_step"),
                         "train_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3),
                         "per_row_max_dev": ev["per_row_max_dev"], "metrics": res["metrics"],
                         "cold": res["cold"], "strict": res["strict"], "precision": res["precision"]})
        m = res["metrics"]
        _log(progress, f"segfast experiment: seed {k} ({i + 1}/{len(seed_list)}) {status}: train {t1 - t0:.1f} s, "
                       f"eval {t2 - t1:.1f} s; {split} HR@1 {_fmt(m.get('HR@1'))} NDCG@5 {_fmt(m.get('NDCG@5'))}")

    base_vals = baseline_rows(prepared, rows, split)
    base_res = evaluate_baselines(inter, split=split, seed=TIE_SEED)
    model_stack = {met: np.stack([v[met] for v in values]) for met in METRICS}
    model_avg = {met: model_stack[met].mean(axis=0) for met in METRICS}

    summary = {"all": {}, "cold": {}}
    for met in METRICS:
        summary["all"][met] = _summary([s["metrics"].get(met) for s in per_seed])
        summary["cold"][met] = _summary([(s["cold"] or {}).get(met) for s in per_seed])
    baselines = {b: {"metrics": base_res[b]["metrics"], "cold": base_res[b]["cold"], "strict": base_res[b]["strict"]}
                 for b in BASELINES}
    diffs = {"all": _differences(model_avg, base_vals, None, n_bootstrap, bootstrap_seed),
             "cold": _differences(model_avg, base_vals, cold, n_bootstrap, bootstrap_seed)}
    from segfast import __version__
    from segfast.model.config import ModelConfig
    commit = _git_commit()
    mc_full = model_config.for_prepared(prepared) \
        if isinstance(model_config, ModelConfig) else model_config
    result = {
        "kind": KIND, "format_version": FORMAT_VERSION, "label": label, "command": command,
        "argv": None if argv is None else [str(x) for x in argv],
        "segfast_version": __version__, "git_commit": commit, "git_dirty": _git_dirty() if commit else None,
        "data": {"path": str(data_dir), **data}, "split": split, "rows": int(rows.size), "cold_rows": int(cold.sum()),
        "seeds": seed_list, "tie_break_seed": TIE_SEED, "eval_batch_size": EVAL_BATCH_SIZE,
        "bootstrap": {"resamples": int(n_bootstrap), "seed": int(bootstrap_seed), "interval": [2.5, 97.5],
                      "statistic": "seed-averaged model metric - baseline metric, paired over rows"},
        "model_config": mc_full.to_dict(), "train_config": {**train_config.to_dict(), "seed": None},  # seed: per run
        "max_steps": max_steps, "precision": precision,
        "metrics": METRICS, "summary": summary, "per_seed": per_seed, "baselines": baselines, "differences": diffs,
        "files": {n: str(out / n) for n in OWN_FILES},
    }
    arrays = {"rows": rows, "is_cold": cold, "seeds": np.asarray(seed_list, dtype=np.int64)}
    for met in METRICS:
        arrays[f"model/{met}"] = model_stack[met]
        for b in BASELINES:
            arrays[f"{b}/{met}"] = base_vals[b][met]
    _write_outputs(out, result, arrays)
    return result


def _write_outputs(out: Path, result: dict, arrays: dict) -> None:
    import json

    from segfast.cli import _jsonable

    def save_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _io.write_with(out / "experiment.npz", save_npz)
    _io.write_text(out / "experiment.md", format_markdown(result) + "\n")
    try:
        plot_experiment(result, out / "experiment.png")
    except ImportError:  # matplotlib missing: the numbers are still written
        result["files"].pop("experiment.png", None)
    _io.write_text(out / "experiment.json", json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------------------
# reporting

def regenerate_line(command: Optional[str], commit: Optional[str], dirty: bool = False) -> str:
    """The line that names how a table was made (the docs' convention, tests/test_doc_tables.py):
    ``Regenerate: `COMMAND` (measured at COMMIT[, where])``; without a known commit it says so instead."""
    cmd = command or "segfast experiment (command not recorded)"
    if not commit:
        return f"Regenerate: `{cmd}` (commit unknown: segfast was not run from a git checkout)"
    return f"Regenerate: `{cmd}` (measured at {commit[:12]}" + (", with uncommitted changes" if dirty else "") + ")"


def _regen(result: dict) -> str:
    return regenerate_line(result.get("command"), result.get("git_commit"), bool(result.get("git_dirty")))


def format_markdown(result: dict, digits: int = 4) -> str:
    """The Markdown report: metric tables (all rows, cold rows) with mean ± std over seeds and the baselines,
    and the differences with paired bootstrap CIs; each table has the Regenerate line of the docs' convention
    directly above it (so any of them can be pasted into the docs as it is)."""
    mets = list(result["metrics"])
    n = len(result["seeds"])
    bs = result["bootstrap"]
    regen = _regen(result)
    seeds = f"{n} seed{'s' if n != 1 else ''} ({result['seeds'][0]}..{result['seeds'][-1]})"
    lines = [f"# segfast experiment: {result['label']}", "",
             f"Task 1 on split {result['split']} of {result['data'].get('path')} ({result['rows']} rows, "
             f"{result['cold_rows']} cold; data sha256 {str(result['data'].get('content_sha256'))[:12]}), {seeds}, "
             f"segfast {result.get('segfast_version')}."]
    for sec, title in (("all", "All rows"), ("cold", "Cold-video rows")):
        if sec == "cold" and not result["cold_rows"]:
            lines += ["", f"{title}: none in this split."]
            continue
        lines += ["", f"{title} ({result['label']}: mean ± std over {seeds}, ddof=1):", "", regen, "",
                  "| model / baseline | " + " | ".join(mets) + " |", "|:--|" + "--:|" * len(mets)]
        cells = []
        for met in mets:
            sm = result["summary"][sec][met]
            cells.append(_fmt(sm["mean"], digits) + (f" ± {_fmt(sm['std'], digits)}" if sm["std"] is not None else ""))
        lines.append(f"| {result['label']} ({n} seed{'s' if n != 1 else ''}) | " + " | ".join(cells) + " |")
        for b, r in result["baselines"].items():
            m = r["metrics"] if sec == "all" else (r["cold"] or {})
            lines.append(f"| {b} | " + " | ".join(_fmt(m.get(met), digits) for met in mets) + " |")
    lines += ["", f"{result['label']} − baseline (seed-averaged), paired bootstrap 95% CI over rows "
                  f"({bs['resamples']} resamples, seed {bs['seed']}; cold: within the cold rows); for MAE lower is "
                  "better:", "", regen, "",
              "| baseline | rows | " + " | ".join(mets) + " |", "|:--|:--|" + "--:|" * len(mets)]
    for b in result["baselines"]:
        for sec in ("all", "cold"):
            d = (result["differences"].get(sec) or {}).get(b)
            if d is None:
                continue
            lines.append(f"| {b} | {sec} | " + " | ".join(_ci(d[met], digits) for met in mets) + " |")
    return "\n".join(lines)


def _ci(d: dict, digits: int) -> str:
    return f"{_fmt(d['diff'], digits, True)} [{_fmt(d['lo'], digits, True)}, {_fmt(d['hi'], digits, True)}]"


def plot_experiment(result: dict, out_png) -> str:
    """Per-seed points (and mean ± std) of the model and the baselines as labelled horizontal lines, for HR@1 and
    NDCG@5, all rows and cold rows. The y range fits the model and the position baselines; Random, usually far
    below, is named in the corner when it falls outside."""
    from segfast.plots import _plt, _save

    plt = _plt()
    secs = ["all"] + (["cold"] if result["cold_rows"] else [])
    fig, axes = plt.subplots(len(secs), len(PLOT_METRICS), figsize=(4.6 * len(PLOT_METRICS), 3.6 * len(secs)),
                             squeeze=False)
    colors = {"Random": "tab:gray", "AllPosition": "tab:green", "UserPosition": "tab:red",
              "ItemPosition": "tab:purple"}
    n = len(result["seeds"])
    for i, sec in enumerate(secs):
        for j, met in enumerate(PLOT_METRICS):
            ax = axes[i][j]
            sm = result["summary"][sec][met]
            vals = sm["values"]
            x = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
            ax.scatter(x, vals, color="tab:blue", zorder=3, label=f"{result['label']} (per seed)")
            span = list(vals)
            if sm["mean"] is not None:
                sd = sm["std"] or 0.0
                ax.errorbar([0.35], [sm["mean"]], yerr=[[sd], [sd]], fmt="D", color="black", capsize=4, zorder=3,
                            label="mean ± std")
                span += [sm["mean"] - sd, sm["mean"] + sd]
            lines = []
            for b, r in result["baselines"].items():
                v = (r["metrics"] if sec == "all" else (r["cold"] or {})).get(met)
                if v is not None:
                    lines.append((b, v))
                    if b != "Random":
                        span.append(v)
            if span:
                lo, hi = min(span), max(span)
                pad = max(0.15 * (hi - lo), 0.01)
                ax.set_ylim(lo - pad, hi + pad)
            ylo, yhi = ax.get_ylim()
            for b, v in lines:
                if ylo <= v <= yhi:
                    ax.axhline(v, color=colors.get(b, "tab:olive"), ls="--", lw=1.2, label=b)
                    ax.text(0.79, v, f" {b}", color=colors.get(b, "tab:olive"), fontsize=7, va="bottom", ha="right")
                else:
                    ax.text(0.02, 0.02 if v < ylo else 0.95, f"{b}: {v:.4f} ({'below' if v < ylo else 'above'})",
                            transform=ax.transAxes, fontsize=7, color=colors.get(b, "tab:olive"))
            ax.set_xlim(-0.6, 0.8)
            ax.set_xticks([])
            ax.set_title(f"{met}, {'all rows' if sec == 'all' else 'cold rows'} ({result['split']})")
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['label']}: {n} seed{'s' if n != 1 else ''} vs the position baselines", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------------------------
# comparing experiments

def _load(exp_dir) -> tuple:
    import json

    d = Path(exp_dir)
    try:
        doc = json.loads((d / "experiment.json").read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{d}: no readable experiment.json (run segfast experiment --out {d} first): "
                              f"{e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ExperimentError(f"{d}/experiment.json: not a segfast experiment result")
    try:
        with np.load(d / "experiment.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{d}: no readable experiment.npz (rerun segfast experiment): {e}") from None
    return doc, arrays


def compare_experiments(dirs: Sequence, n_resamples: int = 2000, bootstrap_seed: int = 0,
                        command: Optional[str] = None) -> dict:
    """Paired bootstrap of (seed-averaged) experiment i - experiment 0 for each i >= 1, on the same data and split
    (same rows): {"experiments": [...], "comparisons": [{"a", "b", "all": {metric: {...}}, "cold": ...}]}."""
    if len(dirs) < 2:
        raise ExperimentError(f"compare: expected at least two experiment directories, got {len(dirs)}")
    loaded = [_load(d) for d in dirs]
    ref_doc, ref_arr = loaded[0]
    exps = []
    for d, (doc, arr) in zip(dirs, loaded):
        exps.append({"dir": str(d), "label": doc.get("label"), "seeds": doc.get("seeds"), "split": doc.get("split"),
                     "command": doc.get("command"),
                     "summary": {sec: {m: doc["summary"][sec][m]["mean"] for m in METRICS if m in doc["summary"][sec]}
                                 for sec in ("all", "cold")}})
        for key, what in ((("data", "content_sha256"), "dataset content"), (("split",), "split")):
            a, b = ref_doc, doc
            for k in key:
                a, b = a.get(k), b.get(k)
            if a != b:
                raise ExperimentError(f"compare: {d} and {dirs[0]} differ in {what} ({b!r} vs {a!r}); a paired "
                                      "comparison needs the same rows")
        if not np.array_equal(arr["rows"], ref_arr["rows"]):
            raise ExperimentError(f"compare: {d} and {dirs[0]} evaluated different rows")
    # experiments of one label (e.g. the default "model") in different directories are named by their directory
    clash = {e["label"] for e in exps if len({x["dir"] for x in exps if x["label"] == e["label"]}) > 1}
    for e in exps:
        if e["label"] in clash:
            e["label"] = Path(e["dir"]).name if e["label"] in (None, "model") else f"{e['label']} ({Path(e['dir']).name})"
    cold = ref_arr["is_cold"].astype(bool)
    avg = [{m: arr[f"model/{m}"].mean(axis=0) for m in METRICS} for _, arr in loaded]
    comps = []
    for i in range(1, len(loaded)):
        other = {"b": avg[0]}
        comps.append({"a": exps[i]["label"], "b": exps[0]["label"], "a_dir": str(dirs[i]), "b_dir": str(dirs[0]),
                      "all": _differences(avg[i], other, None, n_resamples, bootstrap_seed)["b"],
                      "cold": (_differences(avg[i], other, cold, n_resamples, bootstrap_seed) or {}).get("b")})
    from segfast import __version__

    commit = _git_commit()
    return {"kind": "segfast-experiment-compare", "command": command, "segfast_version": __version__,
            "git_commit": commit, "git_dirty": _git_dirty() if commit else None,
            "experiments": exps, "comparisons": comps,
            "rows": int(cold.size), "cold_rows": int(cold.sum()),
            "bootstrap": {"resamples": int(n_resamples), "seed": int(bootstrap_seed), "interval": [2.5, 97.5],
                          "statistic": "seed-averaged metric of a - of b, paired over rows"}}


def format_compare(res: dict, digits: int = 4) -> str:
    """The differences of experiment-compare as a Markdown table, with its Regenerate line."""
    bs = res["bootstrap"]
    lines = [f"Differences a − b (seed-averaged), paired bootstrap 95% CI over {res['rows']} rows "
             f"({res['cold_rows']} cold; {bs['resamples']} resamples, seed {bs['seed']}; cold: within the cold "
             "rows); for MAE lower is better:", "",
             regenerate_line(res.get("command") or "segfast experiment-compare (command not recorded)",
                             res.get("git_commit"), bool(res.get("git_dirty"))), "",
             "| a − b | rows | " + " | ".join(METRICS) + " |", "|:--|:--|" + "--:|" * len(METRICS)]
    for c in res["comparisons"]:
        for sec in ("all", "cold"):
            if c[sec] is None:
                continue
            lines.append(f"| {c['a']} − {c['b']} | {sec} | " + " | ".join(_ci(c[sec][m], digits) for m in METRICS)
                         + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI glue

OUTPUT_ONLY = ("--json", "--quiet")  # flags that change what is printed, not the numbers


def _command(a) -> str:
    """The command line as given (``a.argv``, recorded by segfast.cli.main) less --json / --quiet."""
    argv = getattr(a, "argv", None)
    if not argv:
        argv = [a.command] + (["--data", str(a.data), "--out", str(a.out), "--seeds", str(a.seeds)]
                              if a.command == "experiment" else [str(d) for d in a.dirs])
    return "segfast " + shlex.join(str(x) for x in argv if x not in OUTPUT_ONLY)


def experiment_from_args(a) -> dict:
    """``segfast experiment``: the configs ``segfast train`` builds from the same options, then
    :func:`run_experiment`."""
    import argparse

    from segfast.train import configs_from_args

    for item in getattr(a, "set", None) or []:
        if item.partition("=")[0].strip().replace("-", "_") == "seed":
            raise ExperimentError(f"--set {item}: segfast experiment sets each run's seed itself "
                                  "(seed-<k> gets seed k); use --seed-start and --seeds")
    ns = argparse.Namespace(**vars(a))
    ns.seed = None  # the preset's seed; replaced by k for each run, as `segfast train --seed k` would
    mc, tc = configs_from_args(ns)
    return run_experiment(a.data, a.out, mc, tc, seeds=a.seeds, seed_start=a.seed_start, split=a.split,
                          n_bootstrap=a.bootstrap, bootstrap_seed=a.bootstrap_seed, label=a.label,
                          progress=not a.quiet, max_steps=a.max_steps, precision=a.precision, backend=a.backend,
                          command=_command(a), argv=getattr(a, "argv", None))


def compare_from_args(a) -> dict:
    return compare_experiments(a.dirs, n_resamples=a.bootstrap, bootstrap_seed=a.bootstrap_seed,
                               command=_command(a))
