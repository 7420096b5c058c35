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
