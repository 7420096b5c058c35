"""End-to-end throughput of the offline batch scorer (read Parquet, assemble, model, write parts).

Builds a synthetic SegMM release (``segfast.data.synth``, feature dim 64), prepares it, saves an untrained
``small``-preset model per modality with ``segfast.checkpoint``, writes N random (user_id, video_id, time_ms)
pairs over the known ids, and times ``segfast.scoring.score`` for each modality. Prints the manifest's time
split (setup = validation pass + hashing + loading; data = producer thread read + assemble; wait = model idle
waiting for data; compute = model; write = scores -> Parquet), the process CPU seconds of the whole call
(``process_cpu_s``, JSON only) and optionally a cProfile of the scoring.

Target (brief): 1M ID-only pairs end to end in <= 4 minutes on 2 CPU cores.

    python bench/bench_score.py [--pairs 1000000] [--visual-pairs 200000] [--modalities id,visual,both]
                                [--threads 1] [--batch-size 1024] [--profile id] [--json out.json]
                                [--backends triton,sdpa,torch] [--csv rows.csv]

With --csv, each run's row (card, versions, commit, time split) is appended and printed as soon as it is measured
(bench/_csvlog.py). Backends run in the order given; "sdpa" is skipped (a row says so) while segfast.ops lacks it.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segfast.checkpoint import data_fingerprint, save_model, write_run_config
from segfast.data.prepared import load_prepared, prepare
from segfast.data.synth import synth
from segfast.model import SegInterestModel, model_preset
from segfast.scoring import score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _csvlog import CsvLog, error_status  # noqa: E402

COLUMNS = ["preset", "modality", "impl", "backend", "device", "pairs", "wall_s", "pairs_per_s_end_to_end",
           "s_per_1M_pairs", "setup_s", "scoring_wall_s", "data_s", "wait_s", "compute_s", "write_s",
           "effective_batch_size", "out_mib"]


def build(root: Path, users: int, videos: int, interactions: int, dim: int) -> Path:
    t0 = time.perf_counter()
    synth("segmm", root / "raw", users=users, videos=videos, interactions=interactions, seed=0, feature_dim=dim,
          progress=False)
    prepare("segmm", root / "raw", root / "prep", feature_dim=dim, progress=False)
    print(f"synth + prepare: {time.perf_counter() - t0:.1f} s")
    return root / "prep"


def make_run(root: Path, prepared, modality: str, preset: str = "small") -> Path:
    cfg = model_preset(preset, modality=modality).for_data(prepared.n_users, prepared.n_videos,
                                                             prepared.feature_dim)
    torch.manual_seed(0)
    rd = root / f"run-{preset}-{modality}"
    rd.mkdir()
    write_run_config(rd, cfg, None, data_fingerprint(prepared))
    save_model(rd / "model.safetensors", SegInterestModel(cfg))
    return rd


def make_pairs(path: Path, prepared, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = prepared.interactions["time_ms"]
    cols = {"user_id": prepared.users["user_id"][rng.integers(0, prepared.n_users, n)],
            "video_id": prepared.videos["video_id"][rng.integers(0, prepared.n_videos, n)],
            "time_ms": rng.integers(int(t.min()), int(t.max()) + 2, n)}
    pq.write_table(pa.table(cols), path, row_group_size=131_072)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="pairs for the ID-only model")
    ap.add_argument("--visual-pairs", type=int, default=200_000, help="pairs for the visual / both models")
    ap.add_argument("--modalities", default="id,visual,both")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--videos", type=int, default=20_000)
    ap.add_argument("--interactions", type=int, default=120_000)
    ap.add_argument("--feature-dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="default: score()'s (1024 on CPU)")
    ap.add_argument("--part-rows", type=int, default=262_144)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--profile", default="", help="modality to run under cProfile (top functions printed)")
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--presets", default="small", help="comma list of small,paper-code")
    ap.add_argument("--backends", default="torch", help="comma list of triton,sdpa,torch (run in this order)")
    ap.add_argument("--csv", default=None, help="also append one row per run to this CSV, as measured (gpu_check)")
    ap.add_argument("--commit", default="unknown", help="commit recorded in every row (default: git HEAD)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_score_"))
    root.mkdir(parents=True, exist_ok=True)
    results = {"threads": torch.get_num_threads(), "pairs": {}, "runs": {}}
    try:
        prep = root / "prep"
        if not (prep / "manifest.json").is_file():
            build(root, a.users, a.videos, a.interactions, a.feature_dim)
        p = load_prepared(prep)
        print(p)
        from segfast import ops

        log = CsvLog(a.csv, COLUMNS, device=a.device, commit=a.commit, echo=False)  # rows printed below
        for preset in a.presets.split(","):
            for modality in a.modalities.split(","):
                n = a.pairs if modality == "id" else a.visual_pairs
                pairs = root / f"pairs-{n}.parquet"
                if not pairs.is_file():
                    make_pairs(pairs, p, n)
                rd = root / f"run-{preset}-{modality}"
                if not rd.is_dir():
                    make_run(root, p, modality, preset)
                for backend in a.backends.split(","):
                    ids = dict(preset=preset, modality=modality, backend=backend, device=a.device, pairs=n,
                               impl={"torch": "eager"}.get(backend, backend))
                    if backend not in getattr(ops, "BACKENDS", ("torch", "triton")):
                        log.row(**ids, status=f"skipped: segfast.ops has no {backend!r} backend")
                        print(f"{preset} {modality:7s} {backend}: skipped (segfast.ops has no such backend)")
                        continue
                    out = root / f"out-{preset}-{modality}-{backend}"
                    shutil.rmtree(out, ignore_errors=True)
                    prof = cProfile.Profile() if modality == a.profile else None
                    t0, c0 = time.perf_counter(), time.process_time()
                    if prof:
                        prof.enable()
                    try:
                        man = score(rd, prep, pairs, out, batch_size=a.batch_size, part_rows=a.part_rows,
                                    progress=False, device=a.device, backend=backend)
                    except Exception as e:  # noqa: BLE001 - report it in the CSV, go on with the next run
                        if prof:
                            prof.disable()
                        log.row(**ids, status=error_status(e))
                        print(f"{preset} {modality:7s} {backend}: FAILED {error_status(e)}", flush=True)
                        continue
                    if prof:
                        prof.disable()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    tm = man["timing"]
                    r = {"preset": preset, "modality": modality, "backend": backend, "device": a.device,
                         "pairs": n, "wall_s": round(wall, 2), "pairs_per_s_end_to_end": round(n / wall, 1),
                         "s_per_1M_pairs": round(wall * 1e6 / n, 1), "setup_s": tm["ranks"][0]["setup_s"],
                         "scoring_wall_s": tm["scoring_wall_s"], "data_s": tm["data_s"], "wait_s": tm["wait_s"],
                         "compute_s": tm["compute_s"], "write_s": tm["write_s"],
                         "effective_batch_size": man["effective_batch_size"],
                         "out_mib": round(sum(f.stat().st_size for f in out.glob("part-*")) / 2**20, 1)}
                    results["runs"][f"{preset}/{modality}/{backend}"] = r
                    log.row(impl=ids["impl"], **r)
                    # JSON / printed only (the CSV keeps its columns): CPU seconds of this process (all threads:
                    # robust to other load on a shared box, unlike wall time) and the feature store's path
                    r["process_cpu_s"] = round(cpu, 2)
                    r["feature_store"] = (man.get("feature_store") or {}).get("path")
                    print(f"{preset} {modality:7s} {backend}: {json.dumps(r)}", flush=True)
                    if prof:
                        s = io.StringIO()
                        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
                        print(s.getvalue())
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
