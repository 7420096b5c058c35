"""Benchmark rows that survive a kill: every row goes to the CSV (append, flush, fsync) the moment it is measured.

Every row carries the card, the torch / triton / CUDA versions, the commit and a UTC time stamp, so a CSV
copied out of a GPU session says by itself what produced it. The header is written once, with the first row,
when the file is new (or empty); a script killed part-way (timeout, SIGKILL) leaves every row measured so far
and a parseable file. Used by every ``bench/bench_*.py`` that ``bench/gpu_check.sh`` runs:

    log = CsvLog(args.csv, ["impl", "mode", "ms"], device="cuda", commit=args.commit)
    log.row(impl="triton", mode="fwd", ms=0.12)        # printed and on disk before the next one is measured
    log.row(impl="compile", mode="fwd", status="error: RuntimeError: ...")
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

META = ("commit", "card", "torch", "triton", "cuda", "python", "time_utc")
STATUS = "status"  # "ok", "skipped: why" or "error: Type: message"


def git_commit(default: str = "unknown") -> str:
    """Short hash of HEAD of the repository holding this file ('+dirty' when tracked files changed)."""
    root = Path(__file__).resolve().parents[1]
    try:
        h = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
        if not h:
            return default
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=20).returncode
        return h + ("+dirty" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return default


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: str = "cuda", commit: Optional[str] = None) -> dict:
    """The META columns for this process. Imports torch, not triton (whose import fixes the interpreter choice:
    a caller may still set TRITON_INTERPRET after this)."""
    from importlib import metadata

    import torch

    try:
        tv = metadata.version("triton")
    except metadata.PackageNotFoundError:
        tv = "none"
    if device == "cuda" and torch.cuda.is_available():
        card = torch.cuda.get_device_name(0)
    else:
        interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")
        card = f"cpu: {_cpu_name()} ({torch.get_num_threads()} threads{', triton interpreter' if interp else ''})"
    return {"commit": commit if commit and commit != "unknown" else git_commit(),
            "card": card, "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda or "none",
            "python": platform.python_version()}


def error_status(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first[:160]}"


class CsvLog:
    """Append-only CSV of benchmark rows with a fixed column list (META + ``columns`` + status).

    ``path`` None: rows are only printed. An existing non-empty file must have the same header (else a
    ValueError naming both), so appending a second run to a file never shifts columns.
    """

    def __init__(self, path: Optional[str], columns: Iterable[str], device: str = "cuda",
                 commit: Optional[str] = None, echo: bool = True, print_cols: Optional[Iterable[str]] = None):
        cols = [c for c in columns if c not in META and c != STATUS]
        if len(set(cols)) != len(cols):
            raise ValueError(f"CsvLog: duplicate column names in {cols}")
        self.columns = list(META) + cols + [STATUS]
        self.meta = environment(device, commit)
        self.path = Path(path) if path else None
        self.echo = echo
        self.print_cols = list(print_cols) if print_cols is not None else cols + [STATUS]
        self.rows: list = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, newline="") as fh:
                    have = next(csv.reader(fh), [])
                if have != self.columns:
                    raise ValueError(f"CsvLog: {self.path} already has columns {have}; this benchmark writes "
                                     f"{self.columns} (use a new --csv path)")
        if echo:
            print(f"# {self.meta['card']} | torch {self.meta['torch']} | triton {self.meta['triton']} | "
                  f"cuda {self.meta['cuda']} | commit {self.meta['commit']}"
                  + (f" | rows -> {self.path}" if self.path else ""), flush=True)

    def header(self) -> None:
        """Write the header now if the file is new (lets several processes append rows to one CSV)."""
        if self.path is not None and (not self.path.exists() or self.path.stat().st_size == 0):
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(self.columns)
            self._append(buf.getvalue())

    def _append(self, text: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def row(self, **fields) -> dict:
        """Record one measured row: complete it with META (and status "ok"), append + fsync, print it."""
        extra = set(fields) - set(self.columns)
        if extra:
            raise ValueError(f"CsvLog: unknown columns {sorted(extra)}; expected some of {self.columns}")
        r = {c: "" for c in self.columns}
        r.update(self.meta)
        r["time_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        r[STATUS] = "ok"
        r.update({k: ("" if v is None else v) for k, v in fields.items()})
        if self.path is not None:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
            if not self.path.exists() or self.path.stat().st_size == 0:
                w.writeheader()
            w.writerow(r)
            # one O_APPEND write() per row (header included): a kill between rows never leaves half a header,
            # and rows of several processes appending to one file do not interleave
            self._append(buf.getvalue())
        self.rows.append(r)
        if self.echo:
            print("  ".join(f"{c}={r[c]}" for c in self.print_cols if r[c] != ""), flush=True)
        return r


def sig(x: float, n: int = 4):
    """x rounded to n significant digits (NaN / None kept as empty)."""
    if x is None or x != x:
        return ""
    return float(f"{x:.{n}g}")


if __name__ == "__main__":  # tiny manual check: python bench/_csvlog.py /tmp/x.csv
    log = CsvLog(sys.argv[1] if len(sys.argv) > 1 else None, ["impl", "ms"], device="cpu")
    log.row(impl="demo", ms=1.0)
