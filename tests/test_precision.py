"""Mixed precision (``--precision``): bf16 autocast on CPU against fp32 (scores and Task-1 metrics), the fp16
path with its loss scaler (exact resume), the precision in the run config and in the score output's identity.

Tolerances (bf16 keeps 8 significant bits: a rounding step of 2**-8 = 0.4% relative):
- Scores of one trained run, bf16 vs fp32 autocast: every matmul input is rounded to bf16 (2 encoder layers of
  projections, attention and FFN, plus the decoder's dot products), and on CPU the reference attention softmax
  also runs in bf16 (torch's CPU autocast leaves softmax in its input dtype). The position terms and the bias
  are added in fp32, so the error is a few bf16 roundings (2**-9 relative each) of the content part: max |diff|
  <= 1% and mean |diff| <= 0.2% of the largest |logit| (measured here: 0.14% and 0.025%); within each pair the
  order of the segments must agree (mean Spearman >= 0.99, the same leave slot for >= 95% of the pairs;
  near-ties may swap; measured 0.9994 and 99.4%).
- Task-1 metrics of a bf16-trained run vs the fp32-trained run (same seed, data and schedule): the two runs
  diverge from the first step (rounding), so they differ as two seeds do; on the few hundred test rows here
  that is a few points of HR@1 / NDCG@5, so the margin is 0.06 absolute (both runs must also beat Random).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from segfast import precision as sfprec
from segfast.model.config import ModelConfig, TrainConfig

FEAT = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny synthetic SegMM data (planted interest) and two runs trained on it, fp32 and bf16."""
    from segfast.data.prepared import load_prepared, prepare
    from segfast.data.synth import synth
    from segfast.train import train

    root = tmp_path_factory.mktemp("precision")
    synth("segmm", root / "raw", users=24, videos=300, interactions=3600, seed=0, feature_dim=FEAT, progress=False)
    prepare("segmm", root / "raw", root / "data", seed=0, feature_dim=FEAT, progress=False)
    runs = {}
    for p in ("fp32", "bf16"):
        runs[p] = root / f"run-{p}"
        train(root / "data", runs[p], _mc(), _tc(), progress=False, precision=p)
    prep = load_prepared(root / "data")
    it, rows = prep.interactions, prep.rows("test")
    pairs = pa.table({"user_id": prep.users["user_id"][it["user_idx"][rows]],
                      "video_id": prep.videos["video_id"][it["video_idx"][rows]], "time_ms": it["time_ms"][rows]})
    return {"root": root, "data": root / "data", "runs": runs, "pairs": pairs}


def _mc(**kw):
    base = dict(modality="both", d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, max_user_tokens=16)
    return ModelConfig(**{**base, **kw})


def _tc(**kw):
    base = dict(batch_size=64, epochs=2, eval_every=1000, patience=10, seed=3, lr=5e-3, lr_schedule="cosine",
                warmup_steps=5, device="cpu")
    return TrainConfig(**{**base, **kw})


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(np.argsort(a, kind="stable"), np.argsort(b, kind="stable")) else 0.0
    return float(spearmanr(a, b).statistic)


def score_diff(t32: pa.Table, t16: pa.Table) -> dict:
    """max / mean |diff| of the per-segment scores, the largest |score|, mean within-pair Spearman and the
    share of pairs with the same leave slot, for two score tables of the same pairs."""
    assert t32.column("row").equals(t16.column("row"))
    a = t32.column("scores").combine_chunks().flatten().to_numpy().astype(np.float64)
    b = t16.column("scores").combine_chunks().flatten().to_numpy().astype(np.float64)
    off = t32.column("scores").combine_chunks().offsets.to_numpy()
    rho = [_spearman(a[s:e], b[s:e]) for s, e in zip(off[:-1], off[1:]) if e - s >= 3]
    d = np.abs(a - b)
    leave = np.mean(t32.column("leave_slot").to_numpy() == t16.column("leave_slot").to_numpy())
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "scale": float(np.abs(a).max()),
            "spearman": float(np.mean(rho)), "same_leave_slot": float(leave)}


