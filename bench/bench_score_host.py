"""Host data work of the scorer alone: thread CPU seconds of ``Job.produce`` (read the pairs' parts, map ids,
history positions, assemble batches) for the id / visual / both runs of a ``bench/bench_score.py --workdir W``,
without the model. Thread CPU time (min of --reps) is robust to other load on a shared box, unlike wall time.
Runs against whichever ``segfast`` is imported (PYTHONPATH=old-tree for a before/after comparison).

    python bench/bench_score_host.py W [--pairs 100000] [--visual-pairs 6000] [--reps 12]
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--visual-pairs", type=int, default=6000)
    ap.add_argument("--part-rows", type=int, default=262_144)
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from segfast.scoring import Scorer
    from segfast.scoring.job import Job
    from segfast.scoring.pairs import open_pairs

    res = {}
    for m in ("id", "visual", "both"):
        n = a.pairs if m == "id" else a.visual_pairs
        sc = Scorer.from_run(f"{a.workdir}/run-small-{m}", f"{a.workdir}/prep", device="cpu")
        src = open_pairs(f"{a.workdir}/pairs-{n}.parquet")
        parts = list(range(-(-src.rows // a.part_rows)))
        best, nb = None, 0
        for _ in range(a.reps):
            job = Job(sc.model, sc.index, src, sc.assembler(), sc.fast, "cpu", sc.effective_batch_size,
                      a.part_rows, False, 0)
            c0 = time.thread_time()
            nb = sum(1 for item in job.produce(parts, threading.Event()) if item[0] == "batch")
            c = time.thread_time() - c0
            best = c if best is None else min(best, c)
        res[m] = {"pairs": n, "batches": nb, "host_cpu_s": round(best, 4), "pairs_per_host_cpu_s": round(n / best)}
        print(m, json.dumps(res[m]), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
