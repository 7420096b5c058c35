"""segfast experiment: several seeds evaluated like segfast evaluate, the baselines on the same rows, and the paired
bootstrap (hand-computed cases, a slow loop with the same draws), reuse / resume of runs made by segfast train,
the output-directory rules, and experiment-compare."""
from __future__ import annotations

import json
import os
import re
import shlex

import numpy as np
import pytest

from _fakes import prepared_world
from segfast.cli import main
from segfast.evaluate import (RankingAccumulator, evaluate_baselines, evaluate_run, expected_leave_slot,
                              target_ranks)
from segfast.experiment import (METRICS, ExperimentError, bootstrap_stats, check_experiment_dir,
                                paired_bootstrap, per_row_values)

TINY = ["--modality", "id", "--batch-size", "64", "--set", "d_model=16", "--set", "d_ff=16", "--set",
        "max_user_tokens=8", "--set", "n_layers=1", "--device", "cpu"]


def _run(capfd, *argv, rc_expected=0):
    capfd.readouterr()
    rc = main([*argv, "--threads", "1"])
    out, err = capfd.readouterr()
    assert rc == rc_expected, f"exit {rc}\n{err[-3000:]}"
    return out, err


def _json(capfd, *argv):
    out, err = _run(capfd, *argv, "--json")
    assert out.count("\n") == 1, out[:2000]
    return json.loads(out), err


# ----------------------------------------------------------------------------------------------------------------
# the bootstrap


def _slow_bootstrap(d, n_resamples, seed):
    """The documented draws, one resample at a time: R doubles u, position min(floor(u * R), R - 1)."""
    rng = np.random.default_rng(seed)
    R = d.shape[0]
    stats = []
    for _ in range(n_resamples):
        u = rng.random(R)
        idx = np.minimum(np.floor(u * R).astype(np.int64), R - 1)
        stats.append(sum(d[i] for i in idx) / R)
    return np.array(stats)