def test_resolve_and_autocast_policy(monkeypatch):
    assert sfprec.resolve_precision(None, "cpu") == "fp32" == sfprec.resolve_precision("auto", "cpu")
    assert sfprec.default_precision("cuda:1") == "bf16" and sfprec.default_precision("cpu") == "fp32"
    assert sfprec.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(sfprec.PrecisionError, match="expected one of auto, fp32, bf16, fp16"):
        sfprec.resolve_precision("half", "cpu")
    lin = torch.nn.Linear(4, 4)
    with sfprec.autocast("cpu", "bf16"):
        assert lin(torch.ones(2, 4)).dtype == torch.bfloat16
    with sfprec.autocast("cpu", "fp32"):
        assert lin(torch.ones(2, 4)).dtype == torch.float32
    # the decoder's logits and the loss stay fp32 under autocast (the reference upcasts, softmax of fp32 is fp32)
    from segfast.ops.reference import decode_and_loss

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(5, 40, 16, generator=g, dtype=torch.bfloat16) for _ in range(2))
    w, f, pa_ = torch.randn(16, generator=g), torch.randn(2, 8, 8, generator=g), torch.ones(40)
    with sfprec.autocast("cpu", "bf16"):
        logits, loss = decode_and_loss(x, y, w, w, torch.zeros(()), f, pa_, pa_, torch.tensor([1, 3, 0, 39, 40]))
    assert logits.dtype == loss.dtype == torch.float32 and torch.isfinite(loss)
    assert sfprec.grad_scaler("cpu", "bf16") is None and sfprec.grad_scaler("cpu", "fp16") is not None
    # a device type without autocast is one clear error, not a traceback from inside torch
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda kind: False)
    with pytest.raises(sfprec.PrecisionError, match="no autocast for device type 'cpu'; use --precision fp32"):
        sfprec.resolve_precision("bf16", "cpu")


def test_bf16_scores_within_tolerance_of_fp32(world):
    from segfast.scoring import Scorer

    got = {}
    for p in ("fp32", "bf16"):
        sc = Scorer.from_run(world["runs"]["fp32"], world["data"], device="cpu", precision=p)
        assert sc.precision == p
        got[p] = sc.score(world["pairs"])
    assert Scorer.from_run(world["runs"]["fp32"], world["data"], device="cpu").precision == "fp32"  # CPU default
    d = score_diff(got["fp32"], got["bf16"])
    print("bf16 vs fp32 scores:", json.dumps(d))
    assert d["max_abs"] > 0, "bf16 gave bit-identical scores: autocast was not applied"
    assert d["max_abs"] <= 0.01 * d["scale"] and d["mean_abs"] <= 0.002 * d["scale"], d
    assert d["spearman"] >= 0.99 and d["same_leave_slot"] >= 0.95, d


def test_bf16_trained_task1_metrics_within_margin_of_fp32(world):
    from segfast.checkpoint import load_tensors, read_json
    from segfast.evaluate import evaluate_run, run_baselines

    res = {p: evaluate_run(world["data"], world["runs"][p], split="test") for p in ("fp32", "bf16")}
    rnd = run_baselines(world["data"], split="test")["Random"]["metrics"]
    print("Task-1 test:", {p: {k: r["metrics"][k] for k in ("HR@1", "NDCG@5")} for p, r in res.items()}, rnd)
    for k in ("HR@1", "NDCG@5"):
        assert abs(res["bf16"]["metrics"][k] - res["fp32"]["metrics"][k]) <= 0.06, (k, res)
        assert res["bf16"]["metrics"][k] > rnd[k] and res["fp32"]["metrics"][k] > rnd[k], (k, res, rnd)
    assert res["bf16"]["precision"] == "fp32"  # evaluation uses the device's default, not the training precision
    run = world["runs"]["bf16"]
    assert read_json(run / "config.json")["precision"] == "bf16" and read_json(run / "metrics.json")["precision"] == "bf16"
    # fp32 master weights and optimizer state
    for f in ("model.safetensors", "optimizer.safetensors"):
        dts = {t.dtype for t in load_tensors(run / "last" / f)[0].values() if t.is_floating_point()}
        assert dts == {torch.float32}, (f, dts)
    # the bf16 run really trained under autocast: its weights differ from the fp32 run's
    w16, w32 = load_tensors(run / "model.safetensors")[0], load_tensors(world["runs"]["fp32"] / "model.safetensors")[0]
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)


