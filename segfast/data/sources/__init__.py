"""Readers for the raw release formats (SPEC section 3). Each returns a RawInteractions."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataFormatError(ValueError):
    """Bad input: the message names the file, the row (1-based line or data row) and the field."""


@dataclass
class RawInteractions:
    """Filtered interactions of one source, as parallel int64 columns."""

    user_id: np.ndarray
    video_id: np.ndarray
    time_ms: np.ndarray
    duration_ms: np.ndarray
    play_time_ms: np.ndarray
    source_row: np.ndarray  # 0-based data-row number in the source file
    rows_read: int
    dropped: dict = field(default_factory=dict)  # reason -> count
    source: str = ""

    def __len__(self) -> int:
        return int(self.user_id.shape[0])


MAX_DURATION_MS = 200000  # SPEC 2: keep 0 < duration_ms < 200000 (N <= 40)

DROP_NOT_CLICKED = "not_clicked"
DROP_PLAY_TIME = "play_time_nonpositive"
DROP_DURATION = "duration_out_of_range"


def apply_filters(play_time_ms: np.ndarray, duration_ms: np.ndarray, is_click: np.ndarray | None = None,
                  dropped: dict | None = None) -> tuple[np.ndarray, dict]:
    """SPEC 2-3 filters. Returns (keep mask, dropped counts). A row failing several filters is counted
    once, under the first failing reason in the order: not_clicked, play_time_nonpositive,
    duration_out_of_range. Counts are added to ``dropped`` when given (for streaming readers)."""
    dropped = {} if dropped is None else dropped
    keep = np.ones(play_time_ms.shape[0], dtype=bool)
    checks = []
    if is_click is not None:
        checks.append((DROP_NOT_CLICKED, is_click > 0))
    checks.append((DROP_PLAY_TIME, play_time_ms > 0))
    checks.append((DROP_DURATION, (duration_ms > 0) & (duration_ms < MAX_DURATION_MS)))
    for reason, ok in checks:
        bad = keep & ~ok
        n = int(bad.sum())
        dropped[reason] = dropped.get(reason, 0) + n
        keep &= ok
    return keep, dropped


def read_csv_header(path) -> list[str]:
    """The column names of a CSV file's first line (quotes, spaces and a UTF-8 BOM stripped).
    Raises DataFormatError for a missing or empty file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        raise DataFormatError(f"{path}: file is empty (expected a CSV header line)")
    text = first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    return [c.strip().strip('"').strip() for c in text.split(",")]


def check_header(path, header: list[str], required, exact: bool = False) -> None:
    """Raise DataFormatError naming the file and the missing / unexpected columns."""
    required = list(required)
    if exact:
        ok = header == required
    else:
        ok = all(c in header for c in required)
    if ok:
        return
    missing = [c for c in required if c not in header]
    extra = [c for c in header if c not in required]
    msg = f"{path}: line 1: bad CSV header {header}; expected {'exactly ' if exact else ''}{required}"
    if missing:
        msg += f"; missing column(s) {missing}"
    if extra and exact:
        msg += f"; unexpected column(s) {extra}"
    if not missing and exact:
        msg += "; columns out of order"
    raise DataFormatError(msg)


def locate_bad_int(path, header: list[str], columns, has_header: bool = True,
                   max_bytes: int | None = None) -> str | None:
    """Scan a CSV (no quoted newlines) for the first field of ``columns`` that is not an integer.

    Returns "line L (data row R), field 'name': got 'value'" or None if nothing is found within
    ``max_bytes``. Used to turn a pyarrow conversion error into a message that names the row.
    """
    idx = [(header.index(c), c) for c in columns if c in header]
    ncol = len(header)
    read = 0
    first = 2 if has_header else 1  # line number of data row 0
    with open(path, "rb") as f:
        if has_header:
            read += len(f.readline())
        line_no = first - 1
        for raw in f:
            line_no += 1
            read += len(raw)
            s = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not s.strip():
                continue
            fields = s.split(",")
            if len(fields) != ncol:
                return f"line {line_no} (data row {line_no - first}): expected {ncol} fields, got {len(fields)}"
            for j, name in idx:
                v = fields[j].strip().strip('"')
                try:
                    int(v)
                except ValueError:
                    return f"line {line_no} (data row {line_no - first}), field {name!r}: expected an integer, got {v!r}"
            if max_bytes is not None and read > max_bytes:
                return None
    return None
