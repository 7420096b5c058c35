"""The scoring job over a Parquet input into an output directory: what ``segfast score`` and
``Scorer.score_dataset`` run (validation pass, output directory, this rank's parts, the manifest merge)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from segfast._guard import check_out_vs_inputs
from segfast.scoring.common import (DEFAULT_PART_ROWS, FORMAT, MANIFEST, ON_UNKNOWN, OUTPUT_COLUMNS,
                                    PROBABILITY_COLUMNS, REJECTED_DIR, REJECTED_FILE, VERSION, OutDirError,
                                    atomic_json, atomic_parquet, now, part_name, read_json, sha256_file)
from segfast.scoring.gpu import GpuMonitor
from segfast.scoring.job import Job
from segfast.scoring.outdir import data_fingerprint, rank_file, run_fingerprint, setup_out_dir
from segfast.scoring.pairs import open_pairs
from segfast.scoring.validate import scan

__all__ = ["run_dataset", "check_positive", "calibration_identity"]


def calibration_identity(cal) -> dict:
    """The score identity's record of a calibrator: its checkpoint digest, form, feature and the sha256 of its
    parameters (a refit calibrator is another job: its output is not resumed into)."""
    import hashlib
    import json

    d = cal.to_dict()
    params = json.dumps({k: d[k] for k in ("form", "feature", "groups", "params")}, sort_keys=True)
    return {"checkpoint": (cal.checkpoint or {}).get("digest"), "form": cal.form, "feature": cal.feature,
            "sha256": hashlib.sha256(params.encode()).hexdigest()}


def check_positive(**vals) -> None:
    for name, val in vals.items():
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}={val!r}: expected a positive integer")


def _merge(out: Path, man0: dict, my_records: list, timing: dict, gpu, scorer, identity: dict, n_parts: int,
           world_size: int, t_begin: float) -> dict:
    """(rank 0, after the final barrier) Merge every rank's records and timing into the manifest."""
    parts = {r["part"]: r for r in man0["parts"]}
    parts.update({r["part"]: r for r in my_records})
    ranks = [dict(timing, gpu=gpu)]
    for r in range(1, world_size):
        f = out / rank_file(r)
        js = read_json(f)
        if not isinstance(js, dict) or js.get("identity") != identity:
            raise OutDirError(f"{f}: missing or unreadable after the final barrier")
        parts.update({rec["part"]: rec for rec in js["parts"]})
        ranks.append(dict(js.get("timing") or {}, gpu=js.get("gpu")))
    scored = sum(x.get("pairs_scored", 0) for x in ranks)
    wall = max((x.get("wall_s", 0.0) for x in ranks), default=0.0)
    final = dict(man0, parts=[parts[p] for p in sorted(parts)])
    final.update({
        "complete": len(parts) == n_parts,
        "rows_scored": int(sum(r["rows"] for r in parts.values())),
        "rows_rejected": int(sum(r["rejected"] for r in parts.values())),
        "backend": scorer.backend, "device": scorer.device, "precision": scorer.precision,
        "batch_size": int(scorer.batch_size),
        "effective_batch_size": scorer.effective_batch_size, "fast_path": scorer.fast,
        "feature_store": None if scorer.features is None else scorer.features.describe(),
        "world_size": int(world_size),
        "timing": {"this_run_pairs": scored, "wall_s": round(time.perf_counter() - t_begin, 3),
                   "scoring_wall_s": wall,
                   "pairs_per_s": round(scored / wall, 1) if wall > 0 else None,
                   "data_s": round(sum(x.get("data_s", 0.0) for x in ranks), 3),
                   "compute_s": round(sum(x.get("compute_s", 0.0) for x in ranks), 3),
                   "wait_s": round(sum(x.get("wait_s", 0.0) for x in ranks), 3),
                   "write_s": round(sum(x.get("write_s", 0.0) for x in ranks), 3),
                   "ranks": ranks},
        "gpu": gpu if world_size == 1 else [x.get("gpu") for x in ranks],
        "updated": now(),
    })
    atomic_json(out / MANIFEST, final)
    for r in range(1, world_size):
        (out / rank_file(r)).unlink(missing_ok=True)
    return final


