"""Raw readers: the real sample, hand-made SegMM / KuaiRand files, and every bad-input case."""
import json
from pathlib import Path

import numpy as np
import pytest

from segfast.data.labels import labels_from_rows
from segfast.data.sources import DataFormatError
from segfast.data.sources.kuairand import KUAIRAND_COLUMNS, read_kuairand
from segfast.data.sources.segmm import FeatureMatrix, read_segmm
from segfast.data.sources.segmm_sample import read_segmm_sample

SAMPLE_HEADER = "user_id,video_id,time_ms,duration_ms,playing_time,label_1D\n"


# ----------------------------------------------------------------------------- SegMM sample
def test_real_sample_parses_all_rows(sample_csv):
    s = read_segmm_sample(sample_csv)
    raw = s.interactions
    assert raw.rows_read == 10000 and len(raw) == 10000
    assert raw.dropped == {"play_time_nonpositive": 0, "duration_out_of_range": 0}
    assert len(np.unique(raw.user_id)) == 37 and len(np.unique(raw.video_id)) == 9123
    assert s.label_offsets.shape == (10001,)
    # spot-check against the raw text: first row and the first multi-line row
    assert s.label(0).tolist() == [0, -1, -1, -1, -1, -1, -1]
    assert (raw.user_id[0], raw.video_id[0], raw.time_ms[0], raw.duration_ms[0], raw.play_time_ms[0]) == \
        (1, 316602, 205739830, 32366, 1623)
    lens = np.diff(s.label_offsets)
    assert lens.max() == 40 and np.array_equal(lens, -(-raw.duration_ms // 5000))
    assert raw.source_row.tolist() == list(range(10000))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sample_multiline_labels_and_filters(tmp_path):
    long_label = "[ 1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1  1\n  0 -1 -1]"
    text = (SAMPLE_HEADER
            + f'1,10,100,135000,125000,"{long_label}"\n'    # 27 segments, k = 24
            + '1,11,101,7000,0,"[ 0 -1]"\n'                  # play 0 -> dropped
            + '2,12,102,200000,5000,"[ 0 -1]"\n'             # duration out of range -> dropped
            + '2,13,103,0,5000,"[0]"\n'                      # duration 0 -> dropped
            + '2,14,104,9000,9500,"[1 1]"\n'
            + '3,15,105,5000,5000,"[1]"\n')
    s = read_segmm_sample(_write(tmp_path / "s.csv", text))
    raw = s.interactions
    assert raw.rows_read == 6 and len(raw) == 3
    assert raw.dropped == {"play_time_nonpositive": 1, "duration_out_of_range": 2}
    assert raw.source_row.tolist() == [0, 4, 5]
    assert s.label(0).tolist() == [1] * 24 + [0, -1, -1]
    assert s.label(1).tolist() == [1, 1] and s.label(2).tolist() == [1]


@pytest.mark.parametrize("header,needle", [
    ("user_id,video_id,time_ms,duration_ms,play_time,label_1D", "missing column(s) ['playing_time']"),
    ("user_id,video_id,time_ms,duration_ms,playing_time", "missing column(s) ['label_1D']"),
    ("video_id,user_id,time_ms,duration_ms,playing_time,label_1D", "out of order"),
])
def test_sample_bad_header(tmp_path, header, needle):
    p = _write(tmp_path / "s.csv", header + '\n1,2,3,4000,1000,"[0]"\n')
    with pytest.raises(DataFormatError) as e:
        read_segmm_sample(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_sample_bad_values(tmp_path):
    good = '1,10,100,7000,1000,"[ 0 -1]"\n'
    multi = '1,10,100,7000,1000,"[ 0\n -1]"\n'
    p = _write(tmp_path / "a.csv", SAMPLE_HEADER + multi + good + '1,x1,100,7000,1000,"[ 0 -1]"\n')
    with pytest.raises(DataFormatError, match=r"a\.csv: line 5 \(data row 2\): field 'video_id': expected an integer"):
        read_segmm_sample(p)
    p = _write(tmp_path / "b.csv", SAMPLE_HEADER + good + '1,10,100,7000,1000,"[ 0 -1"\n')
    with pytest.raises(DataFormatError, match=r"b\.csv: line 3 \(data row 1\): field 'label_1D'"):
        read_segmm_sample(p)
    p = _write(tmp_path / "c.csv", SAMPLE_HEADER + good + '1,10,100,7000,1000,"[ 0 2]"\n')
    with pytest.raises(DataFormatError, match="field 'label_1D': entries must be -1, 0 or 1"):
        read_segmm_sample(p)
    p = _write(tmp_path / "d.csv", SAMPLE_HEADER + good + '1,10,100,7000,1000,"[ 0 a]"\n')
    with pytest.raises(DataFormatError, match="label_1D"):
        read_segmm_sample(p)
    # disagrees with the rule (play 6000 -> [1 0])
    p = _write(tmp_path / "e.csv", SAMPLE_HEADER + multi + '1,10,100,7000,6000,"[ 0 -1]"\n')
    with pytest.raises(DataFormatError, match=r"e\.csv: line 4 \(data row 1\): field 'label_1D'.*disagrees"):
        read_segmm_sample(p)
    assert len(read_segmm_sample(p, check_labels=False).interactions) == 2
    # wrong length for the duration
    p = _write(tmp_path / "f.csv", SAMPLE_HEADER + '1,10,100,7000,1000,"[ 0 -1 -1]"\n')
    with pytest.raises(DataFormatError, match="length 3 but duration_ms=7000 gives N=2"):
        read_segmm_sample(p)
    p = _write(tmp_path / "g.csv", SAMPLE_HEADER + '1,10,100,7000\n')
    with pytest.raises(DataFormatError, match="line 2.*expected 6 fields, got 4"):
        read_segmm_sample(p)


def test_sample_empty_and_missing(tmp_path):
    with pytest.raises(DataFormatError, match="empty"):
        read_segmm_sample(_write(tmp_path / "e.csv", ""))
    with pytest.raises(DataFormatError, match="no data rows"):
        read_segmm_sample(_write(tmp_path / "h.csv", SAMPLE_HEADER))
    with pytest.raises(DataFormatError, match="not found"):
        read_segmm_sample(tmp_path / "nope.csv")


# ----------------------------------------------------------------------------- SegMM release
INTER_HEADER = "user_id,time_ms,photo_id,duration_ms,playing_time,wtd_effective_view\n"


def _segmm_release(d: Path, dim=6, base=0, drop_key=None, extra_rows=0, line_perm=True):
    """A hand-made release: 3 videos (2, 1 and 3 segments), rows in a permuted order."""
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        (7, 1000, 501, 9000, 4000, 0),    # N=2
        (7, 900, 502, 3000, 3500, 1),     # N=1
        (8, 5, 503, 14000, 12000, 1),     # N=3
        (8, 6, 501, 9000, 0, 0),          # play 0 -> dropped
        (9, 7, 502, 250000, 1000, 0),     # duration out of range -> dropped
        (9, 8, 503, 14000, 5000, 0),
    ]
    (d / "SegMM_inter.csv").write_text(INTER_HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    segs = [(501, 0), (501, 1), (502, 0), (503, 0), (503, 1), (503, 2)]
    rng = np.random.default_rng(0)
    lines = rng.permutation(len(segs)) if line_perm else np.arange(len(segs))
    mapping = {f"{p}-{s + base}": int(l) for (p, s), l in zip(segs, lines) if f"{p}-{s}" != drop_key}
    (d / "SegMM_photoidframeid2lineid.json").write_text(json.dumps(mapping))
    feats = rng.standard_normal((len(segs) + extra_rows, dim))
    feats.astype("<f8").tofile(d / "SegMM_feat_memmap.dat")
    truth = {(p, s): feats[l] for (p, s), l in zip(segs, lines)}
    return truth


def test_segmm_release_roundtrip(tmp_path):
    truth = _segmm_release(tmp_path, dim=6)
    raw, feats = read_segmm(tmp_path, feature_dim=6)
    assert raw.rows_read == 6 and len(raw) == 4
    assert raw.dropped == {"play_time_nonpositive": 1, "duration_out_of_range": 1}
    assert raw.source_row.tolist() == [0, 1, 2, 5]
    assert raw.video_id.tolist() == [501, 502, 503, 503]
    assert raw.time_ms.tolist() == [1000, 900, 5, 8]
    assert feats.dim == 6 and len(feats) == 6 and feats.matrix.rows == 6
    offs, rows = feats.rows_for([503, 501, 502], [3, 2, 1])
    assert offs.tolist() == [0, 3, 5, 6]
    x = feats.read(rows)
    expect = np.stack([truth[(503, 0)], truth[(503, 1)], truth[(503, 2)], truth[(501, 0)], truth[(501, 1)],
                       truth[(502, 0)]])
    np.testing.assert_array_equal(x, expect)
    one = feats.rows_for(501, 2)  # scalar form of docs/internals.md
    np.testing.assert_array_equal(feats.read(one), expect[3:5])
    assert feats.has_all([501, 502, 503], [2, 2, 3]).tolist() == [True, False, True]


def test_segmm_one_based_map(tmp_path):
    truth = _segmm_release(tmp_path, base=1)
    _, feats = read_segmm(tmp_path, feature_dim=6)
    assert feats.segment_base == 1
    np.testing.assert_array_equal(feats.read(feats.rows_for(503, 3)),
                                  np.stack([truth[(503, i)] for i in range(3)]))


def test_segmm_missing_segment(tmp_path):
    _segmm_release(tmp_path, drop_key="503-1")
    _, feats = read_segmm(tmp_path, feature_dim=6)
    with pytest.raises(DataFormatError, match=r'no feature row for key "503-1"'):
        feats.rows_for([501, 503], [2, 3])
    offs, rows = feats.rows_for([501, 503], [2, 3], missing="zero")
    assert rows[3] == -1 and (rows != -1).sum() == 4
    x = feats.read(rows)
    assert (x[3] == 0).all() and (x[2] != 0).all()


def test_segmm_feature_parts_match_single(tmp_path):
    _segmm_release(tmp_path / "one", dim=5)
    data = (tmp_path / "one" / "SegMM_feat_memmap.dat").read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("SegMM_inter.csv", "SegMM_photoidframeid2lineid.json"):
        (parts / name).write_bytes((tmp_path / "one" / name).read_bytes())
    cuts = [0, 37, 40, 41, 200, len(data)]  # arbitrary byte cuts, rows straddle parts; "10" sorts after "2"
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        (parts / f"SegMM_feat_memmap.dat.{i * 5}").write_bytes(data[a:b])
    whole = FeatureMatrix([tmp_path / "one" / "SegMM_feat_memmap.dat"], 5)
    split = FeatureMatrix(sorted(parts.glob("SegMM_feat_memmap.dat.*"),
                                 key=lambda p: int(p.suffix[1:])), 5)
    rows = np.array([5, 0, 3, 1, 1, 2, 4, 5])
    np.testing.assert_array_equal(split.read(rows), whole.read(rows))
    np.testing.assert_array_equal(whole.read(rows), np.frombuffer(data, "<f8").reshape(-1, 5)[rows])
    _, f1 = read_segmm(tmp_path / "one", feature_dim=5)
    _, f2 = read_segmm(parts, feature_dim=5)
    assert [p.name for p in f2.matrix.paths][-1] == "SegMM_feat_memmap.dat.20"
    r = f1.rows_for([501, 502, 503], [2, 1, 3])[1]
    np.testing.assert_array_equal(f1.read(r), f2.read(r))


def test_segmm_bad_feature_sizes(tmp_path):
    _segmm_release(tmp_path, dim=6)
    with pytest.raises(DataFormatError, match=r"size 288 bytes is not rows x 5 x 8 bytes"):
        read_segmm(tmp_path, feature_dim=5)          # 288 bytes is not a multiple of 40
    dat = tmp_path / "SegMM_feat_memmap.dat"
    dat.write_bytes(dat.read_bytes()[:-8])
    with pytest.raises(DataFormatError, match="not rows x 6 x 8 bytes"):
        read_segmm(tmp_path, feature_dim=6)
    dat.write_bytes(np.zeros((4, 6)).tobytes())     # too few rows for line ids up to 5
    with pytest.raises(DataFormatError, match="refers to line ids 0..5"):
        read_segmm(tmp_path, feature_dim=6)
    dat.write_bytes(b"")
    with pytest.raises(DataFormatError, match="empty"):
        read_segmm(tmp_path, feature_dim=6)


def test_segmm_bad_map(tmp_path):
    _segmm_release(tmp_path)
    m = tmp_path / "SegMM_photoidframeid2lineid.json"
    m.write_text('{"501-0": 0, "501x1": 1}')
    with pytest.raises(DataFormatError, match="key '501x1'"):
        read_segmm(tmp_path, feature_dim=6)
    m.write_text('{"501-0": 0, "501-1": "one"}')
    with pytest.raises(DataFormatError, match="key '501-1': expected an integer line id"):
        read_segmm(tmp_path, feature_dim=6)
    m.write_text('{"501-0": 0,')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_segmm(tmp_path, feature_dim=6)
    m.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        read_segmm(tmp_path, feature_dim=6)
    m.unlink()
    with pytest.raises(DataFormatError, match="missing: SegMM_photoidframeid2lineid.json"):
        read_segmm(tmp_path, feature_dim=6)
    raw, feats = read_segmm(tmp_path, with_features=False)
    assert feats is None and len(raw) == 4


def test_segmm_bad_csv(tmp_path):
    _segmm_release(tmp_path)
    csvp = tmp_path / "SegMM_inter.csv"
    csvp.write_text("user_id,time_ms,video_id,duration_ms,playing_time,wtd_effective_view\n1,2,3,4000,5,0\n")
    with pytest.raises(DataFormatError, match=r"SegMM_inter.csv: line 1: .*missing column\(s\) \['photo_id'\]"):
        read_segmm(tmp_path)
    csvp.write_text(INTER_HEADER + "1,2,3,4000,5,0\n1,2,3,4000.5,5,0\n")
    with pytest.raises(DataFormatError, match=r"line 3 \(data row 1\), field 'duration_ms': expected an integer"):
        read_segmm(tmp_path)
    csvp.write_text(INTER_HEADER + "1,2,3,4000,5,0\n1,2,,4000,5,0\n")
    with pytest.raises(DataFormatError, match=r"line 3 \(data row 1\), field 'photo_id'"):
        read_segmm(tmp_path)
    csvp.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        read_segmm(tmp_path)
    csvp.write_text(INTER_HEADER)
    with pytest.raises(DataFormatError, match="no data rows"):
        read_segmm(tmp_path)
    csvp.unlink()
    with pytest.raises(DataFormatError, match="SegMM_inter.csv not found"):
        read_segmm(tmp_path)
    with pytest.raises(DataFormatError, match="not a directory"):
        read_segmm(tmp_path / "nope")


# ----------------------------------------------------------------------------- KuaiRand
def _kr_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((n, 19), dtype=np.int64)
    a[:, 0] = rng.integers(0, 30, n)
    a[:, 1] = rng.integers(0, 10**6, n)
    a[:, 4] = 1649347200000 + np.arange(n) * 1000
    a[:, 5] = rng.random(n) < 0.4                               # is_click
    a[:, 12] = rng.integers(-2, 60000, n)                       # play_time_ms (some <= 0)
    a[:, 13] = rng.integers(-1000, 240000, n)                   # duration_ms (some out of range)
    a[:, 18] = rng.integers(0, 10, n)
    return a


def _kr_write(path: Path, a: np.ndarray, header=True):
    txt = (",".join(KUAIRAND_COLUMNS) + "\n") if header else ""
    path.write_text(txt + "".join(",".join(map(str, r)) + "\n" for r in a.tolist()))
    return path


def _kr_expected(a):
    click, play, dur = a[:, 5], a[:, 12], a[:, 13]
    nc = click <= 0
    npl = ~nc & (play <= 0)
    nd = ~nc & ~npl & ~((dur > 0) & (dur < 200000))
    keep = ~(nc | npl | nd)
    return keep, {"not_clicked": int(nc.sum()), "play_time_nonpositive": int(npl.sum()),
                  "duration_out_of_range": int(nd.sum())}


def test_kuairand_filters_and_streaming(tmp_path):
    a = _kr_rows(3000)
    _kr_write(tmp_path / "log_standard_4_08_to_4_21_1k.csv", a)
    keep, dropped = _kr_expected(a)
    whole = read_kuairand(tmp_path, progress=False)
    small = read_kuairand(tmp_path, chunk_bytes=4096, progress=True)  # ~30 record batches
    for r in (whole, small):
        assert r.rows_read == 3000 and r.dropped == dropped
        assert r.source_row.tolist() == np.flatnonzero(keep).tolist()
        np.testing.assert_array_equal(r.user_id, a[keep, 0])
        np.testing.assert_array_equal(r.video_id, a[keep, 1])
        np.testing.assert_array_equal(r.time_ms, a[keep, 4])
        np.testing.assert_array_equal(r.play_time_ms, a[keep, 12])
        np.testing.assert_array_equal(r.duration_ms, a[keep, 13])
        assert r.user_id.dtype == np.int64
    assert len(whole) == keep.sum() > 0


def test_kuairand_multipart_and_log_choice(tmp_path):
    a = _kr_rows(900, seed=1)
    _kr_write(tmp_path / "log_standard_4_08_to_4_21_27k_part1.csv", a[:400])
    _kr_write(tmp_path / "log_standard_4_08_to_4_21_27k_part2.csv", a[400:700])
    _kr_write(tmp_path / "log_standard_4_08_to_4_21_27k_part10.csv", a[700:], header=False)
    keep, dropped = _kr_expected(a)
    r = read_kuairand(tmp_path, chunk_bytes=2048, progress=False)
    assert r.rows_read == 900 and r.dropped == dropped
    assert r.source_row.tolist() == np.flatnonzero(keep).tolist()  # numbered across parts, in part order
    np.testing.assert_array_equal(r.video_id, a[keep, 1])
    r2 = read_kuairand(tmp_path, log="log_standard_4_08_to_4_21_27k_part2.csv", progress=False)
    assert r2.rows_read == 300
    # a second, different log in the folder makes the default ambiguous
    _kr_write(tmp_path / "log_standard_4_08_to_4_21_pure.csv", a[:10])
    with pytest.raises(DataFormatError, match="several different KuaiRand logs"):
        read_kuairand(tmp_path, progress=False)
    assert read_kuairand(tmp_path, log="*_pure.csv", progress=False).rows_read == 10


def test_kuairand_bad_input(tmp_path):
    a = _kr_rows(50)
    p = tmp_path / "log_standard_4_08_to_4_21_1k.csv"
    lines = (",".join(KUAIRAND_COLUMNS) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in a.tolist()))
    bad = lines.replace(",".join(KUAIRAND_COLUMNS), ",".join(KUAIRAND_COLUMNS).replace("play_time_ms", "play_time"))
    p.write_text(bad)
    with pytest.raises(DataFormatError, match=r"1k\.csv: line 1: bad CSV header.*missing column\(s\) \['play_time_ms'\]"):
        read_kuairand(tmp_path, progress=False)
    rows = lines.splitlines(keepends=True)
    f = rows[31].split(",")
    f[13] = "12.5"
    rows[31] = ",".join(f)
    p.write_text("".join(rows))
    with pytest.raises(DataFormatError, match=r"line 32 \(data row 30\), field 'duration_ms': expected an integer, got '12.5'"):
        read_kuairand(tmp_path, chunk_bytes=1024, progress=False)
    f[13] = ""
    rows[31] = ",".join(f)
    p.write_text("".join(rows))
    with pytest.raises(DataFormatError, match=r"line 32 \(data row 30\), field 'duration_ms'"):
        read_kuairand(tmp_path, progress=False)
    p.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        read_kuairand(tmp_path, progress=False)
    p.write_text(",".join(KUAIRAND_COLUMNS) + "\n")
    with pytest.raises(DataFormatError, match="no data rows"):
        read_kuairand(tmp_path, progress=False)
    p.unlink()
    with pytest.raises(DataFormatError, match=r"no KuaiRand log matching 'log_standard_4_08_to_4_21_\*\.csv'"):
        read_kuairand(tmp_path, progress=False)
    with pytest.raises(DataFormatError, match="not a directory"):
        read_kuairand(tmp_path / "missing", progress=False)


def test_labels_of_read_rows_follow_rule(sample_csv):
    """Reader + label rule together on the sample: labels_from_rows equals the parsed label_1D."""
    s = read_segmm_sample(sample_csv, check_labels=False)
    vals, offs = labels_from_rows(s.interactions.play_time_ms, s.interactions.duration_ms)
    np.testing.assert_array_equal(offs, s.label_offsets)
    np.testing.assert_array_equal(vals, s.labels)
