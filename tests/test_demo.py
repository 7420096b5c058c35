"""The demo end to end at its quick size, and its truth-correlation helper on hand-built rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segfast.demo import run_demo, spearman_vs_truth


def test_spearman_vs_truth_hand_built():
    logits = np.zeros((3, 40), np.float32)
    logits[0, :4] = [0.1, 0.2, 0.3, 0.4]    # same order as the truth: +1
    logits[1, :4] = [0.4, 0.3, 0.2, 0.1]    # reversed: -1
    logits[2, :2] = [1.0, 2.0]              # N = 2: skipped (fewer than 3 segments)
    truth = [np.array([1, 2, 3, 4.0]), np.array([1, 2, 3, 4.0]), np.array([1, 2.0])]
    r = spearman_vs_truth(logits, np.array([4, 4, 2]), truth)
    assert r["rows"] == 2 and abs(r["mean"] - 0.0) < 1e-12
    r = spearman_vs_truth(logits[:1], np.array([4]), truth[:1])
    assert abs(r["mean"] - 1.0) < 1e-12


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch, capsys):
    from segfast import plots

    figs = {}
    orig = plots._save

    def keep(fig, out_png):  # the figures the demo saves, by file name
        figs[Path(out_png).name] = fig
        return orig(fig, out_png)

    monkeypatch.setattr(plots, "_save", keep)
    summary = run_demo(tmp_path / "demo", quick=True)
    printed = capsys.readouterr().out
    for name in ("results.json", "training_curve.png", "reliability.png", "interest_vs_truth.png", "case_study.png"):
        f = tmp_path / "demo" / name
        assert f.exists() and f.stat().st_size > 0, name
    assert (tmp_path / "demo" / "run-full" / "calibration.json").exists()
    # calibration: before / after on test in the summary and printed
    cal = summary["calibration"]
    assert cal["after"]["ece"] < cal["before"]["ece"] and cal["after"]["brier"] < cal["before"]["brier"]
    assert "ECE" in printed and "Brier" in printed
    # the two case-study figures show the same rows (video, users, order), the leave slot at each row's target
    case, ivt = summary["plots"]["case_study"], summary["plots"]["interest_vs_truth"]
    assert case["rows"] == ivt["rows"] and case["users"] == ivt["users"] and case["video_id"] == ivt["video_id"]
    from segfast.data.prepared import load_prepared

    it = load_prepared(tmp_path / "demo" / "data").interactions
    target = [int(it["target"][r]) for r in case["rows"]]
    nrow = [int(it["n_segments"][r]) for r in case["rows"]]
    assert case["leave_slots"] == ivt["leave_slots"] == target
    ax = figs["case_study.png"].axes[0]
    # each says so in its title
    assert "same rows as interest_vs_truth.png" in ax.get_title()
    assert "same rows as case_study.png" in figs["interest_vs_truth.png"].axes[0].get_title()
    boxes = sorted((int(round(q.get_y() + 0.5)), int(round(q.get_x() + 0.5))) for q in ax.patches)
    assert boxes == [(r, y) for r, (y, n) in enumerate(zip(target, nrow)) if y < n]
    # calibrated keep probabilities with visible spread across users and segments, on a scale fitted to them
    m = np.array([[np.nan if v is None else v for v in r] for r in case["keep_probability"]], dtype=np.float64)
    shown = np.ma.filled(ax.images[0].get_array().astype(np.float64), np.nan)
    np.testing.assert_allclose(shown, m, rtol=1e-5)
    assert np.nanstd(m) > 0.03 and np.nanmax(m) - np.nanmin(m) > 0.1
    lo, hi = ax.images[0].get_clim()
    assert (lo, hi) != (0.0, 1.0) and lo <= np.nanpercentile(m, 50) <= hi
    assert figs["case_study.png"].axes[1].get_ylabel() == "P(keep watching past segment | reached it), calibrated"
    assert (tmp_path / "demo" / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    assert set(res) >= {"Random", "AllPosition", "UserPosition", "ItemPosition", "ours"}
    for r in res.values():
        assert 0.0 <= r["metrics"]["HR@1"] <= r["metrics"]["HR@5"] <= r["metrics"]["HR@10"] <= 1.0
    assert summary["spearman_vs_truth"]["rows"] > 0
    seg = json.loads((tmp_path / "demo" / "results.json").read_text())["segrec"]
    assert set(seg) == {"video", "segsum", "interest"}
    for w, r in seg.items():
        assert 0.0 <= r["metrics"]["AUC"]["mean"] <= 1.0 and r["metrics"]["LogLoss"]["mean"] > 0
        assert ("ttest_vs_video" in r) == (w != "video")
