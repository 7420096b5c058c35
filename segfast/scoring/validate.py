"""The validation pass: every input row is read once (types, nulls) before anything is scored, and the pairs
whose user or video the prepared dataset does not know are refused (on_unknown="error") or listed in
``_rejected/part-00000.parquet`` (on_unknown="skip")."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from segfast import _io
from segfast.scoring.common import MAX_LISTED_IDS, UnknownIdsError
from segfast.scoring.index import IdIndex

__all__ = ["scan"]


def scan(pairs, index: IdIndex, on_unknown: str, data_dir, write_rejected: Optional[Path]):
    """Validate every row (types, nulls) and find the pairs with unknown ids; with on_unknown="skip" and
    ``write_rejected``, stream them there (``_rejected/part-00000.parquet``). Returns (rejected count, summary).
    ``pairs``: any :mod:`segfast.scoring.pairs` source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_bad = 0
    first_row = None
    listed = {"user_id": [], "video_id": [], "video_id_no_features": []}
    seen = {k: set() for k in listed}
    writer = tmp = None
    schema = pa.schema([("row", pa.int64()), ("user_id", pa.int64()), ("video_id", pa.int64())]
                       + ([("time_ms", pa.int64())] if pairs.has_time else []) + [("reason", pa.string())])
    try:
        if write_rejected is not None:
            write_rejected.parent.mkdir(parents=True, exist_ok=True)
            tmp = _io.create_temp(write_rejected)  # O_EXCL | O_NOFOLLOW, unpredictable name (segfast._io)
            writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        for r0, cols in pairs.chunks():
            _, _, ku, kv, hf = index.known(cols["user_id"], cols["video_id"])
            bad = ~(ku & kv & hf)
            if not bad.any():
                continue
            nb = int(bad.sum())
            if first_row is None:
                first_row = r0 + int(np.flatnonzero(bad)[0])
            n_bad += nb
            for key, m in (("user_id", ~ku), ("video_id", ~kv), ("video_id_no_features", kv & ~hf)):
                col = cols["video_id" if key.startswith("video") else "user_id"]
                if m.any() and len(seen[key]) <= MAX_LISTED_IDS:
                    for x in np.unique(col[m])[:MAX_LISTED_IDS + 1].tolist():
                        if len(seen[key]) > MAX_LISTED_IDS:
                            break
                        if x not in seen[key]:
                            seen[key].add(x)
                            listed[key].append(x)
            if writer is not None:
                reason = np.where(~ku & ~kv, "unknown_user_and_video",
                                  np.where(~ku, "unknown_user", np.where(~kv, "unknown_video",
                                                                         "video_without_features")))[bad]
                arrays = [pa.array(r0 + np.flatnonzero(bad)), pa.array(cols["user_id"][bad]),
                          pa.array(cols["video_id"][bad])]
                if pairs.has_time:
                    arrays.append(pa.array(cols["time_ms"][bad]))
                arrays.append(pa.array(reason.astype(str)))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if writer is not None:
            writer.close()
            writer = None
            _io.commit_temp(tmp, write_rejected)
    except BaseException:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    summary = {"pairs": n_bad, "first_row": first_row}
    for k, v in listed.items():
        if v:
            summary[k] = v[:MAX_LISTED_IDS] + (["..."] if len(v) > MAX_LISTED_IDS else [])
    if n_bad and on_unknown == "error":
        parts = []
        if listed["user_id"]:
            parts.append(f"user_id {summary['user_id']}")
        if listed["video_id"]:
            parts.append(f"video_id {summary['video_id']}")
        if listed["video_id_no_features"]:
            parts.append(f"video_id without segment features {summary['video_id_no_features']}")
        raise UnknownIdsError(
            f"{pairs.path}: {n_bad} pair(s) (first at row {first_row}) have ids the prepared dataset {data_dir} "
            f"does not know: {'; '.join(parts)}. The model has no ID embedding for an unseen user or video and no "
            "segment features for an unseen video, so it cannot score them. Pass on_unknown='skip' "
            "(--on-unknown skip) to leave them out and list them in _rejected/.")
    return n_bad, summary
