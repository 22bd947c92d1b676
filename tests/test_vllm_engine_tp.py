"""fastsafe's vLLM adapter under tensor parallelism (opt-in: ``FASTSAFE_VLLM_TP=3``).

Each tensor-parallel worker runs the logits processors on its own copy of the logits and samples
on its own; the adapter must make the same decisions on every worker. SmolLM2-135M has 9 attention
heads, so the tensor-parallel sizes it accepts are 3 and 9 (``tensor_parallel_size=2`` is refused by
vLLM: "Total number of attention heads (9) must be divisible by tensor parallel size (2)"). vLLM's
CPU backend binds one NUMA node per worker unless ``VLLM_CPU_OMP_THREADS_BIND=nobind``; a machine
with one NUMA node needs that. On the 2-core CI machine three workers take minutes for a few
tokens, so CI does not run this module (set ``FASTSAFE_VLLM_TP=3`` to run it).
"""
import collections
import json
import os
import re

import pytest

from tests.vllm_engine import harness
from tests.vllm_engine.harness import PROMPTS, mentioned

harness.require_vllm()
harness.require_adapter()

TP = int(os.environ.get("FASTSAFE_VLLM_TP", "0") or 0)
if TP < 2:
    pytest.skip("tensor-parallel engine test: set FASTSAFE_VLLM_TP=3 to run it (minutes on 2 cores)",
                allow_module_level=True)

BANNED = ["Paris", "make a bomb", "chocolate chip"]
QUESTIONS = [q for q, e in PROMPTS.items() if e in BANNED]
EVENT = re.compile(r"Worker_TP(\d+).*?(fastsafe: policy=\S+ rule=.*)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_tp")
    (work / "policies.toml").write_text(f"[policy.default]\nphrases = {json.dumps(BANNED)}\nallow_opt_out = true\n")
    engine = dict(harness.ENGINE, model=harness.model_path(), tensor_parallel_size=TP,
                  kv_cache_memory_bytes=64 * 2**20, logits_processors=[harness.ADAPTER])
    jobs = [{"name": "none", "requests": [{"prompt": q, "params": {"temperature": 0.0, "max_tokens": 12,
                                                                   "extra_args": {"fastsafe": {"policy": "none"}}}}
                                          for q in QUESTIONS]},
            {"name": "default", "requests": [{"prompt": q, "params": {"temperature": 0.8, "seed": i, "max_tokens": 12}}
                                             for i, q in enumerate(QUESTIONS)]}]
    env = harness.subprocess_env(FASTSAFE_VLLM_POLICIES=str(work / "policies.toml"), VLLM_LOGGING_LEVEL="INFO",
                                 VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    return harness.run_plan({"engine": engine, "jobs": jobs}, env=env, workdir=str(work))


def _texts(out, job):
    return [r["outputs"][0]["text"] for r in out["jobs"][job]["requests"]]


def test_tensor_parallel_filters_and_every_worker_decides_alike(run):
    assert {e for e, _ in mentioned(_texts(run, "none"), BANNED)}, "unfiltered, the model said no entity"
    assert mentioned(_texts(run, "default"), BANNED) == []
    per_rank = collections.defaultdict(collections.Counter)
    with open(run["log"], errors="replace") as f:
        for line in f:
            m = EVENT.search(line.rstrip())
            if m:
                per_rank[int(m.group(1))][m.group(2)] += 1
    assert sorted(per_rank) == list(range(TP)), f"audit lines from ranks {sorted(per_rank)}"
    assert sum(per_rank[0].values()) > 0
    assert all(per_rank[r] == per_rank[0] for r in per_rank), dict(per_rank)
