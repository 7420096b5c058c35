"""Scoring input: (user_id, video_id[, time_ms]) pairs, plus columns carried through to the output.

Three kinds of input share one interface (``rows``, ``has_time``, ``keep``, ``read(start, end)``, ``chunks()``,
``identity()``):

- :class:`ParquetPairs` over a Parquet file, a directory of Parquet files, or a hive-partitioned dataset
  (``key=value`` directories; the partition keys are columns like any other). Files are taken in sorted path
  order and row ``r`` of the input is row ``r`` of their concatenation. Nothing is read whole: a validation
  pass streams record batches, and each output part reads only the row groups it overlaps.
- :class:`TablePairs` over an in-memory Arrow table (the Python API; pandas / polars frames are converted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from segfast.scoring.common import (ID_COLUMNS, OUTPUT_COLUMNS, READ_ROWS, TIME_COLUMN, ScoreInputError,
                                    sha256_file)

__all__ = ["ParquetPairs", "TablePairs", "PairsFile", "open_pairs", "as_arrow_table", "parse_keep_columns"]

EXPECTED = "int64 columns user_id and video_id (and optionally time_ms)"


def parse_keep_columns(keep) -> list:
    """None, "a,b" or a sequence of names -> a list of distinct names (validated against the output's own)."""
    if keep is None:
        return []
    names = [x.strip() for x in keep.split(",")] if isinstance(keep, str) else [str(x) for x in keep]
    names = [x for x in names if x]
    out = []
    for n in names:
        if n in OUTPUT_COLUMNS:
            raise ValueError(f"keep column {n!r} is already an output column ({', '.join(OUTPUT_COLUMNS)}); "
                             "list only extra input columns")
        if n not in out:
            out.append(n)
    return out


def _convert(arr, where: str, col: str, row0: int) -> np.ndarray:
    """A validated int64 numpy copy of an integer Arrow array (nulls and uint64 overflow are errors)."""
    import pyarrow as pa

    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ScoreInputError(f"{where}: column {col!r} is null at row {row0 + i}; expected an int64 value")
    a = arr.to_numpy(zero_copy_only=False)
    if pa.types.is_uint64(arr.type):
        bad = np.flatnonzero(a > np.iinfo(np.int64).max)
        if bad.size:
            i = int(bad[0])
            raise ScoreInputError(f"{where}: column {col!r} at row {row0 + i} holds {int(a[i])}, which does not "
                                  "fit int64")
    return a.astype(np.int64, copy=False)


def _check_type(where: str, col: str, t, first) -> None:
    import pyarrow as pa

    if not pa.types.is_integer(t):
        raise ScoreInputError(f"{where}: column {col!r} has type {t}, expected an integer type (int64); "
                              f"first row: {first()!r}")


def _concat(chunks: list, typ):
    import pyarrow as pa

    if not chunks:
        return pa.array([], type=typ)
    return pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]


