"""One process's scoring of a list of parts: a reader thread reads and assembles batches, the main thread runs
the model and hands each finished part, as an Arrow table, to a sink (the output directory, or a list for the
in-memory API)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np

from segfast.scoring.common import MAX_SLOTS, TIME_COLUMN
from segfast import precision as sfprec

__all__ = ["Job", "part_table"]


def part_table(ctx: dict):
    """The Arrow table of a scored part (the columns of ``part-NNNNN.parquet``), rows in input order."""
    import pyarrow as pa

    cols = [("row", pa.array(ctx["row"], pa.int64())), ("user_id", pa.array(ctx["user_id"], pa.int64())),
            ("video_id", pa.array(ctx["video_id"], pa.int64()))]
    if ctx["time_ms"] is not None:
        cols.append(("time_ms", pa.array(ctx["time_ms"], pa.int64())))
    scores = pa.ListArray.from_arrays(pa.array(ctx["offsets"].astype(np.int32)),
                                      pa.array(ctx["values"], pa.float32()))
    cols += [("n_segments", pa.array(ctx["n"].astype(np.int8), pa.int8())), ("scores", scores),
             ("leave_slot", pa.array(ctx["leave"], pa.int8())),
             ("thumbnail_slot", pa.array(ctx["thumb"], pa.int8())),
             ("expected_watch_segments", pa.array(ctx["expect"], pa.float32()))]
    if "keep_values" in ctx:  # probabilities=True: the calibrated columns (segfast.calibration)
        so = ctx["offsets"] + np.arange(ctx["offsets"].shape[0])  # N + 1 survival values per row
        cols += [("keep_probability", pa.ListArray.from_arrays(pa.array(ctx["offsets"].astype(np.int32)),
                                                               pa.array(ctx["keep_values"], pa.float32()))),
                 ("survival", pa.ListArray.from_arrays(pa.array(so.astype(np.int32)),
                                                       pa.array(ctx["surv_values"], pa.float32()))),
                 ("calibrated_watch_segments", pa.array(ctx["cal_expect"], pa.float32())),
                 ("most_likely_leave", pa.array(ctx["ml_leave"], pa.int16()))]
    cols += list(ctx["keep"].items())
    return pa.table({k: v for k, v in cols})


class Job:
    """Scores parts of ``pairs`` (any segfast.scoring.pairs source) with ``model``."""

    def __init__(self, model, index, pairs, assembler, fast, device, batch_size, part_rows, progress, rank,
                 precision: str = "fp32", calibrator=None):
        self.model, self.ix, self.pairs, self.asm = model, index, pairs, assembler
        self.calibrator = calibrator  # probabilities=True: a segfast.calibration.Calibrator
        self.precision = precision  # autocast of the model call (segfast.precision)
        self.fast, self.device, self.batch_size, self.part_rows = fast, device, batch_size, part_rows
        self.progress, self.rank = progress, rank
        self.t_produce = 0.0

    # ---------------- producer side
    def _part_inputs(self, p: int) -> dict:
        import pyarrow as pa

        s = p * self.part_rows
        e = min(s + self.part_rows, self.pairs.rows)
        cols = self.pairs.read(s, e)
        uid, vid = cols["user_id"], cols["video_id"]
        u, v, ku, kv, hf = self.ix.known(uid, vid)
        keep = np.flatnonzero(ku & kv & hf)
        t = cols.get(TIME_COLUMN)
        take = None if keep.shape[0] == e - s else pa.array(keep)
        ctx = {"part": p, "start": s, "end": e, "row": s + keep, "user_id": uid[keep], "video_id": vid[keep],
               "time_ms": None if t is None else t[keep], "u": u[keep], "v": v[keep],
               "keep": {c: (a if take is None else a.take(take)) for c, a in cols["keep"].items()}}
        ctx["n"] = self.ix.nseg[ctx["v"]]
        ctx["p"] = self.ix.hist_pos(ctx["u"], ctx["time_ms"])
        k = keep.shape[0]
        ctx["rejected"] = (e - s) - k
        ctx["offsets"] = np.concatenate(([0], np.cumsum(ctx["n"]))).astype(np.int64)
        ctx["values"] = np.empty(int(ctx["offsets"][-1]), dtype=np.float32)
        ctx["leave"] = np.empty(k, np.int8)
        ctx["thumb"] = np.empty(k, np.int8)
        ctx["expect"] = np.empty(k, np.float32)
        if self.calibrator is not None:
            ctx["keep_values"] = np.empty(int(ctx["offsets"][-1]), dtype=np.float32)
            ctx["surv_values"] = np.empty(int(ctx["offsets"][-1]) + k, dtype=np.float32)
            ctx["cal_expect"] = np.empty(k, np.float32)
            ctx["ml_leave"] = np.empty(k, np.int16)
        return ctx

    def produce(self, parts, stop: threading.Event):
        for p in parts:
            t0 = time.perf_counter()
            ctx = self._part_inputs(p)
            order = np.argsort(ctx["n"], kind="stable")  # bucket by segment count
            self.t_produce += time.perf_counter() - t0
            for a in range(0, order.shape[0], self.batch_size):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                sel = order[a:a + self.batch_size]
                batch = self.asm.assemble(ctx["row"][sel], ctx["u"][sel], ctx["v"][sel], ctx["n"][sel],
                                          ctx["p"][sel])
                self.t_produce += time.perf_counter() - t0
                yield ("batch", ctx, sel, batch)
            yield ("end", ctx, None, None)

    # ---------------- consumer side
    def _fill(self, ctx, sel, logits: np.ndarray) -> None:
        from segfast.evaluate import expected_leave_slot

        n = ctx["n"][sel]
        b, s = logits.shape
        slots = np.arange(s)
        real = slots[None, :] < n[:, None]
        dst = ctx["offsets"][sel][:, None] + slots[None, :]
        ctx["values"][dst[real]] = logits[real]
        ctx["leave"][sel] = np.where(real, logits, np.inf).argmin(axis=1)
        ctx["thumb"][sel] = np.where(real, logits, -np.inf).argmax(axis=1)
        full = np.zeros((b, MAX_SLOTS), dtype=np.float32)
        full[:, :s] = logits
        ctx["expect"][sel] = expected_leave_slot(full, n)
        if self.calibrator is not None:
            from segfast import calibration as cal

            keep = self.calibrator.keep_probability(logits, n)  # [b, s], NaN on slots >= N
            ctx["keep_values"][dst[real]] = keep[real]
            surv = cal.survival(keep, n)  # [b, 41], NaN beyond N
            sreal = np.arange(surv.shape[1])[None, :] <= n[:, None]
            sdst = (ctx["offsets"][sel] + sel)[:, None] + np.arange(surv.shape[1])[None, :]
            ctx["surv_values"][sdst[sreal]] = surv[sreal]
            leave = cal.leave_distribution(keep, n, surv)
            ctx["cal_expect"][sel] = leave @ np.arange(leave.shape[1], dtype=np.float64)
            ctx["ml_leave"][sel] = leave.argmax(axis=1)

    def _items(self, gen, stop: threading.Event, q: queue.Queue):
        """Start the reader thread over ``gen``; return (thread, iterator over its items)."""
        def worker():
            try:
                for item in gen:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                q.put(e)

        thread = threading.Thread(target=worker, name="segfast-score-reader", daemon=True)
        thread.start()

        def items():
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        return thread, items()

    def run(self, parts, sink: Callable, prefetch: bool = True) -> dict:
        """Score ``parts``; ``sink(ctx, table)`` gets each finished part. Returns this run's timing."""
        import torch
        from tqdm.auto import tqdm

        total = sum(min((p + 1) * self.part_rows, self.pairs.rows) - p * self.part_rows for p in parts)
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=3)
        gen = self.produce(parts, stop)
        thread, it = self._items(gen, stop, q) if prefetch else (None, gen)
        cuda = str(self.device).startswith("cuda")
        t = {"wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
        scored = 0
        t_start = time.perf_counter()
        bar = tqdm(total=total, unit="pairs", unit_scale=True, disable=not self.progress, smoothing=0.1,
                   desc="score" if self.rank == 0 else f"score[{self.rank}]", position=self.rank)
        try:
            with torch.inference_mode():
                while True:
                    t0 = time.perf_counter()
                    try:
                        kind, ctx, sel, batch = next(it)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    t["wait_s"] += t1 - t0
                    if kind == "batch":
                        dev = {k: v.to(self.device, non_blocking=cuda) for k, v in batch.items()}
                        with sfprec.autocast(self.device, self.precision):
                            logits = self.model.score(dev)  # the model owns its forward
                        logits = logits.float().cpu().numpy()
                        t2 = time.perf_counter()
                        t["compute_s"] += t2 - t1
                        self._fill(ctx, sel, logits)
                        t["write_s"] += time.perf_counter() - t2
                        scored += sel.shape[0]
                        bar.update(sel.shape[0])
                    else:
                        sink(ctx, part_table(ctx))
                        bar.update(ctx["rejected"])
                        t["write_s"] += time.perf_counter() - t1
        finally:
            stop.set()
            bar.close()
            if thread is not None:
                while thread.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    thread.join(timeout=0.05)
        wall = time.perf_counter() - t_start
        t = {k: round(v, 3) for k, v in t.items()}
        return {"rank": self.rank, "pairs_scored": scored, "parts": len(parts), "wall_s": round(wall, 3),
                "pairs_per_s": round(scored / wall, 1) if wall > 0 else None,
                "data_s": round(self.t_produce, 3), **t}
