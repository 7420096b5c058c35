"""Issue 15, items 1 and 4: segfast never destroys what it did not create, and its temporary files are safe.

Each ``test_case_N_*`` reproduces case N of the issue (it failed on the code before the fix) and checks the fix:
1 prepare over its own input / over unrelated files, 2 score over a prepared dataset, 3 edit / thumbnails over
their inputs, 10 a symlink planted under a temporary name, 12a the temp directory a killed prepare leaves.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast import _io
from segfast._guard import FILE_META_KEY, OutputGuardError, check_out_vs_inputs, file_output_kind
from segfast.cli import main
from segfast.data.prepared import load_prepared, prepare_raw
from _fakes import interaction_pairs, make_run, prepared_world, raw_interactions

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(root: Path) -> dict:
    """{relative path: sha256} of every file under root (what must survive a refused command)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(d: Path) -> list:
    """Hidden entries of d other than the lock files segfast._lock leaves (emptied) beside an output."""
    return sorted(n for n in os.listdir(d) if n.startswith(".") and not n.endswith(".segfast.lock"))


def _cli(capfd, *args) -> tuple:
    capfd.readouterr()
    rc = main([str(a) for a in args] + ["--quiet"])
    o, e = capfd.readouterr()
    return rc, o, e


@pytest.fixture(scope="module")
def raw_release(tmp_path_factory):
    from segfast.data.synth import synth

    root = tmp_path_factory.mktemp("raw")
    synth("segmm", root / "raw", users=6, videos=80, interactions=900, seed=0, feature_dim=8, progress=False)
    return root / "raw"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    p = prepared_world(root)
    run = make_run(root, p, "id")
    from segfast.calibration import calibrate_run

    calibrate_run(run, root / "p")  # thumbnails / edit need the run's calibrator (segfast train writes it)
    pairs = root / "pairs.parquet"
    pq.write_table(interaction_pairs(p).slice(0, 12), pairs)
    return {"root": root, "p": p, "data": root / "p", "run": run, "pairs": pairs}


# ---------------------------------------------------------------------------------------------------- case 1

def test_case_1_prepare_never_deletes_its_input_or_unrelated_files(tmp_path, raw_release, capfd):
    raw = tmp_path / "raw"
    os.system(f"cp -r {raw_release} {raw}")
    before = _tree(raw)
    assert any(n.endswith(".csv") for n in before) and any(n.endswith(".json") for n in before)
    prep = ["prepare", "--source", "segmm", "--feature-dim", "8", "--input", raw]

    # --out is the input (the issue: exit 0 and the raw release deleted)
    rc, o, e = _cli(capfd, *prep, "--out", raw, "--overwrite")
    assert rc == 2 and o == "" and e.count("\n") == 1, e
    assert "is the input --input" in e and "never writes over its own input" in e
    assert _tree(raw) == before
    # ... through a symlink, inside it, around it
    (tmp_path / "link").symlink_to(raw)
    for out, how in ((tmp_path / "link", "is the input"), (raw / "prepared", "is inside the input"),
                     (tmp_path, "contains the input")):
        rc, _, e = _cli(capfd, *prep, "--out", out, "--overwrite")
        assert rc == 2 and how in e, e
    assert _tree(raw) == before and not (raw / "prepared").exists()

    # --out somedir --overwrite: somedir's files are not a prepared dataset (the issue: deleted)
    some = tmp_path / "some"
    some.mkdir()
    (some / "notes.txt").write_text("mine")
    (some / "manifest.json").write_text('{"mine": true}')
    rc, _, e = _cli(capfd, *prep, "--out", some, "--overwrite")
    assert rc == 2 and "not a prepared dataset" in e and "pass" not in e, e
    assert (some / "notes.txt").read_text() == "mine" and (some / "manifest.json").read_text() == '{"mine": true}'

    # a real prepared dataset is replaced with --overwrite, but not once it holds someone else's file
    out = tmp_path / "prep"
    assert _cli(capfd, *prep, "--out", out)[0] == 0
    assert load_prepared(out).manifest["kind"] == "segfast-prepared"
    rc, _, e = _cli(capfd, *prep, "--out", out)
    assert rc == 2 and "--overwrite" in e  # here --overwrite would help, so the message says so
    (out / "analysis.ipynb").write_text("notebook")
    rc, _, e = _cli(capfd, *prep, "--out", out, "--overwrite")
    assert rc == 2 and "analysis.ipynb" in e and "files prepare did not write" in e, e
    assert (out / "analysis.ipynb").read_text() == "notebook"
    (out / "analysis.ipynb").unlink()
    assert _cli(capfd, *prep, "--out", out, "--overwrite", "--seed", "3")[0] == 0
    assert load_prepared(out).manifest["seed"] == 3 and _tree(raw) == before
    assert not _hidden(tmp_path)  # no temp or old directories left


