"""The command-line contract: every subcommand with --json prints exactly one JSON document on stdout (logs
and progress on stderr), one flag vocabulary with help text and defaults, and one-line errors with exit
code 2 for a device or backend this machine cannot run.

The every-subcommand test runs the real commands in-process on tiny synthetic data (stdout / stderr
captured at the file-descriptor level, so a stray print anywhere would break the JSON); the error-path
tests run ``python -m segfast`` in a subprocess to see the real exit code and stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segfast import __version__
from segfast.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def _run_json(capfd, *argv) -> dict:
    """Run ``segfast ARGV --json``; assert exit 0 and exactly one single-line JSON document on stdout."""
    capfd.readouterr()
    rc = main([*argv, "--json", "--threads", "1"])
    out, err = capfd.readouterr()
    assert rc == 0, f"segfast {' '.join(argv)}: exit {rc}\n{err[-2000:]}"
    assert out.endswith("\n") and out.count("\n") == 1, f"segfast {argv[0]}: stdout is not one line:\n{out[:2000]}"
    doc = json.loads(out)  # raises on anything but exactly one document
    assert isinstance(doc, dict) and doc, argv[0]
    assert "NaN" not in out and "Infinity" not in out  # strict JSON (non-finite values become null)
    return doc


def test_every_subcommand_json(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    covered = set()
    t = tmp_path

    # demo first: its data and run feed evaluate, baselines, score, segrec, thumbnails and edit
    doc = _run_json(capfd, "demo", "--quick", "--out", str(t / "demo"))
    covered.add("demo")
    assert {"Random", "ItemPosition", "ours"} <= set(doc["results"])
    data, run = t / "demo" / "data", t / "demo" / "run-full"

    doc = _run_json(capfd, "synth", "--format", "segmm", "--out", str(t / "raw"), "--users", "24", "--videos",
                    "300", "--interactions", "3600", "--feature-dim", "8")
    covered.add("synth")
    assert doc["rows"] == 3600 and doc["feature_dim"] == 8
    doc = _run_json(capfd, "prepare", "--source", "segmm", "--input", str(t / "raw"), "--feature-dim", "8",
                    "--out", str(t / "data"))
    covered.add("prepare")
    assert doc["counts"]["rows_kept"] > 0
    doc = _run_json(capfd, "train", "--data", str(t / "data"), "--out", str(t / "run"), "--max-steps", "3",
                    "--eval-every", "3", "--batch-size", "64", "--set", "max_user_tokens=8", "--set", "d_model=16",
                    "--set", "d_ff=16", "--device", "cpu")
    covered.add("train")
    assert doc["step"] == 3
    doc = _run_json(capfd, "experiment", "--data", str(t / "data"), "--out", str(t / "exp"), "--seeds", "1",
                    "--max-steps", "2", "--eval-every", "2", "--batch-size", "64", "--bootstrap", "50", "--set",
                    "max_user_tokens=8", "--set", "d_model=16", "--set", "d_ff=16", "--device", "cpu")
    covered.add("experiment")
    assert doc["seeds"] == [0] and set(doc["differences"]["all"]) == {"Random", "AllPosition", "UserPosition",
                                                                       "ItemPosition"}
    doc = _run_json(capfd, "experiment-compare", str(t / "exp"), str(t / "exp"), "--bootstrap", "50")
    covered.add("experiment-compare")
    assert doc["comparisons"][0]["all"]["HR@1"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}

    doc = _run_json(capfd, "calibrate", "--data", str(data), "--run-dir", str(run))
    covered.add("calibrate")
    assert doc["form"] and doc["checkpoint"]["which"] == "best" and (run / "calibration.json").is_file()
    doc = _run_json(capfd, "evaluate", "--data", str(data), "--run-dir", str(run), "--plots", str(t / "plots"))
    covered.add("evaluate")
    assert 0.0 <= doc["metrics"]["HR@1"] <= 1.0
    assert doc["calibration"]["calibrator"]["source"] == "calibration.json"
    assert (t / "plots" / "reliability.png").is_file()
    doc = _run_json(capfd, "baselines", "--data", str(data))
    covered.add("baselines")
    assert set(doc) == {"Random", "AllPosition", "UserPosition", "ItemPosition"}

    # pairs: 37 known pairs and 2 with an unknown user; tiny parts, so the old 2,000-character cut would bite
    from segfast.data.prepared import load_prepared

    prep = load_prepared(data)
    uids = np.asarray(prep.users["user_id"])
    vids = np.asarray(prep.videos["video_id"])
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.choice(uids, 37), [10**12, 10**12 + 1]]).astype(np.int64)
    v = np.concatenate([rng.choice(vids, 37), vids[:2]]).astype(np.int64)
    pairs = t / "pairs.parquet"
    pq.write_table(pa.table({"user_id": u, "video_id": v}), pairs)

    doc = _run_json(capfd, "score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs),
                    "--out", str(t / "scores"), "--part-rows", "2", "--on-unknown", "skip", "--batch-size", "8")
    covered.add("score")
    assert doc["n_parts"] == 20 and doc["complete"] and doc["rows_scored"] == 37 and doc["rows_rejected"] == 2
    assert len(json.dumps(doc)) > 2000  # long enough that a cut would have broken it
    doc = _run_json(capfd, "score", "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs),
                    "--out", str(t / "probs"), "--on-unknown", "skip", "--probabilities")
    assert doc["rows_scored"] == 37
    assert pq.read_table(t / "probs").column("keep_probability").type == pa.list_(pa.float32())
    doc = _run_json(capfd, "verify", str(t / "scores"))
    covered.add("verify")
    assert doc["ok"] and doc["kind"] == "scores" and not doc["problems"]

    # segrec without --quiet: its per-epoch log lines must go to stderr
    capfd.readouterr()
    doc = _run_json(capfd, "segrec", "--data", str(data), "--run-dir", str(run), "--seeds", "1", "--epochs", "1",
                    "--batch-size", "256")
    covered.add("segrec")
    assert 0.0 <= doc["metrics"]["AUC"]["mean"] <= 1.0

    for name, extra in (("thumbnails", []), ("edit", ["--threshold", "0.4"])):
        out = t / f"{name}.parquet"
        args = [name, "--run-dir", str(run), "--data", str(data), "--pairs", str(pairs), "--out", str(out),
                "--on-unknown", "skip", "--batch-size", "8", *extra]
        doc = _run_json(capfd, *args)
        covered.add(name)
        assert doc["pairs"] == 37 and doc["rejected"] == 2 and doc["batch_size"] == 8
        assert pq.read_table(out).num_rows == 37
        # an existing output is refused without --overwrite: one line on stderr, exit 2, nothing on stdout
        before = out.stat().st_mtime_ns
        rc = main(args + ["--json"])
        o, e = capfd.readouterr()
        assert rc == 2 and o == "" and "already exists" in e and "--overwrite" in e and e.count("\n") == 1
        assert out.stat().st_mtime_ns == before
        doc = _run_json(capfd, *args, "--overwrite")
        assert doc["pairs"] == 37
        # the error policy names the flag these commands now accept
        strict = [x for x in args if x not in ("--on-unknown", "skip")]
        rc = main(strict + ["--overwrite", "--quiet"])
        o, e = capfd.readouterr()
        assert rc == 2 and "--on-unknown skip" in e, e

    assert covered == set(_subcommands(build_parser())), "a subcommand is missing from this test"


def test_every_flag_has_help_and_shows_its_default():
    for name, sp in _subcommands(build_parser()).items():
        fmt = sp._get_formatter()
        for a in sp._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"segfast {name} {a.option_strings}: no help text"
            shown = fmt._get_help_string(a)
            if a.required:
                assert "required" in shown, (name, a.option_strings)
            elif a.default not in (None, False, []):
                assert "default" in shown, f"segfast {name} {a.option_strings}: default {a.default!r} not shown"
        text = sp.format_help()
        for alias in ("--interest-run", "--run "):
            assert alias not in text, f"segfast {name}: hidden alias {alias!r} shown in --help"


def test_run_dir_spelling_and_hidden_aliases():
    p = build_parser()
    assert p.parse_args(["evaluate", "--data", "d", "--run-dir", "r"]).run_dir == "r"
    assert p.parse_args(["evaluate", "--data", "d", "--run", "r"]).run_dir == "r"
    assert p.parse_args(["segrec", "--data", "d", "--interest-run", "r"]).run_dir == "r"
    for cmd in ("score", "thumbnails", "edit"):
        a = p.parse_args([cmd, "--run", "r", "--data", "d", "--pairs", "x", "--out", "o"])
        assert a.run_dir == "r" and a.device == "auto" and a.backend is None and a.on_unknown == "error"
    from segfast.ops import BACKENDS

    for cmd in ("train", "evaluate", "score", "thumbnails", "edit"):
        sp = _subcommands(p)[cmd]
        (b,) = [a for a in sp._actions if a.dest == "backend"]
        assert tuple(b.choices) == tuple(BACKENDS) and b.default is None
        (d,) = [a for a in sp._actions if a.dest == "device"]
        assert d.default == "auto"


def _cli(*argv, env=None, timeout=120):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    for k in [k for k, v in e.items() if v is None]:
        del e[k]
    return subprocess.run([sys.executable, "-m", "segfast", *argv], capture_output=True, text=True, cwd=str(REPO),
                          env=e, timeout=timeout)


def test_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"segfast {__version__}"


@pytest.mark.parametrize("flags,env,needle", [
    (["--device", "cuda"], {}, "--device cuda: CUDA is not available"),
    (["--device", "cuda:0"], {}, "CUDA is not available"),
    (["--device", "tpu"], {}, "expected auto, cpu, cuda or cuda:N"),
    (["--backend", "triton", "--device", "cpu"], {"TRITON_INTERPRET": None}, "--backend triton"),
    (["--backend", "triton"], {"TRITON_INTERPRET": None}, "need a CUDA device"),
])
def test_device_and_backend_errors_are_one_line_exit_2(tmp_path, flags, env, needle):
    import torch

    if torch.cuda.is_available() and "cuda" in " ".join(flags):
        pytest.skip("this machine has CUDA")
    if torch.cuda.is_available() and "triton" in flags and "cpu" not in flags:
        pytest.skip("this machine has CUDA")
    r = _cli("evaluate", "--data", str(tmp_path), "--run-dir", str(tmp_path), "--json", *flags, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = _cli("baselines", "--data", str(tmp_path / "missing"), "--json")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("segfast baselines: error:") and r.stderr.count("\n") == 1


def test_threads_flag_sets_torch_threads():
    import torch

    from segfast.cli import apply_runtime

    before = torch.get_num_threads()
    try:
        a = argparse.Namespace(threads=1, device="cpu", backend=None)
        apply_runtime(a)
        assert torch.get_num_threads() == 1 and a.device == "cpu"
        a = argparse.Namespace(threads=0)
        with pytest.raises(Exception, match="positive"):
            apply_runtime(a)
    finally:
        torch.set_num_threads(before)
