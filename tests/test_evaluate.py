"""Task-1 evaluation: hand-computed ranks, metrics, MAE and baselines (SPEC section 7)."""
import math
import sys
import types

import numpy as np
import pytest
import torch

from segfast.evaluate import (BASELINES, PositionBaseline, RankingAccumulator, baseline_scores,
                              evaluate_baselines, evaluate_run, expected_leave_slot, format_table,
                              ranking_metrics, target_ranks, watch_time_mae)

S = 40


def ascending_row():
    return np.arange(S, dtype=np.float32)  # slot i has the i-th lowest interest -> rank i + 1


# ------------------------------------------------------------------------------------------------ ranks/metrics

def test_known_ranks_and_metrics_by_hand():
    logits = np.stack([ascending_row(), ascending_row(), ascending_row(), -ascending_row()])
    target = np.array([2, 0, 7, 39])
    n = np.array([40, 40, 40, 40])
    ranks = target_ranks(logits, target, n)
    assert ranks.tolist() == [3, 1, 8, 1]
    m = ranking_metrics(logits, target, n)
    assert m["rows"] == 4
    # ranks 3, 1, 8, 1
    assert m["HR@1"] == pytest.approx(2 / 4)
    assert m["HR@5"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)  # 1/log2(4) = 0.5
    assert m["HR@10"] == pytest.approx(1.0)
    assert m["NDCG@10"] == pytest.approx((0.5 + 1 + 1 / math.log2(9) + 1) / 4)
    assert m["NDCG@1"] == pytest.approx(m["HR@1"])


def test_torch_input_matches_numpy():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(50, S)).astype(np.float32)
    n = rng.integers(1, S + 1, size=50)
    y = np.minimum(rng.integers(0, S, size=50), n)
    a = ranking_metrics(p, y, n, seed=3)
    b = ranking_metrics(torch.from_numpy(p), torch.from_numpy(y), torch.from_numpy(n), seed=3)
    assert a == b


def test_target_40_rows_are_excluded():
    logits = np.stack([ascending_row(), np.zeros(S, np.float32)])
    m = ranking_metrics(logits, np.array([2, 40]), np.array([40, 40]))
    assert m["rows"] == 1
    assert m["HR@5"] == 1.0 and m["NDCG@5"] == pytest.approx(0.5)
    assert target_ranks(logits, np.array([2, 40]), np.array([40, 40])).tolist() == [3, 0]
    empty = ranking_metrics(logits[1:], np.array([40]), np.array([40]))
    assert empty["rows"] == 0 and empty["HR@1"] is None
    assert watch_time_mae(logits[1:], np.array([40]), np.array([40])) is None


def test_ties_broken_by_seeded_permutation():
    # slots 3 and 5 tie for lowest interest; target 5 gets rank 1 or 2 depending on the seed
    row = ascending_row() + 10
    row[3] = row[5] = 0.0
    logits = row[None, :]
    ranks = {int(target_ranks(logits, [5], [40], seed=s)[0]) for s in range(40)}
    assert ranks == {1, 2}
    for s in range(5):  # same seed, same result
        assert target_ranks(logits, [5], [40], seed=s)[0] == target_ranks(logits, [5], [40], seed=s)[0]
    # the two tied slots always take ranks 1 and 2 between them
    for s in range(10):
        r3, r5 = target_ranks(np.stack([row, row]), [3, 5], [40, 40], seed=s, row_ids=[7, 7])
        assert {int(r3), int(r5)} == {1, 2}


