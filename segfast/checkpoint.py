"""Run directories and checkpoints: safetensors + JSON only (never pickle).

Layout of a run directory::

    RUN/
      config.json          {"format": "segfast-run", "version": 1, "model": ModelConfig, "train": TrainConfig,
                            "data": data fingerprint (source, schema_version, seed, n_users, n_videos,
                            feature_dim, rows, splits)}
      model.safetensors    the exported weights (the best dev checkpoint when training ends or stops)
      metrics.json         summary (best step, best dev metrics, why training stopped, ...)
      metrics.jsonl        one JSON line per dev evaluation (written by segfast.train)
      last/                resume state: model.safetensors, optimizer.safetensors, rng.safetensors, state.json
      best/                best dev checkpoint: model.safetensors, state.json (no optimizer: resuming uses last/)
      calibration.json     keep-probability calibrators fitted on dev, one per checkpoint weights digest
                           (segfast.calibration; written when training finishes and by `segfast calibrate`)

Every safetensors file segfast writes carries ``__metadata__["segfast_sha256"]``, a digest of its tensors
(names, dtypes, shapes, bytes), checked on load when present, so a corrupt file is an error naming it even
where the safetensors header survives. A valid safetensors file without the digest (re-saved with
``safetensors.torch.save_file``, say) loads with a CheckpointWarning. Nothing is ever unpickled.

Single files are written to a temp name and renamed (``segfast._io``: the final mode is the one the umask
implies); the ``last/`` and ``best/`` directories are written whole into a temp directory and swapped in
(``.NAME.old`` is used if a crash left no ``NAME``).

RNG state: torch's CPU (and CUDA) generator states are uint8 tensors stored in ``rng.safetensors``; Python's
``random`` and NumPy's legacy global state go into ``state.json`` as lists of ints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from segfast import _io
from segfast.model.config import ConfigError, ModelConfig, TrainConfig

__all__ = ["CheckpointError", "CheckpointWarning", "RUN_FORMAT", "save_tensors", "load_tensors", "write_json", "read_json",
           "data_fingerprint", "write_run_config", "read_run_config", "save_model", "load_model_weights",
           "optimizer_tensors", "load_optimizer_tensors", "capture_rng", "restore_rng", "save_state",
           "load_state", "state_dir", "load_run", "check_compatible"]

RUN_FORMAT = "segfast-run"
RUN_VERSION = 1
_DIGEST_KEY = "segfast_sha256"
_CONFIG_KEY = "segfast_model_config"  # the model config the weights were built with (JSON, without "backend")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatching checkpoint file; the message names the file."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but cannot be fully verified (a safetensors file without segfast's digest)."""


# ----------------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------------

def _atomic_write_bytes_via(path: Path, writer) -> None:
    """``writer(tmp)`` writes the file; it is renamed onto ``path`` with the umask-implied mode (segfast._io)."""
    _io.write_with(path, writer)


def write_json(path, obj: Any) -> None:
    """Write JSON atomically (temp name, umask-implied mode, then os.replace)."""
    _io.write_json(path, obj, indent=2, sort_keys=True)


def read_json(path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Save a dict of tensors to ``path`` (safetensors, with a digest in the metadata), atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_DIGEST_KEY] = _digest(flat)
    _atomic_write_bytes_via(Path(path), lambda tmp: save_file(flat, tmp, metadata=meta))


def load_tensors(path, device="cpu") -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file written by :func:`save_tensors`; a missing, truncated or
    corrupt file is a CheckpointError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None
    want = meta.get(_DIGEST_KEY)
    if want is None:  # e.g. re-saved with safetensors.torch.save_file: readable, but nothing to verify against
        warnings.warn(f"{path}: no {_DIGEST_KEY} in the safetensors metadata (not written by segfast, or "
                      "re-saved); loading it without verifying its tensor data", CheckpointWarning, stacklevel=2)
    elif _digest(tensors) != want:
        raise CheckpointError(f"{path}: the tensor data does not match its digest (the file is corrupt)")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


# ----------------------------------------------------------------------------------------------------
# run config
# ----------------------------------------------------------------------------------------------------

