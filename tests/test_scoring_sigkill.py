"""A long ``segfast score`` run killed with SIGKILL at random (seeded) moments, then rerun with the same
command to completion: the output equals an uninterrupted run bit for bit and reads back as a dataset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from segfast.checkpoint import data_fingerprint, save_model, write_run_config
from segfast.data.prepared import load_prepared, prepare
from segfast.data.synth import synth
from segfast.model import SegInterestModel, model_preset

REPO = Path(__file__).resolve().parents[1]
PAIRS = 24_000
PART_ROWS = 1_500  # 16 parts
KILLS = 3
SEED = 1234


def _world(root: Path):
    synth("segmm", root / "raw", users=60, videos=600, interactions=6_000, seed=0, feature_dim=16, progress=False)
    prepare("segmm", root / "raw", root / "prep", feature_dim=16, progress=False)
    p = load_prepared(root / "prep")
    cfg = model_preset("small", modality="id").for_data(p.n_users, p.n_videos, p.feature_dim)
    torch.manual_seed(0)
    run = root / "run"
    run.mkdir()
    write_run_config(run, cfg, None, data_fingerprint(p))
    save_model(run / "model.safetensors", SegInterestModel(cfg))
    rng = np.random.default_rng(0)
    t = p.interactions["time_ms"]
    pq.write_table(pa.table({"user_id": p.users["user_id"][rng.integers(0, p.n_users, PAIRS)],
                             "video_id": p.videos["video_id"][rng.integers(0, p.n_videos, PAIRS)],
                             "time_ms": rng.integers(int(t.min()), int(t.max()) + 2, PAIRS),
                             "request": np.arange(PAIRS) * 3}),
                   root / "pairs.parquet", row_group_size=4_000)
    return run, root / "prep", root / "pairs.parquet"


def _cmd(run, data, pairs, out):
    return [sys.executable, "-m", "segfast", "score", "--run-dir", str(run), "--data", str(data), "--pairs",
            str(pairs), "--out", str(out), "--part-rows", str(PART_ROWS), "--batch-size", "256", "--device", "cpu",
            "--threads", "1", "--keep-columns", "request", "--quiet", "--json"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _parts_done(out: Path) -> int:
    try:
        return len(json.loads((out / "_manifest.json").read_text())["parts"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    run, data, pairs = _world(tmp_path)
    out = tmp_path / "killed"
    rng = np.random.default_rng(SEED)
    n_parts = -(-PAIRS // PART_ROWS)
    # kill 1 lands in start-up / the validation pass / the first parts; kills 2 and 3 after random numbers of
    # finished parts, a random delay later (capped at two more parts, so that a fast machine cannot finish first)
    targets = [0] + sorted(rng.choice(np.arange(1, n_parts - 3), KILLS - 1, replace=False).tolist())
    done_before = []
    for target in targets:
        proc = subprocess.Popen(_cmd(run, data, pairs, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        delay = rng.uniform(0.3, 3.0) if target == 0 else rng.uniform(0.0, 1.0)
        deadline = time.time() + 120
        while _parts_done(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        t_kill = time.time() + delay
        while time.time() < t_kill and _parts_done(out) < target + 2 and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        done_before.append(_parts_done(out))
    assert done_before[-1] < n_parts and max(done_before) >= 1, done_before
    r = subprocess.run(_cmd(run, data, pairs, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["complete"] and doc["rows_scored"] == PAIRS
    assert doc["timing"]["this_run_pairs"] == PAIRS - done_before[-1] * PART_ROWS  # finished parts kept
    assert not [x.name for x in out.iterdir() if x.name.startswith(".")]  # no temp file left

    ref_out = tmp_path / "uninterrupted"
    r = subprocess.run(_cmd(run, data, pairs, ref_out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = ds.dataset(out, format="parquet").to_table().sort_by("row")
    ref = ds.dataset(ref_out, format="parquet").to_table().sort_by("row")
    assert got.num_rows == PAIRS and got.column("row").to_pylist() == list(range(PAIRS))
    assert got.column("request").to_pylist() == [3 * i for i in range(PAIRS)]
    a = np.concatenate(got.column("scores").to_numpy(zero_copy_only=False))
    b = np.concatenate(ref.column("scores").to_numpy(zero_copy_only=False))
    assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist()  # bit for bit
    assert got.equals(ref)
    print(f"parts finished before each kill: {done_before} of {n_parts} (targets {targets})")
