"""One Markdown table from several finished `segfast experiment` directories (the docs' multi-config tables).

    python bench/experiment_table.py E/sample-vd0.1 E/sample-vd0.5 E/sample-vd0.9 [--vs ItemPosition UserPosition]
        [--metrics HR@1 NDCG@5] [--cold] [--vs-first] [--label-field video_id_dropout prior]

A row per experiment: its label (the model-config fields named by --label-field, as they differ from the
defaults, or the experiment's --label), mean ± std over its seeds per metric, then for every baseline named by
--vs the paired bootstrap 95% CI of (seed-averaged model - baseline) that `segfast experiment` computed (its
experiment.json; nothing is recomputed here) and, with --vs-first, the paired CI of each experiment minus the
first one (segfast.experiment.compare_experiments on their stored per-row values). Then one row per baseline. Every experiment must
be on the same data (content sha256) and split; the table's Regenerate line lists the commands recorded in the
experiment.json files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_METRICS = ("HR@1", "NDCG@5")
DEFAULT_VS = ("ItemPosition", "UserPosition")


def load(path: Path) -> dict:
    f = Path(path) / "experiment.json"
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{f}: no experiment.json (run `segfast experiment --out {path} ...` first)")
    except json.JSONDecodeError as e:
        raise SystemExit(f"{f}: not JSON ({e})")
    if doc.get("kind") != "segfast-experiment":
        raise SystemExit(f"{f}: not a segfast experiment result")
    return doc


def label_of(doc: dict, fields, varying=()) -> str:
    cfg = doc.get("model_config", {})
    parts = [f"{k}={cfg[k]}" for k in list(fields) + [f for f in varying if f not in fields] if k in cfg]
    if doc.get("label") and doc["label"] != "model":
        parts.insert(0, doc["label"])
    return ", ".join(parts) or "model"


def _fmt_ci(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def table(docs: list, metrics, vs, part: str, fields, vs_first=None) -> str:
    head = ["config", "seeds"] + [f"{m}" for m in metrics] + [f"{m} - {b} (95% CI)" for b in vs for m in metrics]
    if vs_first is not None:
        head += [f"{m} - first row (95% CI)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|:--|--:|" + "--:|" * (len(head) - 2)]
    # any other model-config field that differs between the experiments names the rows too (e.g. pos_init)
    keys = sorted({k for d in docs for k in d.get("model_config", {})})
    varying = [k for k in keys if len({repr(d.get("model_config", {}).get(k)) for d in docs}) > 1]
    for i, doc in enumerate(docs):
        s = doc["summary"][part]
        cells = [label_of(doc, fields, varying), str(len(doc["seeds"]))]
        cells += [f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" for m in metrics]
        for b in vs:
            if b not in doc["differences"][part]:
                raise SystemExit(f"baseline {b!r} not in the experiment (have {sorted(doc['differences'][part])})")
            cells += [_fmt_ci(doc["differences"][part][b][m]) for m in metrics]
        if vs_first is not None:
            cells += ["-" if i == 0 else _fmt_ci(vs_first[i - 1][part][m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    base = docs[0]["baselines"]
    for b in vs:
        vals = base[b]["metrics" if part == "all" else "cold"]
        cells = [b, "-"] + [f"{vals[m]:.4f}" for m in metrics]
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+", help="finished `segfast experiment --out` directories")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    p.add_argument("--vs", nargs="+", default=list(DEFAULT_VS), help="baselines to show CIs against")
    p.add_argument("--cold", action="store_true", help="the cold-video rows instead of all rows")
    p.add_argument("--vs-first", action="store_true",
                   help="also the paired bootstrap CI of each experiment minus the first one (segfast experiment-compare)")
    p.add_argument("--regenerate", default=None, metavar="CMD",
                   help="the command named on the Regenerate line (default: the experiments' own commands)")
    p.add_argument("--label-field", nargs="+", default=["video_id_dropout", "prior"],
                   help="model-config fields that name a row")
    a = p.parse_args(argv)
    docs = [load(Path(e)) for e in a.experiments]
    shas = {d["data"].get("content_sha256") if isinstance(d.get("data"), dict) else None for d in docs}
    splits = {d["split"] for d in docs}
    if len(shas) > 1 or len(splits) > 1:
        raise SystemExit(f"the experiments are on different data or splits ({len(shas)} datasets, splits {splits})")
    part = "cold" if a.cold else "all"
    d0 = docs[0]
    rows = d0["cold_rows"] if a.cold else d0["rows"]
    print(f"Test split, {rows} {'cold ' if a.cold else ''}rows; model: mean ± std over seeds; "
          f"CI: paired bootstrap over rows ({d0['bootstrap']['resamples']} resamples, seed {d0['bootstrap']['seed']}).")
    print()
    vs_first = None
    if a.vs_first and len(docs) > 1:
        from segfast.experiment import compare_experiments
        b = d0["bootstrap"]
        vs_first = compare_experiments(a.experiments, n_resamples=b["resamples"], bootstrap_seed=b["seed"])["comparisons"]
    print(table(docs, a.metrics, a.vs, part, a.label_field, vs_first))
    commits = sorted({(d.get("git_commit") or "?")[:12] + ("+dirty" if d.get("git_dirty") else "") for d in docs})
    print()
    if a.regenerate:
        cmds = f"`{a.regenerate}`"
    else:
        cmds = "; ".join(f"`{d['command']}`" for d in docs) + f"; `python bench/experiment_table.py " \
            f"{' '.join(a.experiments)}" + (" --cold" if a.cold else "") + (" --vs-first" if a.vs_first else "") + "`"
    print(f"Regenerate: {cmds} (measured at {', '.join(commits)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
