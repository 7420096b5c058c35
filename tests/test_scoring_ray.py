"""The Ray Data engine (segfast.scoring.ray_engine) on a local Ray instance with 2 CPUs: the same scores as the
single-process scorer, an output that pyarrow.dataset reads, the local engine's refusal / unknown-id rules, and
the callable class in a user's own pipeline. Skipped, with the reason, where the `ray` extra is not installed."""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install 'segfast[ray]'")
pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]: pip install 'segfast[ray]'")

from segfast.scoring import OutDirError, Scorer, UnknownIdsError  # noqa: E402
from segfast.scoring.ray_engine import ScoreBatches, score_ray  # noqa: E402
from _fakes import interaction_pairs, prepared_world  # noqa: E402
from _fakes import make_run as _run  # noqa: E402

KEY = [("user_id", "ascending"), ("video_id", "ascending"), ("time_ms", "ascending"), ("tag", "ascending")]
# Scores of the same pair from differently composed batches agree to float rounding, not bit for bit: a batch
# keeps slots 0..min(40, max N + 1) of ITS pairs, so the attention and matmul shapes (and their summation order)
# depend on which pairs share the batch (docs/scoring.md, "Work per batch").
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def watchdog():
    """A Ray job that waits for resources never ends by itself: fail the test instead of hanging CI."""
    import signal

    def fire(*_):
        raise TimeoutError("Ray test over 300 s (a job waiting for resources?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def local_ray():
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 1024 * 1024)
    print(f"\n[ray] local instance (2 CPUs) started in {time.perf_counter() - t0:.1f} s")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring_ray")
    p = prepared_world(root)
    table = interaction_pairs(p, tag=pa.array(np.arange(len(p)), pa.int32()))
    pairs = root / "pairs"  # a directory of two files
    pairs.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), pairs / "a.parquet", row_group_size=64)
    pq.write_table(table.slice(half), pairs / "b.parquet", row_group_size=64)
    return {"root": root, "data": root / "p", "run": _run(root, p, "both"), "pairs": pairs, "table": table}


def _assert_same_scores(got: pa.Table, ref: pa.Table) -> bool:
    """Same pairs, same columns and values; scores within ATOL/RTOL. Returns whether they are bit for bit."""
    got, ref = got.sort_by(KEY), ref.sort_by(KEY)
    assert got.num_rows == ref.num_rows
    for c in ref.column_names:
        if c not in ("row", "scores", "expected_watch_segments"):
            assert got.column(c).equals(ref.column(c)), c
    gs = np.concatenate(got.column("scores").to_numpy(zero_copy_only=False))
    rs = np.concatenate(ref.column("scores").to_numpy(zero_copy_only=False))
    assert gs.dtype == np.float32 and gs.shape == rs.shape and np.isfinite(gs).all()
    np.testing.assert_allclose(gs, rs, atol=ATOL, rtol=RTOL)
    ge, re_ = got.column("expected_watch_segments").to_numpy(), ref.column("expected_watch_segments").to_numpy()
    np.testing.assert_allclose(ge, re_, atol=ATOL, rtol=RTOL)
    return bool(np.array_equal(gs, rs) and np.array_equal(ge, re_))


