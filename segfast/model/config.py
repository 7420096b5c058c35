"""Model and training configuration: one object travels from the CLI into the model and the checkpoint.

Presets (every field overridable):

- ``paper-code``: the authors' code sizes, d 512, 16 heads, 6 layers, d_ff 512, dropout 0.1,
  batch 1024 (SPEC section 5).
- ``small``: a CPU demo size, d 64, 4 heads, 2 layers, d_ff 128 (2 d), dropout 0.1, batch 256.

``n_users``, ``n_videos`` and ``feature_dim`` describe the data; ``segfast.train.train`` fills them from
the prepared dataset (:meth:`ModelConfig.for_data`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from segfast.ops import BACKENDS  # ("torch", "sdpa", "triton"): one list for the ops, the config and the CLI
from segfast.priors import PRIORS  # ("none", "global", "user", "exposure"): position priors, docs/model.md

__all__ = ["auto_video_id_dropout", "ModelConfig", "TrainConfig", "ConfigError", "PRESETS", "MODALITIES", "ABLATIONS", "LOSSES",
           "PRIORS", "model_preset", "train_preset"]

MODALITIES = ("id", "visual", "both")
ABLATIONS = ("none", "cross-only", "self-only", "no-attention", "no-position")
LOSSES = ("bpr-max", "bpr-max-literal", "pairwise", "bce")
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and what was expected."""


# video_id_dropout="auto" (docs/model.md, "video_id_dropout: measured, and the auto rule"): most training rows on
# videos with a single training row (the real SegMM sample: 87.5%) -> a video embedding can memorise its row, and
# the high rate won there (5 seeds); a few (synthetic KuaiRand 13.5%, the demo data 0.8%) -> the low rate
AUTO_DROPOUT_SHARE = 0.5
AUTO_DROPOUT_LOW, AUTO_DROPOUT_HIGH = 0.1, 0.9


def auto_video_id_dropout(single_row_share: Optional[float]) -> float:
    """The rate ``video_id_dropout="auto"`` stands for: AUTO_DROPOUT_HIGH (0.9) when more than half of the
    training rows are on videos with exactly one training row, else AUTO_DROPOUT_LOW (0.1); 0.1 without the
    statistic (None: a model built by hand, not by segfast train)."""
    if single_row_share is None:
        return AUTO_DROPOUT_LOW
    share = float(single_row_share)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"single_row_share={single_row_share!r}: expected a share in [0, 1]")
    return AUTO_DROPOUT_HIGH if share > AUTO_DROPOUT_SHARE else AUTO_DROPOUT_LOW



def _from_dict(cls, d: dict, what: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


class _JsonConfig:
    """JSON round trip and presets shared by the config dataclasses."""

    _what = "config"
    _part = "model"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        return _from_dict(cls, d, cls._what)

    @classmethod
    def from_json(cls, s: str):
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls._what}: invalid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        return _preset(name, cls._part, cls, overrides)