def test_bootstrap_always_right_vs_always_wrong_and_identical():
    model = np.ones(37)
    base = np.zeros(37)
    r = paired_bootstrap(model, base, n_resamples=500, seed=3)
    assert (r["diff"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    r = paired_bootstrap(base, model, n_resamples=500, seed=3)
    assert (r["diff"], r["lo"], r["hi"]) == (-1.0, -1.0, -1.0)
    v = np.random.default_rng(0).random(50)
    r = paired_bootstrap(v, v.copy(), n_resamples=300, seed=1)
    assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
    r = paired_bootstrap(np.stack([v, v, v]), v, n_resamples=300, seed=1)  # seeds averaged first
    assert max(abs(r["diff"]), abs(r["lo"]), abs(r["hi"])) < 1e-15


def test_bootstrap_matches_a_slow_loop_and_does_not_depend_on_chunking():
    rng = np.random.default_rng(5)
    m, b = rng.random((3, 23)), (rng.random(23) < 0.4).astype(float)
    d = m.mean(axis=0) - b
    slow = _slow_bootstrap(d, 200, seed=11)
    for chunk in (23, 23 * 7, 1 << 22):  # one resample per chunk, 7 per chunk, all at once
        fast = bootstrap_stats(d, 200, 11, chunk_elems=chunk)[:, 0]
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    r = paired_bootstrap(m, b, n_resamples=200, seed=11)
    lo, hi = np.percentile(slow, [2.5, 97.5])
    assert r["diff"] == pytest.approx(d.mean(), abs=1e-15)
    assert r["lo"] == pytest.approx(lo, abs=1e-12) and r["hi"] == pytest.approx(hi, abs=1e-12)
    assert r["lo"] < r["diff"] < r["hi"]
    # several statistics share the resamples: row k of a stacked input is the bootstrap of that row alone
    both = bootstrap_stats(np.stack([d, 2 * d]), 200, 11)
    np.testing.assert_allclose(both[:, 1], 2 * slow, atol=1e-12)


def test_bootstrap_bad_input():
    with pytest.raises(ExperimentError, match="same rows"):
        paired_bootstrap(np.ones(4), np.ones(5))
    with pytest.raises(ExperimentError, match="positive number of resamples"):
        bootstrap_stats(np.ones(4), 0, 0)
    with pytest.raises(ExperimentError, match="no rows"):
        bootstrap_stats(np.ones((1, 0)), 10, 0)


def test_per_row_values_average_to_the_accumulator():
    rng = np.random.default_rng(2)
    B = 300
    p = rng.normal(size=(B, 40)).round(1)  # ties, so the seeded tie-break matters
    n = rng.integers(1, 41, B)
    y = np.minimum(rng.integers(0, 41, B), n)
    y[:5] = np.where(n[:5] == 40, 40, y[:5])
    rows = rng.permutation(10_000)[:B]
    acc = RankingAccumulator(0)
    acc.update(p, y, n, row_ids=rows)
    ref = acc.result()["metrics"]
    keep = y < 40
    ranks = target_ranks(p, y, n, seed=0, row_ids=rows)[keep]
    err = np.abs(expected_leave_slot(p[keep], n[keep]) - y[keep])
    vals = per_row_values(ranks, err)
    assert tuple(vals) == METRICS and ref["rows"] == keep.sum()
    for m in METRICS:
        assert vals[m].mean() == pytest.approx(ref[m], abs=1e-12), m


# ----------------------------------------------------------------------------------------------------------------
# the command

REGENERATE = re.compile(r"^Regenerate: `(?P<cmd>segfast [^`]+)` \(measured at (?P<commit>[0-9a-f]{7,40})")


def _check_regenerate_lines(md: str, command: str, n_tables: int) -> None:
    """The docs' convention (tests/test_doc_tables.py): each table has 'Regenerate: `COMMAND` (measured at
    COMMIT...)' one blank line above its header; COMMAND is this command and parses with the real CLI parser."""
    from segfast.cli import build_parser

    lines = md.splitlines()
    heads = [i for i, x in enumerate(lines) if x.startswith("| ") and i + 1 < len(lines)
             and lines[i + 1].startswith("|:--|")]
    assert len(heads) == n_tables, md
    for i in heads:
        assert lines[i - 1] == "", lines[i - 1]
        m = REGENERATE.match(lines[i - 2])
        if m is None:  # not run from a git checkout
            assert "commit unknown" in lines[i - 2], lines[i - 2]
            continue
        argv = shlex.split(m.group("cmd"))
        assert argv[1] == command and "--json" not in argv and "--quiet" not in argv
        assert build_parser().parse_args(argv[1:]).command == command


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    prepared_world(root)
    return root


@pytest.fixture(scope="module")
def exp1(world):
    """An experiment of 2 seeds (1 and 2), 4 steps each, run through the CLI with --json."""
    E = world / "E1"
    argv = ["experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "2", "--seed-start", "1",
            "--max-steps", "4", "--eval-every", "2", "--bootstrap", "400", "--label", "ours", *TINY]
    rc = main([*argv, "--json", "--quiet", "--threads", "1"])
    assert rc == 0
    return E, argv


def test_experiment_equals_evaluate_and_baselines(world, exp1, capfd):
    from segfast.data.prepared import load_prepared

    E, argv = exp1
    doc = json.loads((E / "experiment.json").read_text())
    assert doc["kind"] == "segfast-experiment" and doc["seeds"] == [1, 2] and doc["label"] == "ours"
    assert doc["command"].startswith("segfast experiment --data ") and "--seed-start 1" in doc["command"]
    prepared = load_prepared(world / "p")
    assert doc["data"]["content_sha256"] == prepared.content_fingerprint()
    for s in doc["per_seed"]:
        assert s["per_row_max_dev"] < 1e-12
        ev = evaluate_run(world / "p", E / f"seed-{s['seed']}", split="test", prepared=prepared)
        for sec in ("metrics", "cold", "strict"):
            assert s[sec] == ev[sec], (s["seed"], sec)  # exactly, through the same accumulator
        cfg = json.loads((E / f"seed-{s['seed']}" / "config.json").read_text())
        assert cfg["train"]["seed"] == s["seed"]
    base = evaluate_baselines(prepared.interactions, split="test", seed=0)
    for b, r in doc["baselines"].items():
        assert r["metrics"] == base[b]["metrics"] and r["cold"] == base[b]["cold"]
    # the per-row values average to the reported metrics; the summary is over the per-seed values
    z = np.load(E / "experiment.npz")
    cold = z["is_cold"]
    assert z["rows"].size == doc["rows"] == doc["per_seed"][0]["metrics"]["rows"] and cold.sum() == doc["cold_rows"]
    for m in METRICS:
        for i, s in enumerate(doc["per_seed"]):
            assert z[f"model/{m}"][i].mean() == pytest.approx(s["metrics"][m], abs=1e-12)
            if cold.any():
                assert z[f"model/{m}"][i][cold].mean() == pytest.approx(s["cold"][m], abs=1e-12)
        for b in doc["baselines"]:
            assert z[f"{b}/{m}"].mean() == pytest.approx(doc["baselines"][b]["metrics"][m], abs=1e-12)
        vals = [s["metrics"][m] for s in doc["per_seed"]]
        sm = doc["summary"]["all"][m]
        assert sm["values"] == vals and sm["mean"] == pytest.approx(np.mean(vals), abs=1e-15)
        assert sm["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-15)
        assert (sm["min"], sm["max"]) == (min(vals), max(vals))
        d = doc["differences"]["all"]["UserPosition"][m]
        ref = paired_bootstrap(z[f"model/{m}"], z[f"UserPosition/{m}"], n_resamples=400, seed=0)
        assert d["diff"] == pytest.approx(ref["diff"], abs=1e-12)
        assert (d["lo"], d["hi"]) == pytest.approx((ref["lo"], ref["hi"]), abs=1e-12)
        assert d["lo"] <= d["diff"] + 1e-12 and d["diff"] <= d["hi"] + 1e-12
    if cold.any():
        m = "NDCG@5"
        ref = paired_bootstrap(z[f"model/{m}"][:, cold], z[f"ItemPosition/{m}"][cold], n_resamples=400, seed=0)
        assert doc["differences"]["cold"]["ItemPosition"][m]["lo"] == pytest.approx(ref["lo"], abs=1e-12)
    md = (E / "experiment.md").read_text()
    _check_regenerate_lines(md, "experiment", 3)
    assert "| model / baseline | HR@1 | HR@5 | NDCG@5 |" in md and "| ours (2 seeds) |" in md
    assert "| UserPosition | all |" in md and " ± " in md
    assert (E / "experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in E.iterdir() if p.name.startswith(".") and "segfast.lock" not in p.name]


def test_rerun_gives_the_same_result_and_text_output(exp1, capfd):
    E, argv = exp1
    old = json.loads((E / "experiment.json").read_text())
    out, err = _run(capfd, *argv)  # no --json: the Markdown on stdout, progress on stderr
    assert out.startswith("# segfast experiment: ours") and "| ours (2 seeds) |" in out
    assert "seed 1 (1/2)" in err and "seed 2 (2/2)" in err
    new = json.loads((E / "experiment.json").read_text())
    # max_steps runs are never "finished": the rerun resumes them at step 4, which trains nothing more
    assert [s["status"] for s in new["per_seed"]] == ["resumed", "resumed"]
    assert [s["step"] for s in new["per_seed"]] == [4, 4]
    assert [s["metrics"] for s in new["per_seed"]] == [s["metrics"] for s in old["per_seed"]]
    assert new["differences"] == old["differences"]


def test_reuses_runs_made_by_segfast_train(world, capfd):
    """The coordinator's layout: `segfast train --out E/seed-k --seed k` with the same options, then experiment."""
    E = world / "E2"
    opts = ["--epochs", "1", "--eval-every", "4", *TINY]
    _run(capfd, "train", "--data", str(world / "p"), "--out", str(E / "seed-0"), "--seed", "0", "--quiet", *opts)
    state = E / "seed-0" / "last" / "state.json"
    t0 = state.stat().st_mtime_ns
    doc, err = _json(capfd, "experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "2",
                     "--bootstrap", "50", *opts)
    assert [s["status"] for s in doc["per_seed"]] == ["reused", "new"]
    assert state.stat().st_mtime_ns == t0  # not trained again
    assert "seed 0 (1/2)" in err and "seed 0 (1/2) reused" in err
    a = json.loads((E / "seed-0" / "config.json").read_text())
    b = json.loads((E / "seed-1" / "config.json").read_text())
    assert a["model"] == b["model"] and {**a["train"], "seed": 1} == b["train"]
    # another configuration in E/seed-0 is refused with train's error
    out, err = _run(capfd, "experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "1", "--lr", "0.5",
                    "--quiet", *opts, rc_expected=2)
    assert out == "" and "different configuration" in err and "lr" in err and err.count("\n") == 1


def test_resumes_an_unfinished_run(world, capfd):
    E = world / "E3"
    opts = ["--eval-every", "2", "--bootstrap", "20", *TINY]
    doc, _ = _json(capfd, "experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "1",
                   "--max-steps", "2", *opts)
    assert doc["per_seed"][0]["status"] == "new" and doc["per_seed"][0]["step"] == 2
    doc, _ = _json(capfd, "experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "1",
                   "--max-steps", "4", *opts)
    assert doc["per_seed"][0]["status"] == "resumed" and doc["per_seed"][0]["step"] == 4


def test_refuses_what_it_did_not_write(world, tmp_path, capfd):
    E = tmp_path / "E"
    E.mkdir()
    (E / "notes.txt").write_text("mine")
    args = ["experiment", "--data", str(world / "p"), "--out", str(E), "--seeds", "1", "--max-steps", "1", *TINY]
    out, err = _run(capfd, *args, rc_expected=2)
    assert "notes.txt" in err and "did not write" in err and err.count("\n") == 1
    assert sorted(p.name for p in E.iterdir()) == ["notes.txt"]
    (E / "notes.txt").unlink()
    (E / "experiment.json").write_text('{"mine": 1}')
    out, err = _run(capfd, *args, rc_expected=2)
    assert "not a segfast experiment" in err
    (E / "experiment.json").unlink()
    (E / "seed-x").mkdir()
    with pytest.raises(ExperimentError, match="seed-x"):
        check_experiment_dir(E)
    os.rmdir(E / "seed-x")
    (E / "seed-0").write_text("")  # a seed name that is not a directory
    with pytest.raises(ExperimentError, match="seed-0"):
        check_experiment_dir(E)
    # the data directory itself, or a seed set by --set
    out, err = _run(capfd, "experiment", "--data", str(world / "p"), "--out", str(world / "p" / "E"), "--seeds", "1",
                    *TINY, rc_expected=2)
    assert "input --data" in err
    out, err = _run(capfd, *args[:4], str(tmp_path / "E4"), *args[5:], "--set", "seed=3", rc_expected=2)
    assert "--seed-start" in err and not (tmp_path / "E4").exists()
    out, err = _run(capfd, *args[:4], str(tmp_path / "E4"), "--seeds", "0", *args[7:], rc_expected=2)
    assert "seeds" in err
    out, err = _run(capfd, *args[:4], str(tmp_path / "E4"), *args[5:], "--label", "a|b", rc_expected=2)
    assert "label" in err and not (tmp_path / "E4").exists()


def test_refuses_torchrun(world, tmp_path, monkeypatch):
    from segfast.experiment import run_experiment
    from segfast.model import ModelConfig, TrainConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ExperimentError, match="torchrun"):
        run_experiment(world / "p", tmp_path / "E", ModelConfig(modality="id"), TrainConfig(), seeds=1)
    assert not (tmp_path / "E").exists()


def test_compare(world, exp1, capfd):
    E1, _ = exp1
    E5 = world / "E5"
    _json(capfd, "experiment", "--data", str(world / "p"), "--out", str(E5), "--seeds", "1", "--max-steps", "4",
          "--eval-every", "2", "--lr", "0.01", "--label", "lr01", "--bootstrap", "20", *TINY)
    doc, _ = _json(capfd, "experiment-compare", str(E1), str(E5), str(E1), "--bootstrap", "300")
    c = doc["comparisons"]
    assert [(x["a"], x["b"]) for x in c] == [("lr01", "ours"), ("ours", "ours")]  # one directory per label: labels kept
    for m in METRICS:
        assert (c[1]["all"][m]["lo"], c[1]["all"][m]["hi"]) == (0.0, 0.0)  # an experiment against itself
    z1, z5 = np.load(E1 / "experiment.npz"), np.load(E5 / "experiment.npz")
    ref = paired_bootstrap(z5["model/HR@1"], z1["model/HR@1"].mean(axis=0), n_resamples=300, seed=0)
    got = c[0]["all"]["HR@1"]
    assert (got["diff"], got["lo"], got["hi"]) == pytest.approx((ref["diff"], ref["lo"], ref["hi"]), abs=1e-12)
    out, _ = _run(capfd, "experiment-compare", str(E1), str(E5), "--bootstrap", "50")
    assert "| lr01 − ours | all |" in out
    _check_regenerate_lines(out, "experiment-compare", 1)
    out, err = _run(capfd, "experiment-compare", str(E1), str(world / "nothing"), rc_expected=2)
    assert "experiment.json" in err