def run_dataset(scorer, pairs, out_dir, *, part_rows: int = DEFAULT_PART_ROWS, overwrite: bool = False,
                progress: bool = True, rank: int = 0, world_size: int = 1, on_unknown: str = "error",
                prefetch: bool = True, on_part: Optional[Callable[[dict], None]] = None, keep_columns=None,
                t_begin: Optional[float] = None) -> dict:
    """Score ``pairs`` (a Parquet file, a directory of Parquet files or a hive dataset) into ``out_dir`` with
    ``scorer`` (a :class:`segfast.scoring.api.Scorer`); return the manifest. See ``segfast.scoring.score``."""
    import torch

    from segfast import distributed as dist_

    t_begin = time.perf_counter() if t_begin is None else t_begin
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"on_unknown={on_unknown!r}: expected one of {ON_UNKNOWN}")
    check_positive(part_rows=part_rows, world_size=world_size)
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: expected 0 <= rank < world_size={world_size}")
    if not isinstance(pairs, (str, Path)) and not hasattr(pairs, "__fspath__"):
        raise TypeError(f"pairs={type(pairs).__name__}: score_dataset takes a path (Parquet file, directory or "
                        "hive dataset); use Scorer.score for an in-memory table")
    out = Path(out_dir)
    device = scorer.device
    started_pg = False
    if world_size > 1 and not dist_.is_initialized():
        info = dist_.DistInfo(int(rank), int(world_size), dist_.env_info().local_rank,
                              dist_.env_info().local_world_size)
        started_pg = dist_.init(device, info=info)
    try:
        # ---- inputs (every rank: cheap, and every rank must fail the same way)
        src = open_pairs(pairs, keep_columns=keep_columns)
        identity = {
            "run": {"fingerprint": run_fingerprint(scorer.meta), "which": scorer.which},
            "data": data_fingerprint(scorer.prepared),
            "input": src.identity(),
            "part_rows": int(part_rows), "on_unknown": on_unknown,
            # scores are bit-identical only at one batch size: a resume with another one would mix them
            "batch_size": int(scorer.effective_batch_size),
        }
        if scorer.precision != "fp32":  # (fp32: absent, so that an output from before --precision resumes)
            identity["precision"] = scorer.precision
        if src.keep:  # only when asked, so that a version-1 output of the same job still resumes
            identity["keep_columns"] = list(src.keep)
        if scorer.calibrator is not None:  # --probabilities: which calibrator (absent otherwise: old outputs resume)
            identity["probabilities"] = calibration_identity(scorer.calibrator)
        rej_path = out / REJECTED_DIR / REJECTED_FILE
        n_parts = -(-src.rows // part_rows)

        # ---- validation pass, output directory (rank 0), then every rank agrees it went well
        try:
            if rank == 0:
                check_out_vs_inputs(out, {"--data": scorer.data_dir, "--pairs": src.path, "--run-dir": scorer.run_dir},
                                    "score")  # never over its own inputs (segfast._guard)
                done, migrated = setup_out_dir(out, identity, overwrite)  # refuse a foreign out_dir first
                n_rej, rej_summary = scan(src, scorer.index, on_unknown, scorer.data_dir,
                                          rej_path if on_unknown == "skip" else None)
                base = {
                    "format": FORMAT, "version": VERSION, "identity": identity,
                    "run_dir": str(Path(scorer.run_dir).resolve()), "weights": scorer.meta["weights"],
                    "data_dir": str(Path(scorer.data_dir).resolve()), "input": str(src.path.resolve()),
                    "input_kind": src.describe(), "input_sha256": identity["input"]["sha256"], "rows": src.rows,
                    "part_rows": int(part_rows), "n_parts": n_parts,
                    "columns": [c for c in OUTPUT_COLUMNS if c != "time_ms" or src.has_time]
                    + (list(PROBABILITY_COLUMNS) if scorer.calibrator is not None else []) + list(src.keep),
                    "keep_columns": list(src.keep), "on_unknown": on_unknown,
                    "rejected": {"file": f"{REJECTED_DIR}/{REJECTED_FILE}" if on_unknown == "skip" else None,
                                 "rows": n_rej, "summary": rej_summary},
                    "created": now(),
                }
                if migrated:
                    base["migrated_from_version"] = migrated
                man = dict(base, parts=[done[p] for p in sorted(done)], complete=len(done) == n_parts)
                atomic_json(out / MANIFEST, man)
            else:
                scan(src, scorer.index, on_unknown, scorer.data_dir, None)
        except BaseException:
            dist_.all_ok(False)
            raise
        if not dist_.all_ok(True):
            raise RuntimeError(f"rank {rank}: another rank failed to set up {out} (see its error)")

        man0 = read_json(out / MANIFEST)
        if not isinstance(man0, dict) or man0.get("identity") != identity:
            raise OutDirError(f"{out / MANIFEST}: missing or from another job after setup (is another scoring "
                              "job writing into the same directory?)")
        done = {rec["part"] for rec in man0["parts"]}
        mine = [p for p in range(n_parts) if p % world_size == rank and p not in done]

        # ---- score this rank's pending parts
        my_records = []
        own_file = out / (MANIFEST if rank == 0 else rank_file(rank))

        def sink(ctx, table):
            name = part_name(ctx["part"])
            atomic_parquet(out / name, table)
            rec = {"part": ctx["part"], "file": name, "input_rows": [ctx["start"], ctx["end"]],
                   "rows": int(ctx["row"].shape[0]), "rejected": int(ctx["rejected"]),
                   "sha256": sha256_file(out / name), "rank": rank, "batch_size": scorer.effective_batch_size,
                   "backend": scorer.backend, "device": device, "finished": now()}
            my_records.append(rec)
            if rank == 0:
                cur = dict(man0, parts=sorted(man0["parts"] + my_records, key=lambda r: r["part"]))
                cur["complete"] = len(cur["parts"]) == n_parts
                atomic_json(own_file, cur)
            else:
                atomic_json(own_file, {"format": FORMAT, "identity": identity, "rank": rank, "parts": my_records})
            if on_part is not None:
                on_part(rec)

        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        monitor = GpuMonitor(device) if cuda else None
        job = Job(scorer.model, scorer.index, src, scorer.assembler(), scorer.fast, device,
                  scorer.effective_batch_size, int(part_rows), progress, rank, precision=scorer.precision,
                  calibrator=scorer.calibrator)
        try:
            timing = job.run(mine, sink, prefetch=prefetch)
            timing["setup_s"] = round(time.perf_counter() - t_begin - timing["wall_s"], 3)
            gpu = monitor.stop() if monitor is not None else None
            if rank != 0:
                atomic_json(own_file, {"format": FORMAT, "identity": identity, "rank": rank, "parts": my_records,
                                       "timing": timing, "gpu": gpu, "done": True})
        except BaseException:
            if monitor is not None:
                monitor.stop()
            dist_.all_ok(False)
            raise
        if not dist_.all_ok(True):
            raise RuntimeError(f"rank {rank}: another rank failed while scoring (see its error); rerun to resume")

        if rank == 0:
            _merge(out, man0, my_records, timing, gpu, scorer, identity, n_parts, world_size, t_begin)
        dist_.barrier()
        return read_json(out / MANIFEST)
    finally:
        if started_pg:
            dist_.destroy()