def test_case_1_library_prepare_refuses_foreign_and_accepts_old_manifests(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "data.csv").write_text("1,2\n")
    with pytest.raises(OutputGuardError, match="not a prepared dataset"):
        prepare_raw(raw_interactions(), out, "kuairand", progress=False, overwrite=True)
    assert (out / "data.csv").read_text() == "1,2\n"
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(OutputGuardError, match="not a directory"):
        prepare_raw(raw_interactions(), f, "kuairand", progress=False, overwrite=True)
    assert f.read_text() == "keep"
    # a dataset prepared before "kind" was recorded is still recognised as prepare's own
    good = tmp_path / "good"
    prepare_raw(raw_interactions(), good, "kuairand", progress=False)
    import json

    m = json.loads((good / "manifest.json").read_text())
    del m["kind"]
    (good / "manifest.json").write_text(json.dumps(m))
    prepare_raw(raw_interactions(), good, "kuairand", seed=5, progress=False, overwrite=True)
    assert load_prepared(good).manifest["seed"] == 5


def test_out_vs_inputs_resolves_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    check_out_vs_inputs(tmp_path / "a" / "c", {"--data": tmp_path / "a" / "b"})  # siblings: fine
    check_out_vs_inputs(tmp_path / "ab", {"--data": tmp_path / "a"})  # a name prefix is not containment
    check_out_vs_inputs(tmp_path / "x", {"--data": None})
    with pytest.raises(OutputGuardError, match="is the input --data"):
        check_out_vs_inputs(tmp_path / "a" / ".." / "a" / "b", {"--data": tmp_path / "a" / "b"})


# ---------------------------------------------------------------------------------------------------- case 2

def test_case_2_score_never_replaces_a_prepared_dataset(world, tmp_path, capfd):
    base = ["score", "--run-dir", world["run"], "--data", world["data"], "--pairs", world["pairs"],
            "--device", "cpu"]
    other = tmp_path / "other"
    prepare_raw(raw_interactions(), other, "kuairand", progress=False)
    # a directory holding a prepared dataset's manifest.json alone (the name of score's version-1 manifest):
    # before, it was taken for the scorer's, --overwrite deleted it and the message without it suggested it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "manifest.json").write_bytes((other / "manifest.json").read_bytes())
    for extra in ([], ["--overwrite"]):
        rc, _, e = _cli(capfd, *base, "--out", lone, *extra)
        assert rc == 2 and "not a segfast score output" in e and "pass" not in e, e
    assert (lone / "manifest.json").read_bytes() == (other / "manifest.json").read_bytes()

    # another prepared dataset as --out
    other_before = _tree(other)
    for extra in ([], ["--overwrite"]):
        rc, _, e = _cli(capfd, *base, "--out", other, *extra)
        assert rc == 2 and "not a segfast score output" in e and "pass" not in e, e
    assert _tree(other) == other_before and load_prepared(other).n_users > 0

    data_before = _tree(world["data"])
    rc, _, e = _cli(capfd, *base, "--out", world["data"], "--overwrite")
    assert rc == 2 and "is the input --data" in e, e
    rc, _, e = _cli(capfd, *base, "--out", world["run"] / "scores")
    assert rc == 2 and "is inside the input --run-dir" in e, e
    from segfast.scoring import score

    with pytest.raises(OutputGuardError, match="is inside the input --data"):  # the library call too
        score(world["run"], world["data"], world["pairs"], world["data"] / "scores", progress=False)
    assert _tree(world["data"]) == data_before

    # Parquet parts without a scores manifest are not recognised either
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"x": [1]}), parts / "part-00000.parquet")
    rc, _, e = _cli(capfd, *base, "--out", parts, "--overwrite")
    assert rc == 2 and "no segfast score manifest" in e and "pass" not in e, e
    assert pq.read_table(parts / "part-00000.parquet").column("x").to_pylist() == [1]

    # a real score output is still replaced with --overwrite
    out = tmp_path / "scores"
    assert _cli(capfd, *base, "--out", out, "--which", "final")[0] == 0
    rc, _, e = _cli(capfd, *base, "--out", out, "--batch-size", "5", "--part-rows", "5")
    assert rc == 2 and "pass overwrite=True (--overwrite)" in e, e
    assert _cli(capfd, *base, "--out", out, "--part-rows", "5", "--overwrite")[0] == 0
    assert len(list(out.glob("part-*.parquet"))) == 3


