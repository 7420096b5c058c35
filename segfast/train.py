"""Training loop (SPEC section 5-6): AdamW, dev evaluation, early stopping, checkpoints, exact resume.

- Data order: the train loader shuffles with (seed, epoch) only (``segfast.data.batches``); rows with
  target 40 are left out of training (they carry no loss). DataLoaders get their own torch.Generator, so
  creating an iterator never touches the global RNG (dropout and the no-position shuffle use that one).
- Dev evaluation every ``eval_every`` steps and at the end of every epoch (``ranking_metrics`` with the
  interaction row numbers as tie-break ids); early stopping on dev NDCG@5 after ``patience`` evaluations
  without improvement; ``best/`` holds the best weights.
- ``last/`` (weights, AdamW state, RNG states, step / epoch / batch position, early-stopping state) is
  written at every evaluation and when ``max_steps`` stops the run. On resume the epoch's order is
  replayed from the seed and the consumed batches skipped, so a resumed run continues exactly as an
  uninterrupted one (bitwise on CPU).
- ``metrics.jsonl``: one line per evaluation {step, epoch, train_loss (mean since the previous line),
  dev {...}, pairs_per_s, elapsed_s}; on resume, lines newer than the checkpoint are dropped.
- When the run stops (epochs done, early stop, or max_steps), RUN/model.safetensors gets the best weights
  (the current ones if no evaluation happened yet) and RUN/metrics.json the summary.
  A finished run (not one stopped by max_steps) also gets RUN/calibration.json: the calibrator of the best
  checkpoint fitted on dev (segfast.calibration; the summary's "calibration" says which form, or the error).

Several processes (``torchrun --nproc-per-node K -m segfast train ...``; WORLD_SIZE > 1 in the environment):

- The process group is started from the environment (``segfast.distributed``: gloo on CPU, nccl on CUDA, where
  ``--device cuda`` means ``cuda:LOCAL_RANK``) and the model is wrapped in DistributedDataParallel
  (``find_unused_parameters`` only when a probe step finds parameters without gradient, e.g. the self-only
  and no-attention ablations leave the user-side representation unused).
- Every rank draws the same global batches as a single process (``batch_size`` rows, order from (seed,
  epoch)); rank r takes the r-th of ``world_size`` contiguous slices (``np.array_split``). ``batch_size``
  must be divisible by the world size. A rank whose slice of a short last batch is empty runs one stand-in
  row with loss weight 0, so that it still joins DDP's gradient reduction.
- Loss weighting: the loss is a mean over kept rows (target < 40). Rank r's loss is multiplied by
  ``kept_r / kept_global * world_size`` (kept counts all-reduced each step) before backward; DDP averages the
  gradients over the ranks, so the result is the gradient of the mean over the global batch's kept rows, i.e.
  of single-process training on the same batch, up to fp32 reduction order. The logged loss is the
  kept-weighted mean over ranks (all-reduced, so every rank sees the same value and a non-finite loss stops
  all of them).
- Dropout and the no-position shuffle draw from the global RNG, which each rank reseeds every step from
  (seed, rank, step): ranks draw different masks (a rank's slice would otherwise repeat rank 0's masks), and
  a resumed run continues the same streams. With dropout > 0 the masks differ from a single process's, so
  only ``dropout=0`` runs match single-process training.
- Rank 0 alone evaluates dev, writes ``last/``, ``best/``, metrics and the summary, and shows the progress
  bar; its early-stopping decision (and any error) is broadcast so that all ranks stop together. The other
  ranks never write into the run directory. On resume every rank loads ``last/`` (on several nodes the run
  directory must be on a shared filesystem). The number of processes may change between sessions.

Precision (``precision``, ``--precision``; ``segfast.precision``): "fp32", "bf16" or "fp16"; None / "auto" =
bf16 on CUDA, fp32 on CPU for a new run, and the run's own on resume. The forward and the loss (and the dev
evaluations) run under ``torch.autocast``; weights, gradients and AdamW state stay fp32; fp16 uses a GradScaler
(dynamic loss scaling, gradients unscaled before clipping) whose state is saved in ``last/state.json``. The
precision is recorded in ``config.json`` ("precision") and in the summary; resuming with another precision is
refused (RunDirError), so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from segfast import MAX_SLOTS
from segfast import distributed as sfdist
from segfast import precision as sfprec
from segfast.checkpoint import (CheckpointError, data_fingerprint, load_state, read_json, read_run_config,
                                save_model, save_state, state_dir, write_json, write_run_config)
from segfast.model.config import ModelConfig, TrainConfig
from segfast.model.model import SegInterestModel, batch_to

__all__ = ["train", "train_from_args", "configs_from_args", "RunDirError", "TrainDataError", "evaluate_dev"]

# fields that may differ when resuming a run
_RESUME_FREE_MODEL = {"backend"}
_RESUME_FREE_TRAIN = {"device", "num_workers", "eval_batch_size"}


class RunDirError(ValueError):
    """The output directory holds something else than a resumable run of this config and data."""


class TrainDataError(ValueError):
    """The data cannot be trained on (empty split, non-finite features); the message says where."""


class _SkipSampler(torch.utils.data.Sampler):
    def __init__(self, base, skip: int):
        self.base, self.skip = base, int(skip)

    def __len__(self):
        return max(len(self.base) - self.skip, 0)

    def __iter__(self):
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        yield from it


class _ShardSampler(torch.utils.data.Sampler):
    """Yields (this rank's contiguous slice of each global batch of ``base``, its number of real rows).

    An empty slice (a last batch shorter than the world size) becomes the batch's first row with 0 real
    rows: the rank still runs forward/backward (DDP needs every rank in each gradient reduction) and weights
    that row's loss by 0."""

    def __init__(self, base, rank: int, world_size: int):
        self.base, self.rank, self.world_size = base, int(rank), int(world_size)

    def __len__(self):
        return len(self.base)

    def __iter__(self):
        for rows in self.base:
            part = np.array_split(rows, self.world_size)[self.rank]
            if part.size:
                yield part, int(part.size)
            else:
                yield rows[:1], 0


class _ShardDataset(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __getitem__(self, item):
        rows, n_real = item
        return self.base[rows], n_real


class _LossModule(torch.nn.Module):
    """What DDP wraps: forward(batch) = model.loss(batch) (DDP hooks only ``forward``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The global-RNG seed of (seed, rank, step) under DDP (a 64-bit SeedSequence draw)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(rank), int(step)])
    return int(ss.generate_state(1, np.uint64)[0])


def _unused_parameters(model, batch) -> list:
    """Names of the trainable parameters that get no gradient from model.loss(batch) (a probe step; the
    caller reseeds the RNG before training)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _, loss = model.loss(batch)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def _dist_device(device_str: str, info) -> torch.device:
    """This rank's device: 'cuda' -> cuda:LOCAL_RANK; an explicit other CUDA index is refused."""
    device = torch.device(sfdist.device_for(device_str, info))
    if device.type == "cuda" and device.index is not None and device.index != info.local_rank:
        raise ValueError(f"TrainConfig.device={device_str!r} under torchrun: rank {info.rank} has LOCAL_RANK="
                         f"{info.local_rank}, so its device is cuda:{info.local_rank}; pass --device cuda")
    return device


@contextlib.contextmanager
def _deterministic(device: torch.device):
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    # On CUDA some kernels (embedding backward, index_add) have no deterministic version: warn, don't fail.
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _diff(a: dict, b: dict, free: set) -> list:
    keys = (set(a) | set(b)) - free
    return [f"{k}: {a.get(k)!r} (run) vs {b.get(k)!r} (now)" for k in sorted(keys) if a.get(k) != b.get(k)]


def _run_precision(out: Path) -> Optional[str]:
    """The precision a run in ``out`` was trained with ("fp32" for runs from before precision was recorded);
    None when ``out`` holds no run config."""
    if not (out / "config.json").is_file():
        return None
    try:
        raw = read_json(out / "config.json")
    except CheckpointError:
        return None
    return raw.get("precision", "fp32") if isinstance(raw, dict) else None


def _record_precision(out: Path, precision: str) -> None:
    """Add "precision" to RUN/config.json (written atomically)."""
    raw = read_json(out / "config.json")
    raw["precision"] = precision
    write_json(out / "config.json", raw)


def _check_out_dir(out: Path, mc: ModelConfig, tc: TrainConfig, data: dict, precision: Optional[str] = None) -> bool:
    """True when ``out`` is a resumable run of this config (resume), False when it is new/empty.
    ``precision``: the one asked for (None = whatever the run has)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return False
    if not (out / "config.json").is_file():
        raise RunDirError(f"{out}: not empty and not a segfast run (no config.json); use an empty or new "
                          "output directory")
    try:
        cfg = read_run_config(out)
    except CheckpointError as e:
        raise RunDirError(f"{out}: cannot resume: {e}") from None
    diffs = _diff(cfg["model"].to_dict(), mc.to_dict(), _RESUME_FREE_MODEL)
    diffs += _diff(cfg["train"].to_dict() if cfg["train"] else {}, tc.to_dict(), _RESUME_FREE_TRAIN)
    # a run from before the content fingerprint resumes (its config has no content_sha256 to compare)
    free_data = set() if "content_sha256" in (cfg["data"] or {}) else {"content_sha256"}
    diffs += [f"data {d}" for d in _diff(cfg["data"] or {}, data, free_data)]
    had = cfg["raw"].get("precision", "fp32")
    if precision not in (None, "auto") and had != precision:
        diffs.append(f"precision: {had!r} (run) vs {precision!r} (now); resume with --precision {had}")
    if diffs:
        raise RunDirError(f"{out}: holds a run of a different configuration or dataset; differences: "
                          + "; ".join(diffs) + ". Use another output directory.")
    return state_dir(out, "last") is not None


def _check_finite(batch: dict, data_dir, store=None) -> None:
    for key in ("video_feat", "user_feat"):
        t = batch.get(key)
        if t is None and store is not None and key + "_rows" in batch:  # row indices: the store's finite rows
            rows = batch[key + "_rows"]
            ok = torch.from_numpy(store.finite_rows()[rows.numpy()].reshape(rows.shape[0], -1).all(axis=1))
        elif t is None:
            continue
        else:
            ok = torch.isfinite(t).flatten(1).all(dim=1)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            row = int(batch["row"][i])
            raise TrainDataError(f"{data_dir}: non-finite value (NaN/inf) in the segment features of interaction "
                                 f"row {row} ({'target video' if key == 'video_feat' else 'visual user history'}, "
                                 f"batch key {key!r}); re-prepare the dataset from clean features")


def evaluate_dev(model: SegInterestModel, loader, device, seed: int, data_dir="", precision: str = "fp32") -> dict:
    """Ranking metrics of ``model`` over the rows of ``loader`` (eval mode, under ``precision``'s autocast;
    restores the mode)."""
    from segfast.evaluate import ranking_metrics

    was = model.training
    model.eval()
    logits, target, nseg, rows = [], [], [], []
    try:
        with torch.no_grad():
            for batch in loader:
                _check_finite(batch, data_dir, getattr(model, "feature_store", None))
                with sfprec.autocast(device, precision):
                    out = model(batch_to(batch, device))
                logits.append(out.float().cpu())
                target.append(batch["target"])
                nseg.append(batch["n_segments"])
                rows.append(batch["row"])
    finally:
        model.train(was)
    if not logits:
        raise TrainDataError(f"{data_dir}: the dev split yielded no batches")
    return ranking_metrics(torch.cat(logits), torch.cat(target), torch.cat(nseg), seed=seed,
                           row_ids=torch.cat(rows))


def _rewrite_jsonl(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    keep = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
            if rec.get("step", 0) <= max_step:
                keep.append(line)
    from segfast import _io

    _io.write_text(path, "".join(x + "\n" for x in keep))


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train(data_dir, out_dir, model_config: ModelConfig, train_config: TrainConfig, progress: bool = True,
          max_steps: Optional[int] = None, precision: Optional[str] = None) -> dict:
    """Train a SegInterestModel on the prepared dataset ``data_dir`` into the run directory ``out_dir``.

    ``max_steps`` stops after that many optimizer steps in total (counting steps of earlier sessions of a
    resumed run) and leaves a resumable ``last/``. Calling again with the same arguments resumes.
    Returns the summary also written to RUN/metrics.json.

    Under torchrun (WORLD_SIZE > 1) this trains with DistributedDataParallel (see the module docstring);
    every rank returns the summary.

    ``precision``: "fp32", "bf16", "fp16", or None / "auto" (bf16 on CUDA, fp32 on CPU for a new run; the
    run's recorded precision on resume). See the module docstring."""
    tc = train_config.validate()
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps: expected None or an integer >= 0, got {max_steps!r}")
    info = sfdist.env_info()
    if not info.distributed:
        device = torch.device(tc.device)
    else:
        if tc.batch_size % info.world_size:
            raise ValueError(f"TrainConfig.batch_size={tc.batch_size} is not divisible by WORLD_SIZE="
                             f"{info.world_size}: each global batch is split into {info.world_size} equal "
                             f"slices, one per process; use a multiple of {info.world_size} (--batch-size)")
        device = _dist_device(tc.device, info)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TrainConfig.device={tc.device!r} but CUDA is not available")
    if precision is not None and precision != "auto":
        precision = sfprec.resolve_precision(precision, device)
    with sfdist.process_group(str(device)) as info:
        return _train(data_dir, out_dir, model_config, tc, progress, max_steps, device, info, precision)


def _train(data_dir, out_dir, model_config: ModelConfig, tc: TrainConfig, progress: bool,
           max_steps: Optional[int], device: torch.device, info, precision: Optional[str] = None) -> dict:
    from tqdm.auto import tqdm

    from segfast.data.batches import make_loader
    from segfast.data.prepared import load_prepared

    ddp = info.distributed
    rank0 = info.rank == 0
    prepared = load_prepared(data_dir)
    mc = model_config.for_prepared(prepared)  # sizes, and video_id_dropout="auto" resolved from the data
    data = data_fingerprint(prepared)
    out = Path(out_dir)
    if ddp:  # only rank 0 looks at the run directory (a refusal there raises on every rank)
        resume = bool(sfdist.on_rank0(lambda: _check_out_dir(out, mc, tc, data, precision),
                                      "checking the run directory"))
    else:
        resume = _check_out_dir(out, mc, tc, data, precision)
    if precision in (None, "auto"):  # a new run: the device's default; a resume: the run's own
        precision = (_run_precision(out) if resume else None) or sfprec.default_precision(device)
    precision = sfprec.resolve_precision(precision, device)
    sfprec.check_backend(precision, mc.backend)

    target = np.asarray(prepared.interactions["target"])
    for split in ("train", "dev"):
        rows = prepared.rows(split)
        if rows.size == 0 or not (target[rows] < MAX_SLOTS).any():
            raise TrainDataError(f"{data_dir}: split {split!r} has no usable rows ({rows.size} rows, none with "
                                 f"target < {MAX_SLOTS}); cannot train")

    features = mc.uses_visual
    store = None
    if features:  # the features on the training device; batches carry row indices (segfast.features)
        from segfast.features import FeatureStore
        store = FeatureStore(prepared.features, device)
    gen = torch.Generator().manual_seed(tc.seed)
    loader_kw = dict(features=features, num_workers=tc.num_workers, exclude_full_40=True,
                     max_user_tokens=mc.max_user_tokens, generator=gen, pin_memory=device.type == "cuda",
                     feature_rows=store is not None and store.resident)
    train_loader = make_loader(prepared, "train", tc.batch_size, shuffle=True, seed=tc.seed, **loader_kw)
    dev_loader = make_loader(prepared, "dev", tc.eval_batch_size or 2 * tc.batch_size, shuffle=False, **loader_kw)
    steps_per_epoch = len(train_loader)

    metrics_path = out / "metrics.jsonl"
    with _deterministic(device):
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        model = SegInterestModel(mc).to(device)
        model.set_seen_videos(np.asarray(prepared.videos["n_train"]) > 0)  # a resume reloads the same flags
        if mc.prior != "none":  # the position prior's table from the training split (a resume reloads it)
            from segfast.priors import compute_priors
            model.install_prior(compute_priors(prepared.interactions, mc.prior, mc.n_users, mc.prior_strength))
        model.set_feature_store(store)
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        scaler = sfprec.grad_scaler(device, precision)  # fp16 only
        st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_ndcg5": None, "best_step": None,
              "best_dev": None, "bad_evals": 0, "finished": False, "stopped": None, "loss_sum": 0.0,
              "loss_n": 0, "evals": 0}
        if resume and not ddp:
            st = load_state(out, "last", model, optimizer=opt, device=device)
            sfprec.load_scaler_state(scaler, st.get("grad_scaler"), str(out / "last" / "state.json"))
            _rewrite_jsonl(metrics_path, st["step"])
            if st.get("finished"):
                summary_path = out / "metrics.json"
                return read_json(summary_path) if summary_path.is_file() else st
        elif resume:  # every rank loads last/; a rank that cannot makes all of them raise
            err = None
            try:
                st = load_state(out, "last", model, optimizer=opt, device=device)
                sfprec.load_scaler_state(scaler, st.get("grad_scaler"), str(out / "last" / "state.json"))
            except Exception as e:  # noqa: BLE001 -- re-raised after the others are told
                err = e
            if not sfdist.all_ok(err is None):
                if err is not None:
                    raise RuntimeError(f"rank {info.rank}: cannot load {out / 'last'} to resume ({err}); every "
                                       "rank reads the run directory on resume, so with several nodes it must "
                                       "be on a shared filesystem") from err
                raise RuntimeError(f"rank {info.rank}: another rank could not load {out / 'last'} to resume "
                                   "(see its error)")
            if rank0:
                _rewrite_jsonl(metrics_path, st["step"])
            if st.get("finished"):
                summary_path = out / "metrics.json"
                return read_json(summary_path) if summary_path.is_file() else st
        else:
            def new_run():
                out.mkdir(parents=True, exist_ok=True)
                write_run_config(out, mc, tc, data)
                _record_precision(out, precision)
                if metrics_path.exists():
                    metrics_path.unlink()
            if ddp:
                sfdist.on_rank0(new_run, "creating the run directory")
            else:
                new_run()

        net = model
        if ddp:
            probe = batch_to(train_loader.dataset[train_loader.sampler.rows[:2]], device)
            unused = _unused_parameters(model, probe)
            del probe
            find_unused = not sfdist.all_ok(not unused)
            net = torch.nn.parallel.DistributedDataParallel(
                _LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused)

        def finite_weights():
            """A non-finite weight (an update that overflowed although its loss was finite) stops the run
            before it is evaluated or saved: last/ and best/ keep the previous, finite state."""
            bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
            if bad is not None:
                raise FloatingPointError(f"non-finite weights ({bad}) after step {st['step']} (epoch {st['epoch']}); "
                                         "try a lower lr or grad_clip")

        def checkpoint():
            finite_weights()
            if scaler is not None:
                st["grad_scaler"] = sfprec.scaler_state(scaler)
            save_state(out, "last", model, st, optimizer=opt, device=device)

        def finish(stopped: str) -> dict:
            st["stopped"] = stopped
            st["finished"] = stopped != "max_steps"
            checkpoint()
            best = state_dir(out, "best")
            if best is not None:
                import shutil

                from segfast import _io
                _io.write_with(out / "model.safetensors", lambda tmp: shutil.copyfile(best / "model.safetensors", tmp))
            else:
                save_model(out / "model.safetensors", model)
            summary = {"step": st["step"], "epoch": st["epoch"], "stopped": stopped, "finished": st["finished"],
                       "best_step": st["best_step"], "best_dev": st["best_dev"], "evals": st["evals"],
                       "steps_per_epoch": steps_per_epoch, "precision": precision, "model": mc.to_dict(),
                       "train": tc.to_dict()}
            if st["finished"]:  # the calibrator of the best checkpoint, fitted on dev (segfast.calibration)
                summary["calibration"] = _calibrate_run(out, prepared, device, precision, tc)
            write_json(out / "metrics.json", summary)
            return summary

        t_last = time.perf_counter()
        t0 = t_last
        pairs_since = 0

        def evaluate() -> bool:
            """Dev evaluation + metrics line + checkpoints; True when early stopping triggers."""
            nonlocal t_last, pairs_since
            finite_weights()
            try:
                dev = evaluate_dev(model, dev_loader, device, tc.seed, data_dir, precision)
            except ValueError as e:  # finite but huge weights overflow in the forward: NaN logits
                if "NaN" not in str(e):
                    raise
                raise FloatingPointError(f"non-finite model output at the dev evaluation after step {st['step']} "
                                         f"(epoch {st['epoch']}): {e}; try a lower lr or grad_clip") from None
            now = time.perf_counter()
            loss = st["loss_sum"] / st["loss_n"] if st["loss_n"] else None
            rec = {"step": st["step"], "epoch": st["epoch"], "train_loss": loss, "dev": dev,
                   "pairs_per_s": pairs_since / max(now - t_last, 1e-9), "elapsed_s": now - t0}
            st["loss_sum"], st["loss_n"] = 0.0, 0
            st["evals"] += 1
            score = dev.get("NDCG@5")
            improved = score is not None and (st["best_ndcg5"] is None or score > st["best_ndcg5"])
            if improved:
                st["best_ndcg5"], st["best_step"], st["best_dev"], st["bad_evals"] = score, st["step"], dev, 0
                save_state(out, "best", model, {"step": st["step"], "epoch": st["epoch"], "dev": dev}, rng=False)
            else:
                st["bad_evals"] += 1
            rec["best_step"] = st["best_step"]
            _append_jsonl(metrics_path, rec)
            stop = st["bad_evals"] >= tc.patience
            checkpoint()
            t_last, pairs_since = time.perf_counter(), 0
            return stop

        if ddp:  # rank 0 evaluates and writes; the others get its decision / summary (or its error)
            def stop_run(stopped: str) -> dict:
                return sfdist.on_rank0(lambda: finish(stopped), f"finishing the run ({stopped})")

            def eval_step() -> bool:
                return bool(sfdist.on_rank0(evaluate, "dev evaluation"))

            def checkpoint_step() -> None:
                sfdist.on_rank0(checkpoint, "writing last/")
        else:
            stop_run, eval_step, checkpoint_step = finish, evaluate, checkpoint

        planned = steps_per_epoch * tc.epochs  # the lr schedule's length (max_steps only cuts a run short)
        total = planned
        if max_steps is not None:
            total = min(total, max_steps)
        bar = tqdm(total=total, initial=min(st["step"], total), desc="train", unit="step",
                   disable=not (progress and rank0), dynamic_ncols=True)
        net.train()
        try:
            while st["epoch"] < tc.epochs:
                if max_steps is not None and st["step"] >= max_steps:
                    return stop_run("max_steps")
                train_loader.set_epoch(st["epoch"])
                if ddp:
                    sampler = train_loader.sampler
                    if st["batch_in_epoch"]:
                        sampler = _SkipSampler(sampler, st["batch_in_epoch"])
                    it = torch.utils.data.DataLoader(
                        _ShardDataset(train_loader.dataset), batch_size=None, num_workers=tc.num_workers,
                        generator=gen, sampler=_ShardSampler(sampler, info.rank, info.world_size),
                        pin_memory=device.type == "cuda")
                elif st["batch_in_epoch"]:
                    it = torch.utils.data.DataLoader(
                        train_loader.dataset, batch_size=None, num_workers=tc.num_workers, generator=gen,
                        sampler=_SkipSampler(train_loader.sampler, st["batch_in_epoch"]),
                        pin_memory=device.type == "cuda")
                else:
                    it = train_loader
                evaluated_at = None
                for batch in it:
                    if ddp:
                        batch, n_real = batch
                        kept = int((batch["target"] < MAX_SLOTS).sum()) if n_real else 0
                        try:
                            _check_finite(batch, data_dir, store)
                            bad = None
                        except TrainDataError as e:  # raised on every rank after the all_reduce below
                            bad = e
                    else:
                        _check_finite(batch, data_dir, store)
                    batch = batch_to(batch, device, non_blocking=True)
                    if ddp:
                        torch.manual_seed(_step_seed(tc.seed, info.rank, st["step"]))
                        kept_g, rows_g, bad_g = sfdist.all_reduce_sum([kept, n_real, bad is not None])
                        if bad_g:
                            raise bad or TrainDataError(
                                f"{data_dir}: another rank found non-finite segment features in its slice of "
                                f"the batch of step {st['step'] + 1}; see that rank's error")
                        # mean over this rank's kept rows -> its share of the global mean; DDP divides by world
                        weight = kept / kept_g * info.world_size if kept_g else 0.0
                        with sfprec.autocast(device, precision):
                            _, loss = net(batch)
                        opt.zero_grad(set_to_none=True)
                        scaled = loss * weight
                    else:
                        with sfprec.autocast(device, precision):
                            _, loss = model.loss(batch)
                        opt.zero_grad(set_to_none=True)
                        scaled = loss
                    loss = loss.float()  # fp32 already (the reference loss upcasts); logged and checked in fp32
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    if scaler is not None and tc.grad_clip is not None:
                        scaler.unscale_(opt)  # clip the true gradients
                    if tc.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    lr_now = tc.lr_at(st["step"], planned)
                    for group in opt.param_groups:
                        group["lr"] = lr_now
                    if scaler is not None:
                        scaler.step(opt)  # skipped when the scaled gradients overflowed
                        scaler.update()
                    else:
                        opt.step()
                    if ddp:
                        lsum = sfdist.all_reduce_sum([float(loss.detach()) * kept if kept else 0.0])[0]
                        lv = lsum / kept_g if kept_g else 0.0
                        b = int(rows_g)
                    else:
                        lv = float(loss.detach())
                        b = int(batch["target"].shape[0])
                    if not math.isfinite(lv):
                        raise FloatingPointError(f"non-finite training loss {lv} at step {st['step'] + 1} "
                                                 f"(epoch {st['epoch']}); try a lower lr or grad_clip")
                    st["step"] += 1
                    st["batch_in_epoch"] += 1
                    st["loss_sum"] += lv * b
                    st["loss_n"] += b
                    pairs_since += b
                    bar.update(1)
                    if progress:
                        el = max(time.perf_counter() - t_last, 1e-9)
                        bar.set_postfix(loss=f"{lv:.4f}", pairs_s=f"{pairs_since / el:.0f}",
                                        best=st["best_ndcg5"], refresh=False)
                    if st["step"] % tc.eval_every == 0:
                        evaluated_at = st["step"]
                        if eval_step():
                            return stop_run("early_stop")
                    if max_steps is not None and st["step"] >= max_steps:
                        return stop_run("max_steps")
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
                if evaluated_at == st["step"]:
                    checkpoint_step()  # already evaluated at this step; record the epoch boundary
                elif eval_step():
                    return stop_run("early_stop")
            return stop_run("epochs")
        finally:
            bar.close()


def _calibrate_run(out: Path, prepared, device, precision: str, tc: TrainConfig) -> dict:
    """Fit RUN/calibration.json for the best checkpoint on dev at the end of a finished run; a failure is
    recorded in the summary (with the command that retries it) rather than failing the finished run."""
    from segfast.calibration import CALIBRATION_FILE, calibrate_run

    try:
        cal = calibrate_run(out, prepared.path, which="best", device=str(device), prepared=prepared,
                            batch_size=tc.eval_batch_size or 2 * tc.batch_size, precision=precision)
    except ValueError as e:  # CalibrationError, CheckpointError and bad dev data are ValueErrors
        import warnings

        warnings.warn(f"{out}: the run finished but its calibration failed ({e}); retry with "
                      f"segfast calibrate --run-dir {out} --data {prepared.path}")
        return {"error": str(e)}
    return {"file": CALIBRATION_FILE, "form": cal.form, "feature": cal.feature, "checkpoint": cal.checkpoint,
            "fitted_on": cal.fitted_on}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as cpu / cross-only


def configs_from_args(a) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) from the ``segfast train`` arguments: the preset, then the named options,
    then every ``--set FIELD=VALUE`` (VALUE parsed as JSON, else a string; FIELD of either config)."""
    from dataclasses import fields

    from segfast.model.config import ConfigError, model_preset, train_preset

    mfields = {f.name for f in fields(ModelConfig)}
    tfields = {f.name for f in fields(TrainConfig)}
    m_over = {"modality": a.modality}
    device = a.device
    if device == "auto":  # the CLI's default (segfast.cli resolves it too): CUDA when available
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t_over = {"device": device}
    for name, dest in (("loss", m_over), ("ablation", m_over), ("backend", m_over), ("epochs", t_over),
                       ("batch_size", t_over), ("lr", t_over), ("seed", t_over), ("eval_every", t_over),
                       ("patience", t_over)):
        v = getattr(a, name, None)
        if v is not None:
            dest[name] = v
    for item in getattr(a, "set", None) or []:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        if key in mfields:
            m_over[key] = _parse_value(val)
        elif key in tfields:
            t_over[key] = _parse_value(val)
        else:
            raise ConfigError(f"--set {item!r}: unknown field {key!r}; model fields {sorted(mfields)}, "
                              f"train fields {sorted(tfields)}")
    return model_preset(a.preset, **m_over), train_preset(a.preset, **t_over)


def train_from_args(a) -> dict:
    """``segfast train``: configs from the CLI arguments, then :func:`train`."""
    mc, tc = configs_from_args(a)
    return train(a.data, a.out, mc, tc, progress=not getattr(a, "quiet", False),
                 max_steps=getattr(a, "max_steps", None), precision=getattr(a, "precision", None))