def test_all_equal_logits_rank_uniform_and_seed_dependent():
    B = 8000
    logits = np.zeros((B, S), np.float32)
    rng = np.random.default_rng(0)
    y = rng.integers(0, S, size=B)
    n = np.full(B, S)
    r0 = target_ranks(logits, y, n, seed=0)
    r0b = target_ranks(logits, y, n, seed=0)
    r1 = target_ranks(logits, y, n, seed=1)
    assert np.array_equal(r0, r0b)
    assert (r0 != r1).mean() > 0.9
    assert r0.min() >= 1 and r0.max() <= S
    assert abs(r0.mean() - 20.5) < 0.6  # uniform on 1..40: mean 20.5, sd of mean ~0.13
    counts = np.bincount(r0, minlength=S + 1)[1:]
    assert counts.min() > 120 and counts.max() < 290  # expected 200 each
    m = ranking_metrics(logits, y, n, seed=0)
    assert 0.015 < m["HR@1"] < 0.035


def test_tie_break_independent_of_batch_composition_with_row_ids():
    rng = np.random.default_rng(5)
    B = 300
    p = rng.integers(0, 3, size=(B, S)).astype(np.float32)  # many ties
    n = rng.integers(1, S + 1, size=B)
    y = np.minimum(rng.integers(0, S, size=B), n)
    ids = np.arange(1000, 1000 + B)
    full = target_ranks(p, y, n, seed=9, row_ids=ids)
    perm = rng.permutation(B)[:120]
    part = target_ranks(p[perm], y[perm], n[perm], seed=9, row_ids=ids[perm])
    assert np.array_equal(full[perm], part)


def test_strict_ranks_only_real_slots_and_pseudo_slot():
    # N = 5: candidates are slots 0..5 (6 of them); padding slots 6..39 have the lowest logits
    row = np.full(S, -100.0, np.float32)
    row[:6] = np.arange(6)
    logits = np.stack([row, row, row])
    y = np.array([2, 5, 0])
    n = np.array([5, 5, 5])
    assert target_ranks(logits, y, n, strict=False).tolist() == [34 + 3, 34 + 6, 34 + 1]
    assert target_ranks(logits, y, n, strict=True).tolist() == [3, 6, 1]
    m = ranking_metrics(logits, y, n, strict=True)
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["HR@10"] == pytest.approx(1.0)
    assert m["NDCG@10"] == pytest.approx((0.5 + 1 / math.log2(7) + 1) / 3)
    # N == 40: no pseudo-slot, strict ranks all 40 slots
    assert target_ranks(-ascending_row()[None], [0], [40], strict=True)[0] == 40


def test_watch_time_mae_by_hand():
    # row 1: N = 2, slots 0..2 have -p = [0, ln2, ln3] -> q = [1, 2, 3] / 6 -> E = 8/6; y = 0
    r1 = np.full(S, -50.0)
    r1[:3] = [0.0, -math.log(2), -math.log(3)]
    # row 2: N = 40 (no pseudo-slot), equal logits -> q uniform over 0..39 -> E = 19.5; y = 10
    r2 = np.zeros(S)
    # row 3: y == 40, excluded
    logits = np.stack([r1, r2, r2])
    E = expected_leave_slot(logits, [2, 40, 40])
    assert E[0] == pytest.approx(8 / 6) and E[1] == pytest.approx(19.5)
    mae = watch_time_mae(logits, [0, 10, 40], [2, 40, 40])
    assert mae == pytest.approx((8 / 6 + 9.5) / 2)


def test_watch_time_matches_literal_inverse_softmax_formula():
    rng = np.random.default_rng(2)
    p = rng.normal(size=(20, S)) * 3
    n = rng.integers(1, S + 1, size=20)
    E = expected_leave_slot(p, n)
    for b in range(20):
        M = min(n[b], S - 1)
        s = np.exp(p[b, :M + 1]) / np.exp(p[b, :M + 1]).sum()  # softmax over slots 0..N
        q = (1 / s) / (1 / s).sum()
        assert E[b] == pytest.approx((np.arange(M + 1) * q).sum(), rel=1e-9)


