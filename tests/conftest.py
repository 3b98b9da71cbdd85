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


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct model (cached after the first load)."""
    import interp

    try:
        return interp.load("smollm2-135m-instruct")
    except ImportError as exc:  # the package is installed by `make setup`
        pytest.skip(str(exc))
