"""The `segfast` command line: thin wrappers over library functions (which the tests call directly)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_synth(a: argparse.Namespace) -> int:
    from segfast.data.synth import synth

    sizes = {k: getattr(a, k) for k in ("users", "videos", "interactions") if getattr(a, k) is not None}
    summary = synth(a.format, a.out, seed=a.seed, feature_dim=a.feature_dim, progress=not a.quiet, **sizes)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from segfast.data.prepared import prepare

    manifest = prepare(a.source, a.input, a.out, seed=a.seed, features_dir=a.features, log=a.log,
                       feature_dim=a.feature_dim, feature_dtype=a.feature_dtype, progress=not a.quiet,
                       overwrite=a.overwrite)
    print(json.dumps(manifest["counts"], indent=2))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from segfast.train import train_from_args

    result = train_from_args(a)
    print(json.dumps(result, indent=2, default=str))
    return 0


SECTIONS = (("metrics", "all rows, 40-slot protocol (SPEC 7)"), ("cold", "cold-video rows (no training row)"),
            ("strict", "strict variant: slots 0..N only"))


def _sections(results: dict) -> str:
    """The three Task-1 tables (all rows, cold-video rows, strict), each under a heading."""
    from segfast.evaluate import format_table

    return "\n\n".join(f"{title}:\n{format_table(results, section=key)}" for key, title in SECTIONS)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from segfast.evaluate import evaluate_run

    res = evaluate_run(a.data, a.run, split=a.split, batch_size=a.batch_size, device=a.device,
                       seed=a.seed, backend=a.backend)
    if a.json:
        print(json.dumps(res))
    else:
        print(_sections({"model": res}))
    return 0


def _cmd_baselines(a: argparse.Namespace) -> int:
    from segfast.evaluate import run_baselines

    res = run_baselines(a.data, split=a.split, seed=a.seed)
    if a.json:
        print(json.dumps(res))
    else:
        print(_sections(res))
    return 0


def _cmd_score(a: argparse.Namespace) -> int:
    from segfast.score import score_from_args

    manifest = score_from_args(a)
    print(json.dumps({k: manifest.get(k) for k in ("rows", "parts", "timing") if k in manifest}, default=str)[:2000])
    return 0


def _cmd_segrec(a: argparse.Namespace) -> int:
    from segfast.segrec.train import compare_weightings, format_results, run_segrec

    common = dict(seeds=a.seeds, epochs=a.epochs, batch_size=a.batch_size, device=a.device, progress=not a.quiet)
    if a.compare:
        res = compare_weightings(a.data, a.interest_run, a.backbone, ["segsum", "segadjust", "interest",
                                                                       "itemposition"], **common)
        print(json.dumps(res, default=str) if a.json else format_results(res))
        return 0
    res = run_segrec(a.data, a.interest_run, a.backbone, a.weights, **common)
    if a.json:
        print(json.dumps(res, default=str))
    else:
        for k in ("AUC", "F1", "LogLoss"):
            m = res["metrics"][k]
            p = res.get("ttest_vs_video", {}).get(k, {}).get("p")
            print(f"{k:8s} {m['mean']:.4f} ± {m['std']:.4f}" + (f"   p vs video {p:.3g}" if p is not None else ""))
    return 0


def _cmd_thumbnails(a: argparse.Namespace) -> int:
    from segfast.apps import thumbnails

    print(json.dumps(thumbnails(a.run, a.data, a.pairs, a.out, device=a.device), default=str))
    return 0


def _cmd_edit(a: argparse.Namespace) -> int:
    from segfast.apps import edit

    print(json.dumps(edit(a.run, a.data, a.pairs, a.out, threshold=a.threshold, device=a.device), default=str))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from segfast.demo import run_demo

    run_demo(a.out, seed=a.seed, quick=a.quick, ablations=a.ablations)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segfast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate synthetic data with planted segment interest, in a real source's files")
    s.add_argument("--format", choices=["segmm", "kuairand"], required=True)
    s.add_argument("--out", required=True)
    # defaults (None): synth's DEFAULT_* (the demo's size), resolved there so that building the parser stays light
    s.add_argument("--users", type=int, default=None, help="default: the demo's 100")
    s.add_argument("--videos", type=int, default=None, help="default: the demo's 1,500")
    s.add_argument("--interactions", type=int, default=None, help="default: the demo's 30,000")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--feature-dim", type=int, default=1024)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("prepare", help="filters, labels, splits, histories -> a prepared dataset")
    s.add_argument("--source", choices=["segmm", "segmm-sample", "kuairand"], required=True)
    s.add_argument("--input", required=True, help="segmm: release folder; kuairand: folder of logs; segmm-sample: the CSV")
    s.add_argument("--features", default=None, help="segmm: folder of the JSON map and feature memmap (default --input)")
    s.add_argument("--log", default=None, help="kuairand: log file name or glob (default log_standard_4_08_to_4_21_*.csv)")
    s.add_argument("--feature-dim", type=int, default=1024)
    s.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("train", help="train the segment interest model")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--modality", choices=["id", "visual", "both"], default="both")
    s.add_argument("--preset", choices=["small", "paper-code"], default="small")
    s.add_argument("--loss", choices=["bpr-max", "bpr-max-literal", "pairwise", "bce"], default=None)
    s.add_argument("--ablation", choices=["none", "cross-only", "self-only", "no-attention", "no-position"], default=None)
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--backend", choices=["torch", "triton"], default=None)
    s.add_argument("--eval-every", type=int, default=None)
    s.add_argument("--patience", type=int, default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any model/train config field, e.g. --set d_model=128")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_train)

    for name, fn, helptext in (("evaluate", _cmd_evaluate, "Task-1 metrics of a trained run"),):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--data", required=True)
        s.add_argument("--run", required=True)
        s.add_argument("--split", choices=["train", "dev", "test"], default="test")
        s.add_argument("--batch-size", type=int, default=1024)
        s.add_argument("--device", default="cpu")
        s.add_argument("--backend", choices=["torch", "triton"], default=None)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=fn)

    s = sub.add_parser("baselines", help="Random, AllPosition, UserPosition, ItemPosition under the same protocol")
    s.add_argument("--data", required=True)
    s.add_argument("--split", choices=["train", "dev", "test"], default="test")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_baselines)

    s = sub.add_parser("score", help="score (user, video) pairs from a Parquet file into Parquet parts (resumable)")
    from segfast.score import add_arguments as _score_args

    _score_args(s)
    s.set_defaults(func=_cmd_score)

    s = sub.add_parser("segrec", help="Task 2: segment-weighted video recommendation (SegRec)")
    s.add_argument("--data", required=True)
    s.add_argument("--interest-run", required=True, help="the frozen Task-1 run giving the segment weights")
    s.add_argument("--backbone", choices=["widedeep", "din"], default="widedeep")
    s.add_argument("--weights", choices=["interest", "video", "segsum", "segadjust", "itemposition"],
                   default="interest")
    s.add_argument("--compare", action="store_true", help="run every weighting against video")
    s.add_argument("--seeds", type=int, default=5)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=512)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_segrec)

    for name, fn, helptext in (("thumbnails", _cmd_thumbnails, "the highest-interest segment of each pair"),
                               ("edit", _cmd_edit, "the time ranges below an interest threshold, to skip")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--run", required=True)
        s.add_argument("--data", required=True)
        s.add_argument("--pairs", required=True)
        s.add_argument("--out", required=True, help="output Parquet file")
        s.add_argument("--device", default="cpu")
        if name == "edit":
            s.add_argument("--threshold", type=float, default=0.5, help="interest (sigmoid of the logit) below this")
        s.set_defaults(func=fn)

    s = sub.add_parser("demo", help="synth -> prepare -> train -> evaluate vs baselines, with plots")
    s.add_argument("--out", default="segfast_demo")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quick", action="store_true", help="a smaller run (for tests)")
    s.add_argument("--ablations", action="store_true", help="also train the no-position and no-attention ablations")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from segfast.data.sources import DataFormatError

    import os

    try:
        return int(args.func(args) or 0)
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        if os.environ.get("SEGFAST_DEBUG"):
            raise
        print(f"segfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
