"""Checkpoint files: segfast's tensor digest is verified when present; a valid safetensors file without it
(e.g. re-saved with ``safetensors.torch.save_file``) loads with a warning; nothing is ever unpickled."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import segfast
from segfast import checkpoint as ck


def _tiny_run(run_dir):
    from segfast.model.config import model_preset

    mc = model_preset("small", modality="id", n_users=3, n_videos=5, d_model=8, d_ff=8, n_heads=2)
    model = segfast.SegInterestModel(mc)
    ck.write_run_config(run_dir, mc, None, None)
    ck.save_model(run_dir / "model.safetensors", model)
    return model


def _resave_without_digest(path):
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    assert ck._DIGEST_KEY in meta
    save_file(tensors, str(path))  # no metadata at all
    with safe_open(str(path), framework="pt", device="cpu") as f:
        assert ck._DIGEST_KEY not in (f.metadata() or {})
    return tensors


def test_digest_verified_when_present(tmp_path):
    p = tmp_path / "t.safetensors"
    ck.save_tensors(p, {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with its digest loads silently
        t, meta = ck.load_tensors(p)
    assert torch.equal(t["a"], torch.arange(6, dtype=torch.float32)) and ck._DIGEST_KEY in meta
    # flip one byte of tensor data (the header stays valid): the digest catches it
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(ck.CheckpointError, match="does not match its digest"):
        ck.load_tensors(p)


def test_resaved_file_without_digest_loads_with_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model = _tiny_run(run)
    tensors = _resave_without_digest(run / "model.safetensors")
    with pytest.warns(ck.CheckpointWarning, match="no segfast_sha256"):
        loaded, meta = segfast.load_run(run)
    assert meta["weights"].endswith("model.safetensors") and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tensors[k]) and torch.equal(v, model.state_dict()[k])


def test_a_pickle_is_never_unpickled(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    model = _tiny_run(run)
    (run / "model.safetensors").write_bytes(pickle.dumps(model.state_dict()))

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors file"):
        segfast.load_run(run)


def test_public_api():
    import subprocess
    import sys

    from segfast.model.config import ModelConfig
    from segfast.model.model import SegInterestModel

    assert segfast.ModelConfig is ModelConfig and segfast.SegInterestModel is SegInterestModel
    assert {"SegInterestModel", "ModelConfig", "load_run"} <= set(segfast.__all__)
    assert "(model, meta)" in segfast.load_run.__doc__ and "SegInterestModel" in segfast.__doc__
    with pytest.raises(AttributeError):
        segfast.no_such_thing  # noqa: B018
    # ``import segfast`` stays light: no torch until a model class or load_run is used
    r = subprocess.run([sys.executable, "-c", "import sys, segfast; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
