"""`torchrun -m segfast train` (DistributedDataParallel, 2 CPU processes, gloo) against single-process training.

Reference: the single-process training loop (tests/test_train.py pins its exact resume) run in this process on
the same data, configs and global batches. With dropout 0 (``--set dropout=0.0 --set video_id_dropout=0.0``;
with dropout > 0 every rank draws its own masks, which cannot equal the single process's masks for the whole
batch) and ``feature_rescale=false`` (with the x feature_dim input scale the fp32 reduction-order noise is
larger in absolute terms, and AdamW's normalised step turns it, on a weight whose gradient is near zero, into
an update difference above the tolerance: measured 2.7e-5 on 1 of 1,536 ``proj_v`` weights after 7 steps;
the rescale itself is tested in tests/test_model.py) the two differ only
by fp32 reduction order (the loss and gradient sums are split across ranks and all-reduced), so weights,
AdamW moments and logged losses must agree within

    rtol 1e-4, atol 1e-6   (measured here after 7 AdamW steps: max |weight diff| 3.7e-7, max |AdamW moment
                            diff| 1.0e-7, max relative train_loss diff 1.1e-7)

and the run structure (steps, evaluation points, early stop, file layout) exactly. One weight is excluded:
decoder.bias, whose gradient is 0 up to rounding (see the test), so AdamW moves it by noise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from segfast.checkpoint import load_tensors
from segfast.cli import build_parser
from segfast.train import _ShardSampler, _step_seed, train_from_args

RTOL, ATOL = 1e-4, 1e-6

# 351 training rows, batch 70: an epoch is 6 steps and its last batch has 1 row, so rank 1 gets an empty
# slice at step 6 (the stand-in row with loss weight 0); the other steps are split 35 / 35.
COMMON = ["--modality", "both", "--batch-size", "70", "--seed", "7", "--lr", "3e-3", "--quiet",
          "--set", "dropout=0.0", "--set", "video_id_dropout=0.0", "--set", "feature_rescale=false", "--set", "d_model=16", "--set", "n_heads=2", "--set", "n_layers=2",
          "--set", "d_ff=16", "--set", "max_user_tokens=24"]
MAIN = ["--eval-every", "2", "--patience", "10"]
# lr so small that dev NDCG@5 cannot move: eval at step 1 improves (first), step 2 does not -> early stop
EARLY = ["--eval-every", "1", "--patience", "1", "--lr", "1e-9"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from segfast.data.prepared import prepare
    from segfast.data.synth import synth

    root = tmp_path_factory.mktemp("ddp")
    synth("segmm", root / "raw", users=6, videos=120, interactions=900, seed=3, feature_dim=16, progress=False)
    prepare("segmm", root / "raw", root / "data", seed=3, feature_dim=16, progress=False)
    return root / "data"


def _args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *COMMON, *extra]


def _single(data, out, *extra):
    return train_from_args(build_parser().parse_args(_args(data, out, *extra)))


def _torchrun(data, out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "segfast", *_args(data, out, *extra), "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _max_diff(a: dict, b: dict, skip=()) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if k in skip:
            continue
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
        worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
    return worst


def _files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def _lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_shard_sampler_slices_global_batches():
    base = [np.arange(10, 20), np.arange(5), np.array([7])]
    r0 = list(_ShardSampler(base, 0, 2))
    r1 = list(_ShardSampler(base, 1, 2))
    assert [(list(x), n) for x, n in r0] == [(list(range(10, 15)), 5), ([0, 1, 2], 3), ([7], 1)]
    assert [(list(x), n) for x, n in r1] == [(list(range(15, 20)), 5), ([3, 4], 2), ([7], 0)]  # stand-in row
    assert _step_seed(7, 0, 3) != _step_seed(7, 1, 3) and _step_seed(7, 1, 3) == _step_seed(7, 1, 3)


def test_batch_size_must_divide_by_world_size(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="batch_size=70 is not divisible by WORLD_SIZE=3"):
        _single(data, tmp_path / "run", "--max-steps", "1")
    assert not (tmp_path / "run").exists()


def test_two_processes_match_one_process_with_resume(data, tmp_path, one_thread):
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    _torchrun(data, ddp, *MAIN, "--max-steps", "3")  # stops mid-epoch, off an evaluation point
    assert json.loads((ddp / "metrics.json").read_text())["step"] == 3
    r = _torchrun(data, ddp, *MAIN, "--max-steps", "7")  # resumes: both ranks load last/
    s2 = json.loads((ddp / "metrics.json").read_text())
    s1 = _single(data, ref, *MAIN, "--max-steps", "7")
    # every rank returned (and the CLI printed) rank 0's summary
    # rank 0 alone prints the result, one JSON document (torchrun's exit 0 says both ranks returned)
    assert json.loads(r.stdout)["stopped"] == "max_steps"
    for k in ("step", "epoch", "stopped", "finished", "best_step", "evals", "steps_per_epoch"):
        assert s2[k] == s1[k], k
    # step 6 evaluates and ends epoch 0 (checkpoint at the boundary); step 7 is the first batch of epoch 1
    assert s1["step"] == 7 and s1["steps_per_epoch"] == 6 and s1["epoch"] == 1
    # rank 0 alone wrote the run directory: the same files as a single-process run, no temp leftovers
    assert _files(ddp) == _files(ref)
    la, lb = _lines(ddp), _lines(ref)
    assert [(x["step"], x["epoch"]) for x in la] == [(x["step"], x["epoch"]) for x in lb] == [(2, 0), (4, 0), (6, 0)]
    for x, y in zip(la, lb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=RTOL, abs=ATOL)
        assert x["dev"] == pytest.approx(y["dev"], rel=RTOL, abs=ATOL)
    # decoder.bias shifts all 40 logits of a row alike, and bpr-max depends only on differences of logits, so
    # its gradient is 0 up to rounding; AdamW's normalisation turns that rounding noise into lr-sized steps of
    # either sign. Its weight is therefore not comparable; its gradient moments are (checked below, ~0).
    dw = _max_diff(load_tensors(ddp / "last" / "model.safetensors")[0],
                   load_tensors(ref / "last" / "model.safetensors")[0], skip={"decoder.bias"})
    oa = load_tensors(ddp / "last" / "optimizer.safetensors")[0]
    ob = load_tensors(ref / "last" / "optimizer.safetensors")[0]
    do = _max_diff(oa, ob)
    assert float(ob["decoder.bias/exp_avg"].abs()) < 1e-6
    print(f"max |weight diff| {dw:.3g}, max |AdamW state diff| {do:.3g}, max train_loss rel diff "
          f"{max(abs(x['train_loss'] / y['train_loss'] - 1) for x, y in zip(la, lb)):.3g}")


def test_early_stop_is_broadcast(data, tmp_path, one_thread):
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    r = _torchrun(data, ddp, *EARLY, "--max-steps", "6")
    s1 = _single(data, ref, *EARLY, "--max-steps", "6")
    assert s1["stopped"] == "early_stop" and s1["step"] == 2
    assert json.loads(r.stdout)["stopped"] == "early_stop"  # rank 0's result; exit 0: both ranks returned
    s2 = json.loads((ddp / "metrics.json").read_text())
    assert (s2["stopped"], s2["step"], s2["best_step"]) == (s1["stopped"], s1["step"], s1["best_step"])
    # the gradients (AdamW moments do not depend on lr) agree with the single process's
    do = _max_diff(load_tensors(ddp / "last" / "optimizer.safetensors")[0],
                   load_tensors(ref / "last" / "optimizer.safetensors")[0])
    print(f"early stop: max |AdamW state diff| {do:.3g}")