def test_accumulator_chunks_equal_one_shot():
    rng = np.random.default_rng(3)
    B = 1000
    p = np.round(rng.normal(size=(B, S)), 1).astype(np.float32)  # ties included
    n = rng.integers(1, S + 1, size=B)
    y = np.minimum(rng.integers(0, S + 1, size=B), n)
    y[:20] = 40
    n[:20] = 40
    cold = rng.random(B) < 0.3
    for strict in (False, True):
        acc = RankingAccumulator(seed=4, strict=strict)
        for a in range(0, B, 137):
            acc.update(torch.from_numpy(p[a:a + 137]), y[a:a + 137], n[a:a + 137], is_cold=cold[a:a + 137])
        res = acc.result()
        one = ranking_metrics(p, y, n, seed=4, strict=strict)
        for k, v in one.items():
            assert res["metrics"][k] == pytest.approx(v, rel=1e-12), k
        assert res["metrics"]["MAE"] == pytest.approx(watch_time_mae(p, y, n), rel=1e-12)
        assert res["metrics"]["rows"] == int((y < 40).sum())
        ids = np.flatnonzero(cold)
        cone = ranking_metrics(p[ids], y[ids], n[ids], seed=4, strict=strict, row_ids=ids)
        for k, v in cone.items():
            assert res["cold"][k] == pytest.approx(v, rel=1e-12), k
        assert res["cold"]["MAE"] == pytest.approx(watch_time_mae(p[ids], y[ids], n[ids]), rel=1e-12)
    assert RankingAccumulator().result()["cold"] is None


def test_bad_input_errors_name_the_field():
    good = np.zeros((2, S))
    with pytest.raises(ValueError, match="logits"):
        ranking_metrics(np.zeros((2, 39)), [0, 0], [5, 5])
    with pytest.raises(ValueError, match="logits"):
        bad = good.copy(); bad[1, 3] = np.nan
        ranking_metrics(bad, [0, 0], [5, 5])
    with pytest.raises(ValueError, match="target"):
        ranking_metrics(good, [6, 0], [5, 5])
    with pytest.raises(ValueError, match="target"):
        ranking_metrics(good, [0], [5, 5])
    with pytest.raises(ValueError, match="n_segments"):
        ranking_metrics(good, [0, 0], [0, 5])
    with pytest.raises(ValueError, match="n_segments"):
        ranking_metrics(good, [0, 0], [41, 5])
    with pytest.raises(ValueError, match="seed"):
        ranking_metrics(good, [0, 0], [5, 5], seed=1.5)
    with pytest.raises(ValueError, match="ks"):
        ranking_metrics(good, [0, 0], [5, 5], ks=(0,))


# ------------------------------------------------------------------------------------------------ baselines

def tiny_table():
    # row: user, video, N, target, split, is_cold
    t = np.array([
        [0, 0, 3, 0, 0, 0],  # 0 train: left at 0
        [0, 0, 3, 1, 0, 0],  # 1 train: left at 1
        [1, 1, 3, 3, 1, 0],  # 2 dev: full watch (censored at 3)
        [1, 2, 2, 2, 0, 0],  # 3 train: full watch of a 2-segment video
        [0, 1, 3, 0, 3, 0],  # 4 profile: must be ignored
        [0, 0, 3, 3, 2, 0],  # 5 test
        [2, 3, 3, 1, 2, 1],  # 6 test: unseen user and unseen video
        [1, 1, 3, 0, 2, 0],  # 7 test
    ])
    return {"user_idx": t[:, 0].astype(np.int32), "video_idx": t[:, 1].astype(np.int32),
            "n_segments": t[:, 2].astype(np.int8), "target": t[:, 3].astype(np.int8),
            "view_length": t[:, 3].astype(np.int8), "split": t[:, 4].astype(np.int8),
            "is_cold": t[:, 5].astype(bool)}


def probs(*head):
    out = np.zeros(S)
    out[:len(head)] = head
    return out