def test_ray_engine_scores_equal_the_single_process_run(world, local_ray, tmp_path):
    ref = Scorer.from_run(world["run"], world["data"], device="cpu").score(world["table"], keep_columns=["tag"])
    out = tmp_path / "scores"
    t0 = time.perf_counter()
    man = score_ray(world["run"], world["data"], world["pairs"], out, actors=2, cpus_per_actor=0.5, batch_rows=128,
                    keep_columns=["tag"])
    t_job = time.perf_counter() - t0
    assert man["complete"] and man["engine"] == "ray" and man["rows_scored"] == world["table"].num_rows
    assert man["n_parts"] >= 2 and man["ray"]["actors"] == 2 and man["ray"]["gpus_per_actor"] == 0
    assert man["input_kind"]["files"] == 2 and sum(p["rows"] for p in man["parts"]) == man["rows_scored"]
    # a Parquet dataset: only part files beside names the readers ignore, the local engine's schema
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_manifest.json"] + [f"part-{i:05d}.parquet" for i in range(man["n_parts"])]
    assert json.loads((out / "_manifest.json").read_text())["complete"]
    got = pads.dataset(out).to_table()
    assert got.schema.equals(ref.schema) and got.column_names == man["columns"]
    assert got.column("row").null_count == got.num_rows  # Ray gives a batch no input row numbers
    assert pq.read_table(out).num_rows == got.num_rows
    exact = _assert_same_scores(got, ref)
    print(f"[ray] engine job {t_job:.1f} s for {got.num_rows} pairs in {man['n_parts']} parts "
          f"(timing {man['timing']}); scores {'bit for bit' if exact else f'within {ATOL}'} of the local run")
    # the same job again: the finished output is returned untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = score_ray(world["run"], world["data"], world["pairs"], out, actors=2, cpus_per_actor=0.5,
                      batch_rows=128, keep_columns=["tag"])
    assert again["parts"] == man["parts"] and before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_ray_engine_unknown_ids_and_refusals(world, local_ray, tmp_path):
    t = world["table"].slice(0, 200)
    uid = t.column("user_id").to_numpy().copy()
    uid[[5, 77]] = 10**12
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.set_column(0, "user_id", pa.array(uid)), bad)
    out = tmp_path / "o"
    with pytest.raises(UnknownIdsError, match=r"2 pair\(s\) \(first at row 5\)"):
        score_ray(world["run"], world["data"], bad, out, actors=1)
    assert not any(p.name.startswith("part-") for p in out.iterdir())
    man = score_ray(world["run"], world["data"], bad, out, actors=2, cpus_per_actor=0.5, batch_rows=64,
                    on_unknown="skip")
    assert man["rows_scored"] == 198 and man["rows_rejected"] == 2 and man["complete"]
    rej = pq.read_table(out / "_rejected")
    assert rej.column("row").to_pylist() == [5, 77] and set(rej.column("reason").to_pylist()) == {"unknown_user"}
    got = pads.dataset(out).to_table()
    ok = np.ones(200, bool)
    ok[[5, 77]] = False
    ref = Scorer.from_run(world["run"], world["data"]).score(t.filter(pa.array(ok)), keep_columns=["tag"])
    _assert_same_scores(got.append_column("tag", pa.array(np.zeros(got.num_rows), pa.int32())),
                        ref.set_column(ref.schema.get_field_index("tag"), "tag",
                                       pa.array(np.zeros(ref.num_rows), pa.int32())))
    # another job's output is refused without --overwrite; a directory segfast did not write, always
    with pytest.raises(OutDirError, match="different run or input"):
        score_ray(world["run"], world["data"], world["pairs"], out, actors=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match="not a segfast score output"):
        score_ray(world["run"], world["data"], bad, foreign, actors=1, on_unknown="skip", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_callable_class_in_a_users_pipeline(world, local_ray):
    t = world["table"].slice(100, 150)
    ds = ray.data.from_arrow(t).map_batches(
        ScoreBatches, fn_constructor_kwargs={"run_dir": str(world["run"]), "data_dir": str(world["data"]),
                                             "keep_columns": ["tag"]},
        batch_size=50, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    ref = Scorer.from_run(world["run"], world["data"]).score(t, keep_columns=["tag"])
    _assert_same_scores(got, ref)


def test_cli_engine_ray(world, local_ray, tmp_path, capsys):
    from segfast.cli import main

    t = world["table"].slice(0, 120)
    pq.write_table(t, tmp_path / "pairs.parquet")
    job = ["--run-dir", str(world["run"]), "--data", str(world["data"]), "--pairs", str(tmp_path / "pairs.parquet"),
           "--keep-columns", "tag", "--quiet", "--json"]
    ray_ = ["--engine", "ray", "--cpus-per-actor", "0.5", "--ray-batch-rows", "50"]
    assert main(["score", *ray_, "--actors", "1", *job, "--out", str(tmp_path / "o")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows_scored"] == 120 and doc["complete"] and doc["n_parts"] == 3
    man = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert man["engine"] == "ray" and man["identity"]["engine"] == "ray" and man["ray"]["batch_rows"] == 50
    ref = Scorer.from_run(world["run"], world["data"]).score(t, keep_columns=["tag"])
    _assert_same_scores(pads.dataset(tmp_path / "o").to_table(), ref)
    # the local engine does not take over (or resume) a Ray output: another identity
    assert main(["score", *job, "--out", str(tmp_path / "o")]) == 2
    assert "different run or input" in capsys.readouterr().err
    # too many actors for the cluster's CPUs is refused, not left waiting for CPUs forever
    assert main(["score", *ray_, "--actors", "5", *job, "--out", str(tmp_path / "o2")]) == 2
    assert "leaves no CPU" in capsys.readouterr().err


def test_hive_input_and_partition_keys(world, local_ray, tmp_path):
    """A hive-partitioned input: the same files as the local engine, partition keys kept with its types."""
    from segfast.scoring import score

    t = world["table"].slice(0, 160)
    for day in (1, 2):
        d = tmp_path / "hive" / f"day={day}"
        d.mkdir(parents=True)
        pq.write_table(t.slice((day - 1) * 80, 80), d / "x.parquet")
    man = score_ray(world["run"], world["data"], tmp_path / "hive", tmp_path / "o", actors=2, cpus_per_actor=0.5,
                    batch_rows=60, keep_columns=["tag", "day"])
    assert man["input_kind"]["kind"] == "hive" and man["rows_scored"] == 160
    score(world["run"], world["data"], tmp_path / "hive", tmp_path / "local", keep_columns=["tag", "day"],
          progress=False)
    got, ref = pads.dataset(tmp_path / "o").to_table(), pq.read_table(tmp_path / "local")
    assert got.schema.equals(ref.schema)  # day: the local engine's partition type, not Ray's string
    _assert_same_scores(got, ref)
    assert got.sort_by(KEY).column("day").equals(ref.sort_by(KEY).column("day"))
