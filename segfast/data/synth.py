"""Synthetic SegMM / KuaiRand releases with a known ground truth (the generative story: docs/synth.md).

``synth(format, out, ...)`` writes exactly the files of the real source, so the readers in
``segfast.data.sources`` read them through the same code, plus ``ground_truth.parquet`` with the true
per-segment interest of every (user, video) pair. Everything is vectorised numpy, generated and written
in chunks (rows by user blocks, features by video blocks), so SegMM scale (4M x 1024 float64 = 32 GB of
features) and KuaiRand-1K scale (11.7M raw rows) run in bounded memory. The output is written to a
temporary folder next to ``out`` and renamed on success.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segfast import MAX_SLOTS, SEGMENT_MS, _io
from segfast.data.sources import MAX_DURATION_MS
from segfast.data.sources.kuairand import KUAIRAND_COLUMNS
from segfast.data.sources.segmm import FEAT_FILE, INTER_COLUMNS, INTER_FILE, MAP_FILE

# ----------------------------------------------------------------------------- defaults (the demo scale)
DEFAULT_USERS = 100
DEFAULT_VIDEOS = 1500
DEFAULT_INTERACTIONS = 30000
DEFAULT_FEATURE_DIM = 64
DEFAULT_SEED = 0
KUAIRAND_LOG = "log_standard_4_08_to_4_21_1k.csv"
GROUND_TRUTH = "ground_truth.parquet"
FORMATS = ("segmm", "kuairand")

# ----------------------------------------------------------------------------- the generative model
LATENT_DIM = 8          # k: dimension of user tastes and segment content
N_TOPICS = 16           # video topics (cluster centres of the content space)
W_TOPIC, W_VIDEO, W_DRIFT = 0.8, 0.6, 0.7   # z = W_TOPIC c_t + W_VIDEO e_v + W_DRIFT drift_i
_Z_STD = float(np.sqrt(W_TOPIC ** 2 + W_VIDEO ** 2 + W_DRIFT ** 2))
HAZ_ALPHA = -2.0        # base leave logit per segment
HAZ_START = 0.9         # extra leave logit at the first segment ...
HAZ_TAU = 1.2           # ... decaying as exp(-i / tau)
HAZ_BETA = 1.8          # weight of the user-segment affinity <u, z_i> (the personal signal)
USER_PATIENCE_STD = 0.5
VIDEO_QUALITY_STD = 0.5
DURATION_MEDIAN_MS = 22000.0
DURATION_SIGMA = 1.0
POPULARITY_ZIPF = 0.9
FEATURE_NOISE = 0.5     # features = A z / sqrt(k) + FEATURE_NOISE * eps
REPLAY_MEDIAN = 0.2     # full watches: play = duration * (1 + r), r ~ lognormal(log 0.2, 1.2)
SEGMM_SPAN_MS = 3 * 86400 * 1000
SEGMM_LIGHT_USERS = 0.05          # fraction of users below SegMM's 100-interaction threshold
SEGMM_ZERO_PLAY = 0.0005          # fraction of SegMM rows with playing_time 0 (dropped by the reader)
KUAIRAND_START_MS = 1649347200000  # 2022-04-08 00:00 UTC+8
KUAIRAND_DAYS = 14
KUAIRAND_CLICK_BIAS = -2.05       # click logit; with the affinity term ~14% of exposures are clicked
KUAIRAND_CLICK_BETA = 0.8
KUAIRAND_LIGHT_USERS = 0.02       # users with < 20 clicked rows
KUAIRAND_ZERO_PLAY = 0.003        # clicked rows with play_time_ms 0
KUAIRAND_LONG_VIDEOS = 0.015      # videos with duration >= 200000 ms
KUAIRAND_ZERO_DURATION = 0.001    # videos with duration 0
ROW_CHUNK = 1 << 19               # rows generated per user block
HAZ_CHUNK = 1 << 16               # rows per hazard evaluation ([chunk, 40] arrays)
FEATURE_CHUNK_BYTES = 64 << 20    # feature rows written per block


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


# ----------------------------------------------------------------------------- catalogue and users
class _World:
    """Users, videos and the content space; every per-video array is indexed by the video index."""

    def __init__(self, fmt: str, users: int, videos: int, seed: int):
        k = LATENT_DIM
        rng = _rng(seed, 1)
        self.topic_c = rng.standard_normal((N_TOPICS, k))
        # videos
        self.video_id = np.sort(rng.choice(int(videos * 1.5) + 10, size=videos, replace=False)).astype(np.int64)
        if fmt == "segmm":
            self.video_id += 1
        d = np.exp(rng.normal(np.log(DURATION_MEDIAN_MS), DURATION_SIGMA, videos))
        d = np.where(d < 1000, rng.uniform(1000, 5000, videos), d)
        d = np.where(d >= MAX_DURATION_MS, rng.uniform(100000, MAX_DURATION_MS - 1, videos), d)
        d = d.astype(np.int64)
        if fmt == "kuairand":
            u = rng.random(videos)
            d = np.where(u < KUAIRAND_LONG_VIDEOS, rng.integers(MAX_DURATION_MS, 600000, videos), d)
            d = np.where(u > 1 - KUAIRAND_ZERO_DURATION, 0, d)
        self.duration = d
        self.n_seg = np.clip(-(-d // SEGMENT_MS), 0, None)  # > 40 for out-of-range videos (never used)
        self.topic = rng.integers(0, N_TOPICS, videos)
        f32 = np.float32
        self.e = rng.standard_normal((videos, k)).astype(f32)
        self.w1 = rng.standard_normal((videos, k)).astype(f32)
        self.w2 = rng.standard_normal((videos, k)).astype(f32)
        self.omega = rng.uniform(0.25, 0.9, videos).astype(f32)
        self.phi = rng.uniform(0, 2 * np.pi, videos).astype(f32)
        self.quality = rng.normal(0, VIDEO_QUALITY_STD, videos).astype(f32)
        pop = (np.arange(1, videos + 1, dtype=np.float64)) ** -POPULARITY_ZIPF
        pop = pop[rng.permutation(videos)]
        self.pop_cdf = np.cumsum(pop / pop.sum())
        # users
        rng = _rng(seed, 2)
        self.user_id = np.arange(users, dtype=np.int64) + (1 if fmt == "segmm" else 0)
        self.u = rng.standard_normal((users, k))
        self.patience = rng.normal(0, USER_PATIENCE_STD, users)
        self.activity = np.exp(rng.normal(0, 0.5, users))

    def content(self, v: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """z [len, k] of segment ``seg`` of video ``v`` (float64)."""
        th = (self.omega[v] * seg + self.phi[v]).astype(np.float64)[:, None]
        z = (W_TOPIC * self.topic_c[self.topic[v]] + W_VIDEO * self.e[v]
             + W_DRIFT * (np.cos(th) * self.w1[v] + np.sin(th) * self.w2[v]))
        return z / _Z_STD

    def hazard(self, uidx: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Leave hazard h [R, 40] (float64) of user rows ``uidx`` on videos ``v``; the interest is 1 - h."""
        u = self.u[uidx]
        scale = 1.0 / (_Z_STD * np.sqrt(LATENT_DIM))
        a0 = (W_TOPIC * np.einsum("rk,rk->r", u, self.topic_c[self.topic[v]])
              + W_VIDEO * np.einsum("rk,rk->r", u, self.e[v].astype(np.float64))) * scale
        a1 = W_DRIFT * np.einsum("rk,rk->r", u, self.w1[v].astype(np.float64)) * scale
        a2 = W_DRIFT * np.einsum("rk,rk->r", u, self.w2[v].astype(np.float64)) * scale
        i = np.arange(MAX_SLOTS, dtype=np.float64)[None, :]
        th = self.omega[v].astype(np.float64)[:, None] * i + self.phi[v].astype(np.float64)[:, None]
        aff = a0[:, None] + a1[:, None] * np.cos(th) + a2[:, None] * np.sin(th)
        logit = (HAZ_ALPHA + HAZ_START * np.exp(-i / HAZ_TAU) - HAZ_BETA * aff
                 - self.patience[uidx][:, None] - self.quality[v].astype(np.float64)[:, None])
        return _sigmoid(logit)

    def mean_affinity(self, uidx: np.ndarray, v: np.ndarray) -> np.ndarray:
        u = self.u[uidx]
        scale = 1.0 / (_Z_STD * np.sqrt(LATENT_DIM))
        return (W_TOPIC * np.einsum("rk,rk->r", u, self.topic_c[self.topic[v]])
                + W_VIDEO * np.einsum("rk,rk->r", u, self.e[v].astype(np.float64))) * scale