def test_all_position_hazard_by_hand():
    inter = tiny_table()
    m = PositionBaseline("AllPosition").fit(inter, np.array([0, 1, 2, 3]))
    # slot 0: 4 at risk, 1 leaves; slot 1: rows 1, 2, 3 at risk, row 1 leaves; slot 2: row 2 only, none leaves
    assert m.hazard_all[:4] == pytest.approx([1 / 4, 1 / 3, 0, 0])
    assert (m.hazard_all[3:] == 0).all()
    P = m.leave_probabilities(inter, np.array([5, 3]))
    assert P[0] == pytest.approx(probs(1 / 4, 1 / 4, 0, 1 / 2))  # N = 3: completed slot 3 gets 3/4 * 2/3
    assert P[1] == pytest.approx(probs(1 / 4, 1 / 4, 1 / 2))  # N = 2: completed slot 2 gets 3/4 * 2/3
    # baseline_scores fits on train+dev only (the profile row 4 would change slot 0 to 2/5)
    sc = baseline_scores(inter, np.array([5, 6, 7]), "AllPosition")
    assert sc.shape == (3, S)
    assert np.exp(-sc[0, :4]) == pytest.approx([1 / 4, 1 / 4, 0, 1 / 2], abs=1e-12)
    assert (sc[:, 4:] > sc[:, :4].max()).all()  # impossible slots rank last
    assert target_ranks(sc, [3, 1, 0], [3, 3, 3], row_ids=[5, 6, 7])[0] == 1
    assert set(target_ranks(sc, [3, 1, 0], [3, 3, 3], row_ids=[5, 6, 7])[1:].tolist()) <= {2, 3}


def test_evaluate_baselines_all_position_by_hand():
    res = evaluate_baselines(tiny_table(), "test", seed=0, kinds=["AllPosition"])["AllPosition"]
    assert res["split"] == "test" and res["rows"] == 3
    # expected leave slot 0*1/4 + 1*1/4 + 3*1/2 = 1.75 against y = 3, 1, 0
    assert res["metrics"]["MAE"] == pytest.approx((1.25 + 0.75 + 1.75) / 3)
    assert res["metrics"]["HR@1"] == pytest.approx(1 / 3)  # only the full watch is ranked first
    assert res["metrics"]["HR@5"] == 1.0
    assert res["cold"]["rows"] == 1 and res["cold"]["HR@1"] == 0.0
    assert res["strict"]["HR@5"] == 1.0 and res["strict"]["rows"] == 3


def test_user_position_per_user_and_fallback():
    inter = tiny_table()
    sc = baseline_scores(inter, np.array([5, 6, 7]), "UserPosition", prior_strength=0.0)
    P = np.exp(-sc[:, :4])
    # user 0 (rows 0, 1; profile row 4 ignored): h = [1/2, 1, fallback 0]
    assert P[0] == pytest.approx([1 / 2, 1 / 2, 0, 0], abs=1e-12)
    # user 2 is unseen: AllPosition
    assert P[1] == pytest.approx([1 / 4, 1 / 4, 0, 1 / 2], abs=1e-12)
    # user 1 (rows 2, 3): nobody left -> completes with probability 1
    assert P[2] == pytest.approx([0, 0, 0, 1], abs=1e-12)
    # smoothing with 5 pseudo-rows of the AllPosition prior: slot 0 of user 0 = (1 + 5/4) / (2 + 5)
    sm = baseline_scores(inter, np.array([5]), "UserPosition", prior_strength=5.0)
    assert math.exp(-sm[0, 0]) == pytest.approx((1 + 5 / 4) / 7)


