"""Task 2, SegRec (SPEC section 8): video-level recommendation with segment-interest weights."""
from segfast.segrec.backbones import BACKBONES, DIN, VIDEO_POS, Backbone, WideDeep, make_backbone
from segfast.segrec.labels import EffectiveViewLabeler, effective_view_labels
from segfast.segrec.train import (WEIGHTINGS, SegRec, auc, binary_metrics, compare_weightings, f1_score,
                                  format_results, log_loss, masked_softmax, run_segrec)

__all__ = ["BACKBONES", "DIN", "VIDEO_POS", "Backbone", "WideDeep", "make_backbone", "EffectiveViewLabeler",
           "effective_view_labels", "WEIGHTINGS", "SegRec", "auc", "binary_metrics", "compare_weightings",
           "f1_score", "format_results", "log_loss", "masked_softmax", "run_segrec"]
