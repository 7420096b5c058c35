"""segfast: segment-level user interest for short videos (SIGIR 2025), from raw logs to scored pairs.

Every subcommand follows one contract: with --json, stdout carries exactly one JSON document (the result);
progress bars and logs go to stderr, always; tables and summaries go to stdout only without --json. Bad
input, or a --device / --backend this machine cannot run, is one line on stderr and exit code 2; a full disk,
permission denied or another I/O error exit 3, a non-finite training loss 4, a CUDA error 5, Ctrl-C 130 and
SIGTERM 143, each with one line on stderr (segfast._errors; docs/internals.md "Exit codes").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["main", "build_parser", "add_score_arguments", "apply_runtime", "resolve_device", "UsageError"]


class UsageError(Exception):
    """An argument the machine or the command cannot honour; reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# help formatting, shared flags
# ----------------------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after every flag's help that has a meaningful default (not None / False,
    not already stated); required flags say so."""

    def _format_action_invocation(self, action):
        if action.option_strings and HIDDEN_ALIASES & set(action.option_strings):
            shown = [o for o in action.option_strings if o not in HIDDEN_ALIASES]
            action = argparse.Action(shown, action.dest, nargs=action.nargs, metavar=action.metavar)
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        h = action.help or ""
        if h is argparse.SUPPRESS or "%(default)" in h or "default:" in h:
            return h
        if action.required:
            return h + " (required)"
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or d == [] or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _parser(sub, name: str, helptext: str, parents=()) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=helptext, description=helptext, parents=list(parents),
                          formatter_class=_Formatter)


def _common_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output and threads")
    g.add_argument("--json", action="store_true",
                   help="print exactly one JSON document (the result) on stdout; everything else goes to stderr")
    g.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (torch.set_num_threads); on a loaded machine 1 is often fastest "
                        "(default: torch's own choice)")
    return p


def _backends() -> tuple:
    from segfast.ops import BACKENDS

    return tuple(BACKENDS)


def _add_device(p, backend: bool = True) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    if backend:
        g.add_argument("--backend", choices=_backends(), default=None,
                       help="segfast.ops backend of the model's hot ops (default: the run's / model's own)")
        g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                       help="autocast of the model's forward and loss (weights, optimizer state and loss stay "
                            "fp32; fp16 trains with loss scaling); default auto: bf16 on CUDA, fp32 on CPU "
                            "(train resumes with the run's own)")


HIDDEN_ALIASES = frozenset({"--run", "--interest-run"})  # old spellings of --run-dir: accepted, not shown


def _add_run_dir(p, what: str = "run directory (the --out of segfast train)", old=("--run",)) -> None:
    assert set(old) <= HIDDEN_ALIASES
    p.add_argument("--run-dir", *old, dest="run_dir", required=True, metavar="DIR", help=what)


def _add_train_options(p, seed: bool = True) -> None:
    """The model / training options of ``segfast train``, shared with ``segfast experiment`` (which sets the seed
    of each run itself, so it gets no --seed), then the execution flags."""
    p.add_argument("--modality", choices=["id", "visual", "both"], default="both", help="which representations")
    p.add_argument("--preset", choices=["small", "paper-code"], default="small",
                   help="model and training preset (docs/model.md)")
    p.add_argument("--loss", choices=["bpr-max", "bpr-max-literal", "pairwise", "bce"], default=None,
                   help="intra-video loss (default: the preset's)")
    p.add_argument("--ablation", choices=["none", "cross-only", "self-only", "no-attention", "no-position"],
                   default=None, help="model ablation (default: none)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    if seed:
        p.add_argument("--seed", type=int, default=None, help="training seed (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default: the preset's)")
    p.add_argument("--patience", type=int, default=None,
                   help="dev evaluations without improvement before stopping (default: the preset's)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this invocation (resumable; default: no limit)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any model/train config field, e.g. --set d_model=128 (repeatable)")
    _add_device(p)


def add_score_arguments(p, out_help: str = "output directory (Parquet parts + _manifest.json)",
                        part_rows: bool = True) -> None:
    """The scoring flags of ``segfast score`` (and of thumbnails / edit, which score through it)."""
    from segfast.scoring.common import DEFAULT_PART_ROWS, ON_UNKNOWN

    # --run-dir: under torchrun a bare --run is an ambiguous abbreviation of torchrun's own --run-path
    _add_run_dir(p)
    p.add_argument("--data", required=True, help="prepared dataset the run was trained on")
    p.add_argument("--pairs", required=True, help="Parquet file, directory of Parquet files or hive-partitioned "
                                                  "dataset with int64 user_id, video_id [, time_ms]")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--which", choices=["best", "last", "final"], default="best",
                   help="checkpoint of the run: best dev, last saved, or the exported model.safetensors")
    p.add_argument("--batch-size", type=int, default=None,
                   help="pairs per model call (default: 1024 on CPU, 8192 on GPU, capped by memory)")
    if part_rows:
        p.add_argument("--part-rows", type=int, default=DEFAULT_PART_ROWS,
                       help="input rows per output part (the unit of resumption and sharding)")
        p.add_argument("--keep-columns", default=None, metavar="A,B",
                       help="extra input columns to carry through to the output parts")
        p.add_argument("--probabilities", action="store_true",
                       help="add the calibrated columns keep_probability, survival, calibrated_watch_segments and "
                            "most_likely_leave (the run's calibrator: segfast calibrate; docs/scoring.md)")
        r = p.add_argument_group("Ray engine (--engine ray, needs the extra segfast[ray]; docs/scoring.md)")
        r.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this process (or torchrun ranks); ray: Ray Data actors, one model each")
        r.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="a running Ray cluster ('auto', 'ray://host:10001'); default: start a local one")
        r.add_argument("--actors", type=int, default=2, metavar="N", help="scoring actors (one model each)")
        r.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                       help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
        r.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                       help="CPUs per actor (also its torch threads); the read / write tasks need 0.25 each")
        r.add_argument("--ray-batch-rows", type=int, default=65_536, metavar="R",
                       help="rows per Ray block and per actor call (about one output part)")
    p.add_argument("--on-unknown", choices=list(ON_UNKNOWN), default="error",
                   help="pairs with a user or video the dataset does not know: refuse the input (error) or "
                        "leave them out and list them (skip)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that segfast wrote for this same command (nothing else)")
    p.add_argument("--no-prefetch", action="store_true", help="assemble batches in the main thread")
    from segfast.features import parse_bytes
    p.add_argument("--feature-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="budget for the device-resident feature table (e.g. 40G; 0 = gather on the host; default: "
                        "half the free GPU memory, or a quarter of the RAM up to 8G on CPU)")
    if not any(a.dest == "device" for a in p._actions):
        _add_device(p)
    if not any(a.dest == "quiet" for a in p._actions):  # python -m segfast.score builds its own parser
        p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads (default: torch's own choice)")


# ----------------------------------------------------------------------------------------------------
# device, backend, threads
# ----------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it (truthy strings), without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; "cpu", "cuda", "cuda:N" checked against this machine."""
    d = str(name).strip().lower()
    if d in ("cpu", "auto") or d == "cuda" or d.startswith("cuda:"):
        if d == "cpu":
            return d
        import torch

        have = torch.cuda.is_available()
        if d == "auto":
            return "cuda" if have else "cpu"
        if not have:
            raise UsageError(f"--device {name}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, no GPU visible); use --device cpu or auto")
        if d.startswith("cuda:"):
            idx = d.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise UsageError(f"--device {name}: expected cuda:N with 0 <= N < {torch.cuda.device_count()}")
        return d
    raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def apply_runtime(a: argparse.Namespace) -> None:
    """Resolve --device, check --backend against it, apply --threads (raises UsageError)."""
    threads = getattr(a, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: expected a positive integer")
        import torch

        torch.set_num_threads(int(threads))
    if getattr(a, "device", None) is not None:
        a.device = resolve_device(a.device)
    if getattr(a, "precision", "auto") not in (None, "auto"):  # "auto" is resolved where it is used
        from segfast.precision import PrecisionError, resolve_precision

        try:
            a.precision = resolve_precision(a.precision, getattr(a, "device", "cpu"))
        except PrecisionError as e:
            raise UsageError(f"--precision {a.precision}: {e}") from None
    if getattr(a, "backend", None) == "triton" and not str(getattr(a, "device", "cpu")).startswith("cuda") \
            and not _interpreting():
        raise UsageError("--backend triton: the Triton kernels need a CUDA device, and this run is on "
                         f"{getattr(a, 'device', 'cpu')} (use --backend torch, or TRITON_INTERPRET=1 to run "
                         "them, slowly, in Triton's interpreter)")


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, paths as strings, NaN / inf as null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    tolist = getattr(x, "tolist", None)  # numpy scalars / arrays, torch tensors
    if callable(tolist):
        return _jsonable(tolist())
    return str(x)


def _text(doc: Any) -> str:
    """A readable summary of a result dict (the output without --json)."""
    if not isinstance(doc, dict):
        return json.dumps(_jsonable(doc), indent=2)
    lines = []
    for k, v in doc.items():
        v = _jsonable(v)
        lines.append(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# subcommands: each returns (JSON document, text for stdout without --json)
# ----------------------------------------------------------------------------------------------------

def _cmd_synth(a):
    from segfast.data.synth import synth

    sizes = {k: getattr(a, k) for k in ("users", "videos", "interactions") if getattr(a, k) is not None}
    summary = synth(a.format, a.out, seed=a.seed, feature_dim=a.feature_dim, progress=not a.quiet, **sizes)
    return summary, _text(summary)


def _cmd_prepare(a):
    from segfast.data.prepared import prepare

    manifest = prepare(a.source, a.input, a.out, seed=a.seed, features_dir=a.features, log=a.log,
                       feature_dim=a.feature_dim, feature_dtype=a.feature_dtype, progress=not a.quiet,
                       overwrite=a.overwrite)
    return manifest, _text(dict(manifest["counts"], out=a.out))


def _cmd_train(a):
    from segfast.train import train_from_args

    result = train_from_args(a)
    return result, _text({k: v for k, v in result.items() if k not in ("model", "train")})


def _cmd_experiment(a):
    from segfast.experiment import experiment_from_args, format_markdown

    res = experiment_from_args(a)
    return res, format_markdown(res) + f"\n\nruns and experiment.json/.md/.png in {a.out}"


def _cmd_experiment_compare(a):
    from segfast.experiment import compare_from_args, format_compare

    res = compare_from_args(a)
    return res, format_compare(res)


SECTIONS = (("metrics", "all rows, 40-slot protocol (SPEC section 7)"), ("cold", "cold-video rows (no training row)"),
            ("strict", "strict variant: slots 0..N only"))


def _sections(results: dict) -> str:
    """The three Task-1 tables (all rows, cold-video rows, strict), each under a heading."""
    from segfast.evaluate import format_table

    return "\n\n".join(f"{title}:\n{format_table(results, section=key)}" for key, title in SECTIONS)


def _calibration_text(c: dict) -> str:
    """Two lines on the calibration section of evaluate (segfast.calibration)."""
    b, f, w = c["before"], c["after"], c["watch_time_mae"]
    return (f"calibration ({c['calibrator']['form']} on the {c['calibrator']['feature']} logit, "
            f"{c['calibrator']['source']}{'; in-sample: fitted on these rows' if c.get('in_sample') else ''}): "
            f"{c['slots']} observed slots, keep rate {c['observed_keep_rate']:.4f}; "
            f"ECE {b['ece']:.4f} -> {f['ece']:.4f}, Brier {b['brier']:.4f} -> {f['brier']:.4f} (sigmoid(logit) -> "
            f"calibrated)\nwatch-time MAE (segments): calibrated {w['calibrated']:.4f}, reciprocal-softmax "
            f"{w['reciprocal_softmax']:.4f}, ItemPosition {w['ItemPosition']:.4f}"
            + (f"\nreliability diagram: {c['plot']}" if c.get("plot") else ""))


def _cmd_evaluate(a):
    from segfast.evaluate import evaluate_run

    res = evaluate_run(a.data, a.run_dir, split=a.split, batch_size=a.batch_size, device=a.device,
                       seed=a.seed, backend=a.backend, precision=a.precision, plots=a.plots)
    text = _sections({"model": res})
    if res.get("calibration"):
        text += "\n\n" + _calibration_text(res["calibration"])
    return res, text


def _cmd_calibrate(a):
    from segfast.calibration import calibrate_from_args

    res = calibrate_from_args(a)
    if "forms" in res:  # --compare: a Markdown table
        lines = ["| form | feature | test ECE | test Brier | test log-loss | watch-time MAE |",
                 "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['form']} | {r['feature']} | {r['ece']:.4f} | {r['brier']:.4f} | {r['log_loss']:.4f} | "
                  f"{r['watch_time_mae']:.3f} |" for r in res["forms"]]
        return res, "\n".join(lines) + "\n\n(fitted on dev, measured on test; nothing written)"
    return res, _text(res)


def _cmd_baselines(a):
    from segfast.evaluate import run_baselines

    res = run_baselines(a.data, split=a.split, seed=a.seed)
    return res, _sections(res)


SCORE_SUMMARY = ("rows", "rows_scored", "rows_rejected", "n_parts", "complete", "backend", "device", "precision",
                 "effective_batch_size", "fast_path", "world_size", "rejected", "timing", "parts")


def _cmd_score(a):
    from segfast.scoring.command import score_from_args

    manifest = score_from_args(a)
    doc = {k: manifest.get(k) for k in SCORE_SUMMARY if k in manifest}
    doc["out"] = str(a.out)
    doc["manifest"] = str(Path(a.out) / "_manifest.json")
    return doc, _text({k: v for k, v in doc.items() if k not in ("timing", "parts")})


def _cmd_segrec(a):
    from segfast.segrec.train import compare_weightings, format_results, run_segrec

    common = dict(seeds=a.seeds, epochs=a.epochs, batch_size=a.batch_size, device=a.device, progress=not a.quiet)
    if a.compare:
        res = compare_weightings(a.data, a.run_dir, a.backbone, ["segsum", "segadjust", "interest",
                                                                  "itemposition"], **common)
        return res, format_results(res)
    res = run_segrec(a.data, a.run_dir, a.backbone, a.weights, **common)
    lines = []
    for k in ("AUC", "F1", "LogLoss"):
        m = res["metrics"][k]
        p = res.get("ttest_vs_video", {}).get(k, {}).get("p")
        std = m.get("std")
        std_s = f" ± {std:.4f}" if isinstance(std, float) and math.isfinite(std) else ""
        lines.append(f"{k:8s} {m['mean']:.4f}{std_s}" + (f"   p vs video {p:.3g}" if p is not None else ""))
    return res, "\n".join(lines)


def _app_scoring(a) -> dict:
    return dict(device=a.device, progress=not a.quiet, overwrite=a.overwrite, backend=a.backend,
                precision=a.precision,
                batch_size=a.batch_size, on_unknown=a.on_unknown, which=a.which, prefetch=not a.no_prefetch,
                feature_memory_bytes=a.feature_memory)


def _cmd_thumbnails(a):
    from segfast.apps import thumbnails

    res = thumbnails(a.run_dir, a.data, a.pairs, a.out, **_app_scoring(a))
    return res, _text(res)


def _cmd_edit(a):
    from segfast.apps import edit

    res = edit(a.run_dir, a.data, a.pairs, a.out, threshold=a.threshold, **_app_scoring(a))
    return res, _text(res)


def _cmd_verify(a):
    from segfast.verify import verify

    res = verify(a.dir)
    lines = [f"{res['path']}: {res['kind']}, {'OK' if res['ok'] else 'FAILED'} ({len(res['checked'])} checks passed)"]
    lines += [f"  problem: {x}" for x in res["problems"]] + [f"  note: {x}" for x in res["notes"]]
    return res, "\n".join(lines)


def _cmd_demo(a):
    from segfast.demo import run_demo

    kw = {} if a.threads is None else {"threads": a.threads}
    summary = run_demo(a.out, seed=a.seed, quick=a.quick, ablations=a.ablations, device=a.device,
                       progress=not a.quiet, **kw)
    from segfast.evaluate import format_table

    return summary, format_table(summary["results"]) + f"\n\nresults, plots and runs in {a.out}"


# ----------------------------------------------------------------------------------------------------
# the parser
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from segfast import __version__

    p = argparse.ArgumentParser(prog="segfast", description=__doc__, formatter_class=_Formatter,
                                epilog="`segfast COMMAND --help` lists a command's flags and their defaults.")
    p.add_argument("--version", action="version", version=f"segfast {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common_flags()]

    s = _parser(sub, "synth", "generate synthetic data with planted segment interest, in a real source's files",
                common)
    s.add_argument("--format", choices=["segmm", "kuairand"], required=True, help="which source's files to write")
    s.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    s.add_argument("--users", type=int, default=None, help="number of users (default: the demo's 100)")
    s.add_argument("--videos", type=int, default=None, help="number of videos (default: the demo's 1,500)")
    s.add_argument("--interactions", type=int, default=None,
                   help="number of interactions (default: the demo's 30,000)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--feature-dim", type=int, default=1024, help="segfast segment feature dimension (segmm)")
    s.set_defaults(func=_cmd_synth)

    s = _parser(sub, "prepare", "filters, labels, splits, histories -> a prepared dataset", common)
    s.add_argument("--source", choices=["segmm", "segmm-sample", "kuairand"], required=True, help="input format")
    s.add_argument("--input", required=True,
                   help="segmm: release folder; kuairand: folder of logs; segmm-sample: the CSV")
    s.add_argument("--features", default=None,
                   help="segmm: folder of the JSON map and feature memmap (default: --input)")
    s.add_argument("--log", default=None,
                   help="kuairand: log file name or glob (default: log_standard_4_08_to_4_21_*.csv)")
    s.add_argument("--feature-dim", type=int, default=1024, help="segment feature dimension of the source")
    s.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the prepared feature memmap")
    s.add_argument("--out", required=True, help="output folder of the prepared dataset")
    s.add_argument("--seed", type=int, default=0, help="seed of the random split keys and history samples")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing prepared dataset (only one segfast prepare wrote, holding nothing else)")
    s.set_defaults(func=_cmd_prepare)

    s = _parser(sub, "train", "train the segment interest model (resumable; DDP under torchrun)", common)
    s.add_argument("--data", required=True, help="prepared dataset (segfast prepare --out)")
    s.add_argument("--out", required=True, help="run directory; an unfinished run there is resumed")
    _add_train_options(s, seed=True)
    s.set_defaults(func=_cmd_train)

    s = _parser(sub, "experiment", "several training seeds of one config: mean ± std per metric, paired bootstrap "
                                   "CIs against the position baselines (Markdown, JSON, PNG)", common)
    s.add_argument("--data", required=True, help="prepared dataset (segfast prepare --out)")
    s.add_argument("--out", required=True, help="experiment directory: runs seed-<k> (finished ones reused, "
                                                "unfinished ones resumed) and experiment.json/.md/.png/.npz")
    s.add_argument("--seeds", type=int, required=True, metavar="N", help="number of training seeds")
    s.add_argument("--seed-start", type=int, default=0, metavar="K", help="first seed: runs seed-K .. seed-(K+N-1)")
    s.add_argument("--split", choices=["train", "dev", "test"], default="test", help="which split's targets")
    s.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap resamples of the rows")
    s.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    s.add_argument("--label", default="model", help="the model's name in the tables and the plot")
    _add_train_options(s, seed=False)
    s.set_defaults(func=_cmd_experiment)

    s = _parser(sub, "experiment-compare", "paired bootstrap CIs of the differences between finished experiments "
                                           "on the same data and split (each vs the first)", common)
    s.add_argument("dirs", nargs="+", metavar="DIR", help="experiment directories (segfast experiment --out); "
                                                         "each later one is compared with the first")
    s.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap resamples of the rows")
    s.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    s.set_defaults(func=_cmd_experiment_compare)

    s = _parser(sub, "evaluate", "Task-1 metrics (HR@K, NDCG@K, MAE; all, cold, strict) of a trained run", common)
    s.add_argument("--data", required=True, help="prepared dataset")
    _add_run_dir(s)
    s.add_argument("--split", choices=["train", "dev", "test"], default="test", help="which split's targets")
    s.add_argument("--batch-size", type=int, default=1024, help="rows per model call")
    s.add_argument("--seed", type=int, default=0, help="seed of the tie-breaks")
    s.add_argument("--plots", default=None, metavar="DIR",
                   help="write DIR/reliability.png: predicted vs observed keep rate, before / after calibration")
    _add_device(s)
    s.set_defaults(func=_cmd_evaluate)

    s = _parser(sub, "calibrate", "fit the run's calibrator on dev (keep probabilities per segment) into "
                                  "RUN/calibration.json", common)
    _add_run_dir(s)
    s.add_argument("--data", required=True, help="prepared dataset the run was trained on")
    s.add_argument("--which", choices=["best", "last", "final"], default="best",
                   help="checkpoint of the run to calibrate: best dev, last saved, or the exported model.safetensors")
    s.add_argument("--batch-size", type=int, default=1024, help="rows per model call")
    s.add_argument("--compare", action="store_true",
                   help="fit every form x feature on dev, print their test ECE / Brier / log-loss / watch-time MAE, "
                        "write nothing (docs/model.md, 'Calibrated interest')")
    _add_device(s)
    s.set_defaults(func=_cmd_calibrate)

    s = _parser(sub, "baselines", "Random, AllPosition, UserPosition, ItemPosition under the same protocol",
                common)
    s.add_argument("--data", required=True, help="prepared dataset")
    s.add_argument("--split", choices=["train", "dev", "test"], default="test", help="which split's targets")
    s.add_argument("--seed", type=int, default=0, help="seed of the tie-breaks and of Random")
    s.set_defaults(func=_cmd_baselines)

    s = _parser(sub, "score", "score (user, video) pairs from a Parquet file into Parquet parts (resumable; "
                              "sharded under torchrun)", common)
    _add_device(s)
    add_score_arguments(s)
    s.set_defaults(func=_cmd_score)

    s = _parser(sub, "segrec", "Task 2: segment-weighted video recommendation (SegRec)", common)
    s.add_argument("--data", required=True, help="prepared dataset")
    _add_run_dir(s, "the frozen Task-1 run giving the segment weights", old=("--run", "--interest-run"))
    s.add_argument("--backbone", choices=["widedeep", "din"], default="widedeep", help="recommender backbone")
    s.add_argument("--weights", choices=["interest", "video", "segsum", "segadjust", "itemposition"],
                   default="interest", help="segment weighting of the view labels")
    s.add_argument("--compare", action="store_true", help="run every weighting against video")
    s.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (mean, std, t-test vs video)")
    s.add_argument("--epochs", type=int, default=10, help="maximum epochs per seed (early stopping on dev AUC)")
    s.add_argument("--batch-size", type=int, default=512, help="training batch size")
    _add_device(s, backend=False)
    s.set_defaults(func=_cmd_segrec)

    for name, fn, helptext in (("thumbnails", _cmd_thumbnails, "the segment of each pair with the highest calibrated "
                                                                "keep probability"),
                               ("edit", _cmd_edit, "the time ranges whose calibrated keep probability is below a "
                                                   "threshold, to skip")):
        s = _parser(sub, name, helptext + " (scores the pairs like `segfast score --probabilities`; needs the run's "
                    "calibration.json: segfast calibrate)", common)
        _add_device(s)
        add_score_arguments(s, out_help="output Parquet file (one row per scored pair)", part_rows=False)
        if name == "edit":
            s.add_argument("--threshold", type=float, default=0.5,
                           help="skip the segments whose calibrated keep probability P(keep watching past the "
                                "segment | reached it) is below this (0.3: fewer than 30%% of the viewers who reach "
                                "it keep watching)")
        s.set_defaults(func=fn)

    s = _parser(sub, "verify", "check a prepared dataset, a run directory or a score output against its manifest "
                "(sizes, sha256); exit 0 when it matches, 1 when not", common)
    s.add_argument("dir", help="the directory to check (prepare --out, train --out or score --out)")
    s.set_defaults(func=_cmd_verify)

    s = _parser(sub, "demo", "synth -> prepare -> train -> evaluate vs baselines -> SegRec, with plots", common)
    s.add_argument("--out", default="segfast_demo", help="output folder")
    s.add_argument("--seed", type=int, default=0, help="seed of every step")
    s.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    s.add_argument("--ablations", action="store_true", help="also train the no-position and no-attention ablations")
    _add_device(s, backend=False)
    s.set_defaults(func=_cmd_demo)
    return p


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def _is_rank0() -> bool:
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


# commands that hold a lock on --out (segfast._lock)
LOCKED = ("prepare", "score", "train", "experiment", "thumbnails", "edit")


def _out_lock(a):
    """The advisory lock on ``--out`` of a writing command, held while it runs (a second writer: exit 2)."""
    if a.command not in LOCKED or not getattr(a, "out", None):
        return contextlib.nullcontext()
    from segfast._lock import output_lock

    return output_lock(a.out, a.command)


INPUTS = {"prepare": ("input", "features"), "train": ("data",), "experiment": ("data",),
          "score": ("data", "pairs", "run_dir"),
          "thumbnails": ("data", "pairs", "run_dir"), "edit": ("data", "pairs", "run_dir")}  # what --out may not touch


def _guard_out(a) -> None:
    """Refuse an --out that is, contains or lies inside one of the command's inputs (segfast._guard), before
    anything (the lock file included) is written; the --overwrite rules live with each writer."""
    if a.command not in INPUTS or not getattr(a, "out", None):
        return
    from segfast._guard import check_out_vs_inputs

    check_out_vs_inputs(a.out, {"--" + k.replace("_", "-"): getattr(a, k, None) for k in INPUTS[a.command]},
                        a.command)


def main(argv: Optional[list] = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:  # without building the parser (torch)
        from segfast import __version__

        print(f"segfast {__version__}")
        return 0
    parser = build_parser()
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given (segfast experiment records it)
    out = sys.stdout
    func: Callable = a.func
    sink = open(os.devnull, "w") if a.quiet else sys.stderr
    from segfast import _errors

    stack = contextlib.ExitStack()
    stack.enter_context(_errors.handle_sigterm())  # SIGTERM unwinds like Ctrl-C (temporaries removed)
    try:
        apply_runtime(a)
        _guard_out(a)
        with contextlib.redirect_stdout(sink), _out_lock(a):  # library logs never reach stdout
            doc, text = func(a)
    except UsageError as e:
        print(f"segfast {a.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError, KeyError) as e:
        if os.environ.get("SEGFAST_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"segfast {a.command}: error: {msg}", file=sys.stderr)
        return 2
    except BaseException as e:  # disk full, permission denied, non-finite loss, CUDA, Ctrl-C / SIGTERM
        known = _errors.classify(e, getattr(a, "out", None))
        if known is None or os.environ.get("SEGFAST_DEBUG"):
            raise  # a bug: the traceback
        print(f"segfast {a.command}: error: {known[1]}", file=sys.stderr)
        return known[0]
    finally:
        stack.close()
        if sink is not sys.stderr:
            sink.close()
    if _is_rank0():
        if a.json:
            out.write(json.dumps(_jsonable(doc), indent=None, allow_nan=False) + "\n")
        elif text:
            out.write(text.rstrip("\n") + "\n")
        out.flush()
    if a.command == "verify" and not doc.get("ok"):
        return 1  # checked, and it does not match its manifest
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
