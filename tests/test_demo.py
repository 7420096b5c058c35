"""The demo end to end at its quick size, and its truth-correlation helper on hand-built rows."""
from __future__ import annotations

import json

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
def test_demo_quick_end_to_end(tmp_path):
    summary = run_demo(tmp_path / "demo", quick=True)
    for name in ("results.json", "training_curve.png", "interest_vs_truth.png", "case_study.png"):
        f = tmp_path / "demo" / name
        assert f.exists() and f.stat().st_size > 0, name
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