# ---------------------------------------------------------------------------------------------------- case 3

def test_case_3_edit_and_thumbnails_never_overwrite_their_inputs(world, tmp_path, capfd):
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(world["pairs"].read_bytes())
    args = ["--run-dir", world["run"], "--data", world["data"], "--pairs", pairs, "--device", "cpu"]
    data_before, pairs_before = _tree(world["data"]), pairs.read_bytes()
    rc, _, e = _cli(capfd, "edit", *args, "--out", pairs, "--overwrite")
    assert rc == 2 and "is the input --pairs" in e, e
    rc, _, e = _cli(capfd, "thumbnails", *args, "--out", world["data"] / "interactions.parquet", "--overwrite")
    assert rc == 2 and "is inside the input --data" in e, e
    assert pairs.read_bytes() == pairs_before and _tree(world["data"]) == data_before

    # a Parquet file segfast did not write (or wrote for the other command) is never replaced
    mine = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [7]}), mine)
    rc, _, e = _cli(capfd, "thumbnails", *args, "--out", mine, "--overwrite")
    assert rc == 2 and "not a file segfast thumbnails wrote" in e and "pass" not in e, e
    assert pq.read_table(mine).column("x").to_pylist() == [7]
    thumbs = tmp_path / "thumbs.parquet"
    assert _cli(capfd, "thumbnails", *args, "--out", thumbs)[0] == 0
    assert file_output_kind(thumbs) == "thumbnails" and FILE_META_KEY in pq.read_schema(thumbs).metadata
    rc, _, e = _cli(capfd, "edit", *args, "--out", thumbs, "--overwrite")
    assert rc == 2 and "an output of segfast thumbnails" in e, e
    assert file_output_kind(thumbs) == "thumbnails"
    assert _cli(capfd, "thumbnails", *args, "--out", thumbs, "--overwrite")[0] == 0  # its own: replaced
    assert not _hidden(tmp_path)


# ---------------------------------------------------------------------------------------------------- case 10

def test_case_10_planted_symlinks_under_temp_names_are_never_followed(world, tmp_path, monkeypatch):
    """An attacker who can write into --out plants symlinks under the temporary names the scorer would use
    (the old names were ``.NAME.tmp-PID``) right after the output directory is set up."""
    from segfast.scoring import runner, score

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    real_setup = runner.setup_out_dir

    def setup_then_plant(out, identity, overwrite):
        res = real_setup(out, identity, overwrite)
        (out / "_rejected").mkdir(exist_ok=True)
        for d, n in ((out / "_rejected", "part-00000.parquet"), (out, "part-00000.parquet"),
                     (out, "_manifest.json")):
            (d / f".{n}.tmp-{os.getpid()}").symlink_to(victim)
        return res

    monkeypatch.setattr(runner, "setup_out_dir", setup_then_plant)
    p = world["p"]
    t = interaction_pairs(p).slice(0, 10)
    t = t.set_column(0, "user_id", pa.array([999_999] * 3 + t.column("user_id").to_pylist()[3:]))
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(t, pairs)
    out = tmp_path / "o"
    man = score(world["run"], world["data"], pairs, out, on_unknown="skip", progress=False)
    assert victim.read_text() == "precious"
    assert man["complete"] and man["rows_rejected"] == 3
    assert not (out / "_rejected" / "part-00000.parquet").is_symlink()
    assert pq.read_table(out / "_rejected" / "part-00000.parquet").num_rows == 3
    assert not (out / "part-00000.parquet").is_symlink() and pq.read_table(out / "part-00000.parquet").num_rows == 7