class _File:
    """One Parquet file of the input: its footer, row groups, partition values and first input row."""

    def __init__(self, path: Path, partition: dict, start: int):
        import pyarrow.parquet as pq

        self.path = path
        self.partition = partition  # column -> (value, arrow type)
        try:  # the footer only; the file is opened again for each read (no handle kept per file)
            md = pq.read_metadata(path)
            self.schema = md.schema.to_arrow_schema()
        except Exception as e:  # ArrowInvalid, OSError, ... for a bad magic number or a corrupt footer
            raise ScoreInputError(f"{path}: not a readable Parquet file (corrupt or truncated footer?): {e}") \
                from None
        self.rows = int(md.num_rows)
        rg = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
        self.rg_start = np.concatenate(([0], np.cumsum(rg))).astype(np.int64)
        self.start = start
        self.names = list(self.schema.names) + [c for c in partition if c not in self.schema.names]

    def type_of(self, col):
        return self.partition[col][1] if col in self.partition else self.schema.field(col).type

    def first_value(self, col):
        if col in self.partition:
            return self.partition[col][0]
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.path) as pf:
                for b in pf.iter_batches(batch_size=1, columns=[col]):
                    return b.column(0)[0].as_py() if b.num_rows else None
        except Exception:  # noqa: BLE001 - only for the message
            return None
        return None

    def batches(self, columns: Sequence[str], read_rows: int, row_groups=None):
        """(first row in this file, {column: arrow array}) record batches."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        file_cols = [c for c in columns if c not in self.partition]
        pos = 0 if row_groups is None else int(self.rg_start[row_groups[0]]) if row_groups else 0
        pf = None
        try:
            pf = pq.ParquetFile(self.path)
            it = pf.iter_batches(batch_size=read_rows, row_groups=row_groups, columns=file_cols, use_threads=False)
            for b in it:
                cols = {c: b.column(i) for i, c in enumerate(file_cols)}
                for c in columns:
                    if c in self.partition:
                        v, t = self.partition[c]
                        cols[c] = pa.array([v] * b.num_rows, type=t)
                yield pos, cols
                pos += b.num_rows
        except ScoreInputError:
            raise
        except Exception as e:  # corrupt pages, decompression errors
            raise ScoreInputError(f"{self.path}: cannot read the data near row {pos}: {e}") from None
        finally:
            if pf is not None:
                pf.close()


class _PairsBase:
    """The shared reading logic over a list of row ranges ("files"; one for an in-memory table)."""

    path: Path
    files: list
    rows: int
    has_time: bool
    columns: list  # the id columns read (user_id, video_id[, time_ms])
    keep: list  # the carried-through columns
    keep_types: dict
    read_rows: int

    def _validate(self, keep) -> None:
        f0 = self.files[0]
        self.has_time = TIME_COLUMN in f0.names
        self.columns = list(ID_COLUMNS) + ([TIME_COLUMN] if self.has_time else [])
        self.keep = parse_keep_columns(keep)
        self.keep_types = {}
        for f in self.files:
            missing = [c for c in ID_COLUMNS if c not in f.names]
            if missing:
                raise ScoreInputError(f"{f.path}: missing column(s) {missing}; the input has {f.names}, expected "
                                      f"{EXPECTED}")
            if (TIME_COLUMN in f.names) != self.has_time:
                raise ScoreInputError(f"{f.path}: {'has' if not self.has_time else 'lacks'} column 'time_ms' but "
                                      f"{f0.path} {'does not' if not self.has_time else 'does'}; every file of the "
                                      "input must have the same id columns")
            for c in self.columns:
                _check_type(str(f.path), c, f.type_of(c), lambda: f.first_value(c))
            for c in self.keep:
                if c not in f.names:
                    raise ScoreInputError(f"{f.path}: keep column {c!r} is not in the input; it has {f.names}")
                self.keep_types.setdefault(c, f.type_of(c))

    def _keep_array(self, f, c, arr, row0):
        t = self.keep_types[c]
        if arr.type == t:
            return arr
        try:
            return arr.cast(t)
        except Exception as e:  # noqa: BLE001 - incompatible types across files
            raise ScoreInputError(f"{f.path}: keep column {c!r} has type {arr.type} near row {row0}, the first "
                                  f"file has {t}; cannot cast: {e}") from None

    def _locate(self, row: int) -> int:
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    def read(self, start: int, end: int) -> dict:
        """Input rows [start, end): the id columns as int64 numpy arrays (validated); keep columns as Arrow
        arrays under ``"keep"``."""
        out = {c: [] for c in self.columns}
        kept = {c: [] for c in self.keep}
        if end > start:
            for fi in range(self._locate(start), len(self.files)):
                f = self.files[fi]
                if f.start >= end:
                    break
                lo_f, hi_f = max(start - f.start, 0), min(end - f.start, f.rows)
                if hi_f <= lo_f:
                    continue
                g0 = int(np.searchsorted(f.rg_start, lo_f, side="right") - 1)
                g1 = int(np.searchsorted(f.rg_start, hi_f, side="left"))
                for b0, cols in f.batches(self.columns + self.keep, self.read_rows, list(range(g0, g1))):
                    b1 = b0 + len(cols[self.columns[0]])
                    if b1 <= lo_f:
                        continue
                    if b0 >= hi_f:
                        break
                    lo, hi = max(lo_f - b0, 0), min(hi_f, b1) - b0
                    for c in self.columns:
                        out[c].append(_convert(cols[c].slice(lo, hi - lo), str(f.path), c, b0 + lo))
                    for c in self.keep:
                        kept[c].append(self._keep_array(f, c, cols[c].slice(lo, hi - lo), b0 + lo))
        res = {c: (np.concatenate(v) if v else np.zeros(0, np.int64)) for c, v in out.items()}
        if res["user_id"].shape[0] != max(end - start, 0):
            raise ScoreInputError(f"{self.path}: read {res['user_id'].shape[0]} rows for [{start}, {end}), the "
                                  f"footers say {self.rows} rows in all (corrupt file?)")
        res["keep"] = {c: _concat(v, self.keep_types[c]) for c, v in kept.items()}
        return res

    def chunks(self) -> Iterable:
        """(first input row, id columns) over the whole input, in record batches (the validation pass)."""
        for f in self.files:
            n = 0
            for b0, cols in f.batches(self.columns, self.read_rows):
                yield f.start + b0, {c: _convert(cols[c], str(f.path), c, b0) for c in self.columns}
                n = b0 + len(cols[self.columns[0]])
            if n != f.rows:
                raise ScoreInputError(f"{f.path}: read {n} rows, the footer says {f.rows} (corrupt file?)")

    def _finish(self) -> None:
        self._starts = np.array([f.start for f in self.files], dtype=np.int64)
        self.rows = int(sum(f.rows for f in self.files))


class ParquetPairs(_PairsBase):
    """A validated, streamed Parquet input: one file, a directory of files, or a hive-partitioned dataset."""

    def __init__(self, path, keep_columns=None, read_rows: int = READ_ROWS):
        self.path = Path(path)
        self.read_rows = int(read_rows)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or directory (expected a Parquet file, a directory "
                                    f"of Parquet files or a hive-partitioned dataset with {EXPECTED})")
        self.kind = "file" if self.path.is_file() else "dataset"
        self.partitioning: list = []
        if self.path.is_file():
            listed = [(self.path, {})]
        elif self.path.is_dir():
            listed = self._discover()
        else:
            raise ScoreInputError(f"{self.path}: not a file or directory (expected Parquet pairs with {EXPECTED})")
        self.files, start = [], 0
        for p, part in listed:
            f = _File(p, part, start)
            self.files.append(f)
            start += f.rows
        self._finish()
        self._validate(keep_columns)

    def _discover(self) -> list:
        import pyarrow.dataset as ds

        try:
            d = ds.dataset(str(self.path), format="parquet", partitioning="hive")
        except Exception as e:  # noqa: BLE001 - an unreadable first file, a bad partition directory, ...
            raise ScoreInputError(f"{self.path}: cannot open as a Parquet dataset: {e}") from None
        frags = [(Path(f.path), ds.get_partition_keys(f.partition_expression) or {}) for f in d.get_fragments()]
        names = []
        for _, keys in frags:
            names += [k for k in keys if k not in names]
        self.partitioning = [c for c in d.schema.names if c in names]  # key=value directory names, in order
        listed = [(p, {c: (keys.get(c), d.schema.field(c).type) for c in self.partitioning}) for p, keys in frags]
        listed.sort(key=lambda x: str(x[0]))
        if not listed:
            raise ScoreInputError(f"{self.path}: no Parquet files in this directory (names starting with '.' or "
                                  f"'_' are ignored); expected Parquet files with {EXPECTED}")
        return listed

    def identity(self) -> dict:
        if self.kind == "file":  # the same as format version 1, so that old outputs still resume
            return {"sha256": sha256_file(self.path), "rows": self.rows, "has_time": self.has_time}
        import hashlib

        h = hashlib.sha256()
        for f in self.files:
            h.update(str(f.path.relative_to(self.path)).encode() + b"\0" + sha256_file(f.path).encode())
        return {"sha256": h.hexdigest(), "files": len(self.files), "partitioning": self.partitioning,
                "rows": self.rows, "has_time": self.has_time}

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": "hive" if self.partitioning else self.kind,
                "files": len(self.files), "partitioning": self.partitioning}


PairsFile = ParquetPairs  # the name of the single-file reader before the directory / dataset input


class _TableChunk:
    """An in-memory table as the single "file" of :class:`TablePairs`."""

    def __init__(self, table, label: str):
        self.table = table
        self.path = label
        self.partition = {}
        self.rows = table.num_rows
        self.start = 0
        self.names = list(table.schema.names)
        self.rg_start = np.array([0, self.rows], dtype=np.int64)

    def type_of(self, col):
        return self.table.schema.field(col).type

    def first_value(self, col):
        return self.table.column(col)[0].as_py() if self.rows else None

    def batches(self, columns, read_rows: int, row_groups=None):
        for b0 in range(0, self.rows, read_rows):
            t = self.table.slice(b0, read_rows)
            yield b0, {c: t.column(c).combine_chunks() for c in columns}


class TablePairs(_PairsBase):
    """An in-memory Arrow table of pairs (validated like a file; ``path`` is a label for messages)."""

    def __init__(self, table, keep_columns=None, read_rows: int = READ_ROWS, label: str = "<table>"):
        self.path = label
        self.read_rows = int(read_rows)
        self.files = [_TableChunk(table, label)]
        self._finish()
        self._validate(keep_columns)


def as_arrow_table(data):
    """A pyarrow Table from a Table / RecordBatch, a pandas or polars DataFrame, or a dict of columns."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    mod = type(data).__module__.split(".")[0]
    if mod == "polars" and hasattr(data, "to_arrow"):
        return data.to_arrow()
    if mod == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, dict):
        return pa.table(data)
    raise TypeError(f"expected a pyarrow Table or RecordBatch, a pandas or polars DataFrame, or a dict of columns; "
                    f"got {type(data).__module__}.{type(data).__name__}")


def open_pairs(pairs, keep_columns=None, read_rows: int = READ_ROWS) -> _PairsBase:
    """A path (file / directory / hive dataset) -> ParquetPairs; a table or DataFrame -> TablePairs."""
    if isinstance(pairs, _PairsBase):
        return pairs
    if isinstance(pairs, (str, Path)) or hasattr(pairs, "__fspath__"):
        return ParquetPairs(pairs, keep_columns=keep_columns, read_rows=read_rows)
    return TablePairs(as_arrow_table(pairs), keep_columns=keep_columns, read_rows=read_rows)

