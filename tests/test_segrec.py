"""SegRec (Task 2): labels, metrics, weights, backbones, and a tiny end-to-end run."""
import math

import numpy as np
import pytest
import torch

from segfast.segrec.backbones import DIN, VIDEO_POS, WideDeep, make_backbone
from segfast.segrec.labels import (EffectiveViewLabeler, duration_bucket_edges, duration_buckets,
                                   effective_view_labels)
from segfast.segrec.train import (SegRec, auc, f1_score, itemposition_weights, log_loss, masked_softmax,
                                  run_segrec)



# Two torch threads on a shared 2-core box oversubscribe badly (7x slower); these models are tiny.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- labels

def test_decile_edges_and_buckets_hand_values():
    d = np.arange(1, 12) * 1000  # 1000 .. 11000: deciles at 2000 .. 10000 exactly
    edges = duration_bucket_edges(d)
    assert np.allclose(edges, np.arange(2, 11) * 1000)
    b = duration_buckets(np.array([1000, 1999, 2000, 5500, 10000, 11000, 190000]), edges)
    assert b.tolist() == [0, 0, 1, 4, 9, 9, 9]


def test_bucket_medians_and_labels_ties_not_effective():
    # 2 buckets; edge = median duration 25000
    lab = EffectiveViewLabeler.fit([2000, 12000, 30000, 20000], [10000, 20000, 30000, 40000], n_buckets=2)
    assert lab.edges.tolist() == [25000.0]
    assert np.allclose(lab.medians, [0.4, 0.75])  # (0.2, 0.6) and (1.0, 0.5)
    assert lab.label([2000, 12000, 30000, 20000], [10000, 20000, 30000, 40000]).tolist() == [0, 1, 1, 0]
    # 0.4 ties bucket 0's median -> 0; 25000 is in bucket 1: 0.8 > 0.75 -> 1; 0.75 ties -> 0; replay 1.5 -> 1
    got = lab.label([6000, 20000, 18750, 15000], [15000, 25000, 25000, 10000])
    assert got.tolist() == [0, 1, 0, 1]


def test_empty_bucket_uses_overall_median_and_train_only():
    inter = {"play_time_ms": np.array([1000, 9000, 5000, 40000, 99999]),
             "duration_ms": np.array([10000, 10000, 10000, 40000, 40000]),
             "split": np.array([0, 0, 0, 0, 2])}
    labels, lab = effective_view_labels(inter)
    # train ratios 0.1, 0.9, 0.5, 1.0; 3 edges... 10 buckets: the buckets without rows get median 0.7
    assert np.isclose(np.median([0.1, 0.9, 0.5, 1.0]), 0.7)
    assert lab.medians.shape == (10,)
    b = duration_buckets(np.array([10000, 40000]), lab.edges)
    assert np.isclose(lab.medians[b[0]], 0.5) and np.isclose(lab.medians[b[1]], 1.0)
    assert sum(np.isclose(lab.medians, 0.7)) == 10 - len(set(b.tolist()))
    # the test row (ratio 2.5) does not move the medians
    assert labels.tolist() == [0, 1, 0, 0, 1]


def test_labels_bad_input():
    with pytest.raises(ValueError, match="row 1 has duration 0"):
        EffectiveViewLabeler.fit([1, 2], [5, 0])


# ---------------------------------------------------------------- metrics

