"""Issue 15 item 5, input sanity: the SegMM feature memmap must hold exactly the vectors the JSON map implies
(case 6: a wrong --feature-dim, or extra bytes, is an error naming the file and both sizes), and exact
duplicate interactions (same user, video, time) are dropped at prepare and counted (case 8)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from segfast.cli import main
from segfast.data import splits as sp
from segfast.data.prepared import load_prepared
from segfast.data.sources import DataFormatError
from segfast.data.sources.segmm import FEAT_FILE, INTER_FILE, MAP_FILE, read_segmm
from segfast.data.synth import synth


@pytest.fixture(scope="module")
def release16(tmp_path_factory):
    """A small synthetic SegMM release whose memmap really has dimension 16."""
    d = tmp_path_factory.mktemp("rel") / "segmm"
    synth("segmm", d, users=4, videos=40, interactions=800, seed=3, feature_dim=16, progress=False)
    return d


def _lines_needed(d) -> int:
    return max(json.loads((d / MAP_FILE).read_text()).values()) + 1


def test_case6_wrong_feature_dim_is_refused(release16, tmp_path, capsys):
    """case 6: `prepare --feature-dim 8` on a memmap of dimension 16 used to read it at width 8 (exit 0)."""
    need = _lines_needed(release16)
    size = (release16 / FEAT_FILE).stat().st_size
    assert size == need * 16 * 8
    rc = main(["prepare", "--source", "segmm", "--input", str(release16), "--feature-dim", "8", "--quiet",
               "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert str(release16 / FEAT_FILE) in err                       # the file
    assert f"size {size} bytes" in err                              # the actual size
    assert f"exactly {need} x 8 x 8 = {need * 64} bytes" in err     # the expected size
    assert "--feature-dim" in err
    assert not (tmp_path / "p").exists()
    # the right dimension passes the reader
    _, feats = read_segmm(release16, feature_dim=16)
    assert feats.matrix.rows == need


def test_case6_longer_memmap_is_an_error(release16, tmp_path):
    """One extra vector after the last one the map refers to: 'at least' accepted it, 'exactly' does not."""
    d = tmp_path / "rel"
    d.mkdir()
    for name in (INTER_FILE, MAP_FILE):
        (d / name).write_bytes((release16 / name).read_bytes())
    data = (release16 / FEAT_FILE).read_bytes()
    (d / FEAT_FILE).write_bytes(data + np.zeros(16).tobytes())
    need = _lines_needed(d)
    with pytest.raises(DataFormatError, match=rf"size {len(data) + 128} bytes .* expected exactly {need} x 16 x 8"):
        read_segmm(d, feature_dim=16)
    (d / FEAT_FILE).write_bytes(data[:-128])  # one vector short: still an error
    with pytest.raises(DataFormatError, match=rf"expected exactly {need} x 16 x 8 = {len(data)} bytes"):
        read_segmm(d, feature_dim=16)


def test_first_occurrences():
    # sorted by (user, time, source_row); duplicates of (user, video, time) interleaved with another video
    u = np.array([1, 1, 1, 1, 1, 2, 2], dtype=np.int64)
    t = np.array([5, 5, 5, 7, 7, 5, 5], dtype=np.int64)
    v = np.array([9, 8, 9, 9, 9, 9, 9], dtype=np.int64)
    assert sp.first_occurrences(u, v, t).tolist() == [True, True, False, True, False, True, False]
    assert sp.first_occurrences(u[:0], v[:0], t[:0]).tolist() == []


def test_case8_duplicated_rows_dropped_and_counted(release16, tmp_path):
    """case 8: every row twice used to keep both copies, uncounted, each twin in the other's history."""
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / MAP_FILE).write_bytes((release16 / MAP_FILE).read_bytes())
    (dup / FEAT_FILE).write_bytes((release16 / FEAT_FILE).read_bytes())
    header, *rows = (release16 / INTER_FILE).read_text().splitlines()
    rows = [r for r in rows if r]
    (dup / INTER_FILE).write_text("\n".join([header] + [r for r in rows for _ in (0, 1)]) + "\n")

    args = ["prepare", "--source", "segmm", "--feature-dim", "16", "--quiet", "--json"]
    assert main(args + ["--input", str(release16), "--out", str(tmp_path / "once")]) == 0
    assert main(args + ["--input", str(dup), "--out", str(tmp_path / "twice")]) == 0
    once, twice = load_prepared(tmp_path / "once"), load_prepared(tmp_path / "twice")
    c1, c2 = once.manifest["counts"], twice.manifest["counts"]
    # the synthetic release itself may hold a few exact duplicates: every extra copy is counted
    n_dup_orig = c1["rows_dropped"]["duplicate_interaction"]
    assert c2["rows_read"] == 2 * c1["rows_read"]
    assert c2["rows_dropped"]["duplicate_interaction"] == c1["rows_read"] + n_dup_orig \
        - sum(v for k, v in c1["rows_dropped"].items() if k not in ("duplicate_interaction",
                                                                    "user_too_few_interactions"))
    assert c2["rows_kept"] == c1["rows_kept"] and c2["users"] == c1["users"] and c2["splits"] == c1["splits"]
    assert c2["rows_read"] == c2["rows_kept"] + sum(c2["rows_dropped"].values())
    # the same dataset: identical tables, only the source rows point at the first copy of each pair
    for col in ("user_idx", "video_idx", "time_ms", "split", "hist_len", "vhist_offset", "vhist_len", "target"):
        np.testing.assert_array_equal(once.interactions[col], twice.interactions[col], err_msg=col)
    np.testing.assert_array_equal(twice.interactions["source_row"], 2 * once.interactions["source_row"])
    np.testing.assert_array_equal(np.asarray(once.vhist), np.asarray(twice.vhist))
    # no twin left: (user, video, time) is unique, so no row has its own copy in its history
    it = twice.interactions
    key = np.stack([it["user_idx"].astype(np.int64), it["video_idx"].astype(np.int64), it["time_ms"]], 1)
    assert np.unique(key, axis=0).shape[0] == key.shape[0]
    r = np.arange(len(twice))
    for k in range(1, 51):  # rows [r - hist_len, r) of the same user never share (video, time) with r
        h = r - k
        m = (k <= it["hist_len"]) & (h >= 0)
        same = (it["video_idx"][h[m]] == it["video_idx"][m]) & (it["time_ms"][h[m]] == it["time_ms"][m])
        assert not same.any()
    assert pq.read_metadata(tmp_path / "twice" / "interactions.parquet").num_rows == c1["rows_kept"]