def test_item_position_per_video_and_fallback():
    inter = tiny_table()
    sc = baseline_scores(inter, np.array([5, 6, 7]), "ItemPosition", prior_strength=0.0)
    P = np.exp(-sc[:, :4])
    assert P[0] == pytest.approx([1 / 2, 1 / 2, 0, 0], abs=1e-12)  # video 0: rows 0, 1
    assert P[1] == pytest.approx([1 / 4, 1 / 4, 0, 1 / 2], abs=1e-12)  # video 3 unseen: AllPosition
    # video 1: dev row 2 only (the profile row 4, which left at 0, is not a target)
    assert P[2] == pytest.approx([0, 0, 0, 1], abs=1e-12)
    res = evaluate_baselines(inter, "test", kinds=["ItemPosition"], prior_strength=0.0)["ItemPosition"]
    # row 5 (y=3): slots 0,1 (P 1/2) come first, then 2 and 3 tie at P=0 -> rank 3 or 4
    # row 6 (y=1): rank 2 or 3; row 7 (y=0): slot 3 first (P = 1), then 0, 1, 2 tie at P = 0 -> rank 2..4
    r = target_ranks(sc, [3, 1, 0], [3, 3, 3], row_ids=[5, 6, 7])
    assert r[0] in (3, 4) and r[1] in (2, 3) and r[2] in (2, 3, 4)
    assert res["metrics"]["HR@1"] == 0.0 and res["metrics"]["HR@5"] == 1.0


def test_random_baseline_hr1_near_one_in_forty():
    B = 8000
    rng = np.random.default_rng(7)
    n = np.full(B, S, np.int8)
    y = rng.integers(0, S, size=B).astype(np.int8)
    inter = {"user_idx": np.zeros(B, np.int32), "video_idx": np.arange(B, dtype=np.int32), "n_segments": n,
             "target": y, "split": np.full(B, 2, np.int8), "is_cold": np.ones(B, bool)}
    res = evaluate_baselines(inter, "test", seed=0, kinds=["Random"])["Random"]["metrics"]
    assert 0.015 < res["HR@1"] < 0.035
    assert 0.10 < res["HR@5"] < 0.15
    a = baseline_scores(inter, np.arange(10), "Random", seed=1)
    assert np.array_equal(a, baseline_scores(inter, np.arange(10), "Random", seed=1))
    assert not np.array_equal(a, baseline_scores(inter, np.arange(10), "Random", seed=2))
    assert np.array_equal(a[3:5], baseline_scores(inter, np.array([3, 4]), "Random", seed=1))


def test_baseline_errors():
    inter = tiny_table()
    with pytest.raises(ValueError, match="kind"):
        baseline_scores(inter, np.array([5]), "Popular")
    with pytest.raises(ValueError, match="rows"):
        baseline_scores(inter, np.array([99]), "AllPosition")
    del inter["video_idx"]
    with pytest.raises(ValueError, match="video_idx"):
        baseline_scores(inter, np.array([5]), "ItemPosition")
    empty = tiny_table()
    empty["split"] = np.zeros(8, np.int8)
    with pytest.raises(ValueError, match="test"):
        evaluate_baselines(empty, "test")


# ------------------------------------------------------------------------------------------------ evaluate_run

class _Prepared:
    def __init__(self, inter):
        self.interactions = inter


def _fake_modules(monkeypatch, inter, logits_of_row, seen):
    class Model(torch.nn.Module):
        def score(self, batch):
            assert not self.training
            return torch.from_numpy(logits_of_row[batch["row"].numpy()])

    def load_run(run_dir, which="best", device="cpu"):
        seen["load"] = (run_dir, which, device)
        return Model(), {"meta": 1}

    def check_compatible(meta, prepared):
        seen["checked"] = True

    def make_loader(prepared, split, batch_size, shuffle=False, features=None, **kw):
        seen["loader_kw"] = kw
        code = {"train": 0, "dev": 1, "test": 2}[split]
        rows = np.flatnonzero(prepared.interactions["split"] == code)
        for a in range(0, rows.size, batch_size):
            r = rows[a:a + batch_size]
            yield {"row": torch.from_numpy(r), "target": torch.from_numpy(inter["target"][r].astype(np.int64)),
                   "n_segments": torch.from_numpy(inter["n_segments"][r].astype(np.int64)),
                   "is_cold": torch.from_numpy(inter["is_cold"][r])}

    monkeypatch.setitem(sys.modules, "segfast.checkpoint",
                        types.SimpleNamespace(load_run=load_run, check_compatible=check_compatible))
    monkeypatch.setitem(sys.modules, "segfast.data.batches", types.SimpleNamespace(make_loader=make_loader))


