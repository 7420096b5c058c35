"""Calibrated interest (segfast.calibration, issue 16): the survival algebra by hand, the labels from (y, N), a
fit that recovers a known keep probability, the JSON file and its refusals, score --probabilities and the
calibration section of evaluate against independent computations."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from segfast import calibration as C

from _fakes import interaction_pairs, make_run, prepared_world

pytestmark = pytest.mark.usefixtures("one_thread")
S = 40


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------------------------ algebra by hand

def test_survival_leave_expectation_by_hand():
    nan = np.nan
    keep = np.array([[0.5, 0.8, 0.25], [0.9, nan, nan]])
    n = np.array([3, 1])
    Sv = C.survival(keep, n)
    assert Sv.shape == (2, 41)
    np.testing.assert_allclose(Sv[0, :4], [1.0, 0.5, 0.4, 0.1])
    np.testing.assert_allclose(Sv[1, :2], [1.0, 0.9])
    assert np.isnan(Sv[0, 4:]).all() and np.isnan(Sv[1, 2:]).all()
    P = C.leave_distribution(keep, n)
    np.testing.assert_allclose(P[0, :4], [0.5, 0.1, 0.3, 0.1])  # 1-0.5; 0.5*0.2; 0.4*0.75; watched to the end
    np.testing.assert_allclose(P[1, :2], [0.1, 0.9])
    assert (P[0, 4:] == 0).all() and (P[1, 2:] == 0).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    np.testing.assert_allclose(C.expected_watch_segments(keep, n), [0 * .5 + 1 * .1 + 2 * .3 + 3 * .1, 0.9])
    assert C.most_likely_leave(keep, n).tolist() == [0, 1]
    # torch input, and keep values beyond N are ignored whatever they hold
    k2 = torch.tensor([[0.5, 0.8, 0.25], [0.9, 0.3, 0.7]])
    np.testing.assert_allclose(C.expected_watch_segments(k2, torch.tensor([3, 1])), [1.0, 0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="probabilities"):
        C.survival(np.array([[1.5]]), np.array([1]))
    with pytest.raises(ValueError, match="only 3 slots"):
        C.survival(keep, np.array([4, 1]))


def test_labels_from_target_and_length():
    y = np.array([0, 3, 2, 40, 1])
    n = np.array([3, 3, 5, 40, 1])
    lab, obs = C.keep_labels(y, n)
    assert obs[0].tolist()[:4] == [True, False, False, False] and lab[0, 0] == 0  # left in slot 0
    assert obs[1, :3].all() and not obs[1, 3:].any() and (lab[1, :3] == 1).all()  # y == N: all kept
    assert obs[2].tolist()[:5] == [True, True, True, False, False] and lab[2, :3].tolist() == [1, 1, 0]
    assert obs[3].all() and (lab[3] == 1).all()  # a full 40-segment watch
    assert obs[4].tolist()[:2] == [True, False] and lab[4, 0] == 1  # one segment, watched to the end
    assert obs.sum() == 1 + 3 + 3 + 40 + 1
    with pytest.raises(ValueError, match="target"):
        C.keep_labels(np.array([4]), np.array([3]))


def test_features_and_input_checks():
    p = np.array([[0.0, 1.0, 2.0, 3.0, -5.0]])
    n = np.array([3])  # candidates 0..3 (slot 3: completed pseudo-slot)
    x = C._features(p, n, "hazard")
    # logit(1 - h_i), h_i = e^-p_i / sum_{j >= i, j <= 3} e^-p_j
    for i in range(3):
        tail = sum(math.exp(-p[0, j]) for j in range(i + 1, 4))
        assert x[0, i] == pytest.approx(math.log(tail / math.exp(-p[0, i])))
    np.testing.assert_allclose(C._features(p, n, "relative")[0, :4], p[0, :4] - 3.0)
    cal = C.Calibrator("platt", "raw", None, [[1.0, 0.0, 0.0]])
    k = cal.keep_probability(p, n)
    np.testing.assert_allclose(k[0, :3], _sig(p[0, :3]))
    assert np.isnan(k[0, 3:]).all()
    with pytest.raises(ValueError, match="needs slots 0..3"):
        cal.keep_probability(p[:, :3], n)
    with pytest.raises(ValueError, match="non-finite"):
        cal.keep_probability(np.array([[np.nan, 0, 0, 0]]), n)
    with pytest.raises(ValueError, match="n_segments"):
        cal.keep_probability(p, np.array([41]))


# ------------------------------------------------------------------------------------------------ fitting

def _simulate(rng, R, keep_fn):
    """Rows with random logits and N; each user walks the slots, keeping slot i with prob keep_fn(...)[i]."""
    n = rng.integers(1, S + 1, R)
    p = rng.normal(0, 1.5, (R, S))
    k = keep_fn(p, n)
    u = rng.random((R, S))
    y = np.empty(R, np.int64)
    for r in range(R):
        left = np.flatnonzero(u[r, :n[r]] >= k[r, :n[r]])
        y[r] = left[0] if left.size else n[r]
    return p, y, n


def _ece_loop(pred, lab, bins=15):
    """An independent ECE: a plain loop over bins."""
    tot = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (pred >= lo) & ((pred < hi) if b < bins - 1 else (pred <= hi))
        if m.any():
            tot += m.sum() * abs(pred[m].mean() - lab[m].mean())
    return tot / pred.size


@pytest.mark.parametrize("form,feature", [("platt", "raw"), ("platt-groups", "raw"), ("isotonic-groups", "raw"),
                                          ("platt-groups", "hazard")])
def test_fit_recovers_known_keep_probability(form, feature):
    rng = np.random.default_rng(3)
    if feature == "raw":
        def truth(p, n):
            return _sig(0.9 * p + 1.2)
    else:
        def truth(p, n):
            x = C._features(p, n, "hazard")
            return _sig(0.7 * x + 0.8 + 0.1 * np.log(n)[:, None])
    p, y, n = _simulate(rng, 6000, truth)
    cal = C.fit_calibrator(p, y, n, form=form, feature=feature)
    q, yq, nq = _simulate(np.random.default_rng(4), 3000, truth)
    k = cal.keep_probability(q, nq)
    t = truth(q, nq)
    real = np.arange(S)[None, :] < nq[:, None]
    err = np.abs(k[real] - t[real])
    assert err.mean() < (0.03 if form.startswith("platt") else 0.05), err.mean()
    lab, obs = C.keep_labels(yq, nq)
    rel = C.reliability(k[obs], lab[obs])
    assert rel["ece"] == pytest.approx(_ece_loop(k[obs], lab[obs]), abs=1e-12)
    assert rel["brier"] == pytest.approx(np.mean((k[obs] - lab[obs]) ** 2))
    assert rel["ece"] < 0.03
    raw = C.reliability(_sig(q)[obs], lab[obs])
    assert rel["brier"] <= raw["brier"] + 1e-9
    if form == "platt":
        a, b, c = cal.params[0]
        assert a == pytest.approx(0.9, abs=0.08) and b == pytest.approx(1.2, abs=0.12) and c == 0.0


def test_row_constant_does_not_change_relative_or_hazard_forms():
    rng = np.random.default_rng(0)
    p, y, n = _simulate(rng, 800, lambda p, n: _sig(p))
    for feat in ("relative", "hazard"):
        cal = C.fit_calibrator(p, y, n, feature=feat)
        shift = p + rng.normal(0, 5, (p.shape[0], 1))  # BPR-max is blind to a per-row constant
        np.testing.assert_allclose(cal.keep_probability(shift, n), cal.keep_probability(p, n), atol=1e-9)


@pytest.mark.parametrize("form", C.FORMS)
def test_json_round_trip(form):
    rng = np.random.default_rng(1)
    p, y, n = _simulate(rng, 500, lambda p, n: _sig(p + 1))
    cal = C.fit_calibrator(p, y, n, form=form, feature="relative", checkpoint={"which": "best", "digest": "ab"})
    d = json.loads(json.dumps(cal.to_dict()))
    back = C.Calibrator.from_dict(d)
    np.testing.assert_array_equal(back.keep_probability(p, n), cal.keep_probability(p, n))
    assert back.to_dict() == d and back.checkpoint == {"which": "best", "digest": "ab"}
    bad = dict(d, version=99)
    with pytest.raises(C.CalibrationError, match="version 99"):
        C.Calibrator.from_dict(bad)
    with pytest.raises(C.CalibrationError, match="params"):
        C.Calibrator.from_dict(dict(d, params=d["params"][:-1]))
    with pytest.raises(C.CalibrationError, match="format"):
        C.Calibrator.from_dict(dict(d, format="pickle"))


# ------------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    p = prepared_world(root)
    run = make_run(root, p, "id")
    return root, p, run


def _uncalibrated_copy(world, tmp_path):
    """(root, prepared, a copy of the world's run without calibration.json) under tmp_path."""
    root, p, run0 = world
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    (run / C.CALIBRATION_FILE).unlink(missing_ok=True)
    return root, p, run


def test_run_file_missing_corrupt_and_wrong_checkpoint(world, tmp_path):
    root, p, run = _uncalibrated_copy(world, tmp_path)
    with pytest.raises(C.CalibrationMissingError, match="segfast calibrate --run-dir"):
        C.load_calibrator(run)
    cal = C.calibrate_run(run, root / "p")
    assert (run / C.CALIBRATION_FILE).is_file() and cal.fitted_on["split"] == "dev"
    got = C.load_calibrator(run)
    assert got.checkpoint == cal.checkpoint == C.checkpoint_digest(run, "best")
    assert C.load_calibrator(run, "final").checkpoint["digest"] == cal.checkpoint["digest"]  # the same weights
    from segfast.verify import verify
    assert verify(run)["ok"]
    # other weights: refused, naming the command
    from segfast.checkpoint import save_model
    from segfast.model.model import SegInterestModel
    from segfast.checkpoint import read_run_config
    torch.manual_seed(5)
    save_model(run / "model.safetensors", SegInterestModel(read_run_config(run)["model"]))
    with pytest.raises(C.CalibrationMissingError, match="no calibration for the best checkpoint.*segfast calibrate"):
        C.load_calibrator(run)
    v = verify(run)
    assert not v["ok"] and any("no checkpoint" in x for x in v["problems"])
    # a new calibration drops the entry of weights no checkpoint holds any more ...
    C.calibrate_run(run, root / "p")
    assert len(json.loads((run / C.CALIBRATION_FILE).read_text())["entries"]) == 1 and verify(run)["ok"]
    # ... and keeps those of the run's other checkpoints
    (run / "last").mkdir()
    torch.manual_seed(6)
    save_model(run / "last" / "model.safetensors", SegInterestModel(read_run_config(run)["model"]))
    (run / "last" / "state.json").write_text(json.dumps({"state": {}}))
    last = C.calibrate_run(run, root / "p", which="last")
    assert len(json.loads((run / C.CALIBRATION_FILE).read_text())["entries"]) == 2
    assert C.load_calibrator(run, "last").checkpoint == last.checkpoint != C.load_calibrator(run, "best").checkpoint
    # corrupt files
    (run / C.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(C.CalibrationError, match="unreadable calibration file"):
        C.load_calibrator(run)
    assert not verify(run)["ok"]
    (run / C.CALIBRATION_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(C.CalibrationError, match="not a segfast calibration file"):
        C.load_calibrator(run)


def test_score_probabilities_columns(world, tmp_path):
    import pyarrow.parquet as pq

    from segfast.scoring import Scorer

    root, p, run = _uncalibrated_copy(world, tmp_path)
    with pytest.raises(C.CalibrationMissingError, match="segfast calibrate"):
        Scorer.from_run(run, root / "p", device="cpu", probabilities=True)
    C.calibrate_run(run, root / "p")
    cal = C.load_calibrator(run)
    sc = Scorer.from_run(run, root / "p", device="cpu", probabilities=True, batch_size=32)
    seen = {}
    inner = sc.model.score

    def spy(batch):  # the model's own logits of every pair (incl. the completed pseudo-slot N)
        out = inner(batch)
        for r, row in zip(batch["row"].tolist(), out.float().cpu().numpy()):
            seen[r] = row
        return out
    sc.model.score = spy
    pairs = interaction_pairs(p).slice(0, 150)
    t = sc.score(pairs, part_rows=64)
    n = t["n_segments"].to_numpy().astype(np.int64)
    width = max(len(v) for v in seen.values())
    L = np.zeros((len(n), S))
    for i, r in enumerate(t["row"].to_pylist()):
        L[i, :len(seen[r])] = seen[r]
    keep = cal.keep_probability(L, n)
    for i, (sv, kv, sur) in enumerate(zip(t["scores"].to_pylist(), t["keep_probability"].to_pylist(),
                                         t["survival"].to_pylist())):
        assert len(kv) == n[i] and len(sur) == n[i] + 1
        np.testing.assert_allclose(sv, L[i, :n[i]], rtol=1e-6)  # the plain scores are the same logits
        np.testing.assert_allclose(kv, keep[i, :n[i]], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sur, C.survival(keep[i:i + 1], n[i:i + 1])[0, :n[i] + 1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t["calibrated_watch_segments"].to_numpy(), C.expected_watch_segments(keep, n),
                               rtol=1e-5)
    assert t["most_likely_leave"].to_numpy().tolist() == C.most_likely_leave(keep, n).tolist()
    assert width <= S
    # the output directory job records the calibrator in its identity; a plain job is another job
    man = sc.score_dataset(_write(pairs, tmp_path / "pairs.parquet"), tmp_path / "out", progress=False)
    assert man["identity"]["probabilities"]["checkpoint"] == cal.checkpoint["digest"]
    assert "keep_probability" in man["columns"]
    assert pq.read_table(tmp_path / "out").num_rows == 150


def _write(table, path):
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    return path


def test_evaluate_calibration_section(world, tmp_path):
    from segfast.evaluate import PositionBaseline, evaluate_run, fit_splits_for, split_logits

    root, p, run = _uncalibrated_copy(world, tmp_path)
    res = evaluate_run(root / "p", run, split="test", batch_size=16, plots=tmp_path / "plots")
    sec = res["calibration"]
    assert "fitted on dev now" in sec["calibrator"]["source"] and sec["in_sample"] is False
    assert not (run / C.CALIBRATION_FILE).exists()  # evaluate never writes into the run
    assert (tmp_path / "plots" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # independently: the same calibrator from dev, the test logits, loops over rows
    dev = split_logits(root / "p", run, "dev")
    cal = C.fit_calibrator(dev["logits"], dev["target"], dev["n_segments"])
    te = split_logits(root / "p", run, "test")
    keep = cal.keep_probability(te["logits"], te["n_segments"])
    preds, labs, praw, errs, errs_item = [], [], [], [], []
    item = PositionBaseline("ItemPosition").fit(p.interactions, np.flatnonzero(
        np.isin(p.interactions["split"], fit_splits_for("test"))))
    item_p = item.leave_probabilities(p.interactions, te["row"])
    for r in range(len(te["target"])):
        y, n = int(te["target"][r]), int(te["n_segments"][r])
        surv, e = 1.0, 0.0
        for i in range(n):
            e += i * surv * (1 - keep[r, i])
            surv *= keep[r, i]
        e += n * surv
        errs.append(abs(e - y))
        m = min(n, S - 1)  # (no pseudo-slot for N == 40: renormalised over 0..39, as evaluate's MAE)
        pi = item_p[r, :m + 1] / item_p[r, :m + 1].sum()
        errs_item.append(abs(float(pi @ np.arange(m + 1)) - y))
        for i in range(min(y + 1, n)):
            preds.append(keep[r, i])
            praw.append(_sig(float(te["logits"][r, i])))
            labs.append(1.0 if i < y else 0.0)
    preds, labs, praw = np.array(preds), np.array(labs), np.array(praw)
    assert sec["slots"] == preds.size and sec["observed_keep_rate"] == pytest.approx(labs.mean())
    assert sec["after"]["ece"] == pytest.approx(_ece_loop(preds, labs), rel=1e-9)
    assert sec["after"]["brier"] == pytest.approx(np.mean((preds - labs) ** 2), rel=1e-9)
    assert sec["before"]["ece"] == pytest.approx(_ece_loop(praw, labs), rel=1e-6)
    assert sec["before"]["brier"] == pytest.approx(np.mean((praw - labs) ** 2), rel=1e-6)
    assert sec["watch_time_mae"]["calibrated"] == pytest.approx(np.mean(errs), rel=1e-9)
    assert sec["watch_time_mae"]["reciprocal_softmax"] == pytest.approx(res["metrics"]["MAE"], rel=1e-9)
    assert sec["watch_time_mae"]["ItemPosition"] == pytest.approx(np.mean(errs_item), rel=1e-9)
    assert sum(b["count"] for b in sec["reliability"]["after"]) == preds.size
    # with the run's own calibration.json
    C.calibrate_run(run, root / "p")
    assert evaluate_run(root / "p", run, split="test")["calibration"]["calibrator"]["source"] == "calibration.json"
    assert evaluate_run(root / "p", run, split="dev")["calibration"]["in_sample"] is True


def test_finished_training_writes_calibration(world, tmp_path):
    from segfast.model.config import ModelConfig, TrainConfig
    from segfast.train import train

    root, p, _ = world
    mc = ModelConfig(modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16, max_user_tokens=8)
    tc = TrainConfig(epochs=1, batch_size=128, eval_every=1000, device="cpu")
    s = train(root / "p", tmp_path / "run", mc, tc, progress=False)
    assert s["finished"] and s["calibration"]["file"] == C.CALIBRATION_FILE
    cal = C.load_calibrator(tmp_path / "run", "best")
    assert cal.checkpoint["digest"] == s["calibration"]["checkpoint"]["digest"]
    stopped = train(root / "p", tmp_path / "run2", mc, tc, progress=False, max_steps=1)
    assert "calibration" not in stopped and not (tmp_path / "run2" / C.CALIBRATION_FILE).exists()


def test_ray_engine_probabilities(world, tmp_path):
    """--probabilities through the Ray engine: the local engine's calibrated columns (to float rounding: Ray
    batches pairs differently), a run without a calibrator refused before Ray starts."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install 'segfast[ray]'")
    pytest.importorskip("ray.data", reason="the Ray engine needs ray[data]: pip install 'segfast[ray]'")
    import pyarrow.parquet as pq

    from segfast.scoring import Scorer
    from segfast.scoring.ray_engine import score_ray

    root, p, run = _uncalibrated_copy(world, tmp_path)
    pairs = _write(interaction_pairs(p).slice(0, 120), tmp_path / "pairs.parquet")
    with pytest.raises(C.CalibrationMissingError, match="segfast calibrate"):
        score_ray(run, root / "p", pairs, tmp_path / "refused", probabilities=True)
    assert not ray.is_initialized() and not (tmp_path / "refused").exists()
    C.calibrate_run(run, root / "p")
    ref = Scorer.from_run(run, root / "p", device="cpu", probabilities=True).score(pq.read_table(pairs))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 1024 * 1024)
    try:
        man = score_ray(run, root / "p", pairs, tmp_path / "out", actors=1, cpus_per_actor=1, batch_rows=64,
                        probabilities=True)
    finally:
        ray.shutdown()
    assert man["complete"]
    assert man["identity"]["probabilities"]["checkpoint"] == C.load_calibrator(run).checkpoint["digest"]
    key = [("user_id", "ascending"), ("video_id", "ascending"), ("time_ms", "ascending")]
    got = pq.read_table(tmp_path / "out").sort_by(key)
    ref = ref.sort_by(key)
    assert got.column_names == man["columns"] == ref.column_names
    for c in ("keep_probability", "survival"):
        np.testing.assert_allclose(np.concatenate(got[c].to_numpy(zero_copy_only=False)),
                                   np.concatenate(ref[c].to_numpy(zero_copy_only=False)), atol=1e-5)
    np.testing.assert_allclose(got["calibrated_watch_segments"].to_numpy(), ref["calibrated_watch_segments"].to_numpy(),
                               atol=1e-4)


def test_compare_forms_measures_every_form_on_held_out_rows():
    rng = np.random.default_rng(7)

    def truth(p, n):
        return _sig(0.9 * p + 1.2)
    dev = dict(zip(("logits", "target", "n_segments"), _simulate(rng, 3000, truth)))
    test = dict(zip(("logits", "target", "n_segments"), _simulate(rng, 2000, truth)))
    rows = C.compare_forms(dev, test)
    assert [(r["form"], r["feature"]) for r in rows[1:]] == [(f, x) for f in C.FORMS for x in C.FEATURES]
    lab, obs = C.keep_labels(test["target"], test["n_segments"])
    assert rows[0]["brier"] == pytest.approx(np.mean((_sig(test["logits"])[obs] - lab[obs]) ** 2))
    best = min(rows, key=lambda r: r["brier"])
    assert best["feature"] == "raw" and best["form"] != "none"  # the truth is a function of the raw logit
    cal = C.fit_calibrator(dev["logits"], dev["target"], dev["n_segments"], form="platt", feature="raw")
    k = cal.keep_probability(test["logits"], test["n_segments"])
    platt = [r for r in rows if r["form"] == "platt" and r["feature"] == "raw"][0]
    assert platt["ece"] == pytest.approx(_ece_loop(k[obs], lab[obs]))
    assert platt["watch_time_mae"] == pytest.approx(
        np.abs(C.expected_watch_segments(k, test["n_segments"]) - test["target"]).mean())
