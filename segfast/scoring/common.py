"""Constants, errors and small file helpers shared by the scoring modules."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from segfast import _io
from segfast._fingerprint import sha256_file  # noqa: F401  (one file digest for segfast; the scoring modules import it from here)

FORMAT = "segfast-scores"
VERSION = 2  # 2: _manifest.json and _rejected/ (names dataset discovery ignores); 1 had manifest.json, rejected.parquet
MAX_SLOTS = 40
DEFAULT_PART_ROWS = 262_144
DEFAULT_BATCH_BYTES = 1 << 30  # estimated activation memory per batch (host), caps the batch size
READ_ROWS = 65_536
MAX_LISTED_IDS = 20
ON_UNKNOWN = ("error", "skip")
ID_COLUMNS = ("user_id", "video_id")
TIME_COLUMN = "time_ms"
OUTPUT_COLUMNS = ("row", "user_id", "video_id", "time_ms", "n_segments", "scores", "leave_slot", "thumbnail_slot",
                  "expected_watch_segments")
# with probabilities=True (``segfast score --probabilities``; the run's calibrator, segfast.calibration)
PROBABILITY_COLUMNS = ("keep_probability", "survival", "calibrated_watch_segments", "most_likely_leave")
MANIFEST = "_manifest.json"
REJECTED_DIR = "_rejected"
REJECTED_FILE = "part-00000.parquet"  # inside _rejected/


class ScoreInputError(ValueError):
    """Bad scoring input; the message names the file, the row or column, and what was expected."""


class UnknownIdsError(ScoreInputError):
    """Pairs whose user or video the prepared dataset (and so the model) does not know."""


class OutDirError(FileExistsError):
    """An output directory that holds something else than this scoring job's output."""


def atomic_json(path: Path, obj) -> None:
    _io.write_json(path, obj, indent=1)  # temp name, umask-implied mode, rename (segfast._io)


def atomic_parquet(path: Path, table) -> None:
    _io.write_parquet(path, table, compression="zstd")


def read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"