def test_evaluate_run_streams_batches_into_metrics(monkeypatch):
    rng = np.random.default_rng(11)
    R = 500
    n = rng.integers(1, S + 1, size=R)
    y = np.minimum(rng.integers(0, S + 1, size=R), n)
    inter = {"n_segments": n.astype(np.int8), "target": y.astype(np.int8),
             "split": rng.integers(0, 3, size=R).astype(np.int8), "is_cold": rng.random(R) < 0.3}
    logits = np.round(rng.normal(size=(R, S)), 1).astype(np.float32)
    seen = {}
    _fake_modules(monkeypatch, inter, logits, seen)
    prep = _Prepared(inter)
    r1 = evaluate_run("data", "run", split="test", batch_size=64, seed=2, prepared=prep, calibration=False)
    r2 = evaluate_run("data", "run", split="test", batch_size=7, seed=2, prepared=prep, calibration=False)
    assert seen["load"] == ("run", "best", "cpu") and seen["checked"]
    rows = np.flatnonzero(inter["split"] == 2)
    ref = ranking_metrics(logits[rows], y[rows], n[rows], seed=2, row_ids=rows)
    ref_s = ranking_metrics(logits[rows], y[rows], n[rows], seed=2, strict=True, row_ids=rows)
    assert r1["split"] == "test" and r1["rows"] == ref["rows"]
    for k, v in ref.items():
        assert r1["metrics"][k] == pytest.approx(v, rel=1e-12)
        assert r2["metrics"][k] == pytest.approx(v, rel=1e-12)  # batch size does not matter
        assert r1["strict"][k] == pytest.approx(ref_s[k], rel=1e-12)
    assert r1["metrics"]["MAE"] == pytest.approx(watch_time_mae(logits[rows], y[rows], n[rows]))
    c = rows[inter["is_cold"][rows]]
    assert r1["cold"]["HR@5"] == pytest.approx(
        ranking_metrics(logits[c], y[c], n[c], seed=2, row_ids=c)["HR@5"])
    inter["split"][:] = 0
    with pytest.raises(ValueError, match="test"):
        evaluate_run("data", "run", split="test", prepared=prep)
    with pytest.raises(ValueError, match="split"):
        evaluate_run("data", "run", split="profile", prepared=prep)


# ------------------------------------------------------------------------------------------------ table

def test_format_table():
    res = evaluate_baselines(tiny_table(), "test", kinds=["AllPosition", "Random"])
    res["model"] = {"metrics": {"HR@1": 0.5, "HR@5": 0.75, "rows": 3}}
    text = format_table(res)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "method"
    assert [c.strip() for c in lines[0].split("|")[2:-1]] == ["HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10",
                                                              "MAE", "rows"]
    allpos = next(line for line in lines if "AllPosition" in line)
    assert "0.3333" in allpos and "1.2500" in allpos  # HR@1 = 1/3, MAE = 1.25
    model = next(line for line in lines if line.startswith("| model"))
    assert "0.7500" in model and "-" in model.split("|")[4]
    assert len({len(line) for line in lines}) == 1  # aligned
    strict = format_table(res, section="strict")
    assert "AllPosition" in strict
    with pytest.raises(ValueError, match="results"):
        format_table({})


def test_all_baseline_names_run():
    res = evaluate_baselines(tiny_table(), "test")
    assert set(res) == set(BASELINES)
    for r in res.values():
        assert r["rows"] == 3 and set(r) == {"split", "rows", "metrics", "cold", "strict"}
