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
# The public 10,000-row SegMM sample is not in the repository: its path comes from SEGFAST_SEGMM_SAMPLE
# (.ci/run sets it), by default ../shared/data beside the repo; the tests that need it skip without it.
SAMPLE_ENV = "SEGFAST_SEGMM_SAMPLE"
SAMPLE_CSV = Path(os.environ.get(SAMPLE_ENV) or SHARED_DATA / "SegMM_inter_sample.csv")
SAMPLE_SKIP = f"SegMM sample not found at {SAMPLE_CSV} (set {SAMPLE_ENV} to the SegMM_inter_sample.csv path)"


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
    """Path of the public SegMM sample; the test is skipped (one-line reason) where it is absent."""
    if not SAMPLE_CSV.is_file():
        pytest.skip(SAMPLE_SKIP)
    return SAMPLE_CSV


@pytest.fixture(scope="module")
def one_thread():
    """One torch CPU thread for a test module: deterministic and fast on a shared 2-core machine (the
    subprocesses that tests start get OMP_NUM_THREADS=1 too). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