def data_fingerprint(prepared) -> dict:
    """What identifies a prepared dataset for a run: source, schema, split seed, sizes and split counts."""
    m = prepared.manifest
    counts = m.get("counts", {})
    return {
        "source": m.get("source"),
        "schema_version": m.get("schema_version"),
        "seed": m.get("seed"),
        "n_users": int(prepared.n_users),
        "n_videos": int(prepared.n_videos),
        "feature_dim": prepared.feature_dim,
        "rows": int(counts.get("rows_kept", len(prepared))),
        "splits": counts.get("splits"),
        # sha256 of the id maps, interactions, features and visual histories (segfast._fingerprint)
        "content_sha256": prepared.content_fingerprint(),
    }


def write_run_config(run_dir, model_config: ModelConfig, train_config: Optional[TrainConfig],
                     data: Optional[dict]) -> None:
    write_json(Path(run_dir) / "config.json", {
        "format": RUN_FORMAT, "version": RUN_VERSION, "model": model_config.to_dict(),
        "train": None if train_config is None else train_config.to_dict(), "data": data})


def read_run_config(run_dir) -> dict:
    """{"model": ModelConfig, "train": TrainConfig | None, "data": dict | None, "raw": the JSON}."""
    path = Path(run_dir) / "config.json"
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a segfast run config (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    if raw.get("version") != RUN_VERSION:
        raise CheckpointError(f"{path}: run config version {raw.get('version')!r}, expected {RUN_VERSION}")
    try:
        mc = ModelConfig.from_dict(raw.get("model"))
        tc = None if raw.get("train") is None else TrainConfig.from_dict(raw["train"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {"model": mc, "train": tc, "data": raw.get("data"), "raw": raw}


# ----------------------------------------------------------------------------------------------------
# model and optimizer tensors
# ----------------------------------------------------------------------------------------------------

def _model_config_dict(model) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if not hasattr(cfg, "to_dict"):
        return None
    d = cfg.to_dict()
    d.pop("backend", None)  # an execution choice: any backend runs the same weights
    return d


def save_model(path, model: torch.nn.Module) -> None:
    """The weights, with the model config they were built with in the metadata (checked on load)."""
    meta = {"format": "segfast-model"}
    cfg = _model_config_dict(model)
    if cfg is not None:
        meta[_CONFIG_KEY] = json.dumps(cfg, sort_keys=True)
    save_tensors(path, model.state_dict(), meta)


def load_model_weights(path, model: torch.nn.Module) -> None:
    """Load ``path`` into ``model`` (strict: same names and shapes, and the same model config as the one the
    weights were saved with, when they record it), or raise a CheckpointError."""
    tensors, meta = load_tensors(path)
    saved, own_cfg = meta.get(_CONFIG_KEY), _model_config_dict(model)
    if saved is not None and own_cfg is not None:
        try:
            saved = json.loads(saved)
        except ValueError:
            raise CheckpointError(f"{path}: unreadable {_CONFIG_KEY} metadata") from None
        # a field added after these weights were saved (e.g. prior) reads as its default, as in config.json
        if dataclasses.is_dataclass(model.config) and isinstance(saved, dict):
            saved = {**{f.name: f.default for f in dataclasses.fields(model.config)
                        if f.name in own_cfg and f.default is not dataclasses.MISSING}, **saved}
        diff = sorted(k for k in set(saved) | set(own_cfg) if saved.get(k) != own_cfg.get(k))
        if diff:
            raise CheckpointError(f"{path}: the weights were built with another model config: "
                                  + ", ".join(f"{k} {saved.get(k)!r} (now {own_cfg.get(k)!r})" for k in diff)
                                  + " (was config.json edited? restore it, or train a new run)")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not match the model config: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{'...' if len(extra) > 5 else ''}")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape) or t.dtype != own[k].dtype:
            raise CheckpointError(f"{path}: tensor {k!r} is {t.dtype} {tuple(t.shape)}, the model expects "
                                  f"{own[k].dtype} {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    for m in model.modules():  # the position prior's table came with the weights (segfast.model.decoder)
        if hasattr(m, "prior_installed"):
            m.prior_installed = True


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        out.append([names[id(p)] for p in g["params"]])
    return out


def optimizer_tensors(model, optimizer) -> tuple[dict, dict]:
    """Flatten an optimizer's state: ({"<param>/<key>": tensor}, JSON-able {param_groups, names, scalars})."""
    sd = optimizer.state_dict()
    group_names = _param_names(model, optimizer)
    flat_names = [n for g in group_names for n in g]
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        pname = flat_names[idx]
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pname}/{key}"] = val
            else:
                scalars[f"{pname}/{key}"] = val
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "param_names": group_names, "scalars": scalars}


def load_optimizer_tensors(model, optimizer, tensors: dict, info: dict, where: str) -> None:
    group_names = _param_names(model, optimizer)
    if info.get("param_names") != group_names:
        raise CheckpointError(f"{where}: optimizer parameters do not match the model")
    flat_names = [n for g in group_names for n in g]
    state: dict = {}
    for key, t in tensors.items():
        pname, _, skey = key.rpartition("/")
        if pname not in flat_names:
            raise CheckpointError(f"{where}: optimizer state for unknown parameter {pname!r}")
        state.setdefault(flat_names.index(pname), {})[skey] = t
    for key, v in info.get("scalars", {}).items():
        pname, _, skey = key.rpartition("/")
        state.setdefault(flat_names.index(pname), {})[skey] = v
    groups = []
    start = 0
    for g, names in zip(info["param_groups"], group_names):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g["params"] = list(range(start, start + len(names)))
        start += len(names)
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: cannot restore the optimizer: {e}") from None


# ----------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------

def capture_rng(device=None) -> tuple[dict, dict]:
    """(tensors for rng.safetensors, JSON-able dict) holding torch, Python and NumPy global RNG states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(dev)
    v, st, gauss = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [v, list(st), gauss],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, js


def restore_rng(tensors: dict, js: dict, device=None) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"].to(torch.uint8), dev)
    if "python" in js:
        v, st, gauss = js["python"]
        random.setstate((v, tuple(st), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------------
# state directories (last/, best/)
# ----------------------------------------------------------------------------------------------------

def state_dir(run_dir, which: str) -> Optional[Path]:
    """The directory of checkpoint ``which`` ("last" / "best"), or its ``.NAME.old`` left by a crash
    during the swap; None when neither exists."""
    run_dir = Path(run_dir)
    d = run_dir / which
    if d.is_dir():
        return d
    old = run_dir / f".{which}.old"
    return old if old.is_dir() else None


def save_state(run_dir, which: str, model, state: dict, optimizer=None, device=None, rng: bool = True) -> Path:
    """Write RUN/<which>/ whole (model, optimizer, RNG, state.json) and swap it in atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _io.remove_stale_temps(run_dir, which)  # the temp directory of a save killed part-way (not .NAME.old)
    tmp = _io.temp_dir(run_dir, prefix=f".{which}.tmp-")  # mode as umask implies (mkdtemp alone: 0700)
    try:
        save_model(tmp / "model.safetensors", model)
        js = {"state": state}
        if optimizer is not None:
            ot, oinfo = optimizer_tensors(model, optimizer)
            save_tensors(tmp / "optimizer.safetensors", ot, {"format": "segfast-optimizer"})
            js["optimizer"] = oinfo
        if rng:
            rt, rjs = capture_rng(device)
            save_tensors(tmp / "rng.safetensors", rt, {"format": "segfast-rng"})
            js["rng"] = rjs
        write_json(tmp / "state.json", js)
        final = run_dir / which
        old = run_dir / f".{which}.old"
        if old.exists() and final.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(run_dir, which: str, model, optimizer=None, device=None, rng: bool = True) -> dict:
    """Load RUN/<which>/ into model (and optimizer, and the global RNGs); returns the saved ``state``."""
    d = state_dir(run_dir, which)
    if d is None:
        raise CheckpointError(f"{Path(run_dir) / which}: missing")
    js = read_json(d / "state.json")
    if not isinstance(js, dict) or "state" not in js:
        raise CheckpointError(f"{d / 'state.json'}: no 'state' field")
    load_model_weights(d / "model.safetensors", model)
    if optimizer is not None:
        path = d / "optimizer.safetensors"
        if "optimizer" not in js:
            raise CheckpointError(f"{d / 'state.json'}: no optimizer state (cannot resume from {d})")
        ot, _ = load_tensors(path)
        load_optimizer_tensors(model, optimizer, ot, js["optimizer"], str(path))
    if rng:
        if "rng" not in js:
            raise CheckpointError(f"{d / 'state.json'}: no RNG state")
        rt, _ = load_tensors(d / "rng.safetensors")
        restore_rng(rt, js["rng"], device)
    return js["state"]


# ----------------------------------------------------------------------------------------------------
# loading a run for use
# ----------------------------------------------------------------------------------------------------

def load_run(run_dir, which: str = "best", device="cpu"):
    """(model in eval mode on ``device``, meta) of a run. ``which``: "best" (best/ checkpoint, else the
    exported model.safetensors), "last" (last/), "final" (the exported RUN/model.safetensors).

    meta: {"model_config", "train_config", "data", "metrics" (metrics.json or None), "state" (or None),
    "weights" (the file loaded), "run_dir"}."""
    from segfast.model.model import SegInterestModel

    run_dir = Path(run_dir)
    if which not in ("best", "last", "final"):
        raise ValueError(f"which: expected 'best', 'last' or 'final', got {which!r}")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a directory")
    cfg = read_run_config(run_dir)
    state = None
    if which == "final":
        weights = run_dir / "model.safetensors"
    else:
        d = state_dir(run_dir, which)
        if d is None:
            if which == "best" and (run_dir / "model.safetensors").is_file():
                weights = run_dir / "model.safetensors"
            else:
                raise CheckpointError(f"{run_dir / which}: missing (no {which} checkpoint in this run)")
        else:
            weights = d / "model.safetensors"
            js = read_json(d / "state.json")
            state = js.get("state") if isinstance(js, dict) else None
    try:
        model = SegInterestModel(cfg["model"])
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: {e}") from None
    load_model_weights(weights, model)
    model.to(device)
    model.eval()
    mpath = run_dir / "metrics.json"
    metrics = read_json(mpath) if mpath.is_file() else None
    meta = {"model_config": cfg["model"], "train_config": cfg["train"], "data": cfg["data"], "metrics": metrics,
            "state": state, "weights": str(weights), "run_dir": str(run_dir)}
    return model, meta


def check_compatible(meta: dict, prepared) -> None:
    """Raise ValueError when the run's model cannot score this prepared dataset (modality needs features of
    the same dimension; ID embeddings need the same user / video index ranges)."""
    mc: ModelConfig = meta["model_config"] if isinstance(meta["model_config"], ModelConfig) \
        else ModelConfig.from_dict(meta["model_config"])
    where = f"{meta.get('run_dir', 'run')} vs {getattr(prepared, 'path', 'data')}"
    if mc.uses_visual:
        fd = prepared.feature_dim
        if fd is None:
            raise ValueError(f"{where}: the model is {mc.modality!r} (needs segment features) but the dataset "
                             "is ID-only")
        if fd != mc.feature_dim:
            raise ValueError(f"{where}: the model expects {mc.feature_dim}-dimensional features, the dataset has {fd}")
    if mc.uses_id:
        if prepared.n_users != mc.n_users or prepared.n_videos != mc.n_videos:
            raise ValueError(f"{where}: the model's ID embeddings cover {mc.n_users} users / {mc.n_videos} videos, "
                             f"the dataset has {prepared.n_users} / {prepared.n_videos} (a different dataset)")
        data = meta.get("data") or {}
        src = prepared.manifest.get("source")
        if data.get("source") not in (None, src):
            raise ValueError(f"{where}: the model was trained on source {data.get('source')!r}, the dataset is "
                             f"{src!r}; ID embeddings do not transfer")
    want = (meta.get("data") or {}).get("content_sha256")  # absent in runs trained before the fingerprint
    if want is not None and hasattr(prepared, "content_fingerprint"):
        got = prepared.content_fingerprint()
        if got != want:
            changed = getattr(prepared, "content_changed", None)
            why = (f"{changed} changed since prepare" if changed else "another dataset, or its files changed")
            raise ValueError(f"{where}: the run was trained on data with content fingerprint {want[:12]}..., "
                             f"the dataset's is {got[:12]}... ({why}); use the dataset the run was trained on")
