"""Ray Data engine: score pairs over a Ray cluster, one :class:`~segfast.scoring.api.Scorer` per actor.

    import ray, segfast.scoring.ray_engine as re_
    ds = ray.data.read_parquet("s3://bucket/pairs/")            # any Ray dataset with user_id, video_id[, time_ms]
    scored = ds.map_batches(re_.ScoreBatches, fn_constructor_kwargs={"run_dir": "runs/both",
                            "data_dir": "data/segmm-prepared"}, batch_size=16384, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1)

    segfast score --engine ray --actors 4 --run-dir ... --data ... --pairs pairs/ --out scores/   # the job

Needs the optional extra ``segfast[ray]`` (``ray[data]``); this module imports ray only when used. The run
directory, the prepared dataset, the input and the output must be on storage every node sees at the same path.
docs/scoring.md ("Ray Data") describes the output and how it differs from the local engine.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from segfast.scoring.common import (FORMAT, MANIFEST, ON_UNKNOWN, OUTPUT_COLUMNS, PROBABILITY_COLUMNS,
                                    REJECTED_DIR, REJECTED_FILE, VERSION, OutDirError, atomic_json, now, part_name,
                                    read_json, sha256_file)

__all__ = ["ScoreBatches", "score_ray", "score_from_args", "require_ray", "RayMissingError", "settle_fsspec_http",
           "DEFAULT_BATCH_ROWS"]

DEFAULT_BATCH_ROWS = 65_536  # rows per read block and map_batches call (one Scorer.score call, ~one output part)
_IO_CPUS = 0.25  # CPU reserved by each read / write task (the actors hold the rest)
_STAGE = ".{name}.ray-tmp-"  # beside OUT: Ray's own write, renamed into OUT part by part


class RayMissingError(ImportError, ValueError):
    """The optional extra is not installed (a ValueError too, so that the command line reports it plainly)."""


def require_ray():
    """Import ray, or fail with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayMissingError("the Ray engine needs the optional extra: pip install 'segfast[ray]' (ray[data]); "
                          f"import failed: {e}") from None
    return ray


class ScoreBatches:
    """A callable class for ``ray.data.Dataset.map_batches(..., batch_format="pyarrow")``: each actor loads the
    run once (``Scorer.from_run``) and scores every batch it is given into the columns of the local engine's
    parts (``docs/scoring.md``), in the batch's row order, plus ``keep_columns``.

    ``device="auto"``: "cuda" when Ray gave this actor a GPU (``num_gpus`` of map_batches), else "cpu".
    ``row`` is null: Ray does not tell a batch where its rows are in the input (carry an id column with
    ``keep_columns`` to join back). ``on_unknown``: "error" raises ``UnknownIdsError`` (Ray then fails the
    job), "skip" drops those rows. ``threads``: torch CPU threads of the actor (default: the actor's num_cpus
    as Ray set OMP_NUM_THREADS, else torch's own). ``keep_types``: {column: arrow type} to cast kept columns to
    (the driver passes the local engine's types, so that e.g. hive partition keys match). Other keyword
    arguments go to ``Scorer.from_run`` (e.g. ``precision``)."""

    def __init__(self, run_dir, data_dir, *, device: str = "auto", backend: Optional[str] = None,
                 batch_size: Optional[int] = None, which: str = "best", on_unknown: str = "error",
                 keep_columns=None, keep_types: Optional[dict] = None, threads: Optional[int] = None,
                 **scorer_kwargs):
        import torch

        from segfast.scoring.api import Scorer, resolve_device

        if on_unknown not in ON_UNKNOWN:
            raise ValueError(f"on_unknown={on_unknown!r}: expected one of {ON_UNKNOWN}")
        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if _actor_has_gpu() else "cpu"
        self.scorer = Scorer.from_run(run_dir, data_dir, device=resolve_device(device), backend=backend,
                                      batch_size=batch_size, which=which, **scorer_kwargs)
        self.on_unknown, self.keep_columns = on_unknown, keep_columns
        self.keep_types = dict(keep_types or {})

    def __call__(self, batch):
        import pyarrow as pa

        if isinstance(batch, pa.Table) and self.keep_types:
            for c, t in self.keep_types.items():
                if c in batch.column_names and batch.schema.field(c).type != t:
                    batch = batch.set_column(batch.schema.get_field_index(c), c, batch.column(c).cast(t))
        # rows of the batch (Arrow, pandas, polars: len(); a dict of columns: its first column's length)
        n = max(1, len(next(iter(batch.values()))) if isinstance(batch, dict) and batch else len(batch))
        out = self.scorer.score(batch, keep_columns=self.keep_columns, on_unknown=self.on_unknown,
                                part_rows=n, prefetch=False, progress=False)
        i = out.schema.get_field_index("row")
        return out.set_column(i, "row", pa.nulls(out.num_rows, pa.int64()))