def test_case_10_temp_files_are_exclusive_and_checked_before_the_rename(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "d"
    d.mkdir()
    tokens = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(_io.secrets, "token_hex", lambda n: next(tokens))
    planted = d / f".x.json.tmp-{_io.HOST}-{os.getpid()}-{'0' * 16}"
    planted.symlink_to(victim)
    _io.write_json(d / "x.json", {"a": 1})  # the planted name is taken: another is drawn, nothing followed
    assert victim.read_text() == "precious" and (d / "x.json").read_text().startswith("{")
    assert planted.is_symlink()
    # the names are unpredictable: two draws differ
    monkeypatch.undo()
    assert _io.temp_name("x") != _io.temp_name("x")
    # a temporary swapped for a symlink while being written is refused, nothing renamed into place
    with pytest.raises(OSError, match="no longer a regular file"):
        with _io.atomic_path(d / "y.bin") as tmp:
            tmp.unlink()
            tmp.symlink_to(victim)
    assert victim.read_text() == "precious" and not (d / "y.bin").exists()


# ---------------------------------------------------------------------------------------------------- case 12a

_KILLED_PREPARE = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from _fakes import raw_interactions, RandomFeatures
import segfast.data.prepared as P

def die(*a, **k):  # after the features and histories are in the temp directory
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    import time; time.sleep(30)

P._write_parquet = die
P.prepare_raw(raw_interactions(), sys.argv[1], "segmm", feature_source=RandomFeatures(16), progress=False)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_case_12a_temp_dir_of_a_killed_prepare_is_removed_by_the_next(tmp_path, sig):
    out = tmp_path / "prep"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(out), sig, str(REPO / "tests")],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -getattr(signal, sig) or r.returncode != 0, r.stderr[-2000:]
    assert not out.exists()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".prep.tmp-")]
    if sig == "SIGKILL":
        assert len(left) == 1 and (tmp_path / left[0] / "features.npy").is_file()  # what the issue saw
    other = tmp_path / ".prep.tmp-notours"  # someone else's hidden directory: left alone
    other.mkdir()
    prepare_raw(raw_interactions(), out, "segmm", progress=False)
    assert _hidden(tmp_path) == [other.name] and load_prepared(out).n_users == 4
    # a temp directory of a live process (another prepare still running) is left alone too
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".prep.tmp-{_io.HOST}-{live.pid}-{'a' * 16}"
        busy.mkdir()
        prepare_raw(raw_interactions(), out, "segmm", progress=False, overwrite=True)
        assert _hidden(tmp_path) == sorted([other.name, busy.name])
    finally:
        live.kill()
        live.wait()


def test_remove_stale_temps_never_follows_a_link_and_restores_an_old_dir(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    link = d / f".out.tmp-{_io.HOST}-{dead.pid}-{'b' * 16}"
    link.symlink_to(victim)
    old = d / f".out.old-{_io.HOST}-{dead.pid}-{'c' * 16}"  # a kill between install_dir's two renames
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    other_host = d / f".out.tmp-{'f' * 8 if _io.HOST != 'f' * 8 else '0' * 8}-{dead.pid}-{'d' * 16}"
    other_host.mkdir()
    legacy_old, legacy_new = d / ".out.tmp-ab_cd123", d / ".out.tmp-xy_zw789"  # mkdtemp names of before
    legacy_old.mkdir()
    legacy_new.mkdir()
    os.utime(legacy_old, (1e9, 1e9))
    done = _io.remove_stale_temps(d, "out")
    assert set(done) == {link, old, legacy_old}
    assert (victim / "keep.txt").read_text() == "keep" and not os.path.lexists(link)
    assert (d / "out" / "manifest.json").read_text() == "{}" and other_host.is_dir()
    assert np.array_equal(sorted(os.listdir(d)), sorted(["out", other_host.name, legacy_new.name]))


def test_checkpoint_save_removes_the_temp_dir_of_a_killed_save(tmp_path):
    import torch

    from segfast import checkpoint as ck

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    stale = run / f".last.tmp-{_io.HOST}-{dead.pid}-{'e' * 16}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    ck.save_state(run, "last", torch.nn.Linear(2, 2), {"step": 1}, rng=False)
    assert sorted(os.listdir(run)) == ["last"]
