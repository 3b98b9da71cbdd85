"""Shared fixtures: offline mode, a fixed hypothesis profile, tiny models, the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "interp",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("interp")
# Under pytest-xdist (`make test` runs 2 workers) each worker gets one thread; tiny models
# are faster single-threaded anyway.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests, restored afterwards; a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``. Tiny matmuls gain
    nothing from threads, and on a busy 2-core machine two threads spin-wait and make them
    up to ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct model (cached after the first load)."""
    import interp

    try:
        return interp.load("smollm2-135m-instruct")
    except ImportError as exc:  # the package is installed by `make setup`
        pytest.skip(str(exc))
