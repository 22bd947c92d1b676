"""Shared pytest configuration.

FASTSAFE_REQUIRE_BACKENDS=cpp,triton (set by .ci/run) turns "backend unavailable" skips into
failures, so a broken native build cannot pass CI silently.
"""
import os

import pytest
import torch

from tests import deprecations

deprecations.install()        # deprecations triggered by fastsafe's own calls fail (see pyproject filterwarnings)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_backend(name: str):
    """Skip (or fail, when FASTSAFE_REQUIRE_BACKENDS lists it) if ``name`` is unavailable."""
    from fastsafe.ops import backends
    info = backends()[name]
    if info.available:
        return
    required = {b.strip() for b in os.environ.get("FASTSAFE_REQUIRE_BACKENDS", "").split(",") if b.strip()}
    if name in required:
        pytest.fail(f"backend {name!r} is required (FASTSAFE_REQUIRE_BACKENDS) but unavailable: {info.reason}")
    pytest.skip(f"backend {name!r} unavailable: {info.reason}")


@pytest.fixture
def backend_required():
    return require_backend
