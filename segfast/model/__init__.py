"""The segment-level interest model (SPEC section 5)."""
from segfast.model.config import (ABLATIONS, LOSSES, MODALITIES, PRESETS, ConfigError, ModelConfig, TrainConfig,
                                  model_preset, train_preset)
from segfast.model.model import SegInterestModel, batch_to

__all__ = ["ModelConfig", "TrainConfig", "ConfigError", "PRESETS", "MODALITIES", "ABLATIONS", "LOSSES",
           "model_preset", "train_preset", "SegInterestModel", "batch_to"]
