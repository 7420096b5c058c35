"""The SPEC section 2 label rule: hand-computed cases and all 10,000 rows of the real public sample."""
import csv

import numpy as np
import pytest

from segfast.data.labels import (
    label_matrix, label_vector, labels_from_rows, n_segments, target_slot, view_length,
)

@pytest.mark.parametrize("play,dur,expected", [
    (5000, 12000, [0, -1, -1]),          # play exactly 5000 ms -> k = 0
    (5001, 12000, [1, 0, -1]),
    (1, 12000, [0, -1, -1]),
    (10000, 12000, [1, 0, -1]),          # exactly 2 segments' worth, still left inside segment 1
    (11999, 12000, [1, 1, 0]),           # left in the (short) last segment
    (12000, 12000, [1, 1, 1]),           # play == duration: full watch
    (40000, 12000, [1, 1, 1]),           # replays: play > duration is a full watch
    (15000, 15000, [1, 1, 1]),           # duration an exact multiple of 5000
    (14999, 15000, [1, 1, 0]),
    (10000, 15000, [1, 0, -1]),
    (4000, 4000, [1]),                   # one-segment video watched
    (3000, 4000, [0]),
    (3000, 5000, [0]),                   # 5000 ms video: one segment
    (5000, 5000, [1]),
    (5000, 5001, [0, -1]),
])
def test_hand_computed(play, dur, expected):
    assert label_vector(play, dur).tolist() == expected
    assert label_vector(play, dur).dtype == np.int8
    assert int(n_segments(dur)) == len(expected)
    assert int(view_length(play, dur)) == expected.count(1)


def test_forty_segments():
    dur = 199999
    assert int(n_segments(dur)) == 40
    assert int(n_segments(195000)) == 39 and int(n_segments(195001)) == 40 and int(n_segments(200000)) == 40
    full = label_vector(250000, dur)
    assert full.tolist() == [1] * 40
    assert int(target_slot(250000, dur)) == 40          # full watch of a 40-segment video: y == 40
    left = label_vector(196000, dur)                    # ceil(196000/5000)-1 = 39: left in the last slot
    assert left.tolist() == [1] * 39 + [0]
    m = label_matrix([40, 40], [40, 39])
    assert m.shape == (2, 40) and (m[0] == 1).all() and m[1, 39] == 0 and (m[1, :39] == 1).all()


def test_label_matrix_padding_and_vectorised():
    n = np.array([3, 3, 1, 5])
    y = np.array([0, 3, 1, 2])
    m = label_matrix(n, y, slots=6)
    assert m.dtype == np.int8
    assert m.tolist() == [
        [0, -1, -1, -1, -1, -1],
        [1, 1, 1, -1, -1, -1],        # full watch: target slot N is padding -> -1
        [1, -1, -1, -1, -1, -1],
        [1, 1, 0, -1, -1, -1],
    ]
    with pytest.raises(ValueError):
        label_matrix([3], [4])
    with pytest.raises(ValueError):
        label_matrix([41], [0])


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(0)
    dur = rng.integers(1, 200000, 2000)
    play = np.where(rng.random(2000) < 0.3, dur + rng.integers(0, 50000, 2000), rng.integers(1, 200000, 2000))
    play = np.where(rng.random(2000) < 0.05, (play // 5000) * 5000 + 5000, play)  # many exact multiples
    vals, offs = labels_from_rows(play, dur)
    m = label_matrix(n_segments(dur), target_slot(play, dur))
    for i in range(0, 2000, 7):
        lv = label_vector(int(play[i]), int(dur[i]))
        assert vals[offs[i]:offs[i + 1]].tolist() == lv.tolist()
        assert m[i, :lv.shape[0]].tolist() == lv.tolist()
        assert (m[i, lv.shape[0]:] == -1).all()


def test_real_sample_every_row(sample_csv):
    """The rule reproduces every label_1D of the 10,000-row public sample (independent csv parse)."""
    with open(sample_csv, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        rows = list(r)
    assert header[3:6] == ["duration_ms", "playing_time", "label_1D"]
    assert len(rows) == 10000
    dur = np.array([int(x[3]) for x in rows])
    play = np.array([int(x[4]) for x in rows])
    truth = [[int(t) for t in x[5].strip("[]").split()] for x in rows]
    assert sum("\n" in x[5] for x in rows) > 100  # the wrapped fields are exercised
    vals, offs = labels_from_rows(play, dur)
    for i, t in enumerate(truth):
        assert vals[offs[i]:offs[i + 1]].tolist() == t, f"row {i}"
    assert view_length(play, dur).tolist() == [t.count(1) for t in truth]
    assert np.array_equal(n_segments(dur), [len(t) for t in truth])
