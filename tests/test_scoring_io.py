"""The scorer's output is a Parquet dataset every Arrow tool reads; its input is a file, a directory or a hive
dataset, with extra columns carried through; a version-1 output is migrated on resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from segfast.scoring import MANIFEST, OutDirError, ScoreInputError, score
from _fakes import prepared_world
from _fakes import make_run as _run

N_BAD = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_io")
    p = prepared_world(root)
    it = p.interactions
    n = 400
    uid = p.users["user_id"][it["user_idx"]][:n].copy()
    vid = p.videos["video_id"][it["video_idx"]][:n].copy()
    uid[[5, 222]] = [10**9, 10**9 + 1]  # unknown users: rejected with on_unknown="skip"
    vid[301] = 10**9
    rng = np.random.default_rng(3)
    table = pa.table({"user_id": uid, "video_id": vid, "time_ms": it["time_ms"][:n],
                      "request": pa.array([f"req-{i}" for i in range(n)]),
                      "weight": rng.standard_normal(n).astype(np.float32)})
    pairs = root / "pairs.parquet"
    pq.write_table(table, pairs, row_group_size=53)
    return {"root": root, "p": p, "runs": {"both": _run(root, p, "both"), "id": _run(root, p, "id")},
            "pairs": pairs, "table": table, "n": n}


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by("row")


def _concat_parts(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))])


# ---------------------------------------------------------------------------------------------- output

def test_output_reads_as_a_dataset_with_every_arrow_tool(world, tmp_path):
    out = tmp_path / "o"
    man = score(world["runs"]["both"], world["root"] / "p", world["pairs"], out, part_rows=90, batch_size=41,
                progress=False, on_unknown="skip", keep_columns="request,weight")
    assert man["complete"] and man["rows_rejected"] == N_BAD and man["version"] == 2
    names = sorted(x.name for x in out.iterdir())
    assert names == ["_manifest.json", "_rejected"] + [f"part-{i:05d}.parquet" for i in range(man["n_parts"])]
    assert man["rejected"]["file"] == "_rejected/part-00000.parquet"
    ref = _concat_parts(out)
    assert ref.num_rows == world["n"] - N_BAD
    assert ref.column_names == man["columns"] == [
        "row", "user_id", "video_id", "time_ms", "n_segments", "scores", "leave_slot", "thumbnail_slot",
        "expected_watch_segments", "request", "weight"]
    via_ds = ds.dataset(out, format="parquet").to_table()
    assert _sorted(via_ds).equals(ref)
    assert _sorted(pq.read_table(out)).equals(ref)
    rej = pq.read_table(out / "_rejected")
    assert rej.column("row").to_pylist() == [5, 222, 301]
    assert set(rej.column("reason").to_pylist()) == {"unknown_user", "unknown_video"}


@pytest.mark.parametrize("tool", ["pandas", "polars", "duckdb"])
def test_output_reads_with_dataframe_libraries(world, tmp_path, tool):
    mod = pytest.importorskip(tool, reason=f"{tool} is not installed here (not a segfast dependency)")
    out = tmp_path / "o"
    score(world["runs"]["id"], world["root"] / "p", world["pairs"], out, part_rows=90, progress=False,
          on_unknown="skip", keep_columns="request")
    ref = _sorted(pq.read_table(out))
    if tool == "pandas":
        df = mod.read_parquet(out).sort_values("row")
        rows, sc = df["row"].tolist(), [list(x) for x in df["scores"]]
    elif tool == "polars":
        df = mod.read_parquet(str(out / "*.parquet")).sort("row")
        rows, sc = df["row"].to_list(), df["scores"].to_list()
    else:
        res = mod.sql(f"select row, scores from read_parquet('{out}/*.parquet') order by row").fetchall()
        rows, sc = [r[0] for r in res], [list(r[1]) for r in res]
    assert rows == ref.column("row").to_pylist()
    assert sc == ref.column("scores").to_pylist()


def _to_v1(out: Path) -> None:
    """Rewrite a version-2 output in the version-1 layout (manifest.json, rejected.parquet beside the parts)."""
    man = json.loads((out / MANIFEST).read_text())
    man["version"] = 1
    if man["rejected"]["file"]:
        man["rejected"]["file"] = "rejected.parquet"
        os.replace(out / "_rejected" / "part-00000.parquet", out / "rejected.parquet")
        (out / "_rejected").rmdir()
    (out / "manifest.json").write_text(json.dumps(man))
    (out / MANIFEST).unlink()


def test_version1_output_is_migrated_and_resumed(world, tmp_path):
    args = (world["runs"]["id"], world["root"] / "p", world["pairs"])
    kw = dict(part_rows=100, batch_size=64, progress=False, on_unknown="skip")
    score(*args, tmp_path / "ref", **kw)
    out = tmp_path / "o"
    score(*args, out, **kw)
    _to_v1(out)
    (out / "part-00002.parquet").unlink()  # an interrupted version-1 job: one part missing
    with pytest.raises(pa.ArrowInvalid):  # the old layout is not a dataset (rejected rows have another schema)
        ds.dataset(out, format="parquet").to_table()
    calls = []
    man = score(*args, out, on_part=calls.append, **kw)
    assert [c["part"] for c in calls] == [2]  # the other parts were kept
    assert man["complete"] and man["version"] == 2 and man["migrated_from_version"] == 1
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in (tmp_path / "ref").iterdir())
    assert pq.read_table(out / "_rejected").equals(pq.read_table(tmp_path / "ref" / "_rejected"))
    assert _sorted(pq.read_table(out)).equals(_sorted(pq.read_table(tmp_path / "ref")))
    # a version-1 output of another job: refused (naming the difference), replaced with overwrite
    other = tmp_path / "other"
    score(*args, other, **kw)
    _to_v1(other)
    with pytest.raises(OutDirError, match="part_rows"):
        score(*args, other, **dict(kw, part_rows=50))
    man = score(*args, other, overwrite=True, **dict(kw, part_rows=50))
    assert man["complete"] and not (other / "manifest.json").exists() and not (other / "rejected.parquet").exists()


def test_foreign_file_beside_a_resumable_output_is_refused(world, tmp_path):
    out = tmp_path / "o"
    kw = dict(part_rows=200, progress=False, on_unknown="skip")
    score(world["runs"]["id"], world["root"] / "p", world["pairs"], out, **kw)
    (out / "notes.parquet").write_bytes(b"x")
    with pytest.raises(OutDirError, match="notes.parquet"):
        score(world["runs"]["id"], world["root"] / "p", world["pairs"], out, **kw)


# ---------------------------------------------------------------------------------------------- input

def _split(table: pa.Table, root: Path, cuts, dirs=None) -> Path:
    root.mkdir()
    edges = [0, *cuts, table.num_rows]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        d = root if dirs is None else root / dirs[i]
        d.mkdir(exist_ok=True)
        pq.write_table(table.slice(a, b - a), d / f"f{i:02d}.parquet", row_group_size=37)
    return root


def test_directory_and_hive_inputs_equal_the_single_file(world, tmp_path):
    t = world["table"]
    kw = dict(part_rows=90, batch_size=41, progress=False, on_unknown="skip")
    run, data = world["runs"]["both"], world["root"] / "p"
    score(run, data, world["pairs"], tmp_path / "single", keep_columns=["weight"], **kw)
    single = _sorted(pq.read_table(tmp_path / "single"))
    # a plain directory of files (sorted by name: f00, f01, ...; a file boundary inside a part)
    d = _split(t, tmp_path / "dir", [130, 131, 260])
    (d / "_SUCCESS").write_text("")  # ignored like pyarrow ignores it
    man = score(run, data, d, tmp_path / "from_dir", keep_columns=["weight"], **kw)
    assert man["input_kind"]["kind"] == "dataset" and man["input_kind"]["files"] == 4
    assert _sorted(pq.read_table(tmp_path / "from_dir")).equals(single)
    # hive partitions: bucket=0/, bucket=1/; the partition key is a column like any other
    h = _split(t.drop_columns(["request"]), tmp_path / "hive", [150, 300],
               dirs=["bucket=0", "bucket=0", "bucket=1"])
    man = score(run, data, h, tmp_path / "from_hive", keep_columns=["weight", "bucket"], **kw)
    assert man["input_kind"]["partitioning"] == ["bucket"] and man["input_kind"]["kind"] == "hive"
    got = _sorted(pq.read_table(tmp_path / "from_hive"))
    assert got.drop_columns(["bucket"]).equals(single)
    expect = np.where(got.column("row").to_numpy() < 300, 0, 1)
    np.testing.assert_array_equal(got.column("bucket").to_numpy(), expect)
    # the same rows with other options are another job
    with pytest.raises(OutDirError, match="keep_columns"):
        score(run, data, h, tmp_path / "from_hive", keep_columns=["weight"], **kw)


def test_keep_columns_and_dataset_errors_are_clear(world, tmp_path):
    run, data = world["runs"]["id"], world["root"] / "p"
    with pytest.raises(ScoreInputError, match=r"keep column 'nope' is not in the input; it has \['user_id'"):
        score(run, data, world["pairs"], tmp_path / "o", keep_columns="weight,nope", progress=False)
    with pytest.raises(ValueError, match="'scores' is already an output column"):
        score(run, data, world["pairs"], tmp_path / "o", keep_columns=["scores"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoreInputError, match="no Parquet files"):
        score(run, data, tmp_path / "empty", tmp_path / "o", progress=False)
    t = world["table"]
    d = _split(t, tmp_path / "mixed", [100])
    pq.write_table(t.slice(100).drop_columns(["time_ms"]), d / "f01.parquet")
    with pytest.raises(ScoreInputError, match=r"f01.parquet: lacks column 'time_ms'"):
        score(run, data, d, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        score(run, data, tmp_path / "missing", tmp_path / "o", progress=False)
    assert not list((tmp_path / "o").glob("part-*")) if (tmp_path / "o").exists() else True


def test_cli_keep_columns(world, tmp_path, capfd):
    from segfast.cli import main

    rc = main(["score", "--run-dir", str(world["runs"]["id"]), "--data", str(world["root"] / "p"), "--pairs",
               str(world["pairs"]), "--out", str(tmp_path / "o"), "--keep-columns", "request", "--on-unknown",
               "skip", "--device", "cpu", "--quiet", "--json"])
    o, e = capfd.readouterr()
    assert rc == 0, e
    doc = json.loads(o)
    assert doc["manifest"].endswith("_manifest.json") and doc["complete"]
    tab = pq.read_table(tmp_path / "o")
    assert tab.column_names[-1] == "request"
    rows = tab.column("row").to_numpy()
    assert tab.column("request").to_pylist() == [f"req-{i}" for i in rows]
    rc = main(["score", "--run-dir", str(world["runs"]["id"]), "--data", str(world["root"] / "p"), "--pairs",
               str(world["pairs"]), "--out", str(tmp_path / "o2"), "--keep-columns", "requests", "--quiet"])
    o, e = capfd.readouterr()
    assert rc == 2 and "keep column 'requests' is not in the input" in e and e.count("\n") == 1


def test_many_files_stream_without_open_handles_and_uint64_checked(world, tmp_path):
    from segfast.scoring import ParquetPairs

    t = world["table"]
    d = _split(t, tmp_path / "many", list(range(8, t.num_rows, 8)))  # 50 files of 8 rows
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    src = ParquetPairs(d, keep_columns=["request"])
    assert len(src.files) == 50 and src.rows == t.num_rows
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds + 2  # footers read, no handle kept per file
    got = src.read(13, 390)
    np.testing.assert_array_equal(got["user_id"], t.column("user_id").to_numpy()[13:390])
    assert got["keep"]["request"].to_pylist() == t.column("request").to_pylist()[13:390]
    assert sum(len(c["video_id"]) for _, c in src.chunks()) == t.num_rows
    big = tmp_path / "u64.parquet"
    pq.write_table(pa.table({"user_id": pa.array([1, 2**63 + 5], pa.uint64()),
                             "video_id": pa.array([1, 2], pa.uint64())}), big)
    with pytest.raises(ScoreInputError, match=r"u64.parquet: column 'user_id' at row 1 holds 9223372036854775813"):
        score(world["runs"]["id"], world["root"] / "p", big, tmp_path / "o", progress=False)
