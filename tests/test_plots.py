"""The case-study figures (issue 16): calibrated keep probabilities on a scale that shows their spread, the leave
slot of each row drawn where its target is, and the heatmap and the demo's interest-vs-truth plot showing the
same rows. The figures are inspected through the matplotlib objects segfast.plots saves (``_save`` is wrapped
to keep them), not only by checking that a PNG was written."""
from __future__ import annotations

import numpy as np
import pytest

from segfast import plots
from segfast.plots import KEEP_LABEL, case_rows, case_study_heatmap, interest_vs_truth, spread_limits

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def saved(monkeypatch):
    """The figures segfast.plots saves, in order (each still written to its PNG)."""
    figs = []
    orig = plots._save

    def keep(fig, out_png):
        figs.append(fig)
        return orig(fig, out_png)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def _boxes(ax):
    """(row, slot) of the red boxes of a heatmap axis."""
    from matplotlib.patches import Rectangle

    out = []
    for p in ax.patches:
        if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == (1.0, 0.0, 0.0):
            x, y = p.get_xy()
            out.append((int(round(y + 0.5)), int(round(x + 0.5))))
    return sorted(out)


def _end_markers(ax):
    """(row, x) of the ">" (watched to the end) markers of a heatmap axis."""
    out = []
    for line in ax.lines:
        if line.get_marker() == ">":
            out.append((int(round(line.get_ydata()[0])), float(line.get_xdata()[0])))
    return sorted(out)


def test_spread_limits_hand_values():
    v = np.linspace(0.6, 0.8, 101)
    lo, hi = spread_limits(v)  # 2nd / 98th percentiles
    assert lo == pytest.approx(0.604) and hi == pytest.approx(0.796)
    assert spread_limits(v, lo=0, hi=100) == pytest.approx((0.6, 0.8))
    # a constant is widened to the minimum span about its value; NaN ignored
    assert spread_limits([0.5, 0.5, np.nan]) == pytest.approx((0.475, 0.525))
    # widened near a bound: moved inside [0, 1]
    assert spread_limits([0.99, 0.995, 1.0], min_span=0.1) == pytest.approx((0.9, 1.0))
    assert spread_limits([0.0, 0.001], min_span=0.1) == pytest.approx((0.0, 0.1))
    assert spread_limits([np.nan]) == (0.0, 1.0)


