"""Reader of the public 10,000-row SegMM sample (`SegMM_inter_sample.csv`, SPEC section 3).

Columns: user_id, video_id, time_ms, duration_ms, playing_time, label_1D. label_1D is a numpy-printed
int array in quotes ("[ 1  0 -1]") that wraps across physical lines for long videos, so the file is read
with the csv module (quoted newlines), tracking the physical line of every record for error messages.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segfast.data.labels import labels_from_rows
from segfast.data.sources import DataFormatError, RawInteractions, apply_filters, check_header

SAMPLE_COLUMNS = ("user_id", "video_id", "time_ms", "duration_ms", "playing_time", "label_1D")
_INT_COLUMNS = SAMPLE_COLUMNS[:5]


@dataclass
class SegmmSample:
    """The sample's kept interactions plus their label_1D arrays, flat: row r's label is
    ``labels[label_offsets[r]:label_offsets[r + 1]]`` (int8, length N)."""

    interactions: RawInteractions
    labels: np.ndarray
    label_offsets: np.ndarray

    def label(self, r: int) -> np.ndarray:
        return self.labels[self.label_offsets[r]:self.label_offsets[r + 1]]


def _parse_label(text: str, where: str) -> np.ndarray:
    s = text.strip()
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        raise DataFormatError(f"{where}: field 'label_1D': expected a bracketed int array like '[ 1  0 -1]', "
                              f"got {text[:60]!r}")
    toks = s[1:-1].split()
    if not toks:
        raise DataFormatError(f"{where}: field 'label_1D': empty label array")
    try:
        vals = np.array([int(t) for t in toks], dtype=np.int64)
    except ValueError:
        raise DataFormatError(f"{where}: field 'label_1D': non-integer entry in {text[:60]!r}") from None
    if np.any((vals < -1) | (vals > 1)):
        raise DataFormatError(f"{where}: field 'label_1D': entries must be -1, 0 or 1, got {text[:60]!r}")
    return vals.astype(np.int8)


def read_segmm_sample(path, check_labels: bool = True) -> SegmmSample:
    """Read ``SegMM_inter_sample.csv``; drop play_time <= 0 and durations outside (0, 200000).

    With ``check_labels`` (default), a kept row whose label_1D differs from the SPEC section 2 rule
    raises DataFormatError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected the SegMM sample CSV with columns "
                              f"{', '.join(SAMPLE_COLUMNS)})")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: file is empty (expected a header line {','.join(SAMPLE_COLUMNS)})")
    cols = [[] for _ in _INT_COLUMNS]
    labels: list[np.ndarray] = []
    lines: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}: file is empty") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        check_header(path, header, SAMPLE_COLUMNS, exact=True)
        prev_line = reader.line_num
        for rec in reader:
            line = prev_line + 1  # physical line where this record starts
            prev_line = reader.line_num
            if not rec or (len(rec) == 1 and not rec[0].strip()):
                continue
            where = f"{path}: line {line} (data row {len(lines)})"
            if len(rec) != len(SAMPLE_COLUMNS):
                raise DataFormatError(f"{where}: expected {len(SAMPLE_COLUMNS)} fields, got {len(rec)}")
            for j, name in enumerate(_INT_COLUMNS):
                try:
                    cols[j].append(int(rec[j]))
                except ValueError:
                    raise DataFormatError(f"{where}: field {name!r}: expected an integer, got {rec[j]!r}") from None
            labels.append(_parse_label(rec[5], where))
            lines.append(line)
    if not lines:
        raise DataFormatError(f"{path}: no data rows after the header")
    user, video, time, dur, play = (np.asarray(c, dtype=np.int64) for c in cols)
    source_row = np.arange(len(lines), dtype=np.int64)
    keep, dropped = apply_filters(play_time_ms=play, duration_ms=dur)
    idx = np.flatnonzero(keep)
    lens = np.fromiter((labels[i].shape[0] for i in idx), dtype=np.int64, count=idx.shape[0])
    offsets = np.zeros(idx.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate([labels[i] for i in idx]) if idx.size else np.zeros(0, np.int8)
    if check_labels and idx.size:
        expect, eoff = labels_from_rows(play[idx], dur[idx])
        bad_len = np.flatnonzero(lens != np.diff(eoff))
        if bad_len.size:
            i = idx[bad_len[0]]
            raise DataFormatError(
                f"{path}: line {lines[i]} (data row {i}): field 'label_1D': length {labels[i].shape[0]} but "
                f"duration_ms={dur[i]} gives N={np.diff(eoff)[bad_len[0]]} segments "
                f"({bad_len.size} rows disagree in length)")
        diff = np.flatnonzero(flat != expect)
        if diff.size:
            r = np.searchsorted(offsets, diff[0], side="right") - 1
            i = idx[r]
            nrows = np.unique(np.searchsorted(offsets, diff, side="right") - 1).size
            raise DataFormatError(
                f"{path}: line {lines[i]} (data row {i}): field 'label_1D': {labels[i].tolist()} disagrees with "
                f"the label rule for playing_time={play[i]}, duration_ms={dur[i]} "
                f"(expected {expect[eoff[r]:eoff[r + 1]].tolist()}; {nrows} rows disagree)")
    raw = RawInteractions(
        user_id=user[idx], video_id=video[idx], time_ms=time[idx], duration_ms=dur[idx],
        play_time_ms=play[idx], source_row=source_row[idx], rows_read=len(lines), dropped=dropped,
        source="segmm_sample")
    return SegmmSample(interactions=raw, labels=flat, label_offsets=offsets)
