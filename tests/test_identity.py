"""Issue 15 item 3: a full identity for resume and compatibility (cases 5, 7 and 9).

- case 5: a prepared dataset's content fingerprint (sha256 of the id maps, interactions, features, visual
  histories, stored by prepare) is in the run's data fingerprint and in a score output's identity: changed
  features (same shape) or rotated user ids are refused by score and evaluate, never mixed into a resume;
- case 7: the weights record the model config they were built with: an edited config.json is refused;
- case 9: the batch size is in a score output's identity: a resume with another one is refused (or, with
  overwrite, restarted whole), never mixed.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from segfast import _fingerprint
from segfast.checkpoint import CheckpointError, check_compatible, load_run
from segfast.data.prepared import load_prepared, prepare_raw
from segfast.scoring import OutDirError, Scorer, score
from _fakes import F, RandomFeatures, interaction_pairs, make_run, prepared_world, raw_interactions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def world(tmp_path):
    p = prepared_world(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(interaction_pairs(p), pairs)
    return {"root": tmp_path, "p": p, "data": tmp_path / "p", "pairs": pairs, "run": make_run(tmp_path, p, "visual")}


class _Stop(Exception):
    pass


def _partial(run, data, pairs, out, n_done=2, **kw):
    """A score run stopped after ``n_done`` parts (as a kill would leave it)."""
    def stop(rec):
        if rec["part"] + 1 >= n_done:
            raise _Stop
    with pytest.raises(_Stop):
        score(run, data, pairs, out, part_rows=60, progress=False, on_part=stop, **kw)
    man = json.loads((out / "_manifest.json").read_text())
    assert len(man["parts"]) == n_done and not man["complete"]


def test_prepare_stores_the_fingerprint_and_old_datasets_still_load(world):
    d = world["data"]
    man = json.loads((d / "manifest.json").read_text())
    fp = man["fingerprint"]
    assert set(fp["files"]) == {"users.parquet", "videos.parquet", "interactions.parquet", "features.npy",
                                "vhist.npy"}
    for name, rec in fp["files"].items():  # independent of segfast: hashlib over the bytes
        import hashlib
        assert rec["sha256"] == hashlib.sha256((d / name).read_bytes()).hexdigest()
        assert rec["size"] == (d / name).stat().st_size
    assert world["p"].content_fingerprint() == fp["sha256"]
    # a dataset prepared before the fingerprint: loads, and its fingerprint is computed from the files
    old = world["root"] / "old"
    shutil.copytree(d, old)
    m = dict(man)
    del m["fingerprint"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert load_prepared(old).content_fingerprint() == fp["sha256"]
    check_compatible(load_run(world["run"])[1], load_prepared(old))  # the same data: accepted


def _change_features(d):
    f = np.load(d / "features.npy", mmap_mode="r+")
    shape = f.shape
    f[:] = f[::-1].copy()  # same shape and dtype, other content
    f.flush()
    del f
    st = os.stat(d / "features.npy")
    os.utime(d / "features.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert np.load(d / "features.npy", mmap_mode="r").shape == shape


def test_case5_changed_features_refuse_the_run_and_the_resume(world, tmp_path):
    run, data, pairs = world["run"], world["data"], world["pairs"]
    out = tmp_path / "o"
    _partial(run, data, pairs, out, batch_size=50)
    _change_features(data)
    p2 = load_prepared(data)
    assert p2.content_fingerprint() != world["p"].content_fingerprint()
    assert p2.content_changed == ["features.npy"]
    # the run was trained on the old content: score refuses it, naming the changed file
    with pytest.raises(ValueError, match=r"content fingerprint .*\['features.npy'\] changed since prepare"):
        score(run, data, pairs, out, batch_size=50, part_rows=60, progress=False)
    # a run made before the fingerprint (no content_sha256 in its config): the output's identity refuses it
    cfg = json.loads((run / "config.json").read_text())
    del cfg["data"]["content_sha256"]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OutDirError, match="data.content_sha256"):
        score(run, data, pairs, out, batch_size=50, part_rows=60, progress=False)
    man = json.loads((out / "_manifest.json").read_text())
    assert len(man["parts"]) == 2  # the old parts untouched, nothing new mixed in


def test_case5_rotated_user_ids_are_another_dataset(world, tmp_path):
    from segfast.evaluate import evaluate_run

    raw = raw_interactions()
    rot = {4: 8, 8: 9, 9: 11, 11: 4}
    raw.user_id[:] = np.array([rot[int(u)] for u in raw.user_id])
    prepare_raw(raw, tmp_path / "rot", "segmm", seed=2, feature_source=RandomFeatures(F), progress=False)
    q = load_prepared(tmp_path / "rot")
    assert (q.n_users, q.n_videos, len(q)) == (world["p"].n_users, world["p"].n_videos, len(world["p"]))
    with pytest.raises(ValueError, match="content fingerprint"):
        Scorer.from_run(world["run"], tmp_path / "rot")
    with pytest.raises(ValueError, match="content fingerprint"):
        evaluate_run(tmp_path / "rot", world["run"], split="test", device="cpu")


@pytest.mark.parametrize("field,value", [("n_heads", 4), ("feature_rescale", False)])
def test_case7_edited_config_is_refused(world, field, value):
    run = world["run"]
    ref = Scorer.from_run(run, world["data"]).score(interaction_pairs(world["p"]).slice(0, 20))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"][field] != value
    cfg["model"][field] = value
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{field} .* \\(now {value!r}\\)"):
        load_run(run)
    with pytest.raises(CheckpointError, match="another model config"):
        Scorer.from_run(run, world["data"])
    # the backend is an execution choice, not part of the weights' config
    cfg["model"][field] = not value if isinstance(value, bool) else 2
    cfg["model"]["backend"] = "sdpa"
    (run / "config.json").write_text(json.dumps(cfg))
    load_run(run)
    got = Scorer.from_run(run, world["data"], backend="torch").score(interaction_pairs(world["p"]).slice(0, 20))
    assert got.column("scores").to_pylist() == ref.column("scores").to_pylist()


def test_case9_resume_with_another_batch_size_is_refused_or_restarted(world, tmp_path):
    run, data, pairs = world["run"], world["data"], world["pairs"]
    out = tmp_path / "o"
    _partial(run, data, pairs, out, batch_size=50)
    with pytest.raises(OutDirError, match="batch_size"):
        score(run, data, pairs, out, batch_size=64, part_rows=60, progress=False)
    man = score(run, data, pairs, out, batch_size=64, part_rows=60, progress=False, overwrite=True)
    assert man["complete"] and {r["batch_size"] for r in man["parts"]} == {64}
    ref = score(run, data, pairs, tmp_path / "ref", batch_size=64, part_rows=60, progress=False)
    for a, b in zip(man["parts"], ref["parts"]):
        assert a["sha256"] == b["sha256"]  # every part from the one batch size
    # the same batch size resumes
    out2 = tmp_path / "o2"
    _partial(run, data, pairs, out2, batch_size=50)
    done = json.loads((out2 / "_manifest.json").read_text())["parts"]
    man2 = score(run, data, pairs, out2, batch_size=50, part_rows=60, progress=False)
    assert man2["complete"] and man2["parts"][:2] == done


def test_training_resume_of_a_run_from_before_the_fingerprint(world):
    from segfast.checkpoint import data_fingerprint, read_run_config
    from segfast.train import RunDirError, _check_out_dir

    run, p = world["run"], world["p"]
    cfg = read_run_config(run)
    mc, data = cfg["model"], data_fingerprint(p)
    from segfast.model.config import TrainConfig
    tc = TrainConfig()
    raw = json.loads((run / "config.json").read_text())
    raw["train"] = tc.to_dict()
    raw["data"]["content_sha256"] = "0" * 64  # trained on other content: refused
    (run / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RunDirError, match="content_sha256"):
        _check_out_dir(run, mc, tc, data)
    del raw["data"]["content_sha256"]  # a run from before the fingerprint: accepted
    (run / "config.json").write_text(json.dumps(raw))
    _check_out_dir(run, mc, tc, data)
