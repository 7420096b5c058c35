"""video_id_dropout="auto": the rule, the statistic it is decided on, and what a run records."""
import json

import numpy as np
import pytest

from segfast.model.config import (AUTO_DROPOUT_HIGH, AUTO_DROPOUT_LOW, ConfigError, ModelConfig,
                                  auto_video_id_dropout, model_preset)
from segfast.priors import single_row_video_share
from _fakes import prepared_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rule():
    assert (AUTO_DROPOUT_LOW, AUTO_DROPOUT_HIGH) == (0.1, 0.9)
    assert auto_video_id_dropout(0.875) == 0.9  # the real SegMM sample's share
    assert auto_video_id_dropout(0.135) == 0.1  # synthetic KuaiRand
    assert auto_video_id_dropout(0.5) == 0.1    # "more than half"
    assert auto_video_id_dropout(0.5001) == 0.9
    assert auto_video_id_dropout(None) == 0.1   # no statistic: a hand-built model
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="single_row_share"):
            auto_video_id_dropout(bad)


def test_share_hand_computed():
    # training rows (split 0) on videos 0, 0, 1, 2, 3, 3, 3 -> single-row videos 1 and 2: 2 of 7 rows;
    # the dev row on video 1 and the test row on video 4 do not count
    inter = {"split": np.array([0, 0, 0, 0, 0, 0, 0, 1, 2], dtype=np.int8),
             "video_idx": np.array([0, 0, 1, 2, 3, 3, 3, 1, 4], dtype=np.int32)}
    assert single_row_video_share(inter) == pytest.approx(2 / 7)
    assert single_row_video_share({"split": np.array([1, 2]), "video_idx": np.array([0, 0])}) == 0.0


def test_validation():
    assert ModelConfig().video_id_dropout == "auto"
    for ok in ("auto", 0, 0.0, 0.5, 0.9):
        ModelConfig(video_id_dropout=ok)
    for bad in ("Auto", "0.5", 1.0, -0.1, True, None):
        with pytest.raises(ConfigError, match="video_id_dropout"):
            ModelConfig(video_id_dropout=bad)


def test_resolution(tmp_path):
    p = prepared_world(tmp_path)
    share = single_row_video_share(p.interactions)
    want = auto_video_id_dropout(share)
    cfg = model_preset("small", modality="id").for_prepared(p)
    assert cfg.video_id_dropout == want and isinstance(cfg.video_id_dropout, float)
    # an explicit rate is kept whatever the data
    assert model_preset("small", modality="id", video_id_dropout=0.5).for_prepared(p).video_id_dropout == 0.5
    # a hand-built model without the statistic: the low rate, recorded in its config
    from segfast.model.model import SegInterestModel
    m = SegInterestModel(ModelConfig(modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16,
                                     n_users=p.n_users, n_videos=p.n_videos))
    assert m.config.video_id_dropout == 0.1 and m.id.rep.video_id_dropout == 0.1


def test_run_records_the_rate_and_explicit_twin_reuses_it(tmp_path):
    """segfast train with "auto" writes the resolved number; the same options with that number explicitly
    are the same run (so `segfast experiment` reuses runs trained either way)."""
    from segfast.model.config import train_preset
    from segfast.train import train

    p = prepared_world(tmp_path)
    want = auto_video_id_dropout(single_row_video_share(p.interactions))
    mc = model_preset("small", modality="id", d_model=16, n_heads=2, n_layers=1, d_ff=16)
    tc = train_preset("small", epochs=1, batch_size=16, eval_every=1000)
    run = tmp_path / "run"
    train(tmp_path / "p", run, mc, tc, progress=False, max_steps=2)
    saved = json.loads((run / "config.json").read_text())["model"]["video_id_dropout"]
    assert saved == want
    import dataclasses
    twin = dataclasses.replace(mc, video_id_dropout=want)
    train(tmp_path / "p", run, twin, tc, progress=False, max_steps=2)  # accepted as the same run (resumes)
    other = dataclasses.replace(mc, video_id_dropout=0.5 if want != 0.5 else 0.1)
    with pytest.raises(Exception, match="video_id_dropout"):
        train(tmp_path / "p", run, other, tc, progress=False, max_steps=2)
