"""Shared pytest configuration.

FASTSAFE_REQUIRE_BACKENDS=cpp,triton (set by .ci/run) turns "backend unavailable" skips into
failures, so a broken native build cannot pass CI silently.
"""
import os
import threading

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


# Declared test dependencies (pyproject's `test` extra) must not be skipped away: with
# FASTSAFE_REQUIRE_TEST_DEPS=1 (set by .ci/run) a `pytest.importorskip` of one of them that
# fails is a failure, so a broken install (e.g. datasets not importing) cannot pass CI as skips.
_OPTIONAL_TEST_DEPS = {"deepspeed", "liger_kernel", "vllm"}   # heavy extras the suite uses where present (vllm: .venv-vllm)


def _missing_required_module(longrepr) -> str | None:
    if os.environ.get("FASTSAFE_REQUIRE_TEST_DEPS") != "1":
        return None
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if "could not import '" not in message:
        return None
    name = message.split("could not import '", 1)[1].split("'", 1)[0]
    return None if name.split(".")[0] in _OPTIONAL_TEST_DEPS else message


def _fail_required_skip(report) -> None:
    if report.skipped:
        message = _missing_required_module(report.longrepr)
        if message is not None:
            report.outcome = "failed"
            report.longrepr = f"a declared test dependency is missing (FASTSAFE_REQUIRE_TEST_DEPS=1): {message}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.fixture
def blocked_build(monkeypatch):
    """Full request-only builds wait for ``release`` (at most 30 s): a step that waited for one would
    leave the build finished, which the tests check it is not."""
    release = threading.Event()
    from fastsafe.integrations.vllm.built import RequestMatchers
    real = RequestMatchers._build

    def slow(self, key):
        release.wait(30)
        return real(self, key)
    monkeypatch.setattr(RequestMatchers, "_build", slow)
    yield release
    release.set()