def _user_counts(fmt: str, users: int, interactions: int, world: _World, seed: int) -> np.ndarray:
    """Rows per user, summing exactly to ``interactions``; a few light users fall below the thresholds."""
    rng = _rng(seed, 3)
    counts = np.zeros(users, dtype=np.int64)
    light_frac, lo, hi = ((SEGMM_LIGHT_USERS, 20, 100) if fmt == "segmm" else (KUAIRAND_LIGHT_USERS, 10, 100))
    light = rng.random(users) < light_frac
    counts[light] = rng.integers(lo, hi, int(light.sum()))
    if counts.sum() > interactions // 2:  # tiny scales: keep light users light but affordable
        counts[light] = np.maximum(1, counts[light] * (interactions // 2) // max(counts.sum(), 1))
    heavy = np.flatnonzero(~light)
    rest = interactions - int(counts.sum())
    if heavy.size:
        p = world.activity[heavy] / world.activity[heavy].sum()
        counts[heavy] = rng.multinomial(rest, p)
    else:
        counts[0] += rest
    return counts


# ----------------------------------------------------------------------------- one block of rows
def _leave(world: _World, uidx: np.ndarray, v: np.ndarray, rng: np.random.Generator):
    """Simulate watching: (play_time_ms int64, interest float32 [R, 40]) for rows with valid durations."""
    R = uidx.shape[0]
    play = np.empty(R, dtype=np.int64)
    interest = np.empty((R, MAX_SLOTS), dtype=np.float32)
    for s in range(0, R, HAZ_CHUNK):
        e = min(R, s + HAZ_CHUNK)
        h = world.hazard(uidx[s:e], v[s:e])
        interest[s:e] = 1.0 - h
        n = world.n_seg[v[s:e]]
        d = world.duration[v[s:e]]
        leave = (rng.random(h.shape) < h) & (np.arange(MAX_SLOTS)[None, :] < n[:, None])
        k = np.where(leave.any(axis=1), leave.argmax(axis=1), n)
        lo = SEGMENT_MS * k + 1
        hi = np.minimum(SEGMENT_MS * (k + 1), d - 1)
        full = (k >= n) | (hi < lo)  # a 1 ms last segment cannot be left inside: a full watch
        u = rng.random(e - s)
        skip_play = lo + np.floor(u * (np.maximum(hi - lo, 0) + 1)).astype(np.int64)
        replay = np.exp(rng.normal(np.log(REPLAY_MEDIAN), 1.2, e - s))
        replay = np.where(rng.random(e - s) < 0.05, 0.0, replay)  # some stop exactly at the end
        full_play = d + np.round(d * replay).astype(np.int64)
        play[s:e] = np.where(full, full_play, skip_play)
    return play, interest


def _times(counts: np.ndarray, span: int, base: int, rng: np.random.Generator) -> np.ndarray:
    """Increasing timestamps per user (rows grouped by user)."""
    t = rng.integers(0, span, int(counts.sum()))
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    order = np.lexsort((t, owner))
    return t[order] + base


def _ground_truth_table(world: _World, uidx, v, interest) -> pa.Table:
    pair = np.unique(np.stack([uidx, v], axis=1), axis=0, return_index=True)[1]
    uidx, v, interest = uidx[pair], v[pair], interest[pair]
    n = world.n_seg[v]
    owner = np.repeat(np.arange(v.shape[0]), n)
    offs = np.zeros(v.shape[0] + 1, dtype=np.int64)
    np.cumsum(n, out=offs[1:])
    seg = np.arange(int(offs[-1])) - offs[:-1][owner]
    return pa.table({
        "user_id": pa.array(world.user_id[uidx][owner], pa.int64()),
        "video_id": pa.array(world.video_id[v][owner], pa.int64()),
        "segment": pa.array(seg.astype(np.int8), pa.int8()),
        "interest": pa.array(interest[owner, seg].astype(np.float32), pa.float32()),
    })


_GT_SCHEMA = pa.schema([("user_id", pa.int64()), ("video_id", pa.int64()), ("segment", pa.int8()),
                        ("interest", pa.float32())])


def _user_blocks(counts: np.ndarray):
    """Contiguous user ranges of about ROW_CHUNK rows."""
    cum = np.cumsum(counts)
    start, done = 0, 0
    while start < counts.shape[0]:
        end = int(np.searchsorted(cum, done + ROW_CHUNK, side="right"))
        end = max(end, start + 1)
        yield start, end
        done = int(cum[end - 1])
        start = end


def _write_rows(fmt: str, tmp: Path, world: _World, counts: np.ndarray, seed: int, bar) -> dict:
    """Generate and write all interaction rows and the ground truth, block by block of users."""
    stats = {"rows": 0, "kept": 0, "dropped": {}, "pairs": 0, "gt_rows": 0, "users_rows": np.zeros_like(counts)}
    if fmt == "segmm":
        names, csv_name = INTER_COLUMNS, INTER_FILE
    else:
        names, csv_name = KUAIRAND_COLUMNS, KUAIRAND_LOG
    schema = pa.schema([(c, pa.int64()) for c in names])
    # duration buckets for the SegMM effective-view label (deciles of the catalogue's durations)
    edges = np.quantile(world.duration, np.linspace(0, 1, 11)[1:-1])
    gt = pq.ParquetWriter(tmp / GROUND_TRUTH, _GT_SCHEMA, compression="zstd")
    with pa.OSFile(str(tmp / csv_name), "wb") as f:
        f.write((",".join(names) + "\n").encode())
        w = pacsv.CSVWriter(f, schema, write_options=pacsv.WriteOptions(include_header=False))
        for b, (us, ue) in enumerate(_user_blocks(counts)):
            rng = _rng(seed, 4, b)
            c = counts[us:ue]
            R = int(c.sum())
            if R == 0:
                continue
            uidx = np.repeat(np.arange(us, ue), c)
            v = np.searchsorted(world.pop_cdf, rng.random(R) * world.pop_cdf[-1], side="right")
            v = np.minimum(v, world.video_id.shape[0] - 1)
            d = world.duration[v]
            if fmt == "segmm":
                t = _times(c, SEGMM_SPAN_MS, 0, rng)
                active = np.ones(R, dtype=bool)
            else:
                t = _times(c, KUAIRAND_DAYS * 86400 * 1000, KUAIRAND_START_MS, rng)
                p_click = _sigmoid(KUAIRAND_CLICK_BIAS + KUAIRAND_CLICK_BETA * world.mean_affinity(uidx, v))
                active = rng.random(R) < p_click  # clicked
            valid = active & (d > 0) & (d < MAX_DURATION_MS)
            play = np.zeros(R, dtype=np.int64)
            vi = np.flatnonzero(valid)
            p_valid, interest = _leave(world, uidx[vi], v[vi], rng)
            play[vi] = p_valid
            bad_dur = active & ~valid  # clicked but out-of-range duration: some play time anyway
            play[bad_dur] = rng.integers(1, 60000, int(bad_dur.sum()))
            zero_frac = SEGMM_ZERO_PLAY if fmt == "segmm" else KUAIRAND_ZERO_PLAY
            zero = active & (rng.random(R) < zero_frac)
            play[zero] = 0
            # ground truth: every interacted pair (SegMM) / every kept clicked pair (KuaiRand)
            gmask = valid if fmt == "segmm" else (valid & ~zero)
            gsel = np.flatnonzero(gmask[vi])
            if gsel.size:
                tab = _ground_truth_table(world, uidx[vi][gsel], v[vi][gsel], interest[gsel])
                gt.write_table(tab)
                stats["gt_rows"] += tab.num_rows
                stats["pairs"] += int(np.unique(np.stack([uidx[vi][gsel], v[vi][gsel]], 1), axis=0).shape[0])
            # the reader's filters, counted as it will count them
            checks = [("play_time_nonpositive", play > 0), ("duration_out_of_range", (d > 0) & (d < MAX_DURATION_MS))]
            if fmt == "kuairand":
                checks.insert(0, ("not_clicked", active))
            keep = np.ones(R, dtype=bool)
            for reason, ok in checks:
                stats["dropped"][reason] = stats["dropped"].get(reason, 0) + int((keep & ~ok).sum())
                keep &= ok
            stats["kept"] += int(keep.sum())
            stats["users_rows"][us:ue] = np.bincount(uidx[keep] - us, minlength=ue - us)
            stats["rows"] += R
            if fmt == "segmm":
                ratio = play / np.maximum(d, 1)
                bucket = np.searchsorted(edges, d, side="right")
                med = np.zeros(11)
                for q in range(10):
                    m = bucket == q
                    med[q] = np.median(ratio[m]) if m.any() else 0.0
                effective = (ratio > med[bucket]).astype(np.int64)
                # the sample's rows are not time-ordered within a user: shuffle each user's rows
                order = np.lexsort((rng.random(R), uidx))
                cols = {"user_id": world.user_id[uidx], "time_ms": t, "photo_id": world.video_id[v],
                        "duration_ms": d, "playing_time": play, "wtd_effective_view": effective}
                cols = {k: a[order] for k, a in cols.items()}
            else:
                local = t - KUAIRAND_START_MS + 0  # already UTC+8 aligned base
                day = local // 86400000
                base = _dt.date(2022, 4, 8)
                date_tab = np.array([int((base + _dt.timedelta(days=int(i))).strftime("%Y%m%d"))
                                     for i in range(int(day.max()) + 1)], dtype=np.int64)
                mins = (local % 86400000) // 60000
                u01 = rng.random((6, R))
                clicked = active.astype(np.int64)
                long_view = (active & (play >= np.minimum(np.maximum(d, 1), 18000))).astype(np.int64)
                cols = {
                    "user_id": world.user_id[uidx], "video_id": world.video_id[v], "date": date_tab[day],
                    "hourmin": (mins // 60) * 100 + (mins % 60), "time_ms": t, "is_click": clicked,
                    "is_like": clicked * (u01[0] < 0.03), "is_follow": clicked * (u01[1] < 0.003),
                    "is_comment": clicked * (u01[2] < 0.004), "is_forward": clicked * (u01[3] < 0.002),
                    "is_hate": (u01[4] < 0.0005).astype(np.int64), "long_view": long_view,
                    "play_time_ms": play, "duration_ms": d,
                    "profile_stay_time": clicked * (u01[5] < 0.01) * rng.integers(1000, 60000, R),
                    "comment_stay_time": clicked * (u01[2] < 0.004) * rng.integers(1000, 90000, R),
                    "is_profile_enter": clicked * (u01[5] < 0.01),
                    "is_rand": (rng.random(R) < 0.05).astype(np.int64),
                    "tab": np.minimum(rng.geometric(0.35, R) - 1, 14),
                }
            w.write_table(pa.table({k: pa.array(np.asarray(cols[k], dtype=np.int64)) for k in names}, schema=schema))
            if bar is not None:
                bar.update(R)
        w.close()
    gt.close()
    return stats


# ----------------------------------------------------------------------------- SegMM features
def _write_features(tmp: Path, world: _World, feature_dim: int, seed: int, bar) -> dict:
    """SegMM_feat_memmap.dat (raw float64 [segments, dim]) and the JSON key -> line map."""
    V = world.video_id.shape[0]
    rng = _rng(seed, 5)
    A = rng.standard_normal((feature_dim, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    line_order = rng.permutation(V)  # videos in line-id order: the map is not the identity
    n = world.n_seg[line_order]
    starts = np.zeros(V + 1, dtype=np.int64)
    np.cumsum(n, out=starts[1:])
    total = int(starts[-1])
    seg_per_chunk = max(1, FEATURE_CHUNK_BYTES // (feature_dim * 8))
    with open(tmp / FEAT_FILE, "wb") as fdat, open(tmp / MAP_FILE, "w", encoding="ascii") as fmap:
        fmap.write("{")
        first = True
        vs = 0
        b = 0
        while vs < V:
            ve = int(np.searchsorted(starts, starts[vs] + seg_per_chunk, side="right")) - 1
            ve = min(max(ve, vs + 1), V)
            vids = line_order[vs:ve]
            nn = world.n_seg[vids]
            owner = np.repeat(vids, nn)
            seg = np.arange(int(nn.sum())) - np.repeat(starts[vs:ve] - starts[vs], nn)
            z = world.content(owner, seg)
            crng = _rng(seed, 6, b)
            x = z @ A.T
            x += FEATURE_NOISE * crng.standard_normal(x.shape, dtype=np.float32)
            fdat.write(np.ascontiguousarray(x, dtype="<f8").tobytes())
            line = starts[vs] + np.arange(owner.shape[0])
            pid = world.video_id[owner]
            body = ", ".join(f'"{p}-{s}": {l}' for p, s, l in zip(pid.tolist(), seg.tolist(), line.tolist()))
            if body:
                fmap.write(("" if first else ", ") + body)
                first = False
            if bar is not None:
                bar.update(owner.shape[0])
            vs = ve
            b += 1
        fmap.write("}\n")
    return {"feature_rows": total, "feature_dim": feature_dim}


# ----------------------------------------------------------------------------- entry point
def synth(format: str, out, users: int = DEFAULT_USERS, videos: int = DEFAULT_VIDEOS,
          interactions: int = DEFAULT_INTERACTIONS, seed: int = DEFAULT_SEED,
          feature_dim: int = DEFAULT_FEATURE_DIM, progress: bool = True, overwrite: bool = False) -> dict:
    """Write a synthetic release of ``format`` ("segmm" or "kuairand") into the folder ``out``.

    ``interactions`` is the number of rows of the interaction file (for KuaiRand: raw log rows, most of
    them unclicked). Returns a summary: counts, the drop counts the reader must find, files and sizes,
    seconds. ``out`` must not exist or be empty unless ``overwrite``.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    for name, val, lo in (("users", users, 1), ("videos", videos, 1), ("interactions", interactions, 1),
                          ("feature_dim", feature_dim, 1)):
        if int(val) != val or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if interactions < users:
        raise ValueError(f"interactions ({interactions}) must be >= users ({users})")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _io.remove_stale_temps(out.parent, out.name)  # left by a killed synth
    tmp = _io.temp_dir(out.parent, prefix=f".{out.name}.tmp-")  # unpredictable name, never a planted one
    bars = []
    try:
        world = _World(format, users, videos, seed)
        counts = _user_counts(format, users, interactions, world, seed)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=interactions, unit="rows", unit_scale=True, desc=f"synth {format} rows")
            bars.append(bar)
        stats = _write_rows(format, tmp, world, counts, seed, bar)
        summary = {"format": format, "out": str(out), "seed": seed, "users": users, "videos": videos,
                   "rows": stats["rows"], "rows_kept": stats["kept"], "dropped": stats["dropped"],
                   "pairs": stats["pairs"], "ground_truth_rows": stats["gt_rows"]}
        kept_per_user = stats["users_rows"]
        thr = 100 if format == "segmm" else 20
        summary["users_with_rows"] = int((kept_per_user > 0).sum())
        summary[f"users_ge_{thr}"] = int((kept_per_user >= thr).sum())
        if format == "segmm":
            fbar = None
            if progress:
                from tqdm import tqdm

                fbar = tqdm(total=int(world.n_seg.sum()), unit="seg", unit_scale=True, desc="synth features")
                bars.append(fbar)
            summary.update(_write_features(tmp, world, feature_dim, seed, fbar))
        for b in bars:
            b.close()
        bars = []
        summary["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / "synth.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=1))
        _io.install_dir(tmp, out, overwrite=True)  # an existing out is swapped out, then deleted
    except BaseException:
        for b in bars:
            b.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