@dataclass
class ModelConfig(_JsonConfig):
    _what, _part = "model config", "model"
    modality: str = "id"
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    fusion_heads: int = 2
    max_slots: int = 40
    max_user_tokens: int = 100
    feature_dim: Optional[int] = None
    n_users: int = 0
    n_videos: int = 0
    ablation: str = "none"
    loss: str = "bpr-max"
    backend: str = "torch"
    pos_init: float = 1.0  # initial value of the per-slot position-bias vectors a and c (SPEC: 1)
    # training rate of replacing a row's video embedding by the unknown-video one; "auto": from the training
    # split's share of rows on single-row videos (auto_video_id_dropout; docs/model.md, "video_id_dropout")
    video_id_dropout: Union[float, str] = "auto"
    feature_rescale: bool = True  # multiply the L1-normalised features by feature_dim (representation.py)
    slot_types: bool = True  # mark real / completed-pseudo-slot / padding slots (representation.py)
    prior: str = "none"  # position prior: "none", "global", "user" (offsets), "exposure" (the authors' form)
    prior_strength: float = 5.0  # shrinkage pseudo-rows of the per-user hazards toward the global ones

    def __post_init__(self) -> None:
        self.validate(require_data=False)

    # ---------------------------------------------------------------- validation
    @property
    def uses_id(self) -> bool:
        return self.modality in ("id", "both")

    @property
    def uses_visual(self) -> bool:
        return self.modality in ("visual", "both")

    def validate(self, require_data: bool = True) -> "ModelConfig":
        """Raise ConfigError on an inconsistent config. ``require_data``: n_users / n_videos /
        feature_dim must be filled for the modality (needed to build the model)."""
        def bad(name, msg):
            raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {msg}")

        if self.modality not in MODALITIES:
            bad("modality", f"expected one of {MODALITIES}")
        if self.ablation not in ABLATIONS:
            bad("ablation", f"expected one of {ABLATIONS}")
        if self.loss not in LOSSES:
            bad("loss", f"expected one of {LOSSES}")
        if self.backend not in BACKENDS:
            bad("backend", f"expected one of {BACKENDS}")
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "fusion_heads", "max_slots", "max_user_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "n_layers" else 1):
                bad(name, "expected a positive integer" if name != "n_layers" else "expected an integer >= 0")
        vd = self.video_id_dropout
        if not (vd == "auto" or (isinstance(vd, (int, float)) and not isinstance(vd, bool) and 0.0 <= float(vd) < 1.0)):
            bad("video_id_dropout", "expected \"auto\" or a number in [0, 1)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= float(self.dropout) < 1.0):
            bad("dropout", "expected a float in [0, 1)")
        for name in ("slot_types", "feature_rescale"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "expected true or false")
        if not isinstance(self.pos_init, (int, float)) or isinstance(self.pos_init, bool):
            bad("pos_init", "expected a number")
        if self.prior not in PRIORS:
            bad("prior", f"expected one of {PRIORS}")
        if isinstance(self.prior_strength, bool) or not isinstance(self.prior_strength, (int, float)) \
                or not (math.isfinite(float(self.prior_strength)) and float(self.prior_strength) >= 0):
            bad("prior_strength", "expected a finite number >= 0")
        if self.d_model % self.n_heads:
            bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if self.uses_id and self.d_model % 2:
            bad("d_model", "must be even for the ID representation ([video embedding (d/2) ; slot (d/2)])")
        if self.modality == "both" and self.d_model % self.fusion_heads:
            bad("d_model", f"must be divisible by fusion_heads={self.fusion_heads} for the bilinear fusion")
        if self.max_slots != 40:
            bad("max_slots", "the data format has 40 slots per video")
        if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim < 1):
            bad("feature_dim", "expected None or a positive integer")
        for name in ("n_users", "n_videos"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "expected an integer >= 0")
        if require_data:
            if self.uses_visual and self.feature_dim is None:
                bad("feature_dim", f"modality {self.modality!r} needs segment features (feature_dim)")
            if self.uses_id and (self.n_users < 1 or self.n_videos < 1):
                raise ConfigError(f"ModelConfig: modality {self.modality!r} needs n_users >= 1 and "
                                  f"n_videos >= 1, got {self.n_users} and {self.n_videos}")
            if self.prior == "user" and self.n_users < 1:
                bad("prior", "the per-user prior needs n_users >= 1 (the data's users)")
        return self

    def for_data(self, n_users: int, n_videos: int, feature_dim: Optional[int],
                 single_row_share: Optional[float] = None) -> "ModelConfig":
        """This config with the data sizes filled in (and checked against any already set), and
        ``video_id_dropout="auto"`` resolved from ``single_row_share`` (the share of training rows whose video
        has exactly one training row; None: no statistics, the low rate; see :func:`auto_video_id_dropout`)."""
        if self.uses_visual:
            if feature_dim is None:
                raise ConfigError(f"modality {self.modality!r} needs segment features, but the data is ID-only")
            if self.feature_dim is not None and self.feature_dim != feature_dim:
                raise ConfigError(f"ModelConfig.feature_dim={self.feature_dim} but the data has "
                                  f"{feature_dim}-dimensional features")
        for name, v in (("n_users", n_users), ("n_videos", n_videos)):
            cur = getattr(self, name)
            if cur not in (0, v):
                raise ConfigError(f"ModelConfig.{name}={cur} but the data has {v}")
        cfg = dataclasses.replace(self, n_users=int(n_users), n_videos=int(n_videos),
                                  feature_dim=int(feature_dim) if self.uses_visual else None)
        return cfg.resolved(single_row_share).validate(require_data=True)

    def for_prepared(self, prepared) -> "ModelConfig":
        """:meth:`for_data` with a prepared dataset's sizes and its training split's single-row-video share
        (what ``segfast train`` builds a run's model config with)."""
        from segfast.priors import single_row_video_share
        return self.for_data(prepared.n_users, prepared.n_videos, prepared.feature_dim,
                             single_row_share=single_row_video_share(prepared.interactions))

    def resolved(self, single_row_share: Optional[float] = None) -> "ModelConfig":
        """This config with ``video_id_dropout="auto"`` replaced by its rate (unchanged otherwise)."""
        if self.video_id_dropout != "auto":
            return self
        return dataclasses.replace(self, video_id_dropout=auto_video_id_dropout(single_row_share))