def _actor_has_gpu() -> bool:
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return True
    except Exception:  # noqa: BLE001 - outside an actor / an old ray: ask torch
        pass
    import torch

    return torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""


def settle_fsspec_http() -> None:
    """Ray's threaded file listing imports ``fsspec.implementations.http`` from several threads at once and
    expects ModuleNotFoundError when aiohttp is missing; a thread that meets another's half-done import gets a
    plain ImportError instead, which escapes (seen with ray 2.60, one run in three). Fail that import once here,
    for good, when it cannot succeed anyway."""
    import sys

    name = "fsspec.implementations.http"
    if name in sys.modules:
        return
    try:
        __import__(name)
    except ModuleNotFoundError:  # aiohttp (or fsspec) absent: every later import fails at once, the same way
        sys.modules[name] = None
    except ImportError:
        pass


def _clean_stale_stages(out: Path) -> None:
    prefix = _STAGE.format(name=out.name)
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if p.name.startswith(prefix) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def score_ray(run_dir, data_dir, pairs, out_dir, *, actors: int = 2, gpus_per_actor: Optional[float] = None,
              cpus_per_actor: float = 1, batch_rows: int = DEFAULT_BATCH_ROWS, batch_size: Optional[int] = None,
              backend: Optional[str] = None, which: str = "best", on_unknown: str = "error", keep_columns=None,
              overwrite: bool = False, address: Optional[str] = None, progress: bool = False,
              scorer_kwargs: Optional[dict] = None, probabilities: bool = False) -> dict:
    """Score the Parquet input ``pairs`` (file, directory, hive dataset) into ``out_dir`` with Ray Data and return
    the manifest. The driver (this process) validates the input and the output directory exactly like the local
    engine (unknown ids: "error" refuses before any actor starts, "skip" writes ``_rejected/``), then
    ``ray.data.read_parquet`` -> ``map_batches(ScoreBatches, ActorPoolStrategy(actors))`` -> ``write_parquet``
    into a staging directory beside ``out_dir``, whose files are renamed to ``part-NNNNN.parquet``.

    ``address``: a running cluster ("auto", "ray://host:10001"); None starts a local instance when Ray is not
    initialised. ``gpus_per_actor``: None = 1 when the cluster has GPUs, else 0. A rerun of a finished job
    returns its manifest; an unfinished one (killed) is redone whole (Ray retries failed tasks within a run).
    ``scorer_kwargs``: more ``Scorer.from_run`` options for the actors (e.g. ``{"precision": "bf16"}``).
    ``probabilities``: the calibrated columns, as the local engine's (the driver refuses a run without a
    calibrator before any actor starts)."""
    from segfast.scoring.api import Scorer
    from segfast.scoring.outdir import data_fingerprint, run_fingerprint, setup_out_dir
    from segfast.scoring.pairs import open_pairs
    from segfast.scoring.runner import check_positive
    from segfast.scoring.validate import scan

    ray = require_ray()
    t_begin = time.perf_counter()
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"on_unknown={on_unknown!r}: expected one of {ON_UNKNOWN}")
    check_positive(actors=actors, batch_rows=batch_rows)
    if not cpus_per_actor or cpus_per_actor < 0 or (gpus_per_actor is not None and gpus_per_actor < 0):
        raise ValueError(f"cpus_per_actor={cpus_per_actor!r}, gpus_per_actor={gpus_per_actor!r}: expected "
                         "cpus > 0 and gpus >= 0")
    out = Path(out_dir)
    # the driver's scorer (CPU): fingerprints, the id index for validation; actors load their own
    driver = Scorer.from_run(run_dir, data_dir, device="cpu", backend=backend, batch_size=batch_size, which=which,
                             probabilities=probabilities)
    src = open_pairs(pairs, keep_columns=keep_columns)
    identity = {"run": {"fingerprint": run_fingerprint(driver.meta), "which": which},
                "data": data_fingerprint(driver.prepared), "input": src.identity(), "on_unknown": on_unknown,
                "engine": "ray", "batch_rows": int(batch_rows)}
    if src.keep:
        identity["keep_columns"] = list(src.keep)
    if probabilities:
        from segfast.scoring.runner import calibration_identity

        identity["probabilities"] = calibration_identity(driver.calibrator)
    from segfast._guard import check_out_vs_inputs

    check_out_vs_inputs(out, {"--data": data_dir, "--pairs": src.path, "--run-dir": run_dir}, "score")
    done, _ = setup_out_dir(out, identity, overwrite)  # refuses foreign / other-job directories
    prev = read_json(out / MANIFEST)
    if isinstance(prev, dict) and prev.get("complete") and len(done) == len(prev.get("parts", [])):
        return prev  # the same job, finished and intact
    for p in out.iterdir():  # an unfinished run of this same job (setup_out_dir checked the identity): redo it
        if p.name.startswith("part-") and p.name.endswith(".parquet"):
            p.unlink()
    _clean_stale_stages(out)
    rej_path = out / REJECTED_DIR / REJECTED_FILE
    n_rej, rej_summary = scan(src, driver.index, on_unknown, data_dir, rej_path if on_unknown == "skip" else None)
    columns = [c for c in OUTPUT_COLUMNS if c != "time_ms" or src.has_time] + \
        (list(PROBABILITY_COLUMNS) if probabilities else []) + list(src.keep)
    man = {"format": FORMAT, "version": VERSION, "engine": "ray", "identity": identity,
           "run_dir": str(Path(run_dir).resolve()), "weights": driver.meta["weights"],
           "data_dir": str(Path(data_dir).resolve()), "input": str(src.path.resolve()),
           "input_kind": src.describe(), "input_sha256": identity["input"]["sha256"], "rows": src.rows,
           "columns": columns, "keep_columns": list(src.keep), "on_unknown": on_unknown,
           "rejected": {"file": f"{REJECTED_DIR}/{REJECTED_FILE}" if on_unknown == "skip" else None,
                        "rows": n_rej, "summary": rej_summary},
           "parts": [], "complete": False, "created": now()}
    atomic_json(out / MANIFEST, man)
    t_setup = time.perf_counter()

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=progress,
                 configure_logging=False, ignore_reinit_error=True)
        started = True
    stage = out.parent / f"{_STAGE.format(name=out.name)}{uuid.uuid4().hex[:12]}"
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(progress)
        if not progress:  # --quiet: Ray Data's own INFO lines (plan, "execution finished") off too
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        res = ray.cluster_resources()
        if gpus_per_actor is None:
            gpus_per_actor = 1 if res.get("GPU", 0) > 0 else 0
        need = actors * cpus_per_actor + 2 * _IO_CPUS
        if need > res.get("CPU", 0):  # the read and write tasks need CPU too: Ray would wait forever
            raise ValueError(f"actors={actors} x cpus_per_actor={cpus_per_actor} leaves no CPU of the cluster's "
                             f"{res.get('CPU', 0):g} for the read and write tasks ({_IO_CPUS} CPU each); use fewer "
                             "actors or a fractional --cpus-per-actor (e.g. 0.5)")
        if gpus_per_actor and actors * gpus_per_actor > res.get("GPU", 0):
            raise ValueError(f"actors={actors} x gpus_per_actor={gpus_per_actor} > the cluster's "
                             f"{res.get('GPU', 0):g} GPUs")
        t_ray = time.perf_counter()
        read_cols = list(src.columns) + [c for c in src.keep if c not in src.columns]
        kw = {}
        if src.partitioning:
            from ray.data.datasource import Partitioning

            kw["partitioning"] = Partitioning("hive", base_dir=str(src.path))
        else:
            kw["partitioning"] = None
        settle_fsspec_http()
        import pyarrow.fs as pafs

        # the files are local paths (segfast's own pairs reader found them): naming the filesystem keeps Ray's
        # file listing (which runs in worker processes) from resolving one through fsspec, where the import race
        # of settle_fsspec_http would otherwise happen again in every worker
        ds = ray.data.read_parquet([str(f.path) for f in src.files], file_extensions=None, num_cpus=_IO_CPUS,
                                   filesystem=pafs.LocalFileSystem(), **kw)
        # a pairs file is small in bytes but heavy in compute: blocks of batch_rows rows (streaming), so that every
        # actor gets work (Ray's blocks are sized by bytes: a few-million-row file would go to a single actor)
        ds = ds.select_columns(read_cols).repartition(target_num_rows_per_block=int(batch_rows))
        keep_types = {c: src.files[0].type_of(c) for c in src.keep}
        ctor = {"run_dir": str(run_dir), "data_dir": str(data_dir), "device": "auto", "backend": backend,
                "batch_size": batch_size, "which": which, "on_unknown": on_unknown,
                "keep_columns": list(src.keep) or None, "keep_types": keep_types,
                "threads": max(1, int(cpus_per_actor)), "probabilities": bool(probabilities),
                **(scorer_kwargs or {})}
        ds = ds.map_batches(ScoreBatches, fn_constructor_kwargs=ctor, batch_size=int(batch_rows),
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=int(actors)),
                            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
        ds.write_parquet(str(stage), compression="zstd", ray_remote_args={"num_cpus": _IO_CPUS})
        t_scored = time.perf_counter()
        staged = sorted(p for p in stage.iterdir() if p.suffix == ".parquet") if stage.is_dir() else []
        parts, rows = [], 0
        import pyarrow.parquet as pq

        for i, p in enumerate(staged):
            n = pq.read_metadata(p).num_rows
            os.replace(p, out / part_name(i))  # same filesystem: a rename
            parts.append({"part": i, "file": part_name(i), "rows": int(n), "sha256": sha256_file(out / part_name(i)),
                          "finished": now()})
            rows += n
        ray_info = {"version": ray.__version__, "address": address, "actors": int(actors),
                    "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor,
                    "batch_rows": int(batch_rows), "nodes": len(ray.nodes())}
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if started:
            ray.shutdown()
    if rows + n_rej != src.rows:
        raise OutDirError(f"{out}: Ray wrote {rows} scored rows, {n_rej} were rejected, but the input has "
                          f"{src.rows}; the output is left incomplete (rerun to redo it)")
    t_end = time.perf_counter()
    score_s = t_scored - t_ray
    man.update({"parts": parts, "n_parts": len(parts), "complete": True, "rows_scored": int(rows),
                "rows_rejected": int(n_rej), "backend": driver.backend,
                "device": "cuda" if gpus_per_actor else "cpu", "ray": ray_info, "updated": now(),
                "timing": {"wall_s": round(t_end - t_begin, 3), "setup_s": round(t_setup - t_begin, 3),
                           "ray_start_s": round(t_ray - t_setup, 3), "ray_job_s": round(score_s, 3),
                           "pairs_per_s": round(rows / score_s, 1) if score_s > 0 else None}})
    atomic_json(out / MANIFEST, man)
    return man


def score_from_args(a) -> dict:
    """``segfast score --engine ray``: the parsed command line -> :func:`score_ray`."""
    from segfast import distributed as dist_

    if dist_.env_info().world_size > 1:
        raise ValueError("--engine ray runs from one driver process; do not start it under torchrun")
    kw = {}
    if getattr(a, "precision", None) not in (None, "auto"):
        kw["precision"] = a.precision
    return score_ray(a.run_dir, a.data, a.pairs, a.out, actors=a.actors, gpus_per_actor=a.gpus_per_actor,
                     cpus_per_actor=a.cpus_per_actor, batch_rows=a.ray_batch_rows, batch_size=a.batch_size,
                     backend=a.backend, which=a.which, on_unknown=a.on_unknown,
                     keep_columns=getattr(a, "keep_columns", None), overwrite=a.overwrite, address=a.ray_address,
                     progress=not a.quiet, scorer_kwargs=kw, probabilities=getattr(a, "probabilities", False))