def test_fp16_on_cpu_trains_with_loss_scaling_and_resumes_exactly(world, tmp_path):
    from segfast.checkpoint import load_tensors, read_json
    from segfast.train import RunDirError, train

    # the reference attention (backend torch) masks with -1e30, which fp16 cannot hold: one clear error
    with pytest.raises(sfprec.PrecisionError, match="fp16 with backend 'torch'.*use --backend sdpa"):
        train(world["data"], tmp_path / "t", _mc(n_layers=1), _tc(), progress=False, precision="fp16")
    assert not (tmp_path / "t").exists()
    mc, tc = _mc(n_layers=1, backend="sdpa"), _tc(epochs=1, eval_every=4, grad_clip=1.0)
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train(world["data"], a, mc, tc, progress=False, max_steps=6, precision="fp16")
    train(world["data"], b, mc, tc, progress=False, max_steps=3, precision="fp16")
    sb = train(world["data"], b, mc, tc, progress=False, max_steps=6)  # None: resumes with the run's own fp16
    assert sa["step"] == sb["step"] == 6 and sa["precision"] == sb["precision"] == "fp16"
    for f in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_tensors(a / "last" / f)[0], load_tensors(b / "last" / f)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    ga, gb = (read_json(x / "last" / "state.json")["state"]["grad_scaler"] for x in (a, b))
    # same scaler state; the scale stays a power of two (halved on overflow, doubled after growth_interval)
    assert ga == gb and ga["scale"] > 0 and np.log2(ga["scale"]) == int(np.log2(ga["scale"])), ga
    with pytest.raises(RunDirError, match="precision: 'fp16' \\(run\\) vs 'bf16' \\(now\\)"):
        train(world["data"], a, mc, tc, progress=False, max_steps=8, precision="bf16")


def test_precision_is_part_of_the_score_output_identity(world, tmp_path):
    import pyarrow.parquet as pq

    from segfast.scoring import Scorer
    from segfast.scoring.common import OutDirError

    pq.write_table(world["pairs"], tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    sc32 = Scorer.from_run(world["runs"]["fp32"], world["data"], device="cpu", precision="fp32")
    sc16 = Scorer.from_run(world["runs"]["fp32"], world["data"], device="cpu", precision="bf16")
    m = sc32.score_dataset(tmp_path / "pairs.parquet", out, part_rows=200, progress=False)
    assert m["precision"] == "fp32" and "precision" not in m["identity"]  # fp32 outputs of before still resume
    with pytest.raises(OutDirError, match="precision"):
        sc16.score_dataset(tmp_path / "pairs.parquet", out, part_rows=200, progress=False)
    m = sc16.score_dataset(tmp_path / "pairs.parquet", out, part_rows=200, progress=False, overwrite=True)
    assert m["precision"] == "bf16" and m["identity"]["precision"] == "bf16" and m["complete"]
    again = sc16.score_dataset(tmp_path / "pairs.parquet", out, part_rows=200, progress=False)  # resumes: no work
    assert again["timing"]["this_run_pairs"] == 0
    assert pq.read_table(out).sort_by("row").column("scores").equals(sc16.score(world["pairs"]).column("scores"))


def test_cli_precision_flag(world, tmp_path, capsys):
    from segfast.cli import UsageError, apply_runtime, build_parser

    p = build_parser()
    for cmd, extra in (("train", ["--data", "d", "--out", "o"]), ("evaluate", ["--data", "d", "--run-dir", "r"]),
                       ("score", ["--run-dir", "r", "--data", "d", "--pairs", "x", "--out", "o"]),
                       ("thumbnails", ["--run-dir", "r", "--data", "d", "--pairs", "x", "--out", "o"]),
                       ("edit", ["--run-dir", "r", "--data", "d", "--pairs", "x", "--out", "o"])):
        a = p.parse_args([cmd, *extra])
        assert a.precision == "auto", cmd
        a = p.parse_args([cmd, *extra, "--precision", "bf16", "--device", "cpu"])
        apply_runtime(a)
        assert a.precision == "bf16"
    a = p.parse_args(["evaluate", "--data", "d", "--run-dir", "r", "--device", "cpu", "--precision", "fp16"])
    import unittest.mock as um

    with um.patch.object(sfprec, "_fp16_autocast_ok", lambda kind: False):
        with pytest.raises(UsageError, match="--precision fp16: precision fp16: .* use --precision bf16 or fp32"):
            apply_runtime(a)
    # end to end: fp16 with the reference backend is one line on stderr and exit code 2
    from segfast.cli import main

    rc = main(["train", "--data", str(world["data"]), "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet",
               "--precision", "fp16"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fp16 with backend 'torch'" in err and "Traceback" not in err, err

    rc = main(["evaluate", "--data", str(world["data"]), "--run-dir", str(world["runs"]["fp32"]), "--device", "cpu",
               "--precision", "bf16", "--json", "--quiet"])
    assert rc == 0
