"""Streaming reader of KuaiRand logs (1K, Pure, 27K; SPEC section 3).

The log is read in record batches (pyarrow.csv.open_csv), and only the five needed columns of the rows
passing the filters are kept, so a 46 GB 27K log never has to fit in memory.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from segfast.data.sources import (
    DataFormatError, RawInteractions, apply_filters, check_header, read_csv_header,
)

KUAIRAND_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
    "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)
DEFAULT_LOG_GLOB = "log_standard_4_08_to_4_21_*.csv"
_NEEDED = ("user_id", "video_id", "time_ms", "is_click", "play_time_ms", "duration_ms")
_USE_THREADS = True


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def find_logs(input_dir: Path, log: str | None = None) -> list[Path]:
    """The log file(s) to read, in order. ``log`` is a file name, a glob, or a path."""
    input_dir = Path(input_dir)
    if log is not None and Path(log).is_file():
        return [Path(log)]
    if not input_dir.is_dir():
        raise DataFormatError(f"{input_dir}: not a directory (expected a KuaiRand data folder holding "
                              f"{DEFAULT_LOG_GLOB})")
    pattern = log if log is not None else DEFAULT_LOG_GLOB
    files = sorted((p for p in input_dir.glob(pattern) if p.is_file()), key=_natural_key)
    if not files:
        have = sorted(p.name for p in input_dir.glob("*.csv"))[:10]
        raise DataFormatError(
            f"{input_dir}: no KuaiRand log matching {pattern!r} (expected e.g. log_standard_4_08_to_4_21_1k.csv, "
            f"_pure.csv or _27k_part1.csv/_part2.csv); CSV files present: {have or 'none'}")
    if log is None:
        groups = {re.sub(r"_part\d+$", "", p.stem) for p in files}
        if len(groups) > 1:
            raise DataFormatError(
                f"{input_dir}: several different KuaiRand logs match {DEFAULT_LOG_GLOB!r}: "
                f"{[p.name for p in files]}; pick one with log=NAME")
    return files


def _locate_in_chunk(data: bytes, first_line: int, first_row: int) -> str | None:
    """The first line of ``data`` with a bad needed field: "line L (data row R), field 'name': ..."."""
    idx = [(KUAIRAND_COLUMNS.index(c), c) for c in _NEEDED]
    row = first_row - 1
    for j, raw in enumerate(data.split(b"\n")):
        s = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not s.strip():
            continue
        row += 1
        where = f"line {first_line + j} (data row {row})"
        fields = s.split(",")
        if len(fields) != len(KUAIRAND_COLUMNS):
            return f"{where}: expected {len(KUAIRAND_COLUMNS)} fields, got {len(fields)}"
        for k, name in idx:
            v = fields[k].strip().strip('"')
            try:
                int(v)
            except ValueError:
                return f"{where}, field {name!r}: expected an integer, got {v!r}"
    return None


def _read_one(path: Path, chunk_bytes: int, row_base: int, out: dict, dropped: dict, bar) -> int:
    """Stream one log file in chunks of whole lines, appending kept rows' columns to ``out``.

    The file is cut at line boundaries into pieces of about ``chunk_bytes`` that are parsed one at a time
    (pyarrow's own streaming reader reads ahead without bound when the consumer is slower), so memory
    stays about a few times ``chunk_bytes`` whatever the file size. Returns the data rows read.
    """
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path}: file is empty (expected a KuaiRand log with header "
                              f"{','.join(KUAIRAND_COLUMNS)})")
    header = read_csv_header(path)
    has_header = header == list(KUAIRAND_COLUMNS)
    if not has_header:
        # a later part of a split log may start without a header; then its first line must be data
        looks_numeric = all(re.fullmatch(r"-?\d+", c) for c in header) and len(header) == len(KUAIRAND_COLUMNS)
        if not (row_base > 0 and looks_numeric):
            check_header(path, header, KUAIRAND_COLUMNS, exact=True)
    chunk_bytes = int(max(chunk_bytes, 1 << 10))
    read_opts = pacsv.ReadOptions(block_size=min(chunk_bytes, 16 << 20), use_threads=_USE_THREADS,
                                  column_names=list(KUAIRAND_COLUMNS))
    conv = pacsv.ConvertOptions(column_types={c: pa.int64() for c in _NEEDED}, include_columns=list(_NEEDED))
    rows = 0
    line = 1  # physical line number of the next chunk's first line
    with open(path, "rb") as f:
        if has_header:
            hdr = f.readline()
            line = 2
            if bar is not None:
                bar.update(len(hdr))
        carry = b""
        while True:
            buf = f.read(chunk_bytes)
            if bar is not None:
                bar.update(len(buf))
            if buf:
                data = carry + buf
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                carry = data[cut + 1:]
                data = data[:cut + 1]
            else:
                data, carry = carry, b""
                if not data.strip():
                    break
            try:
                table = pacsv.read_csv(pa.py_buffer(data), read_options=read_opts, convert_options=conv)
            except pa.ArrowInvalid as e:
                where = _locate_in_chunk(data, line, row_base + rows) or f"near line {line} (data row {row_base + rows} of the log)"
                raise DataFormatError(f"{path}: {where} ({e})") from None
            n = table.num_rows
            cols = {}
            for c in _NEEDED:
                a = table.column(c)
                if a.null_count:
                    where = _locate_in_chunk(data, line, row_base + rows) or f"near line {line}"
                    raise DataFormatError(f"{path}: {where} (empty value in column {c!r})")
                cols[c] = a.to_numpy()
            del table
            keep, _ = apply_filters(cols["play_time_ms"], cols["duration_ms"], is_click=cols["is_click"],
                                    dropped=dropped)
            idx = np.flatnonzero(keep)
            for c in ("user_id", "video_id", "time_ms", "duration_ms", "play_time_ms"):
                out[c].append(cols[c][idx])
            out["source_row"].append(idx.astype(np.int64) + (row_base + rows))
            rows += n
            line += data.count(b"\n")
            if not buf:
                break
    if rows == 0:
        raise DataFormatError(f"{path}: no data rows after the header")
    return rows


def read_kuairand(input_dir, log: str | None = None, chunk_bytes: int = 64 << 20,
                  progress: bool = True) -> RawInteractions:
    """Stream a KuaiRand log (several matching files, e.g. 27K part1/part2, are read in order as one log).

    Filters (counted in ``dropped``, first failing reason only): is_click > 0 ("not_clicked"),
    play_time_ms > 0 ("play_time_nonpositive"), 0 < duration_ms < 200000 ("duration_out_of_range").
    ``source_row`` numbers the data rows across all files of the log.
    """
    files = find_logs(Path(input_dir), log)
    out = {c: [] for c in ("user_id", "video_id", "time_ms", "duration_ms", "play_time_ms", "source_row")}
    dropped: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="read " + (files[0].name if len(files) == 1 else f"{len(files)} KuaiRand logs"))
    try:
        total = 0
        for p in files:
            total += _read_one(p, chunk_bytes, total, out, dropped, bar)
    finally:
        if bar is not None:
            bar.close()

    def cat(c):
        return np.concatenate(out[c]).astype(np.int64, copy=False) if out[c] else np.zeros(0, np.int64)

    return RawInteractions(
        user_id=cat("user_id"), video_id=cat("video_id"), time_ms=cat("time_ms"),
        duration_ms=cat("duration_ms"), play_time_ms=cat("play_time_ms"), source_row=cat("source_row"),
        rows_read=total, dropped=dropped, source="kuairand:" + ",".join(p.name for p in files))