def test_heatmap_shows_the_matrix_on_its_spread_with_leave_slots(tmp_path, saved):
    rng = np.random.default_rng(0)
    keep = 0.55 + 0.3 * rng.random((4, 6))
    keep[3, 4:] = np.nan  # a shorter row (N = 4)
    leave = [0, 2, 6, 4]  # row 2 watched to the end (N = 6), row 3 too (its N = 4)
    out = case_study_heatmap(keep, leave, ["a", "b", "c", "d"], tmp_path / "fig" / "case.png", title="t")
    assert open(out, "rb").read(8) == PNG
    fig = saved[-1]
    ax = fig.axes[0]
    im = ax.images[0]
    shown = np.ma.filled(im.get_array().astype(np.float64), np.nan)
    np.testing.assert_array_equal(np.isnan(shown), np.isnan(keep))
    np.testing.assert_allclose(shown[~np.isnan(keep)], keep[~np.isnan(keep)])
    assert im.get_clim() == pytest.approx(spread_limits(keep))  # not a fixed [0, 1]
    assert fig.axes[1].get_ylabel() == KEEP_LABEL  # the colour bar says what is shown
    assert _boxes(ax) == [(0, 0), (1, 2)]
    assert _end_markers(ax) == [(2, 5.5), (3, 3.5)]  # after each row's own last segment
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(6)]
    assert "numbered from 0" in ax.get_xlabel()
    texts = {t.get_text() for t in ax.texts}
    assert f"{keep[1, 3]:.2f}" in texts  # cells annotated with their value

    with pytest.raises(ValueError, match="leave_slots"):
        case_study_heatmap(keep, [0, 1, 7, 0], list("abcd"), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="leave_slots"):
        case_study_heatmap(keep, [0, 1, 2, 5], list("abcd"), tmp_path / "bad.png")  # beyond row 3's N = 4
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*not logits"):
        case_study_heatmap(keep * 4 - 1, [0, 1, 2, 3], list("abcd"), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    case_study_heatmap(keep, leave, list("abcd"), tmp_path / "lim.png", limits=(0.2, 0.9))
    assert saved[-1].axes[0].images[0].get_clim() == (0.2, 0.9)


def test_interest_vs_truth_panels(tmp_path, saved):
    pred = [np.array([.62, .7, .9]), np.array([.6, .8, .85])]
    truth = [np.array([.65, .75, .8]), np.array([.5, .9, .95])]
    out = interest_vs_truth(pred, truth, ["user 1", "user 2"], tmp_path / "i.png", leave_slots=[1, 3], title="t")
    assert open(out, "rb").read(8) == PNG
    fig = saved[-1]
    axes = [a for a in fig.axes if a.lines or a.patches]
    assert len(axes) == 2
    for a, p in zip(axes, pred):
        np.testing.assert_allclose(a.lines[0].get_ydata(), p)
        assert a.get_ylim() == pytest.approx(axes[0].get_ylim())  # one shared scale ...
    lo, hi = axes[0].get_ylim()
    assert 0.4 < lo < 0.5 and 0.95 < hi <= 1.0  # ... fitted to the values, not [0, 1]
    assert _boxes(axes[0]) and int(round(axes[0].patches[-1].get_x() + 0.5)) == 1  # left in segment 1
    assert any(line.get_marker() == ">" for line in axes[1].lines)  # y = N = 3: watched to the end
    with pytest.raises(ValueError, match="leave slot 4 outside"):
        interest_vs_truth(pred, truth, ["a", "b"], tmp_path / "x.png", leave_slots=[1, 4])
    with pytest.raises(ValueError, match="not logits"):
        interest_vs_truth([np.array([2.0, -1, 0])], [np.array([.1, .2, .3])], ["a"], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------------------
# on a tiny prepared dataset and an untrained, calibrated run

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from _fakes import calibrated_synth_run

    return calibrated_synth_run(tmp_path_factory.mktemp("plots"), users=8, videos=30, interactions=1600, seed=3)


def _brute_force_rows(p, split, max_users, min_segments=3):
    """case_rows' rule, written out with plain Python loops."""
    it = p.interactions
    vraw = [int(x) for x in p.videos["video_id"]]
    uraw = [int(x) for x in p.users["user_id"]]
    users_of, nmax = {}, {}
    for r in p.rows(split).tolist():
        v = int(it["video_idx"][r])
        users_of.setdefault(v, set()).add(int(it["user_idx"][r]))
        nmax[v] = max(nmax.get(v, 0), int(it["n_segments"][r]))
    ok = [v for v in users_of if nmax[v] >= min_segments] or list(users_of)
    v = min(ok, key=lambda v: (-len(users_of[v]), vraw[v]))
    last = {}
    for r in p.rows(split).tolist():
        if int(it["video_idx"][r]) == v:
            u = uraw[int(it["user_idx"][r])]
            key = (int(it["time_ms"][r]), r)
            if u not in last or key > last[u][0]:
                last[u] = (key, r)
    return vraw[v], [last[u][1] for u in sorted(last)][:max_users]


def test_case_rows_rule(world):
    root, p = world
    for split in ("test", "dev", "train"):
        for mu in (1, 3, 8):
            sel = case_rows(p, split, max_users=mu)
            vid, rows = _brute_force_rows(p, split, mu)
            assert (sel["video_id"], sel["rows"].tolist()) == (vid, rows)
            it = p.interactions
            assert sel["target"].tolist() == [int(it["target"][r]) for r in rows]
            assert sel["n_segments"].tolist() == [int(it["n_segments"][r]) for r in rows]
    # a given video: every user's last view of it
    v = int(p.videos["video_id"][int(p.interactions["video_idx"][p.rows("train")[0]])])
    sel = case_rows(p, "train", video=v, max_users=100)
    assert sel["video_id"] == v and len(set(sel["user_ids"].tolist())) == len(sel["rows"])
    with pytest.raises(ValueError, match="not in the prepared dataset"):
        case_rows(p, "test", video=10**12)
    with pytest.raises(ValueError, match="max_users"):
        case_rows(p, "test", max_users=0)


def test_case_study_and_interest_vs_truth_show_the_same_rows(world, tmp_path, saved):
    from segfast.calibration import load_calibrator
    from segfast.demo import interest_vs_truth_plot, score_rows

    root, p = world
    cs = plots.case_study(root / "run", root / "prep", tmp_path / "case.png")
    heat = saved[-1]
    iv = interest_vs_truth_plot(root / "run", root / "prep", root / "raw", tmp_path / "ivt.png")
    panels = saved[-1]
    sel = case_rows(p, "test")
    assert cs["rows"] == iv["rows"] == sel["rows"].tolist()
    assert cs["users"] == iv["users"] and cs["video_id"] == iv["video_id"]
    assert cs["leave_slots"] == iv["leave_slots"] == sel["target"].tolist()
    # the plotted values: the run's calibrator applied to the model's logits of exactly those rows
    logits = score_rows(root / "run", root / "prep", sel["rows"])
    keep = load_calibrator(root / "run").keep_probability(logits, sel["n_segments"])
    n = int(sel["n_segments"].max())
    shown = np.ma.filled(heat.axes[0].images[0].get_array().astype(np.float64), np.nan)
    np.testing.assert_allclose(shown, keep[:, :n], rtol=1e-6, atol=1e-9)
    assert cs["limits"] == pytest.approx(spread_limits(keep[:, :n]), abs=1e-6)
    # the heatmap's red boxes / end markers sit at each row's target
    nrow, y = sel["n_segments"], sel["target"]
    assert _boxes(heat.axes[0]) == [(r, int(y[r])) for r in range(len(y)) if y[r] < nrow[r]]
    assert [r for r, _ in _end_markers(heat.axes[0])] == [r for r in range(len(y)) if y[r] == nrow[r]]
    # the panels: one per row, the same order, the same values, the leave slot boxed at the target
    axes = [a for a in panels.axes if a.lines or a.patches]
    assert len(axes) == len(sel["rows"])
    for r, a in enumerate(axes):
        np.testing.assert_allclose(a.lines[0].get_ydata(), keep[r, :nrow[r]], rtol=1e-6)
        assert a.texts[0].get_text() == f"user {sel['user_ids'][r]}, y = {y[r]}"
        boxed = [int(round(q.get_x() + 0.5)) for q in a.patches if q.get_edgecolor()[:3] == (1.0, 0.0, 0.0)
                 and q.get_fill() is False]
        assert boxed == ([int(y[r])] if y[r] < nrow[r] else [])
    assert cs["calibration"]["checkpoint_digest"] == load_calibrator(root / "run").checkpoint["digest"]


def test_case_study_without_calibration_names_the_command(world, tmp_path):
    import shutil

    from segfast.calibration import CALIBRATION_FILE

    root, p = world
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    (run / CALIBRATION_FILE).unlink()
    with pytest.raises(ValueError, match="segfast calibrate"):
        plots.case_study(run, root / "prep", tmp_path / "case.png")
    assert not (tmp_path / "case.png").exists()