@dataclass
class TrainConfig(_JsonConfig):
    _what, _part = "train config", "train"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 10
    eval_every: int = 500          # steps between dev evaluations (also at the end of every epoch)
    patience: int = 5              # dev evaluations without NDCG@5 improvement before stopping
    seed: int = 0
    device: str = "cpu"
    grad_clip: Optional[float] = None   # max global grad norm, None = off
    eval_batch_size: Optional[int] = None  # default: 2 * batch_size
    num_workers: int = 0
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to lr_min_ratio * lr over the planned steps)
    warmup_steps: int = 0          # linear warm-up from lr / warmup_steps to lr over the first steps
    lr_min_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based) of a run planned for ``total_steps`` steps.

        A pure function of the step, so a resumed run continues the schedule exactly (no scheduler state)."""
        lr = float(self.lr)
        if self.warmup_steps and step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return lr
        span = max(total_steps - self.warmup_steps, 1)
        frac = min(max(step - self.warmup_steps, 0) / span, 1.0)
        lo = lr * float(self.lr_min_ratio)
        return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def validate(self) -> "TrainConfig":
        def bad(name, msg):
            raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: {msg}")

        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            bad("lr", "expected a positive number")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            bad("weight_decay", "expected a number >= 0")
        for name in ("batch_size", "epochs", "eval_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "expected a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "expected an integer >= 0")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            bad("grad_clip", "expected None or a positive number")
        if self.eval_batch_size is not None and (not isinstance(self.eval_batch_size, int)
                                                 or self.eval_batch_size < 1):
            bad("eval_batch_size", "expected None or a positive integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "expected an integer >= 0")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "expected 'cpu' or 'cuda[:n]'")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"expected one of {list(LR_SCHEDULES)}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            bad("warmup_steps", "expected an integer >= 0")
        if not (isinstance(self.lr_min_ratio, (int, float)) and 0.0 <= float(self.lr_min_ratio) <= 1.0):
            bad("lr_min_ratio", "expected a number in [0, 1]")
        return self



PRESETS = {
    "paper-code": {
        "model": dict(d_model=512, n_heads=16, n_layers=6, d_ff=512, dropout=0.1),
        "train": dict(lr=1e-3, weight_decay=1e-4, batch_size=1024),
    },
    "small": {
        "model": dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.1),
        "train": dict(lr=1e-3, weight_decay=1e-4, batch_size=256),
    },
}


def _preset(name: str, part: str, cls, overrides: dict):
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    d = dict(PRESETS[name][part])
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    d.update({k: v for k, v in overrides.items()})
    return cls(**d)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig of preset ``name`` ("paper-code" or "small") with fields overridden."""
    return _preset(name, "model", ModelConfig, overrides)


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig of preset ``name`` with fields overridden."""
    return _preset(name, "train", TrainConfig, overrides)
