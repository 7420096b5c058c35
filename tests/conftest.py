"""Test set-up: the Triton interpreter when no GPU is present, GPU-only markers, shared data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        # Must happen before triton is imported anywhere: kernels then run in the interpreter on CPU.
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_CSV = SHARED_DATA / "SegMM_inter_sample.csv"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    if not SAMPLE_CSV.exists():
        pytest.fail(f"the public SegMM sample is expected at {SAMPLE_CSV} (../shared/data beside the repo)")
    return SAMPLE_CSV
