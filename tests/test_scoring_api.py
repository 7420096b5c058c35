"""The Python API (segfast.Scorer): in-memory tables score exactly like the CLI, and the README's example runs."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segfast.scoring import Scorer, UnknownIdsError, score
from _fakes import interaction_pairs, prepared_world
from _fakes import make_run as _run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_api")
    p = prepared_world(root)
    table = interaction_pairs(p, tag=pa.array(np.arange(len(p)) % 7, pa.int16()))
    pairs = root / "pairs.parquet"
    pq.write_table(table, pairs, row_group_size=101)
    return {"root": root, "p": p, "run": _run(root, p, "both"), "pairs": pairs, "table": table}


def test_in_memory_scores_equal_the_dataset_job_bit_for_bit(world, tmp_path):
    scorer = Scorer.from_run(world["run"], world["root"] / "p", device="cpu", batch_size=45)
    assert scorer.fast and scorer.effective_batch_size == 45
    got = scorer.score(world["table"], part_rows=130, keep_columns=["tag"])
    man = scorer.score_dataset(world["pairs"], tmp_path / "o", part_rows=130, keep_columns="tag", progress=False)
    assert man["complete"] and man["n_parts"] == 4
    ref = pq.read_table(tmp_path / "o").sort_by("row")
    assert got.schema.equals(ref.schema) and got.equals(ref)
    # the one-call function is the same job
    score(world["run"], world["root"] / "p", world["pairs"], tmp_path / "f", batch_size=45, part_rows=130,
          keep_columns="tag", progress=False)
    assert pq.read_table(tmp_path / "f").sort_by("row").equals(ref)
    # other containers of the same columns
    sub = world["table"].slice(0, 50)
    a = scorer.score(sub, part_rows=130)
    assert scorer.score(sub.to_batches()[0], part_rows=130).equals(a)
    assert scorer.score({c: sub.column(c).to_numpy() for c in sub.column_names}, part_rows=130).equals(a)
    assert a.column_names == [c for c in man["columns"] if c != "tag"]
    empty = scorer.score(sub.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema.equals(a.schema)
    with pytest.raises(TypeError, match="expected a pyarrow Table"):
        scorer.score([(1, 2)])


def test_in_memory_dataframes_and_unknown_ids(world):
    scorer = Scorer.from_run(world["run"], world["root"] / "p", device="cpu")
    t = world["table"].slice(0, 40)
    uid = t.column("user_id").to_numpy().copy()
    uid[[3, 17]] = 10**12
    bad = t.set_column(0, "user_id", pa.array(uid))
    with pytest.raises(UnknownIdsError, match=r"<table>: 2 pair\(s\) \(first at row 3\)"):
        scorer.score(bad)
    got = scorer.score(bad, on_unknown="skip")
    assert got.column("row").to_pylist() == [i for i in range(40) if i not in (3, 17)]
    full = scorer.score(t)
    kept = full.filter(pa.array([i not in (3, 17) for i in range(40)]))
    assert got.column("user_id").equals(kept.column("user_id"))
    a = np.concatenate(got.column("scores").to_numpy(zero_copy_only=False))
    b = np.concatenate(kept.column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)  # other batch mates: equal to float rounding


@pytest.mark.parametrize("tool", ["pandas", "polars"])
def test_dataframes(world, tool):
    mod = pytest.importorskip(tool, reason=f"{tool} is not installed here (not a segfast dependency)")
    scorer = Scorer.from_run(world["run"], world["root"] / "p", device="cpu")
    t = world["table"].slice(0, 60)
    df = t.to_pandas() if tool == "pandas" else mod.from_arrow(t)
    got = scorer.score(df, keep_columns=["tag"])
    ref = scorer.score(t, keep_columns=["tag"])
    assert got.column("scores").equals(ref.column("scores")) and got.column("row").equals(ref.column("row"))


def test_segfast_exports_scorer_lazily():
    import subprocess
    import sys

    code = "import sys, segfast; assert 'segfast.scoring' not in sys.modules; print(segfast.Scorer.__module__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "segfast.scoring.api"


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Scorer.from_run" in b]
    assert len(blocks) == 1, "README.md: expected one python example with Scorer.from_run"
    return blocks[0]


def test_readme_example_scores_equal_the_cli_bit_for_bit(world, tmp_path, capfd, monkeypatch):
    from segfast.cli import main

    os.symlink(world["run"], tmp_path / "run")
    os.symlink(world["root"] / "p", tmp_path / "data")
    pq.write_table(world["table"].drop_columns(["tag"]), tmp_path / "pairs.parquet", row_group_size=64)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), ns)  # noqa: S102 - the documented example itself
    out, _ = capfd.readouterr()
    assert "thumbnail_slot" in out
    assert isinstance(ns["scores"], pa.Table) and ns["manifest"]["complete"]
    rc = main(["score", "--run-dir", "run/", "--data", "data/", "--pairs", "pairs.parquet", "--out", "cli/",
               "--device", "cpu", "--quiet", "--json"])
    o, e = capfd.readouterr()
    assert rc == 0, e
    assert json.loads(o)["rows_scored"] == len(world["p"])
    cli = pq.read_table("cli").sort_by("row")
    assert ns["scores"].equals(cli)  # bit for bit: same batches, same kernels
    assert pq.read_table("scores").sort_by("row").equals(cli)
    sc = np.concatenate(cli.column("scores").to_numpy(zero_copy_only=False))
    assert np.isfinite(sc).all() and sc.std() > 0