def test_auc_with_ties_hand_value():
    y = [1, 0, 1, 0, 1]
    s = [0.9, 0.1, 0.5, 0.5, 0.3]
    # pairs (pos, neg): (.9,.1)=1 (.9,.5)=1 (.5,.1)=1 (.5,.5)=.5 (.3,.1)=1 (.3,.5)=0 -> 4.5 / 6
    assert auc(y, s) == pytest.approx(0.75)
    assert auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)
    assert auc([0, 0, 1], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_f1_and_logloss_hand_values():
    # p >= 0.5 -> [1, 0, 1, 1, 0]: TP 2, FP 1, FN 1 -> 4 / 6
    assert f1_score([1, 0, 1, 0, 1], [0.9, 0.1, 0.5, 0.5, 0.3]) == pytest.approx(2 / 3)
    assert f1_score([0, 0], [0.1, 0.2]) == 0.0
    assert log_loss([1, 0], [0.8, 0.25]) == pytest.approx((0.2231435513 + 0.2876820725) / 2)
    # clipping at 1e-7
    assert log_loss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        log_loss([2], [0.5])


# ---------------------------------------------------------------- weights

def test_masked_softmax_ignores_padding():
    logits = torch.tensor([[0.0, math.log(3.0), 100.0, -5.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    w = masked_softmax(logits, mask)
    assert torch.allclose(w[0], torch.tensor([0.25, 0.75, 0.0, 0.0]))
    assert torch.equal(w[1], torch.zeros(4))


def test_itemposition_weights_hand_values():
    inter = {"target": np.array([0, 2, 2, 1, 1]), "n_segments": np.array([2, 2, 2, 2, 3]),
             "video_idx": np.array([0, 0, 0, 0, 1]), "user_idx": np.zeros(5, np.int64),
             "split": np.zeros(5, np.int64)}
    w = itemposition_weights(inter, np.array([0]), np.arange(4), prior_strength=0.0)
    # video 0 hazards: slot 0 = 1/4, slot 1 = 1/3 -> 1-h = (.75, .6667), normalised over the 2 real slots
    assert w.shape == (1, 40)
    assert np.allclose(w[0, :2], [0.75 / (0.75 + 2 / 3), (2 / 3) / (0.75 + 2 / 3)], atol=1e-6)
    assert np.all(w[0, 2:] == 0)


def _batch(b=64, n_users=6, n_videos=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 41, (b,), generator=g)
    slots = torch.arange(40)
    hl = torch.randint(0, 51, (b,), generator=g)
    return {"user_idx": torch.randint(0, n_users, (b,), generator=g),
            "video_idx": torch.randint(0, n_videos, (b,), generator=g),
            "n_segments": n, "slot_mask": slots[None] < n[:, None], "slot_index": slots.repeat(b, 1),
            "hist_video_idx": torch.randint(0, n_videos, (b, 50), generator=g),
            "hist_mask": torch.arange(50)[None] < hl[:, None]}


def test_segrec_weightings_and_padding_ignored():
    torch.manual_seed(0)
    b = _batch(8)
    bb = WideDeep(6, 9, dim=4)
    y = bb(b, b["slot_index"], b["slot_mask"])
    assert torch.all(y[~b["slot_mask"]] == 0)
    m = SegRec(bb, "segsum")
    assert torch.allclose(m(b), (y * b["slot_mask"]).sum(1), atol=1e-6)
    m = SegRec(bb, "segadjust")  # init 0 -> uniform over the N real slots = mean
    assert torch.allclose(m(b), y.sum(1) / b["n_segments"], atol=1e-6)
    pre = torch.rand(8, 40)
    m = SegRec(bb, "interest")
    assert torch.allclose(m(b, pre), (pre * y * b["slot_mask"]).sum(1), atol=1e-6)
    m = SegRec(bb, "video")
    pos = torch.full((8, 1), VIDEO_POS)
    assert torch.allclose(m(b), bb(b, pos, torch.ones(8, 1, dtype=torch.bool))[:, 0])
    with pytest.raises(ValueError, match="unknown weighting"):
        SegRec(bb, "mean")


@pytest.mark.parametrize("name", ["widedeep", "din"])
@pytest.mark.parametrize("weighting", ["video", "interest"])
def test_backbone_trains_and_loss_falls(name, weighting):
    torch.manual_seed(1)
    b = _batch(48, seed=3)
    # the label depends on the user and the video: learnable from the ids
    y = ((b["user_idx"] + b["video_idx"]) % 2).float()
    pre = masked_softmax(torch.randn(48, 40), b["slot_mask"])
    model = SegRec(make_backbone(name, 6, 9, dim=8), weighting)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lossf = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(30):
        loss = lossf(model(b, pre), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_din_attention_ignores_masked_history():
    torch.manual_seed(0)
    b = _batch(4)
    b["hist_mask"][:] = False
    b["hist_mask"][:, :3] = True
    din = DIN(6, 9, dim=4).eval()
    y1 = din(b, b["slot_index"], b["slot_mask"])
    b2 = dict(b)
    b2["hist_video_idx"] = b["hist_video_idx"].clone()
    b2["hist_video_idx"][:, 3:] = (b["hist_video_idx"][:, 3:] + 1) % 9
    assert torch.allclose(y1, din(b2, b["slot_index"], b["slot_mask"]))
    b2["hist_mask"] = torch.zeros_like(b["hist_mask"])  # no history at all: finite
    assert torch.isfinite(din(b2, b["slot_index"], b["slot_mask"])).all()


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    from segfast.data.prepared import prepare
    from segfast.data.synth import synth

    root = tmp_path_factory.mktemp("segrec")
    synth("segmm", root / "raw", users=10, videos=120, interactions=2400, seed=1, feature_dim=8, progress=False)
    prepare("segmm", root / "raw", root / "prep", seed=0, feature_dim=8, progress=False)
    return root


def _random_run(root):
    """A Task-1 run directory with an untrained ID model (no dependence on segfast.train)."""
    from segfast.checkpoint import save_model, write_run_config
    from segfast.data.prepared import load_prepared
    from segfast.model.config import model_preset
    from segfast.model.model import SegInterestModel

    p = load_prepared(root / "prep")
    mc = model_preset("small", modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16).for_data(
        p.n_users, p.n_videos, None)
    torch.manual_seed(0)
    model = SegInterestModel(mc)
    run = root / "run"
    run.mkdir(exist_ok=True)
    from segfast.checkpoint import data_fingerprint
    write_run_config(run, mc, None, data_fingerprint(p))
    save_model(run / "model.safetensors", model)
    return run


def test_run_segrec_end_to_end(tiny_prepared):
    run = _random_run(tiny_prepared)
    res = run_segrec(tiny_prepared / "prep", run, "widedeep", "interest", seeds=2, epochs=1, batch_size=256,
                     progress=False)
    assert res["backbone"] == "widedeep" and res["weights"] == "interest" and res["seeds"] == [0, 1]
    for k in ("AUC", "F1", "LogLoss"):
        m = res["metrics"][k]
        assert len(m["values"]) == 2 and np.isclose(m["mean"], np.mean(m["values"]))
        assert np.isclose(m["std"], np.std(m["values"], ddof=1))
        assert set(res["ttest_vs_video"][k]) >= {"t", "p", "mean_diff"}
    assert 0.0 <= res["metrics"]["AUC"]["mean"] <= 1.0
    vid = run_segrec(tiny_prepared / "prep", None, "din", "video", seeds=[3], epochs=1, progress=False)
    assert "ttest_vs_video" not in vid and vid["seeds"] == [3]


def test_evaluate_and_baselines_cli_print_three_sections(tiny_prepared, capsys):
    """`segfast evaluate` / `baselines` print the all-rows, cold-video and strict tables; --json the same data."""
    import json

    from segfast.cli import main
    from segfast.evaluate import evaluate_run

    run = _random_run(tiny_prepared)
    data = str(tiny_prepared / "prep")
    assert main(["evaluate", "--data", data, "--run", str(run), "--split", "test"]) == 0
    text = capsys.readouterr().out
    heads = ["all rows, 40-slot protocol", "cold-video rows", "strict variant"]
    assert [text.find(h) for h in heads] == sorted(text.find(h) for h in heads) and all(h in text for h in heads)
    ref = evaluate_run(data, run, split="test")
    assert f"{ref['metrics']['HR@1']:.4f}" in text.split("cold-video rows")[0]
    assert f"{ref['strict']['HR@1']:.4f}" in text.split("strict variant")[1]
    assert main(["baselines", "--data", data, "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert all(h in text for h in heads) and text.count("| ItemPosition") == 3
    assert main(["baselines", "--data", data, "--split", "test", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert set(js) == {"Random", "AllPosition", "UserPosition", "ItemPosition"}
    assert all({"metrics", "cold", "strict"} <= set(v) for v in js.values())
